"""ONNX export of a trained segmenter with a parity check against PyTorch eager.

The exported graph takes "image" float32 [N, 3, H, W] RGB in 0..255 (normalisation is inside) and
returns "logits" [N, C, H, W], upsampled bilinearly to the input size. Batch, height and width are
dynamic. One self-contained .onnx file carries the class names, palette, config hash and
normalisation as metadata, which `memseg predict` reads.

With an `Int8Export`, a static int8 model is made from the checked fp32 one and both are scored on
the protocol's evaluation split; the int8 model must stay within a tolerance of the fp32 mIoU.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from memseg_bench.errors import UserError
from memseg_bench.fileio import atomic_path, write_json
from memseg_bench.quantize import Int8Method

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
PARITY_PROVIDER = "CPUExecutionProvider"


class FullResolution(nn.Module):
    """Segmenter logits upsampled to the input size (with the segmenter's own align_corners);
    the features are dropped."""

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits, _ = self.segmenter(image)
        return F.interpolate(
            logits,
            size=image.shape[-2:],
            mode="bilinear",
            align_corners=self.segmenter.align_corners,
        )


def export_model(wrapper: nn.Module, path: Path, opset: int, metadata: dict[str, str]) -> None:
    """Export `wrapper` (eval mode, CPU) to a single .onnx file at `path` (written in place)."""
    import onnx
    from torch.export import Dim

    dims = {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}
    example = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own export internals emit deprecation notices a user cannot act on.
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            wrapper.eval(),
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            dynamic_shapes={INPUT_NAME: dims},
            verbose=False,
        )
    proto = program.model_proto
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    # Parameters are embedded in the proto; no external data file is written.
    onnx.save_model(proto, str(path), save_as_external_data=False)


@dataclass(frozen=True)
class Int8Export:
    """Where the int8 model goes, how it is calibrated, and how much mIoU it may lose."""

    path: Path
    calibration_images: int = 32
    calibration_seed: int = 0
    max_miou_drop: float = 1.0  # mIoU points on the evaluation split
    method: Int8Method = field(default_factory=Int8Method)


def ort_session(path: Path, providers: Sequence[str], threads: int = 0):
    from memseg_bench.runtime import Tuning, create_session

    return create_session(path, providers, Tuning(threads=threads))


def _parity_sizes(sizes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    distinct = list(dict.fromkeys((int(h), int(w)) for h, w in sizes))
    if not distinct:
        raise UserError("params: 'export.parity_sizes' must list at least one (height, width)")
    if len(distinct) < 2:  # always check two different shapes
        height, width = distinct[0]
        distinct.append((height + 32, width + 16))
    return distinct


def parity_check(
    wrapper: nn.Module, session, sizes: Sequence[Sequence[int]], seed: int = 0
) -> list[dict]:
    """Eager vs onnxruntime on random 0..255 images at each size, batch 1 and 2."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for height, width in _parity_sizes(sizes):
        for batch in (1, 2):
            image = torch.rand(batch, 3, height, width, generator=generator) * 255
            with torch.inference_mode():
                expected = wrapper(image).numpy()
            (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: image.numpy()})
            if actual.shape != expected.shape:
                raise UserError(
                    f"ONNX output shape {actual.shape} differs from PyTorch {expected.shape}"
                )
            rows.append(
                {
                    "batch": batch,
                    "height": height,
                    "width": width,
                    "max_abs_diff": float(np.abs(actual - expected).max()),
                    "argmax_agreement": float((actual.argmax(1) == expected.argmax(1)).mean()),
                }
            )
    return rows


def metadata_for(info: dict, num_classes: int) -> dict[str, str]:
    config = info["config"]
    return {
        "class_names": json.dumps(list(info["class_names"])),
        "palette": json.dumps([[int(v) for v in rgb] for rgb in info["palette"]]),
        "config_hash": str(info["config_hash"]),
        "mean": json.dumps(list(config.data.mean)),
        "std": json.dumps(list(config.data.std)),
        "num_classes": str(num_classes),
        "producer": "memseg_bench",
    }


