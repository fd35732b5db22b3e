"""A run killed with SIGKILL and resumed ends exactly like an uninterrupted run; the positive
controls' students export with parity and without their training-only perturbation."""

import json
import os
import signal
import subprocess
import sys
import time

import onnx
import pytest
import torch

from memseg_bench.checkpoint import load as load_checkpoint
from tests.project import make_project, memseg


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model_state"]


# Operators a graph would need for dropout or any random draw.
RANDOM_OPS = {"Dropout", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike",
              "Bernoulli", "Multinomial"}  # fmt: skip


@pytest.mark.parametrize("method", ["memseg", "fixmatch", "unimatch"])
def test_sigkill_then_resume_matches_uninterrupted(method, tmp_path):
    project = make_project(tmp_path / "p")
    memseg(project, "prepare")
    run = f"{method}-n6-s0"
    args = ["train", "--method", method, "--n-labeled", "6", "--seed", "0"]
    memseg(project, *args, "--runs-dir", "runs_a", "--curves-dir", "curves_a")

    killed = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memseg_bench",
            *args,
            "--runs-dir",
            "runs_b",
            "--curves-dir",
            "curves_b",
        ],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = project / "runs_b" / run / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (project / "runs_b" / run / "model.pt").exists()
    stopped_at = load_checkpoint(checkpoint)["step"]
    assert 0 < stopped_at < 16

    memseg(project, *args, "--runs-dir", "runs_b", "--curves-dir", "curves_b", "--resume")

    a, b = (
        _state(project / "runs_a" / run / "model.pt"),
        _state(project / "runs_b" / run / "model.pt"),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    summary_a = json.loads((project / "runs_a" / run / "train.json").read_text())
    summary_b = json.loads((project / "runs_b" / run / "train.json").read_text())
    assert summary_a["steps"] == summary_b["steps"] == 16
    assert summary_a["best_val"] == summary_b["best_val"]
    if method == "memseg":  # equal weights score equally; checked end to end once
        for runs in ("runs_a", "runs_b"):
            memseg(project, "evaluate", "--run", f"{runs}/{run}", "--metrics-dir", runs + "_m")
        metrics_a = json.loads((project / "runs_a_m" / f"{run}.json").read_text())
        metrics_b = json.loads((project / "runs_b_m" / f"{run}.json").read_text())
        assert metrics_a["miou"] == metrics_b["miou"]
        assert metrics_a["per_class_iou"] == metrics_b["per_class_iou"]
    columns = ("step", "loss", "loss_sup", "loss_contr_lab", "bank_fill", "loss_strong",
               "loss_feature", "pseudo_above_tau")  # fmt: skip
    curve_a = (project / "curves_a" / f"{run}.csv").read_text().splitlines()
    curve_b = (project / "curves_b" / f"{run}.csv").read_text().splitlines()
    header = curve_a[0].split(",")
    keep = [header.index(c) for c in columns if c in header]
    assert [[r.split(",")[i] for i in keep] for r in curve_a] == [
        [r.split(",")[i] for i in keep] for r in curve_b
    ]
    if method == "memseg":
        return
    from memseg_bench.export import export_onnx

    onnx_path = project / "models" / "student.onnx"
    report = export_onnx(
        project / "runs_a" / run / "model.pt", onnx_path, project / "check.json", [[32, 32]]
    )
    assert report["passed"] and report["max_abs_diff"] <= 1e-3
    graph = onnx.load(onnx_path).graph
    assert not {node.op_type for node in graph.node} & RANDOM_OPS
