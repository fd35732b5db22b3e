"""`memseg export --int8`: the int8 model, its calibration record, its mIoU beside the fp32 one,
and the tolerance that fails the export stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from memseg_bench.errors import UserError
from tests.project import memseg, one_error_line

SIZES = [[32, 32], [48, 40]]
CALIBRATION_IMAGES = 6
DATA = {"name": "synthetic", "synthetic": {"n_train": 16, "n_val": 2, "n_test": 6, "size": 32}}
MODEL = {"backbone": "resnet18", "weights": None, "decoder_channels": 16, "feature_dim": 16}


def write_model_file(path: Path, data_root: Path) -> None:
    """A random-init ResNet-18 DeepLabv3+ model file whose config points at `data_root`."""
    import torch

    from memseg_bench.config import config_from_dict, config_hash, config_to_dict
    from memseg_bench.data.datasets import open_dataset
    from memseg_bench.models import build_segmenter

    config = config_from_dict({"data": {**DATA, "root": str(data_root)}, "model": MODEL})
    index = open_dataset(config.data)
    torch.manual_seed(0)
    net = build_segmenter(config.model, index.num_classes, config.data.mean, config.data.std)
    with torch.no_grad():  # spread the classifier: fewer near-tied classes
        net.head.classifier.weight.mul_(20)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model_state": net.state_dict(),
            "config": config_to_dict(config),
            "class_names": list(index.class_names),
            "palette": [list(rgb) for rgb in index.palette],
            "config_hash": config_hash(config),
        },
        path,
    )


def split_images(project: Path) -> list[Path]:
    from memseg_bench.data.datasets import open_dataset
    from memseg_bench.models import load_segmenter

    index = open_dataset(load_segmenter(project / "runs/r/model.pt")[1]["config"].data)
    return [index.paths("test", item)[0] for item in index.ids("test")]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from memseg_bench.config import SyntheticConfig
    from memseg_bench.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("int8")
    generate_synthetic(root / "data", SyntheticConfig(**DATA["synthetic"]))
    write_model_file(root / "runs" / "r" / "model.pt", root / "data")
    return root


@pytest.fixture(scope="module")
def exported(project) -> dict:
    from memseg_bench.export import Int8Export, export_onnx

    settings = Int8Export(project / "models/student.int8.onnx", CALIBRATION_IMAGES, 3)
    report = export_onnx(
        project / "runs/r/model.pt",
        project / "models/student.onnx",
        project / "check.json",
        sizes=SIZES,
        int8=settings,
    )
    return report


def test_int8_report_records_the_calibration_sample_method_and_scores(project, exported):
    from memseg_bench.data.datasets import open_dataset
    from memseg_bench.models import load_segmenter
    from memseg_bench.quantize import calibration_ids

    report = json.loads((project / "check.json").read_text())
    assert report == exported and report["passed"] is True
    checked = report["int8"]
    config = load_segmenter(project / "runs/r/model.pt")[1]["config"]
    train_ids = open_dataset(config.data).ids("train")
    calibration = checked["calibration"]
    assert calibration["split"] == "train" and calibration["seed"] == 3
    assert calibration["images"] == CALIBRATION_IMAGES == len(set(calibration["ids"]))
    assert calibration["ids"] == calibration_ids(train_ids, CALIBRATION_IMAGES, 3)
    assert set(calibration["ids"]) < set(train_ids)
    assert checked["method"]["format"] == "QOperator"
    assert checked["eval_split"] == "test" and checked["eval_images"] == 6
    assert 0 < checked["fp32_miou"] <= 1 and 0 < checked["int8_miou"] <= 1
    drop = 100 * (checked["fp32_miou"] - checked["int8_miou"])
    assert checked["miou_drop"] == pytest.approx(drop, abs=1e-3)
    assert checked["passed"] is True and checked["max_miou_drop"] == 1.0


def test_int8_model_is_quantized_keeps_the_metadata_and_agrees_with_fp32(project, exported):
    import onnx
    import onnxruntime as ort

    from memseg_bench.export import ort_session

    fp32 = onnx.load(str(project / "models/student.onnx"))
    int8 = onnx.load(str(project / "models/student.int8.onnx"))
    ops = [node.op_type for node in int8.graph.node]
    # Every convolution is an integer one, and float tensors come back only at the edges.
    assert ops.count("QLinearConv") == [n.op_type for n in fp32.graph.node].count("Conv")
    assert "Conv" not in ops and ops.count("QLinearAdd") > 0
    assert ops.count("DequantizeLinear") < 5 and ops.count("QuantizeLinear") < 5
    weights = [t for t in int8.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights, "no int8 weights"
    assert {p.key: p.value for p in int8.metadata_props} == {
        p.key: p.value for p in fp32.metadata_props
    }
    assert exported["int8"]["onnx_bytes"] < 0.5 * exported["onnx_bytes"]
    # Parity bounds on images the calibration never saw (the test split), batched.
    image = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in split_images(project)])
    image = np.ascontiguousarray(image.transpose(0, 3, 1, 2), dtype=np.float32)
    providers = ["CPUExecutionProvider"]
    (expected,) = ort_session(project / "models/student.onnx", providers).run(
        ["logits"], {"image": image}
    )
    session = ort.InferenceSession(str(project / "models/student.int8.onnx"), providers=providers)
    (actual,) = session.run(["logits"], {"image": image})
    assert actual.shape == expected.shape
    spread = float(expected.max() - expected.min())
    assert np.abs(actual - expected).mean() < 0.05 * spread
    assert (actual.argmax(1) == expected.argmax(1)).mean() > 0.9
    assert exported["int8"]["pixel_agreement"] > 0.9


def _pad_between_convolutions(path: Path) -> None:
    """Conv, ReLU, a bottom/right pad whose size is computed from the tensor's shape (as for
    EfficientNet's "same" strided convolutions), a strided Conv, ReLU, Conv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w1": (8, 3, 3, 3), "w2": (8, 8, 3, 3), "w3": (4, 8, 1, 1)}
    integers = {"zeros": np.zeros(6), "two": np.array([2]), "one": np.array([1])}
    initializers = [
        numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        for name, shape in weights.items()
    ] + [numpy_helper.from_array(value.astype(np.int64), name) for name, value in integers.items()]
    steps = [
        ("Conv", ["image", "w1"], {"pads": [1, 1, 1, 1]}),
        ("Relu", ["c1"], {}),
        ("Shape", ["r1"], {"start": 2}),
        ("Mod", ["size", "two"], {}),
        ("Sub", ["one", "parity"], {}),
        ("Concat", ["zeros", "extra"], {"axis": 0}),
        ("Pad", ["r1", "pads"], {}),
        ("Conv", ["p1", "w2"], {"strides": [2, 2]}),
        ("Relu", ["c2"], {}),
        ("Conv", ["r2", "w3"], {}),
    ]
    outputs = ["c1", "r1", "size", "parity", "extra", "pads", "p1", "c2", "r2", "logits"]
    nodes = [
        helper.make_node(op, inputs, [output], name=f"node_{output}", **attributes)
        for (op, inputs, attributes), output in zip(steps, outputs, strict=True)
    ]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "pad", [image], [logits], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, str(path))


