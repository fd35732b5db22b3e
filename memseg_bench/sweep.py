"""`memseg sweep`: the training runs of a params file's sweep, several at a time, for a machine
with room for more than one (two one-thread runs on a 2-core CPU, several on one GPU). Each run is
the `memseg train` command of its DVC train stage: a finished run is skipped, a run with a
checkpoint resumes from it, and a finished run trained with other params stops the sweep before
anything starts. `dvc commit` then records the runs, and `dvc repro` goes on from evaluation."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from memseg_bench.config import Config, config_hash
from memseg_bench.errors import UserError
from memseg_bench.runs import RunSpec, config_for_run

POLL_S = 1.0


def sweep_runs(config: Config) -> list[RunSpec]:
    """The runs of the sweep in the order of the pipeline's train stages: methods x label counts x
    seeds, the full-label supervised runs, the memseg ablations."""
    sweep, family = config.sweep, config.split.family
    runs = [
        RunSpec(method, family, n, seed)
        for method in sweep.methods
        for n in sweep.n_labeled
        for seed in sweep.seeds
    ]
    runs += [RunSpec("supervised", family, sweep.full_n_labeled, seed) for seed in sweep.full_seeds]
    runs += [
        RunSpec("memseg", family, sweep.ablation_n_labeled, seed, variant)
        for variant in sweep.ablations
        for seed in sweep.ablation_seeds
    ]
    return list(dict.fromkeys(runs))  # a full-label count may also be one of n_labeled


@dataclass(frozen=True)
class Planned:
    spec: RunSpec
    state: str  # "done", "resume" (a checkpoint is there) or "new"


def plan(config: Config, runs_dir: Path) -> list[Planned]:
    """Each run's state; a UserError when a finished run was trained with other params."""
    planned = []
    for spec in sweep_runs(config):
        run_dir = runs_dir / spec.name
        summary = run_dir / "train.json"
        if summary.exists():
            stored = json.loads(summary.read_text())["provenance"]["config_hash"]
            wanted = config_hash(config_for_run(config, spec))
            if stored != wanted:
                raise UserError(
                    f"{run_dir} was trained with other params (config hash {stored}, these give "
                    f"{wanted}); move it away or restore the params it used"
                )
            planned.append(Planned(spec, "done"))
        else:
            state = "resume" if (run_dir / "checkpoint.pt").exists() else "new"
            planned.append(Planned(spec, state))
    return planned


def train_command(
    spec: RunSpec, params: Path, runs_dir: Path, curves_dir: Path, resume: bool
) -> list[str]:
    command = [sys.executable, "-m", "memseg_bench", "train", "--method", spec.method,
               "--n-labeled", str(spec.n_labeled), "--seed", str(spec.seed)]  # fmt: skip
    if spec.variant is not None:
        command += ["--variant", spec.variant]
    command += ["--params", str(params), "--runs-dir", str(runs_dir), "--curves-dir",
                str(curves_dir)]  # fmt: skip
    return command + (["--resume"] if resume else [])


def run_sweep(
    planned: list[Planned],
    params: Path,
    runs_dir: Path,
    curves_dir: Path,
    logs_dir: Path,
    jobs: int,
    echo=print,
) -> list[str]:
    """Train the runs not done, `jobs` at a time, each logging to logs_dir/<run>.log; returns the
    failed runs' lines (run, exit status, log). Interrupted, it stops its runs, which resume from
    their last checkpoint next time."""
    if jobs < 1:
        raise UserError(f"--jobs must be 1 or more, got {jobs}")
    logs_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    with (runs_dir / ".sweep.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another memseg sweep is training into {runs_dir}") from None
        return _run(planned, params, runs_dir, curves_dir, logs_dir, jobs, echo)


def _run(planned, params, runs_dir, curves_dir, logs_dir, jobs, echo) -> list[str]:
    waiting = [p for p in planned if p.state != "done"]
    running: dict[str, tuple[subprocess.Popen, Path, float]] = {}
    failed = []
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                item = waiting.pop(0)
                log = logs_dir / f"{item.spec.name}.log"
                command = train_command(
                    item.spec, params, runs_dir, curves_dir, item.state == "resume"
                )
                with log.open("a") as out:
                    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
                running[item.spec.name] = (process, log, time.perf_counter())
                echo(f"start {item.spec.name}{' (resumed)' if item.state == 'resume' else ''}")
            time.sleep(POLL_S)
            for name, (process, log, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                minutes = (time.perf_counter() - started) / 60
                if process.returncode == 0:
                    echo(f"done  {name} in {minutes:.1f} min")
                else:
                    failed.append(f"{name} exited {process.returncode}, see {log}")
                    echo(f"FAIL  {failed[-1]}")
    finally:
        for process, _, _ in running.values():
            process.terminate()
        for process, _, _ in running.values():
            process.wait()
    return failed
