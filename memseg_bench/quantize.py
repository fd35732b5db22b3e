"""Static int8 quantization of an exported model with onnxruntime's quantization tools.

The graph is calibrated on a fixed sample of training images, drawn by seed from the sorted
train ids and preprocessed as evaluation and `memseg predict` feed the model (RGB 0..255 float32,
normalisation inside the graph). The sample and the quantization method are returned for the
export report, so that the int8 model can be remade exactly.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memseg_bench.errors import UserError, first_line

CALIBRATION_SPLIT = "train"
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("QOperator", "QDQ")


@dataclass(frozen=True)
class Int8Method:
    # One scale per output channel of a convolution: depthwise filters differ widely in range.
    per_channel: bool = True
    calibrate_method: str = "minmax"
    symmetric_activations: bool = False
    # Leave the last node (the upsampling of the logits to the input size) in float: its input
    # and output are then not rounded to 8 bits, which is where near-tied classes flip.
    float_output: bool = True
    # QOperator writes the quantized operators themselves (QLinearConv, QLinearAdd, uint8 Pad,
    # ...). In QDQ form onnxruntime's CPU fusions turn every Conv into QLinearConv too, but have
    # no rule for Pad: the EfficientNet "same" pads before each strided convolution then run in
    # float between a DequantizeLinear and a QuantizeLinear, a quarter of the int8 time at 512x512.
    format: str = "QOperator"

    def describe(self) -> dict:
        return {
            "format": self.format,
            "activations": "uint8",
            "weights": "int8",
            "per_channel": self.per_channel,
            "calibrate_method": self.calibrate_method,
            "symmetric_activations": self.symmetric_activations,
            "float_output": self.float_output,
        }


def calibration_ids(train_ids: Sequence[str], count: int, seed: int) -> list[str]:
    """`count` ids drawn with `seed` from the sorted ids (all of them when there are fewer)."""
    if count < 1:
        raise UserError(f"params: 'export.int8_calibration_images' must be at least 1, got {count}")
    ordered = sorted(train_ids)
    if count >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, count))


def calibration_images(index, ids: Sequence[str], input_scale: float) -> Iterator[np.ndarray]:
    """[1, 3, H, W] float32 0..255 per id, as the evaluation loader gives them."""
    from memseg_bench.data.loader import SegmentationDataset

    dataset = SegmentationDataset(
        index, CALIBRATION_SPLIT, list(ids), crop=None, train=False, seed=0, input_scale=input_scale
    )
    for position in range(len(dataset)):
        yield dataset[position]["image"].numpy()[None].astype(np.float32)


def _reader(images: Iterator[np.ndarray], input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Images(CalibrationDataReader):
        def get_next(self):
            image = next(images, None)
            return None if image is None else {input_name: image}

    return Images()


@contextmanager
def _quiet_about_integer_tensors() -> Iterator[None]:
    """onnxruntime's quantizer warns on the root logger about every integer tensor that an Add,
    Mul or Concat it could quantize takes, and leaves it integer: here the shape arithmetic of the
    size-dependent pads and resizes, which must stay so. Those lines alone are dropped."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Inference failed or unsupported type")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _output_node(model) -> str:
    outputs = {output.name for output in model.graph.output}
    return next(node.name for node in model.graph.node if set(node.output) & outputs)


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    images: Iterator[np.ndarray],
    method: Int8Method = Int8Method(),
    input_name: str = "image",
) -> None:
    """Write the int8 model of `fp32_path` to `int8_path`, with the same metadata."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method.format not in FORMATS:
        raise UserError(f"int8 format must be one of {list(FORMATS)}, got {method.format!r}")
    if method.calibrate_method not in CALIBRATE_METHODS:
        raise UserError(
            f"params: 'export.int8_calibrate_method' must be one of {list(CALIBRATE_METHODS)}, "
            f"got {method.calibrate_method!r}"
        )
    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method.calibrate_method]
    source = onnx.load(str(fp32_path))
    with tempfile.TemporaryDirectory(prefix="memseg-int8-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        # Constant folding and shape inference first, so that every tensor gets a quantization
        # range; symbolic shape inference does not follow the exporter's dynamic dims.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        excluded = [_output_node(onnx.load(str(prepared)))] if method.float_output else []
        try:
            with _quiet_about_integer_tensors():
                quantize_static(
                    str(prepared),
                    str(int8_path),
                    _reader(images, input_name),
                    quant_format=getattr(QuantFormat, method.format),
                    per_channel=method.per_channel,
                    # uint8 activations with int8 weights make every Conv a QLinearConv on x86;
                    # with int8 activations (QDQ) the depthwise convolutions stayed float.
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    calibrate_method=calibrate,
                    calibration_providers=["CPUExecutionProvider"],
                    extra_options={"ActivationSymmetric": method.symmetric_activations},
                )
        except Exception as error:  # onnxruntime's quantizer raises assorted types
            raise UserError(
                f"int8 quantization of {fp32_path} failed: {first_line(error)}"
            ) from None
    quantized = onnx.load(str(int8_path))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(source.metadata_props)
    onnx.save_model(quantized, str(int8_path), save_as_external_data=False)
