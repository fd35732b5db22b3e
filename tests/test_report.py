import json
import math
import re

import pytest

from memseg_bench.errors import UserError
from memseg_bench.tables import (
    ProtocolMixError,
    build_report,
    group_by_protocol,
    load_metrics,
    main_table,
    protocol_slug,
    tex_escape,
    to_latex,
)

CLASSES = ["background", "disc", "square"]
SYNTH = {"dataset": "synthetic", "arch": "deeplabv3plus", "backbone": "resnet18"}
CITY = {"dataset": "cityscapes", "arch": "deeplabv2", "backbone": "resnet101"}


def squeezed(path) -> str:
    """A Markdown table file with the column padding taken out: one space around each cell."""
    return re.sub(r" {2,}", " ", path.read_text())


def record(method, n, seed, miou, variant=None, protocol=SYNTH, best=None, wall=60.0):
    label = method if variant is None else f"{method}+{variant}"
    proto = {"family": "random", "crop": 64, "eval_mode": "whole", "iterations": 600, **protocol}
    proto["id"] = (
        f"{proto['dataset']}/random/{proto['arch']}-{proto['backbone']}/crop64/whole/it600"
    )
    return {
        "run": f"{label}-n{n}-s{seed}",
        "method": method,
        "variant": variant,
        "split": f"random/{n}",
        "family": "random",
        "n_labeled": n,
        "seed": seed,
        "behaviour": "paper",
        "eval_split": "test",
        "protocol": proto,
        "miou": miou,
        "pixel_accuracy": 0.9,
        "mean_accuracy": 0.7,
        "per_class_iou": {"background": 0.9, "disc": miou, "square": None},
        "class_names": CLASSES,
        "best_val": None if best is None else {"miou": best, "step": 400, "val_miou": best},
        "compute": {
            "wall_time_s": wall,
            "images_per_s": 30.0,
            "peak_memory_mb": 900.0 + seed,
            "memory_kind": "cpu_rss",
            "device": "cpu",
            "torch": "2.13.0",
        },
        "provenance": {"git_commit": "c", "config_hash": "h", "split_hash": "s"},
    }


