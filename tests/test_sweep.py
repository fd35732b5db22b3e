"""`memseg sweep`: the runs of the DVC train stages, several at a time, finished ones skipped,
interrupted ones resumed, a run trained with other params refused."""

import fcntl
import json
from pathlib import Path

import pytest

from memseg_bench.config import config_from_dict, config_hash, load_config
from memseg_bench.errors import UserError
from memseg_bench.runs import RunSpec, config_for_run
from memseg_bench.sweep import plan, sweep_runs, train_command
from tests.project import TINY_PARAMS, make_project, memseg

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = [(ROOT / "dvc.yaml", ROOT / "params.yaml")] + [
    (folder / "dvc.yaml", folder / "params.yaml")
    for folder in sorted((ROOT / "pipelines").iterdir())
]


@pytest.mark.parametrize("pipeline, params", PIPELINES, ids=lambda p: p.parent.name)
def test_sweep_runs_are_the_train_stages_outputs(pipeline, params):
    Repo = pytest.importorskip("dvc.repo").Repo  # the GPU machines run the package without dvc

    stages = [s for s in Repo(str(ROOT)).index.stages if Path(s.path) == pipeline]
    trained = [
        str(out.def_path).split("/")[1]
        for stage in stages
        if " train " in f" {stage.cmd} "
        for out in stage.outs
        if not str(out.def_path).endswith(".csv")
    ]
    assert trained, pipeline
    assert [spec.name for spec in sweep_runs(load_config(params))] == trained


def test_sweep_runs_hold_ablations_and_no_run_twice():
    sweep = {**TINY_PARAMS["sweep"], "n_labeled": [6, 24], "seeds": [0, 1]}
    sweep.update(ablations=["no_quality_filter"], ablation_seeds=[1], full_seeds=[0, 1])
    names = [s.name for s in sweep_runs(config_from_dict({**TINY_PARAMS, "sweep": sweep}))]
    assert len(names) == len(set(names)) == 3 * 2 * 2 + 1
    assert names[:2] == ["supervised-n6-s0", "supervised-n6-s1"]
    assert names[-1] == "memseg+no_quality_filter-n6-s1"
    assert "supervised-n24-s1" in names  # in n_labeled and full_n_labeled: once


def test_train_command_resumes_and_names_the_variant():
    spec = RunSpec("memseg", "random", 6, 2, "no_quality_filter")
    command = train_command(spec, Path("p.yaml"), Path("r"), Path("c"), resume=True)
    assert command[1:4] == ["-m", "memseg_bench", "train"]
    text = " ".join(command[4:])
    assert text == (
        "--method memseg --n-labeled 6 --seed 2 --variant no_quality_filter "
        "--params p.yaml --runs-dir r --curves-dir c --resume"
    )
    assert "--resume" not in train_command(spec, Path("p"), Path("r"), Path("c"), False)


def test_plan_marks_done_resume_and_new_and_refuses_other_params(tmp_path):
    config = config_from_dict(TINY_PARAMS)
    specs = sweep_runs(config)
    done, partial = specs[0], specs[1]
    (tmp_path / done.name).mkdir()
    summary = {"provenance": {"config_hash": config_hash(config_for_run(config, done))}}
    (tmp_path / done.name / "train.json").write_text(json.dumps(summary))
    (tmp_path / partial.name).mkdir()
    (tmp_path / partial.name / "checkpoint.pt").write_bytes(b"")
    states = {item.spec.name: item.state for item in plan(config, tmp_path)}
    assert states[done.name] == "done" and states[partial.name] == "resume"
    assert {states[s.name] for s in specs[2:]} == {"new"}

    summary["provenance"]["config_hash"] = "0" * 16
    (tmp_path / done.name / "train.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match=f"{done.name} was trained with other params"):
        plan(config, tmp_path)


def test_sweep_trains_two_at_once_then_skips_them_and_reports_a_failed_run(tmp_path):
    params = {
        **TINY_PARAMS,
        "train": {**TINY_PARAMS["train"], "iterations": 4, "val_every": 4},
        "sweep": {**TINY_PARAMS["sweep"], "methods": ["supervised"]},
    }
    project = make_project(tmp_path / "p", params)
    memseg(project, "prepare")
    first = memseg(project, "sweep", "--jobs", "2")
    lines = first.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["start", "start", "done", "done"], lines
    for run in ("supervised-n6-s0", "supervised-n24-s0"):
        assert (project / "runs" / run / "model.pt").exists()
        assert (project / "logs" / "runs" / f"{run}.log").exists()
        assert (project / "reports" / "curves" / f"{run}.csv").exists()
    again = memseg(project, "sweep", "--jobs", "2", "--list")
    assert again.stdout.split() == ["done", "supervised-n6-s0", "done", "supervised-n24-s0"]
    assert "start" not in memseg(project, "sweep").stdout

    with (project / "runs" / ".sweep.lock").open("w") as lock:  # a sweep still running
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = memseg(project, "sweep", check=False)
    assert busy.returncode == 1 and "another memseg sweep is training into runs" in busy.stderr

    (project / "runs" / "supervised-n24-s0" / "train.json").unlink()
    (project / "runs" / "supervised-n24-s0" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    failed = memseg(project, "sweep", check=False)
    assert "start supervised-n24-s0 (resumed)" in failed.stdout
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert failed.returncode == 1 and len(errors) == 1, failed.stderr
    assert "supervised-n24-s0 exited 1, see logs/runs/supervised-n24-s0.log" in errors[0]


def test_sweep_rejects_zero_jobs(tmp_path):
    project = make_project(tmp_path / "p", draw=False)
    result = memseg(project, "sweep", "--jobs", "0", check=False)
    assert result.returncode == 1 and "--jobs must be 1 or more" in result.stderr
