import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memseg_bench.errors import UserError

NUM_CLASSES = 3
SIZES = [[32, 32], [48, 40]]


def write_model_file(path: Path, config=None) -> None:
    import torch

    from memseg_bench.config import Config, config_hash, config_to_dict
    from memseg_bench.models import build_segmenter

    config = config or Config()
    torch.manual_seed(0)
    net = build_segmenter(config.model, NUM_CLASSES, config.data.mean, config.data.std)
    # Spread the classifier so that argmax ties (and thus flaky agreement) are unlikely.
    with torch.no_grad():
        net.head.classifier.weight.mul_(20)
    torch.save(
        {
            "model_state": net.state_dict(),
            "config": config_to_dict(config),
            "class_names": ["background", "disc", "bar"],
            "palette": [[0, 0, 0], [220, 20, 60], [30, 144, 255]],
            "config_hash": config_hash(config),
        },
        path,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from memseg_bench.export import export_onnx

    root = tmp_path_factory.mktemp("export")
    write_model_file(root / "model.pt")
    models = root / "models"
    report = export_onnx(
        root / "model.pt", models / "student.onnx", root / "check.json", sizes=SIZES, opset=18
    )
    return {"root": root, "onnx": models / "student.onnx", "report": report}


def test_export_writes_one_checked_file_with_metadata(exported):
    import onnx

    onnx_path = exported["onnx"]
    assert [p.name for p in onnx_path.parent.iterdir()] == ["student.onnx"]
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["class_names"]) == ["background", "disc", "bar"]
    assert json.loads(meta["palette"])[1] == [220, 20, 60]
    assert int(meta["num_classes"]) == NUM_CLASSES
    assert json.loads(meta["mean"]) == [123.675, 116.28, 103.53]
    assert len(meta["config_hash"]) == 16
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]


def test_export_parity_report(exported):
    report = json.loads((exported["root"] / "check.json").read_text())
    assert report == exported["report"]
    assert report["passed"] is True
    assert report["provider"] == "CPUExecutionProvider"
    shapes = {(c["batch"], c["height"], c["width"]) for c in report["checks"]}
    assert shapes == {(b, h, w) for b in (1, 2) for h, w in SIZES}
    assert 0 <= report["max_abs_diff"] <= 1e-3
    assert report["min_argmax_agreement"] >= 0.999


def test_exported_model_has_dynamic_batch_and_size(exported):
    import onnxruntime as ort
    import torch

    from memseg_bench.export import FullResolution
    from memseg_bench.models import load_segmenter

    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).uniform(0, 255, (3, 3, 37, 51)).astype(np.float32)
    (logits,) = session.run(["logits"], {"image": image})
    assert logits.shape == (3, NUM_CLASSES, 37, 51)
    wrapper = FullResolution(load_segmenter(exported["root"] / "model.pt")[0])
    with torch.no_grad():
        expected = wrapper(torch.from_numpy(image)).numpy()
    assert np.abs(expected - logits).max() < 1e-3


def reuse_export(monkeypatch, exported) -> None:
    """Skip the slow re-export of the same model file: copy the module's export instead."""
    import shutil

    import memseg_bench.export

    def copy(wrapper, path, opset, metadata):
        shutil.copyfile(exported["onnx"], path)

    monkeypatch.setattr(memseg_bench.export, "export_model", copy)


def test_failed_parity_writes_report_but_no_model(tmp_path, exported, monkeypatch):
    from memseg_bench.export import export_onnx

    reuse_export(monkeypatch, exported)
    target = tmp_path / "out" / "student.onnx"
    with pytest.raises(UserError, match="parity failed"):
        export_onnx(
            exported["root"] / "model.pt",
            target,
            tmp_path / "check.json",
            sizes=[[32, 32]],
            max_abs_tolerance=-1.0,
        )
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["passed"] is False
    assert len({(c["height"], c["width"]) for c in report["checks"]}) == 2  # a second size added
    assert not target.exists() and list(target.parent.iterdir()) == []