def write(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    for rec in records:
        name = rec["run"] + ("" if rec["protocol"]["dataset"] == "synthetic" else "-city")
        (folder / f"{name}.json").write_text(json.dumps(rec))
    return folder


def synthetic_runs():
    return [
        record("supervised", 20, 0, 0.40),
        record("supervised", 20, 1, 0.43),
        record("supervised", 20, 2, 0.47),
        record("memseg", 20, 0, 0.50, best=0.52),
        record("memseg", 20, 1, 0.56, best=0.57),
        record("supervised", 400, 0, 0.81),
        record("memseg", 20, 0, 0.45, variant="no_feature_weights", best=0.46),
    ]


def test_gain_interval_with_three_pairs_and_against_selftrain(tmp_path):
    runs = [record("supervised", 20, s, v) for s, v in enumerate((0.40, 0.43, 0.47))]
    runs += [record("selftrain", 20, s, v) for s, v in enumerate((0.48, 0.50, 0.55))]
    runs += [record("memseg", 20, s, v) for s, v in enumerate((0.50, 0.51, 0.58))]
    summary = build_report(write(tmp_path / "metrics", runs), tmp_path / "tables")
    gains = summary["protocols"][summary["default_protocol"]]["tables"]["main"]["gain"]
    over_sup = gains["memseg − supervised"][20]
    # differences 10, 8, 11: mean 9.667, sd 1.5275, t(0.975, 2 dof) = 4.303
    assert over_sup["value"] == pytest.approx(9.6667, abs=1e-4)
    half = 4.303 * 1.527525 / math.sqrt(3)
    assert over_sup["interval95"] == pytest.approx([9.6667 - half, 9.6667 + half], abs=1e-3)
    over_self = gains["memseg − selftrain"][20]
    assert over_self["differences"] == pytest.approx([2.0, 1.0, 3.0])
    text = squeezed(tmp_path / "tables" / "main.md")
    assert "| memseg − selftrain | +2.0 [-0.5, +4.5] (n=3) |" in text
    assert "| selftrain − supervised |" in text and "selftrain − selftrain" not in text


def test_mean_std_n_against_hand_computed_values(tmp_path):
    metrics = write(tmp_path / "metrics", synthetic_runs())
    summary = build_report(metrics, tmp_path / "tables")
    pid = summary["default_protocol"]
    cells = summary["protocols"][pid]["tables"]["main"]["cells"]
    sup = cells["supervised"][20]
    # values 40, 43, 47: mean 43.333, sample variance (11.111 + 0.111 + 13.444) / 2 = 12.333
    assert sup["mean"] == pytest.approx(43.3333, abs=1e-4)
    assert sup["std"] == pytest.approx(3.5119, abs=1e-4)
    assert sup["n"] == 3
    assert sup["runs"] == ["supervised-n20-s0", "supervised-n20-s1", "supervised-n20-s2"]
    assert cells["memseg"][20]["mean"] == pytest.approx(53.0)
    assert cells["memseg"][20]["std"] == pytest.approx(math.sqrt(18.0))
    gain = summary["protocols"][pid]["tables"]["main"]["gain"]["memseg − supervised"][20]
    # paired by seed: memseg holds seeds 0 and 1 only, differences 10 and 13
    assert gain["seeds"] == [0, 1] and gain["differences"] == pytest.approx([10.0, 13.0])
    assert gain["value"] == pytest.approx(11.5)
    half = 12.706 * math.sqrt(4.5) / math.sqrt(2)  # t(0.975, 1 dof) * sd / sqrt(n)
    assert gain["interval95"] == pytest.approx([11.5 - half, 11.5 + half], abs=1e-3)
    text = squeezed(tmp_path / "tables" / "main.md")
    assert "43.3 ± 3.5 (n=3)" in text
    assert "53.0 ± 4.2 (n=2)" in text
    assert "81.0 (n=1)" in text and "81.0 ±" not in text
    assert "+11.5 [-7.6, +30.6] (n=2)" in text
    # the ablation variant stays out of the main table
    assert "no_feature_weights" not in text


def test_two_protocols_land_in_separate_tables(tmp_path):
    city = [
        record("memseg", 100, 0, 0.61, protocol=CITY),
        record("memseg", 100, 1, 0.63, protocol=CITY),
    ]
    metrics = write(tmp_path / "metrics", synthetic_runs() + city)
    summary = build_report(metrics, tmp_path / "tables")
    assert len(summary["protocols"]) == 2
    synth_pid = next(p for p in summary["protocols"] if p.startswith("synthetic"))
    city_pid = next(p for p in summary["protocols"] if p.startswith("cityscapes"))
    assert summary["default_protocol"] == synth_pid
    synth = squeezed(tmp_path / "tables" / f"main_{protocol_slug(synth_pid)}.md")
    city_text = squeezed(tmp_path / "tables" / f"main_{protocol_slug(city_pid)}.md")
    assert "62.0 ± 1.4 (n=2)" in city_text and "62.0" not in synth
    assert "43.3" in synth and "43.3" not in city_text
    assert squeezed(tmp_path / "tables" / "main.md") == synth
    mixed = load_metrics(metrics)
    with pytest.raises(ProtocolMixError):
        main_table(mixed)
    assert sorted(group_by_protocol(mixed)) == sorted([synth_pid, city_pid])
    # the configured protocol is the main table even with fewer runs; an unknown id falls back
    chosen = build_report(metrics, tmp_path / "chosen", default_protocol=city_pid)
    assert chosen["default_protocol"] == city_pid
    assert squeezed(tmp_path / "chosen" / "main.md") == city_text
    fallback = build_report(metrics, tmp_path / "fallback", default_protocol="no/such/protocol")
    assert fallback["default_protocol"] == synth_pid


def test_editing_one_metrics_value_changes_the_table(tmp_path):
    metrics = write(tmp_path / "metrics", synthetic_runs())
    build_report(metrics, tmp_path / "tables")
    assert "81.0 (n=1)" in squeezed(tmp_path / "tables" / "main.md")
    path = metrics / "supervised-n400-s0.json"
    data = json.loads(path.read_text())
    data["miou"] = 0.777
    path.write_text(json.dumps(data))
    build_report(metrics, tmp_path / "tables")
    text = squeezed(tmp_path / "tables" / "main.md")
    assert "77.7 (n=1)" in text and "81.0" not in text


def test_latex_escaping_and_booktabs(tmp_path):
    assert tex_escape("a_b 50% & #1") == r"a\_b 50\% \& \#1"
    assert tex_escape("1.0 ± 0.2") == r"1.0 $\pm$ 0.2"
    metrics = write(tmp_path / "metrics", synthetic_runs())
    summary = build_report(metrics, tmp_path / "tables")
    slug = protocol_slug(summary["default_protocol"])
    tex = (tmp_path / "tables" / f"ablation_{slug}.tex").read_text()
    assert r"memseg+no\_feature\_weights" in tex
    assert "no_feature" not in tex
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in tex
    main_tex = (tmp_path / "tables" / "main.tex").read_text()
    assert r"43.3 $\pm$ 3.5 (n=3)" in main_tex
    assert r"mIoU (\%)" in main_tex
    table, _ = main_table(load_metrics(metrics)[:3])
    assert to_latex(table).count(r"\\") == 1 + 1  # header + one method row


def test_reported_row_only_when_protocol_matches(tmp_path):
    city = [record("memseg", 100, 0, 0.61, protocol=CITY)]
    other = {**CITY, "arch": "deeplabv3plus"}
    metrics = write(tmp_path / "m1", synthetic_runs() + city)
    summary = build_report(metrics, tmp_path / "t1")
    city_pid = next(p for p in summary["protocols"] if p.startswith("cityscapes"))
    city_text = squeezed(tmp_path / "t1" / f"main_{protocol_slug(city_pid)}.md")
    assert "reported in the paper" in city_text
    assert "59.4" in city_text and "54.07" in city_text
    assert "64.4" not in city_text  # 372 labels: no measured column, no quoted cell
    assert "reported" not in squeezed(tmp_path / "t1" / "main.md")
    quoted = summary["protocols"][city_pid]["tables"]["main"]["reported"]
    assert {(q["method"], q["miou"]) for q in quoted} == {("memseg", 59.4), ("classmix", 54.07)}
    # same dataset and backbone, other architecture: no quoted row
    wrong_arch = [record("memseg", 100, 0, 0.61, protocol=other)]
    summary = build_report(write(tmp_path / "m2", wrong_arch), tmp_path / "t2")
    assert "reported" not in squeezed(tmp_path / "t2" / "main.md")
    # matching protocol but a label count the paper did not report: no quoted row
    wrong_n = [record("memseg", 20, 0, 0.61, protocol=CITY)]
    build_report(write(tmp_path / "m3", wrong_n), tmp_path / "t3")
    assert "reported" not in squeezed(tmp_path / "t3" / "main.md")


def test_ablation_last_vs_best_per_class_and_compute(tmp_path):
    metrics = write(tmp_path / "metrics", synthetic_runs())
    summary = build_report(metrics, tmp_path / "tables")
    tables = summary["protocols"][summary["default_protocol"]]["tables"]
    ablation = tables["ablation"]
    assert ablation["n_labeled"] == 20
    assert ablation["memseg+no_feature_weights"]["delta_same_seeds"] == pytest.approx(-5.0)
    assert ablation["memseg+no_feature_weights"]["paired_n"] == 1
    lvb = tables["last_vs_best"]["memseg"][20]
    assert lvb["best_on_val"]["mean"] == pytest.approx(54.5)
    assert lvb["gap"]["mean"] == pytest.approx(1.5)
    assert tables["last_vs_best"]["supervised"][20]["best_on_val"] is None
    per_class = tables["per_class"]["memseg"][20]
    assert per_class["background"]["mean"] == pytest.approx(90.0)
    assert per_class["disc"]["mean"] == pytest.approx(53.0)
    assert per_class["square"] is None
    compute = tables["compute"]["supervised"][20]
    assert compute["peak_memory_mb"] == 902.0
    assert compute["runs"] == ["supervised-n20-s0", "supervised-n20-s1", "supervised-n20-s2"]
    slug = protocol_slug(summary["default_protocol"])
    for kind in ("main", "ablation", "per_class", "last_vs_best", "compute"):
        for ext in ("md", "csv", "tex"):
            assert (tmp_path / "tables" / f"{kind}_{slug}.{ext}").is_file()
    assert "best on val †" in squeezed(tmp_path / "tables" / f"last_vs_best_{slug}.md")
    json.dumps(summary)


def test_stale_tables_are_removed(tmp_path):
    city = [record("memseg", 100, 0, 0.61, protocol=CITY)]
    metrics = write(tmp_path / "metrics", synthetic_runs() + city)
    summary = build_report(metrics, tmp_path / "tables")
    city_pid = next(p for p in summary["protocols"] if p.startswith("cityscapes"))
    stale = tmp_path / "tables" / f"main_{protocol_slug(city_pid)}.md"
    assert stale.is_file()
    (metrics / "memseg-n100-s0-city.json").unlink()
    (tmp_path / "tables" / "notes.md").write_text("kept")
    build_report(metrics, tmp_path / "tables")
    assert not stale.exists()
    assert (tmp_path / "tables" / "notes.md").exists()


def test_bad_inputs_raise_user_errors_naming_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_report(tmp_path / "missing", tmp_path / "tables")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics"):
        build_report(tmp_path / "empty", tmp_path / "tables")
    metrics = write(tmp_path / "metrics", synthetic_runs())
    path = metrics / "memseg-n20-s1.json"
    data = json.loads(path.read_text())
    del data["protocol"]["backbone"]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"memseg-n20-s1\.json.*protocol\.backbone"):
        build_report(metrics, tmp_path / "tables")
    data = record("memseg", 20, 1, 1.7)
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"memseg-n20-s1\.json.*miou"):
        build_report(metrics, tmp_path / "tables")
    path.write_text("{not json")
    with pytest.raises(UserError, match=r"memseg-n20-s1\.json"):
        build_report(metrics, tmp_path / "tables")


