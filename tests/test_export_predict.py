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


def write_model_file(path: Path) -> None:
    import torch

    from memseg_bench.config import Config, config_hash, config_to_dict
    from memseg_bench.models import build_segmenter

    config = Config()
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
        assert np.abs(overlay.astype(float) - blend).max() <= 1
        assert result["latency_ms"] > 0


def test_predict_writes_next_to_the_input_by_default(exported, tmp_path):
    from memseg_bench.predict import predict

    write_images(tmp_path)
    predict([str(tmp_path / "street.png")], str(exported["onnx"]), None, "auto")
    assert (tmp_path / "street_mask.png").is_file()
    assert (tmp_path / "street_overlay.png").is_file()
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


def test_bench_infer_small(tmp_path, exported, monkeypatch):
    from memseg_bench.bench.infer import bench_infer

    reuse_export(monkeypatch, exported)
    result = bench_infer(
        str(exported["root"] / "model.pt"), "resnet18", size=64, repeats=2, threads=2
    )
    assert result["eager_ms"] > 0 and result["ort_ms"] > 0
    assert result["ratio_eager_over_ort"] == pytest.approx(
        result["eager_ms"] / result["ort_ms"], rel=1e-2
    )
    assert result["provider"] == "CPUExecutionProvider" and result["max_abs_diff"] < 1e-3
    with pytest.raises(UserError, match="backbone"):
        bench_infer(None, "vgg16", size=64, repeats=1, threads=1)
