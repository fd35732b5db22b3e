"""A run killed with SIGKILL and resumed ends exactly like an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from memseg_bench.checkpoint import load as load_checkpoint
from tests.project import make_project, memseg


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model_state"]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    project = make_project(tmp_path / "p")
    memseg(project, "prepare")
    args = ["train", "--method", "memseg", "--n-labeled", "6", "--seed", "0"]
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
    checkpoint = project / "runs_b" / "memseg-n6-s0" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (project / "runs_b" / "memseg-n6-s0" / "model.pt").exists()
    stopped_at = load_checkpoint(checkpoint)["step"]
    assert 0 < stopped_at < 16

    memseg(project, *args, "--runs-dir", "runs_b", "--curves-dir", "curves_b", "--resume")

    a, b = (
        _state(project / "runs_a/memseg-n6-s0/model.pt"),
        _state(project / "runs_b/memseg-n6-s0/model.pt"),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    summary_a = json.loads((project / "runs_a/memseg-n6-s0/train.json").read_text())
    summary_b = json.loads((project / "runs_b/memseg-n6-s0/train.json").read_text())
    assert summary_a["steps"] == summary_b["steps"] == 16
    assert summary_a["best_val"] == summary_b["best_val"]
    for runs in ("runs_a", "runs_b"):
        memseg(project, "evaluate", "--run", f"{runs}/memseg-n6-s0", "--metrics-dir", runs + "_m")
    metrics_a = json.loads((project / "runs_a_m/memseg-n6-s0.json").read_text())
    metrics_b = json.loads((project / "runs_b_m/memseg-n6-s0.json").read_text())
    assert metrics_a["miou"] == metrics_b["miou"]
    assert metrics_a["per_class_iou"] == metrics_b["per_class_iou"]
    columns = ("step", "loss", "loss_sup", "loss_contr_lab", "bank_fill")
    curve_a = (project / "curves_a/memseg-n6-s0.csv").read_text().splitlines()
    curve_b = (project / "curves_b/memseg-n6-s0.csv").read_text().splitlines()
    header = curve_a[0].split(",")
    keep = [header.index(c) for c in columns if c in header]
    assert [[r.split(",")[i] for i in keep] for r in curve_a] == [
        [r.split(",")[i] for i in keep] for r in curve_b
    ]