def test_non_numeric_compute_value_is_a_user_error(tmp_path):
    runs = synthetic_runs()
    runs[0]["compute"]["wall_time_s"] = None
    metrics = write(tmp_path / "metrics", runs)
    with pytest.raises(UserError, match=r"supervised-n20-s0\.json.*compute\.wall_time_s"):
        build_report(metrics, tmp_path / "tables")


def test_update_readme_replaces_only_the_named_block(tmp_path):
    from memseg_bench.report_stage import update_readme

    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- results:start -->\nold\n<!-- results:end -->\nmiddle\n"
        "<!-- camvid:start -->\nold camvid\n<!-- camvid:end -->\nend\n"
    )
    update_readme(readme, "| new camvid |", "camvid")
    text = readme.read_text()
    assert "<!-- camvid:start -->\n| new camvid |\n<!-- camvid:end -->" in text
    assert "<!-- results:start -->\nold\n<!-- results:end -->" in text
    with pytest.raises(UserError, match="no <!-- voc:start -->"):
        update_readme(readme, "x", "voc")


def ablation_runs():
    """memseg on three seeds and a variant whose seeds lie -1, -3 and -2 points below."""
    full = [record("memseg", 5, s, v) for s, v in enumerate([0.40, 0.50, 0.45])]
    variant = [
        record("memseg", 5, s, v, variant="masked_entropy")
        for s, v in enumerate([0.39, 0.47, 0.43])
    ]
    return full + variant