def test_int8_pads_run_on_uint8(tmp_path):
    """onnxruntime's CPU fusions have no QDQ rule for Pad; the int8 model must pad the uint8
    tensor itself, not dequantize, pad in float and quantize again."""
    import onnx
    import onnxruntime as ort

    from memseg_bench.quantize import quantize_int8

    _pad_between_convolutions(tmp_path / "fp32.onnx")
    images = np.random.default_rng(1).uniform(0, 255, (4, 1, 3, 20, 18)).astype(np.float32)
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", iter(images))
    int8 = onnx.load(str(tmp_path / "int8.onnx"))
    producers = {out: node.op_type for node in int8.graph.node for out in node.output}
    [pad] = [node for node in int8.graph.node if node.op_type == "Pad"]
    assert producers[pad.input[0]] == "QLinearConv"
    providers = ["CPUExecutionProvider"]
    feed = {"image": images[0]}
    (expected,) = ort.InferenceSession(str(tmp_path / "fp32.onnx"), providers=providers).run(
        None, feed
    )
    (actual,) = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=providers).run(
        None, feed
    )
    assert actual.shape == expected.shape == (1, 4, 10, 9)
    assert np.abs(actual - expected).mean() < 0.05 * float(expected.max() - expected.min())


def test_calibration_sample_is_fixed_by_its_seed():
    from memseg_bench.quantize import calibration_ids

    ids = [f"{i:04d}" for i in range(50, 0, -1)]
    first = calibration_ids(ids, 8, 0)
    assert first == calibration_ids(list(reversed(ids)), 8, 0) == sorted(first)
    assert first != calibration_ids(ids, 8, 1)
    assert calibration_ids(ids, 80, 0) == sorted(ids)
    with pytest.raises(UserError, match="int8_calibration_images"):
        calibration_ids(ids, 0, 0)


def test_int8_beyond_the_tolerance_fails_the_export(project, exported, monkeypatch, tmp_path):
    import shutil

    import memseg_bench.export
    from memseg_bench.export import Int8Export, export_onnx

    def reuse(wrapper, path, opset, metadata):  # the module's fp32 export, not a new one
        shutil.copyfile(project / "models/student.onnx", path)

    monkeypatch.setattr(memseg_bench.export, "export_model", reuse)
    # No model scores 100 points above its fp32 self: the check must fail.
    strict = Int8Export(tmp_path / "out/student.int8.onnx", CALIBRATION_IMAGES, 3, -100.0)
    with pytest.raises(UserError) as info:
        export_onnx(
            project / "runs/r/model.pt",
            tmp_path / "out/student.onnx",
            tmp_path / "check.json",
            sizes=SIZES,
            int8=strict,
        )
    message = str(info.value)
    assert "export.int8_max_miou_drop -100.0" in message and "\n" not in message
    assert list((tmp_path / "out").iterdir()) == []  # neither model is left
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["passed"] is True and report["int8"]["passed"] is False
    assert report["int8"]["fp32_miou"] == exported["int8"]["fp32_miou"]
    assert report["int8"]["int8_miou"] == exported["int8"]["int8_miou"]


def test_export_int8_command_line(project, exported):
    """The stage as DVC runs it: params switch on, then the tolerance error in one line."""
    params = {
        "data": {**DATA, "root": str(project / "data")},
        "model": MODEL,
        "export": {
            "run": "r",
            "parity_sizes": SIZES,
            "int8": True,
            "int8_calibration_images": 4,
        },
    }
    work = project / "cli"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    (work / "runs").symlink_to(project / "runs")
    result = memseg(work, "export")
    assert "models/student.int8.onnx: mIoU" in result.stdout
    report = json.loads((work / "reports/export_check.json").read_text())
    assert report["int8"]["calibration"]["images"] == 4
    assert (work / "models/student.int8.onnx").is_file()
    params["export"]["int8_max_miou_drop"] = -100.0
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    failed = memseg(work, "export", "--output", "m2/a.onnx", "--int8-output", "m2/b.onnx",
                    check=False)  # fmt: skip
    one_error_line(failed, "int8 model of m2/a.onnx loses", "export.int8_max_miou_drop")
    assert not (work / "m2").exists() or not list((work / "m2").iterdir())