def export_onnx(
    model_file: str | Path,
    onnx_path: str | Path,
    report_path: str | Path,
    sizes: Sequence[Sequence[int]] = ((64, 64), (96, 128)),
    opset: int = 18,
    max_abs_tolerance: float = 1e-3,
    min_argmax_agreement: float = 0.999,
    int8: Int8Export | None = None,
) -> dict:
    """Export the segmenter in `model_file` to `onnx_path` and write the parity report.

    The .onnx files only appear when every check passes (parity, and the int8 mIoU drop when
    `int8` is given), and the report after them; on failure the report is still written and a
    UserError is raised."""
    import onnxruntime as ort

    from memseg_bench.models import load_segmenter

    segmenter, info = load_segmenter(model_file)
    wrapper = FullResolution(segmenter).eval()
    onnx_path, report_path = Path(onnx_path), Path(report_path)
    with atomic_path(onnx_path) as tmp:
        export_model(wrapper, tmp, opset, metadata_for(info, segmenter.num_classes))
        session = ort_session(tmp, [PARITY_PROVIDER])
        checks = parity_check(wrapper, session, sizes)
        worst_diff = max(row["max_abs_diff"] for row in checks)
        worst_agreement = min(row["argmax_agreement"] for row in checks)
        passed = worst_diff <= max_abs_tolerance and worst_agreement >= min_argmax_agreement
        report = {
            "model_file": str(model_file),
            "onnx": str(onnx_path),
            "onnx_bytes": tmp.stat().st_size,
            "opset": opset,
            "config_hash": info["config_hash"],
            "provider": session.get_providers()[0],
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "max_abs_diff": worst_diff,
            "min_argmax_agreement": worst_agreement,
            "max_abs_tolerance": max_abs_tolerance,
            "min_argmax_agreement_required": min_argmax_agreement,
            "passed": passed,
            "checks": checks,
        }
        if not passed:
            write_json(report_path, report)
            raise UserError(
                f"ONNX parity failed for {onnx_path}: max abs diff {worst_diff:.3g} "
                f"(tolerance {max_abs_tolerance}), argmax agreement {worst_agreement:.5f} "
                f"(required {min_argmax_agreement}); see {report_path}"
            )
        if int8 is not None:
            with atomic_path(int8.path) as int8_tmp:
                report["int8"] = int8_check(tmp, int8_tmp, int8, info["config"])
                if not report["int8"]["passed"]:
                    write_json(report_path, report)
                    checked = report["int8"]
                    raise UserError(
                        f"int8 model of {onnx_path} loses {checked['miou_drop']:.2f} mIoU points "
                        f"({100 * checked['fp32_miou']:.2f} -> {100 * checked['int8_miou']:.2f}"
                        f" on {checked['eval_split']}), more than "
                        f"export.int8_max_miou_drop {int8.max_miou_drop}; see {report_path}"
                    )
    # After the models are in place: a passing report never names a model that is not there.
    write_json(report_path, report)
    return report


def int8_check(fp32_path: Path, int8_path: Path, settings: Int8Export, config) -> dict:
    """Quantize `fp32_path` into `int8_path`, score both on the evaluation split, and compare."""
    from memseg_bench.data.datasets import open_dataset
    from memseg_bench.onnx_scoring import score_session
    from memseg_bench.quantize import (
        CALIBRATION_SPLIT,
        calibration_ids,
        calibration_images,
        quantize_int8,
    )

    index = open_dataset(config.data)
    ids = calibration_ids(
        index.ids(CALIBRATION_SPLIT), settings.calibration_images, settings.calibration_seed
    )
    images = calibration_images(index, ids, config.data.input_scale)
    quantize_int8(fp32_path, int8_path, images, settings.method, INPUT_NAME)
    fp32 = ort_session(fp32_path, [PARITY_PROVIDER])
    quantized = ort_session(int8_path, [PARITY_PROVIDER])
    fp32_scores, fp32_pass = score_session(fp32, config)
    int8_scores, int8_pass = score_session(quantized, config, compare_with=fp32_pass.classes)
    drop = 100 * (fp32_scores["miou"] - int8_scores["miou"])
    return {
        "onnx": str(settings.path),
        "onnx_bytes": int8_path.stat().st_size,
        "calibration": {
            "split": CALIBRATION_SPLIT,
            "images": len(ids),
            "seed": settings.calibration_seed,
            "ids": ids,
        },
        "method": settings.method.describe(),
        "eval_split": config.evaluate.split,
        "eval_images": int8_scores["num_images"],
        "fp32_miou": fp32_scores["miou"],
        "int8_miou": int8_scores["miou"],
        "miou_drop": round(drop, 4),
        "max_miou_drop": settings.max_miou_drop,
        "pixel_agreement": int8_pass.agreement,
        "passed": drop <= settings.max_miou_drop,
    }