def test_ablation_delta_is_paired_by_seed_with_an_interval(tmp_path):
    summary = build_report(write(tmp_path / "metrics", ablation_runs()), tmp_path / "tables")
    ablation = summary["protocols"][summary["default_protocol"]]["tables"]["ablation"]
    row = ablation["memseg+masked_entropy"]
    assert row["delta_same_seeds"] == pytest.approx(-2.0)
    assert row["paired_n"] == 3
    half = 4.303 * 1.0 / 3**0.5
    assert row["interval95"] == pytest.approx([-2.0 - half, -2.0 + half])
    assert "-2.0 [-4.5, +0.5] (n=3)" in squeezed(next((tmp_path / "tables").glob("ablation_*.md")))


def test_readme_block_shows_the_ablation_table_and_no_empty_checks(tmp_path):
    from memseg_bench.report_stage import readme_results, update_readme

    summary = build_report(write(tmp_path / "metrics", ablation_runs()), tmp_path / "tables")
    tables = summary["protocols"][summary["default_protocol"]]["tables"]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- ablations:start -->\n<!-- ablations:end -->\nafter\n")
    update_readme(readme, readme_results(tmp_path / "tables", tables, {}), "ablations")
    text = readme.read_text()
    assert "### Main results:" in text and "### Ablations:" in text
    assert "memseg+masked_entropy" in text and "-2.0 [-4.5, +0.5] (n=3)" in text
    assert "Protocol checks" not in text and text.endswith("<!-- ablations:end -->\nafter\n")


