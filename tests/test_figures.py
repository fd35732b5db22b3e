import math

import numpy as np
import pytest
from PIL import Image

from memseg_bench import figures
from memseg_bench.errors import UserError

CLASSES = ["background", "disc", "square"]
PALETTE = [[120, 120, 120], [230, 25, 75], [60, 180, 75]]
HEADER = (
    "step,lr,loss,loss_sup,loss_pseudo,loss_ent,loss_contr_lab,loss_contr_unlab,"
    "filter_pass_rate,bank_fill,images_per_s,val_miou"
)


def write_curves(folder, with_val=True):
    folder.mkdir(parents=True, exist_ok=True)
    for method in ("supervised", "selftrain", "memseg"):
        for seed in (0, 1):
            lines, bank = [HEADER], ["step," + ",".join(CLASSES)]
            for step in range(10, 201, 10):
                loss = 2 * math.exp(-step / 80) + 0.1 * seed + 0.05
                val = f"{0.3 + step / 1000:.3f}" if with_val and step % 50 == 0 else ""
                memseg = method == "memseg"
                rate = f"{step / 250:.3f}" if memseg and step >= 50 else ""
                lines.append(f"{step},0.01,{loss:.4f},{loss:.4f},,,,,{rate},,25.0,{val}")
                bank.append(
                    f"{step}," + ",".join(str(min(64, step * (i + 1) // 8)) for i in range(3))
                )
            (folder / f"{method}-n20-s{seed}.csv").write_text("\n".join(lines) + "\n")
            if method == "memseg":
                (folder / f"{method}-n20-s{seed}.bank.csv").write_text("\n".join(bank) + "\n")
    return folder


def assert_png(path, min_w=300, min_h=150):
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.verify()
    assert min_w <= width <= 4000 and min_h <= height <= 4000
    leftovers = [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


def test_training_curves_with_and_without_validation(tmp_path):
    curves = write_curves(tmp_path / "curves")
    out = figures.training_curves(curves, tmp_path / "figs" / "curves.png")
    assert_png(out, min_w=800)
    plain = write_curves(tmp_path / "plain", with_val=False)
    out = figures.training_curves(plain, tmp_path / "figs" / "plain.png")
    assert_png(out)
    with Image.open(out) as image:
        assert image.size[0] < 800  # one panel only: no val mIoU logged
    with pytest.raises(UserError):
        figures.training_curves(tmp_path / "nowhere", tmp_path / "x.png")
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError):
        figures.training_curves(tmp_path / "none", tmp_path / "x.png")


def test_seed_mean_averages_runs_per_step():
    a = {"step": np.array([1.0, 2.0, 3.0]), "loss": np.array([1.0, 2.0, np.nan])}
    b = {"step": np.array([1.0, 2.0]), "loss": np.array([3.0, 4.0])}
    steps, mean = figures._seed_mean([a, b], "loss")
    assert steps.tolist() == [1.0, 2.0]
    assert mean.tolist() == [2.0, 3.0]


def test_bank_diagnostics_and_placeholder(tmp_path):
    curves = write_curves(tmp_path / "curves")
    assert_png(figures.bank_diagnostics(curves, tmp_path / "bank.png"), min_w=800)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "supervised-n20-s0.csv").write_text(HEADER + "\n10,0.01,1.0,1.0,,,,,,,25,\n")
    assert_png(figures.bank_diagnostics(plain, tmp_path / "none.png"), min_h=100)


def test_qualitative_grid_uses_the_palette(tmp_path):
    rng = np.random.default_rng(0)
    label = np.zeros((24, 32), dtype=np.uint8)
    label[4:20, 2:14] = 1
    label[6:22, 18:30] = 2
    label[0:2, :] = 255
    predictions = {
        m: np.where(label == 255, 0, label).astype(np.uint8) for m in ("supervised", "memseg")
    }
    predictions["memseg"][10:14, 4:8] = 2
    rows = [
        {
            "image": rng.integers(0, 255, (24, 32, 3), dtype=np.uint8),
            "label": label,
            "predictions": predictions,
        },
        {
            "image": rng.integers(0, 255, (24, 32, 3), dtype=np.uint8),
            "label": label,
            "predictions": predictions,
        },
    ]
    out = tmp_path / "grid.png"
    layout = figures.qualitative_grid(rows, CLASSES, PALETTE, out)
    assert_png(out)
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape[1::-1] == tuple(layout["size"])
    assert list(layout["cells"]) == [
        f"{r},{c}" for r in range(2) for c in ("image", "ground truth", "supervised", "memseg")
    ]

    def colour_at(cell, y, x):
        x0, y0, x1, y1 = layout["cells"][cell]
        px = int(x0 + (x + 0.5) * (x1 - x0) / label.shape[1])
        py = int(y0 + (y + 0.5) * (y1 - y0) / label.shape[0])
        return pixels[py, px].tolist()

    for y, x in [(10, 8), (12, 24), (23, 16), (0, 5), (3, 30)]:
        expected = [0, 0, 0] if label[y, x] == 255 else PALETTE[label[y, x]]
        assert colour_at("1,ground truth", y, x) == expected
    assert colour_at("0,memseg", 11, 5) == PALETTE[2]
    assert colour_at("0,supervised", 11, 5) == PALETTE[1]


def test_colour_mask_rejects_ids_beyond_the_palette():
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    coloured = figures.colour_mask(mask, PALETTE)
    assert coloured[1, 1].tolist() == [0, 0, 0]
    assert coloured[0, 1].tolist() == PALETTE[1]
    with pytest.raises(ValueError):
        figures.colour_mask(np.array([[5]], dtype=np.uint8), PALETTE)


def test_ignore_turns_white_when_a_class_is_black(tmp_path):
    palette = [[0, 0, 0], [230, 25, 75]]
    assert figures.ignore_colour(palette, 2) == (255, 255, 255)
    assert figures.ignore_colour(PALETTE, 3) == (0, 0, 0)
    label = np.zeros((16, 16), dtype=np.uint8)
    label[:8] = 255
    label[12:, :] = 1
    rows = [{"image": np.zeros((16, 16, 3), np.uint8), "label": label, "predictions": {}}]
    layout = figures.qualitative_grid(rows, ["background", "disc"], palette, tmp_path / "g.png")
    pixels = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    x0, y0, x1, y1 = layout["cells"]["0,ground truth"]
    cell = pixels[y0:y1, x0:x1]
    h = cell.shape[0]
    assert cell[h // 4, 50].tolist() == [255, 255, 255]  # ignore rows
    assert cell[(h * 5) // 8, 50].tolist() == [0, 0, 0]  # background (black class)
    assert cell[(h * 7) // 8, 50].tolist() == [230, 25, 75]


def test_method_diagnostics_has_a_row_per_method_with_pseudo_labels(tmp_path):
    folder = tmp_path / "curves"
    folder.mkdir()
    header = "step,loss,loss_sup,loss_pseudo,loss_contr_lab,pseudo_accuracy,pseudo_confidence"
    for method in ("supervised", "selftrain", "memseg"):
        lines = [header if method != "supervised" else "step,loss,loss_sup"]
        for step in range(20, 401, 20):
            accuracy = min(0.95, 0.5 + step / 1000)
            if method == "supervised":
                lines.append(f"{step},1.0,1.0")
            else:
                lines.append(f"{step},1.2,1.0,0.1,0.01,{accuracy:.3f},{accuracy + 0.02:.3f}")
        (folder / f"{method}-n10-s0.csv").write_text("\n".join(lines) + "\n")
    out = figures.method_diagnostics(folder, tmp_path / "diag.png")
    assert_png(out, min_w=800)
    with Image.open(out) as image:
        assert image.size[1] >= 2 * 300  # one row for selftrain, one for memseg
    (folder / "selftrain-n10-s0.csv").unlink()
    (folder / "memseg-n10-s0.csv").unlink()
    with Image.open(figures.method_diagnostics(folder, tmp_path / "none.png")) as image:
        assert image.size[1] < 300  # supervised only: the placeholder
