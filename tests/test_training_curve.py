"""The training curve records every validation at the step it was made."""

import copy

from memseg_bench.figures import read_curve
from tests.project import TINY_PARAMS, make_project, memseg


def test_validation_between_log_steps_gets_its_own_row(tmp_path):
    params = copy.deepcopy(TINY_PARAMS)
    params["train"].update({"iterations": 12, "log_every": 4, "val_every": 6})
    project = make_project(tmp_path / "p", params)
    memseg(project, "prepare")
    memseg(project, "train", "--method", "supervised", "--n-labeled", "6", "--seed", "0")
    curve = read_curve(project / "reports" / "curves" / "supervised-n6-s0.csv")
    assert list(curve["step"]) == [4, 6, 8, 12]
    validated = [int(s) for s, v in zip(curve["step"], curve["val_miou"], strict=True) if v == v]
    assert validated == [6, 12]
    assert all(v == v for v in curve["loss"])  # a validation row carries the losses too