def write_images(folder: Path) -> dict[str, tuple[int, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "street.png")
    Image.fromarray(rng.integers(0, 256, (38, 29, 3), dtype=np.uint8)).save(folder / "road.jpg")
    return {"street": (45, 61), "road": (38, 29)}


def test_predict_png_and_jpeg(exported, tmp_path):
    import onnxruntime as ort

    from memseg_bench.predict import predict

    sizes = write_images(tmp_path / "in")
    results = predict([str(tmp_path / "in")], str(exported["onnx"]), str(tmp_path / "out"), "cpu")
    assert [Path(r["input"]).name for r in results] == ["road.jpg", "street.png"]
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    for result in results:
        stem = Path(result["input"]).stem
        mask_image = Image.open(result["mask"])
        assert mask_image.mode == "P"
        mask = np.asarray(mask_image)
        assert mask.shape == sizes[stem] and mask.max() < NUM_CLASSES
        assert mask_image.getpalette()[3:6] == [220, 20, 60]
        image = np.asarray(Image.open(result["input"]).convert("RGB"))
        batch = image.transpose(2, 0, 1)[None].astype(np.float32)
        expected = session.run(["logits"], {"image": batch})[0][0].argmax(0)
        np.testing.assert_array_equal(mask, expected)
        overlay = np.asarray(Image.open(result["overlay"]))
        assert overlay.shape == (*sizes[stem], 3)
        colour = np.array([[0, 0, 0], [220, 20, 60], [30, 144, 255]])[mask]
        blend = np.round(0.5 * image + 0.5 * colour)
        error = np.abs(overlay.astype(float) - blend).mean()  # JPEG quality 90 on noise
        assert error <= 8 and error < 0.25 * np.abs(overlay.astype(float) - image).mean()
        assert result["latency_ms"] > 0


def test_predict_writes_next_to_the_input_by_default(exported, tmp_path):
    from memseg_bench.predict import predict

    write_images(tmp_path)
    predict([str(tmp_path / "street.png")], str(exported["onnx"]), None, "auto")
    assert (tmp_path / "street_mask.png").is_file()
    assert (tmp_path / "street_overlay.jpg").is_file()
    assert not (tmp_path / "road_mask.png").exists()


def test_predict_errors_name_the_file(exported, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from memseg_bench.predict import predict

    write_images(tmp_path)
    model = str(exported["onnx"])
    image = str(tmp_path / "street.png")
    fake = tmp_path / "notes.png"
    fake.write_text("this is text")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage" * 10)
    foreign = tmp_path / "foreign.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    onnx.save(helper.make_model(graph), str(foreign))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(tmp_path / "missing.png")], model, "missing.png"),
        ([str(fake)], model, "notes.png"),
        ([image], str(tmp_path / "nope.onnx"), "nope.onnx"),
        ([image], str(corrupt), "corrupt.onnx"),
        ([image], str(foreign), "foreign.onnx"),
        ([str(empty)], model, "empty"),
    ]
    for inputs, model_path, name in cases:
        with pytest.raises(UserError) as info:
            predict(inputs, model_path, str(tmp_path / "out"), "cpu")
        assert name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="provider"):
        predict([image], model, None, "tpu")