def test_control_rows_paired_against_supervised_and_memseg(tmp_path):
    values = {
        "supervised": (0.40, 0.43, 0.47),
        "fixmatch": (0.48, 0.52, 0.55),
        "unimatch": (0.50, 0.50, 0.56),
        "memseg": (0.45, 0.47, 0.50),
    }
    runs = [
        record(method, 20, seed, v) for method, row in values.items() for seed, v in enumerate(row)
    ]
    summary = build_report(write(tmp_path / "metrics", runs), tmp_path / "tables")
    main = summary["protocols"][summary["default_protocol"]]["tables"]["main"]
    assert list(main["cells"]) == ["supervised", "fixmatch", "unimatch", "memseg"]
    gains = main["gain"]
    assert gains["fixmatch − supervised"][20]["differences"] == pytest.approx([8.0, 9.0, 8.0])
    assert gains["memseg − fixmatch"][20]["differences"] == pytest.approx([-3.0, -5.0, -5.0])
    assert gains["memseg − unimatch"][20]["differences"] == pytest.approx([-5.0, -3.0, -6.0])
    assert "fixmatch − unimatch" not in gains and "unimatch − fixmatch" not in gains
    text = squeezed(tmp_path / "tables" / "main.md")
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert rows.index("fixmatch") < rows.index("unimatch") < rows.index("memseg")
    assert "| memseg − unimatch | -4.7" in text
    from memseg_bench.config import ReportConfig
    from memseg_bench.protocol_checks import describe, protocol_checks

    checks = protocol_checks(main, tmp_path / "no_curves", ReportConfig(min_gain=5.0))
    control = checks["positive_control"]
    # unimatch gains 10, 7, 9 (mean 8.67), fixmatch 8, 9, 8 (8.33): the better one is read
    assert control["method"] == "unimatch" and control["n_labeled"] == 20
    assert control["minus_supervised"] == pytest.approx(8.6667, abs=1e-4)
    assert control["passed"] and control["interval95"][0] > 0
    assert control["others"] == {"fixmatch": pytest.approx(8.3333, abs=1e-4)}
    line = next(line for line in describe(checks) if line.startswith("positive control"))
    assert "positive control (pass): at 20 labels unimatch − supervised +8.7 points" in line
    failing = protocol_checks(main, tmp_path / "no_curves", ReportConfig(min_gain=9.0))
    assert not failing["positive_control"]["passed"]
