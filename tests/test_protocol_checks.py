"""The protocol checks that `memseg report` prints: plateau from validation curves, headroom
between label counts, and the paired gain with its interval."""

import pytest
import torch

from memseg_bench.config import ReportConfig
from memseg_bench.methods.selftrain import pseudo_label_quality
from memseg_bench.protocol_checks import describe, last_part_gain, protocol_checks
from memseg_bench.tables import paired_gain, stats


def curve(values, every=40):
    steps = [every * (i + 1) for i in range(len(values))]
    return {"step": steps, "val_miou": values}


def test_last_fifth_gain_reads_the_validations_in_the_last_fifth():
    # 10 validations every 40 steps up to 400: the last fifth starts at step 320
    rising = curve([0.1 * i for i in range(10)])
    assert last_part_gain(rising) == {"from_step": 320, "to_step": 400, "gain": pytest.approx(20.0)}
    flat = curve([0.3, 0.4, 0.5, 0.55, 0.56, 0.56, 0.57, 0.575, 0.578, 0.58])
    assert last_part_gain(flat)["gain"] == pytest.approx(0.5)
    assert last_part_gain(curve([0.5])) is None  # one validation: nothing to compare
    every_72 = {"step": [72, 144, 216, 288, 360], "val_miou": [0.1, 0.2, 0.3, 0.40, 0.41]}
    assert last_part_gain(every_72) == {
        "from_step": 288,
        "to_step": 360,
        "gain": pytest.approx(1.0),
    }
    assert last_part_gain({"step": [1, 2], "val_miou": [float("nan")] * 2}) is None


def cell(method_values, seeds=(0, 1, 2), n=10, method="m"):
    return stats(method_values, [f"{method}-n{n}-s{s}" for s in seeds], seeds)


def main_data(sup_low, sup_full, selftrain, memseg):
    cells = {
        "supervised": {10: cell(sup_low, method="supervised"),
                       400: cell(sup_full, (0, 1), 400, "supervised")},
        "selftrain": {10: cell(selftrain, method="selftrain")},
        "memseg": {10: cell(memseg, method="memseg")},
    }  # fmt: skip
    gains = {
        "memseg − supervised": {10: paired_gain(cells["memseg"][10], cells["supervised"][10])},
        "memseg − selftrain": {10: paired_gain(cells["memseg"][10], cells["selftrain"][10])},
    }
    return {"cells": cells, "gain": gains}


def write_curves(folder, runs, values):
    folder.mkdir(exist_ok=True)
    for run in runs:
        lines = ["step,loss,val_miou"] + [f"{40 * (i + 1)},1.0,{v}" for i, v in enumerate(values)]
        (folder / f"{run}.csv").write_text("\n".join(lines) + "\n")


def test_checks_pass_and_fail_on_the_numbers(tmp_path):
    main = main_data([38, 40, 36], [56, 58], [48, 50, 47], [50, 51, 49])
    runs = [r for n in (10, 400) for r in main["cells"]["supervised"][n]["runs"]]
    write_curves(tmp_path, runs, [0.2, 0.3, 0.35, 0.37, 0.38, 0.385, 0.39, 0.395, 0.398, 0.4])
    checks = protocol_checks(main, tmp_path, ReportConfig())
    assert checks["plateau"]["passed"] and checks["plateau"]["max_gain"] == pytest.approx(0.5)
    assert checks["headroom"]["points"] == pytest.approx(57 - 38)
    assert checks["headroom"]["passed"]
    gain = checks["gain"]
    assert gain["memseg_minus_supervised"] == pytest.approx(12.0) and gain["passed"]
    assert gain["interval95"][0] > 0 and gain["memseg_minus_selftrain"] == pytest.approx(5 / 3)
    lines = describe(checks)
    assert lines[0].startswith("plateau (pass)") and lines[1].startswith("headroom (pass)")
    assert lines[2].startswith("gain (pass): at 10 labels memseg − supervised +12.0 points")

    # still rising, little headroom, memseg below selftrain: every check fails
    write_curves(tmp_path, runs, [0.1 * i for i in range(10)])
    main = main_data([38, 40, 36], [45, 47], [50, 52, 49], [48, 51, 47])
    checks = protocol_checks(main, tmp_path, ReportConfig())
    assert not checks["plateau"]["passed"] and not checks["headroom"]["passed"]
    assert not checks["gain"]["passed"]
    assert all("(FAIL)" in line for line in describe(checks))


def test_a_run_without_a_validation_curve_fails_the_plateau(tmp_path):
    main = main_data([38, 40, 36], [56, 58], [48, 50, 47], [50, 51, 49])
    checks = protocol_checks(main, tmp_path, ReportConfig())  # no curve files at all
    assert not checks["plateau"]["passed"] and checks["plateau"]["max_gain"] is None


def test_pseudo_label_quality_against_hidden_labels():
    hidden = torch.tensor([[[0, 1, 2, 255], [1, 1, 2, 2]]])
    pseudo = torch.tensor([[[0, 2, 2, 1], [1, 0, 2, 2]]])
    confidence = torch.full((1, 2, 4), 0.5)
    quality = pseudo_label_quality(pseudo, confidence, hidden)
    # 7 labeled pixels, 5 right; the ignored pixel counts neither way
    assert float(quality["pseudo_accuracy"]) == pytest.approx(5 / 7)
    assert float(quality["pseudo_confidence"]) == pytest.approx(0.5)


def test_a_sweep_without_supervised_runs_has_no_supervised_checks(tmp_path):
    main = {"cells": {"memseg": {5: cell([40, 41, 39], n=5, method="memseg")}}, "gain": {}}
    checks = protocol_checks(main, tmp_path, ReportConfig())
    assert checks == {} and describe(checks) == []