def test_predict_does_not_import_torch(exported, tmp_path):
    write_images(tmp_path)
    code = (
        "import sys\n"
        "from memseg_bench.predict import predict\n"
        f"predict([{str(tmp_path / 'street.png')!r}], {str(exported['onnx'])!r}, None, 'cpu')\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not leaked, leaked\n"
        "print('no torch')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert "no torch" in result.stdout and "CPUExecutionProvider" in result.stdout
    assert (tmp_path / "street_mask.png").is_file()


def test_bench_infer_small(tmp_path, monkeypatch):
    from memseg_bench.bench.infer import bench_infer
    from memseg_bench.config import SyntheticConfig, config_from_dict
    from memseg_bench.data.synthetic import generate_synthetic
    from tests.test_int8_export import DATA, MODEL, write_model_file

    generate_synthetic(tmp_path / "data", SyntheticConfig(**DATA["synthetic"]))
    write_model_file(tmp_path / "model.pt", tmp_path / "data")
    images = tmp_path / "frames"
    write_folder(images)
    (images / "broken.png").unlink()
    config = config_from_dict({"data": {**DATA, "root": str(tmp_path / "data")}, "model": MODEL})
    [result] = bench_infer(
        [str(tmp_path / "model.pt")], config, sizes=[(48, 48), None], repeats=2, threads=2,
        folder=str(images), profile=True,
    )  # fmt: skip
    assert [row["size"] for row in result["latency"]] == ["48x48", "32x32"]  # the protocol's
    for row in result["latency"]:
        assert row["eager_ms"] > 0 and row["ort_fp32_ms"] > 0 and row["ort_int8_ms"] > 0
        assert row["int8_speedup_over_fp32"] == pytest.approx(
            row["ort_fp32_ms"] / row["ort_int8_ms"], rel=1e-2
        )
        assert row["fp32_max_abs_diff"] < 1e-3
    assert result["provider"] == "CPUExecutionProvider"
    cost = result["int8_cost"]
    assert cost["miou_drop"] == pytest.approx(
        100 * (cost["fp32_miou"] - cost["int8_miou"]), abs=1e-3
    )
    assert [row["size"] for row in result["profile"]] == ["48x48", "32x32"]
    for row, latency in zip(result["profile"], result["latency"], strict=True):
        # At these sizes, on a loaded machine, layout reorders can outlast the convolutions.
        assert {"Conv", "FusedConv"} & {entry["op"] for entry in row["by_op"]}
        shares = [entry["share"] for entry in row["by_op"]]
        assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(1)
        assert row["conv_gflop"] > 0
        assert row["eager_gflops_per_s"] == pytest.approx(
            1e3 * row["conv_gflop"] / latency["eager_ms"]
        )
    assert [row["model"] for row in result["folder"]] == ["fp32", "int8"]
    for row in result["folder"]:
        assert row["images"] == 6 and row["predict_images_per_s"] > 0
        assert set(row["predict_stage_cpu_ms_per_image"]) == {"decode", "session", "write"}
        assert row["ratio"] == pytest.approx(
            row["predict_images_per_s"] / row["session_images_per_s"]
        )
    with pytest.raises(UserError, match="backbone"):
        bench_infer([None], config, "vgg16", sizes=[(64, 64)], repeats=1, threads=1)


def write_folder(folder: Path) -> None:
    """Five 40x48 images, one 29x38 image between them, and one file that is not an image."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name in ("a", "b", "d", "e", "f"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            folder / f"{name}.png"
        )
    Image.fromarray(rng.integers(0, 256, (29, 38, 3), dtype=np.uint8)).save(folder / "c.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def test_predict_folder_with_batch_and_a_bad_file(exported, tmp_path):
    from tests.project import memseg

    write_folder(tmp_path / "in")
    model = str(exported["onnx"])
    runs = {}
    for batch in ("1", "3"):
        out = f"out{batch}"
        runs[batch] = memseg(tmp_path, "predict", "in", "-o", out, "--model", model,
                             "--provider", "cpu", "--batch", batch, check=False)  # fmt: skip
        result = runs[batch]
        assert result.returncode == 1, result.stdout + result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[0].startswith("skipped: ") and "broken.png" in lines[0]
        assert lines[-1] == "error: 1 of 7 inputs are not readable images: in/broken.png"
        stems = sorted(p.name for p in (tmp_path / out).glob("*_mask.png"))
        assert stems == [f"{s}_mask.png" for s in "abcdef"]
        assert "6 images in" in result.stdout and "images/s" in result.stdout
    assert "for a batch of 3" in runs["3"].stdout  # a, b and d go together; c alone; then e and f
    for mask in (tmp_path / "out1").glob("*_mask.png"):
        one = np.asarray(Image.open(mask))
        batched = np.asarray(Image.open(tmp_path / "out3" / mask.name))
        assert one.shape == batched.shape
        # The same model on a batch: the same classes up to float summation order.
        assert (one == batched).mean() > 0.999


def test_predict_returns_results_in_input_order_with_mixed_sizes(exported, tmp_path):
    from memseg_bench.predict import predict

    write_folder(tmp_path / "in")
    (tmp_path / "in" / "broken.png").unlink()
    results = predict([str(tmp_path / "in")], str(exported["onnx"]), str(tmp_path / "o"), "cpu",
                      batch=4)  # fmt: skip
    assert [Path(r["input"]).stem for r in results] == list("abcdef")
    assert {r["batch"] for r in results} == {4, 1}
    masks_only = predict([str(tmp_path / "in")], str(exported["onnx"]), str(tmp_path / "m"),
                         "cpu", with_overlay=False)  # fmt: skip
    assert {r["overlay"] for r in masks_only} == {None}
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [f"{s}_mask.png" for s in "abcdef"]
    with pytest.raises(UserError, match="--batch"):
        predict([str(tmp_path / "in")], str(exported["onnx"]), None, "cpu", batch=0)


def test_batches_group_by_size_and_bound_the_waiting_images():
    from memseg_bench.predict_pipeline import Decoded, batches

    sizes = [(4, 4), (4, 4), (6, 2), (4, 4), (6, 2), (5, 5), (5, 5), (5, 5), (5, 5), (4, 4)]
    items = [
        Decoded(i, Path(f"{i}.png"), np.zeros((*s, 3), np.uint8), np.zeros((*s, 3), np.uint8))
        for i, s in enumerate(sizes)
    ]
    groups = list(batches(iter(items), 3))
    assert sorted(i.position for g in groups for i in g) == list(range(len(items)))
    for group in groups:
        assert len({i.model_input.shape for i in group}) == 1 and 1 <= len(group) <= 3
    assert [i.position for i in groups[0]] == [0, 1, 3]


def test_class_ids_is_the_argmax_with_the_first_class_on_ties():
    from memseg_bench.predict_pipeline import class_ids

    logits = np.random.default_rng(0).normal(size=(5, 17, 23)).astype(np.float32)
    logits[:, 0, 0] = 1.0  # a five-way tie
    logits[3, 1, 1] = logits[1, 1, 1] = 9.0
    ids = class_ids(logits)
    assert ids.dtype == np.uint8
    np.testing.assert_array_equal(ids, logits.argmax(0))
    np.testing.assert_array_equal(class_ids(logits[:1]), np.zeros((17, 23), np.uint8))
    np.testing.assert_array_equal(class_ids(logits[:2]), logits[:2].argmax(0))


def test_overlay_is_the_rounded_mean_with_halves_to_even():
    """Every pair of image and colour values, over more rows than one blended block."""
    from memseg_bench.predict import OVERLAY_ROWS, overlay

    rows = OVERLAY_ROWS + 44
    values = np.arange(256)
    image = np.repeat(values[np.arange(rows) % 256, None], 256, axis=1)[..., None].repeat(3, 2)
    colours = np.stack([values, values[::-1], np.full(256, 7)], axis=1).astype(np.uint8)
    mask = np.tile(values.astype(np.uint8), (rows, 1))
    image = image.astype(np.uint8)
    expected = np.round(0.5 * image.astype(np.float32) + 0.5 * colours[mask].astype(np.float32))
    blended = overlay(image, mask, colours)
    assert blended.dtype == np.uint8
    np.testing.assert_array_equal(blended, expected)


def test_parallel_runs_on_the_cpu_use_every_core_one_image_each(monkeypatch):
    import memseg_bench.runtime as runtime
    from memseg_bench.predict import parallel_runs

    monkeypatch.setattr(runtime, "machine_threads", lambda: 4)
    cpu, cuda = [runtime.CPU], [runtime.CUDA, runtime.CPU]
    assert parallel_runs(cpu, 0) == (1, 4)
    assert parallel_runs(cpu, 2) == (2, 2)
    assert parallel_runs(cpu, 8) == (8, 1)
    assert parallel_runs(cuda, 0) == (0, 1)
    with pytest.raises(UserError, match="--threads"):
        parallel_runs(cpu, -1)


def test_images_run_in_parallel_give_the_masks_of_one_at_a_time(exported, tmp_path):
    from memseg_bench.predict import open_session
    from memseg_bench.predict_pipeline import run_pipeline

    write_folder(tmp_path / "in")
    (tmp_path / "in" / "broken.png").unlink()
    images = sorted((tmp_path / "in").iterdir())
    session, info = open_session(str(exported["onnx"]), "cpu", 1)
    masks = {}
    for runs in (1, 3):
        out = tmp_path / f"o{runs}"
        out.mkdir()
        run = run_pipeline(session, info, images, lambda _, out=out: out, 0, 1, lambda _: None,
                           print, runs=runs)  # fmt: skip
        assert [Path(r["input"]).stem for r in run.results] == list("abcdef")
        assert set(run.stage_cpu_s) == {"decode", "session", "write"}
        assert min(run.stage_cpu_s.values()) > 0
        masks[runs] = [np.asarray(Image.open(r["mask"])) for r in run.results]
    for one, parallel in zip(masks[1], masks[3], strict=True):
        np.testing.assert_array_equal(one, parallel)
