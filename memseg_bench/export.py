"""ONNX export of a trained segmenter with a parity check against PyTorch eager.

The exported graph takes "image" float32 [N, 3, H, W] RGB in 0..255 (normalisation is inside) and
returns "logits" [N, C, H, W], upsampled bilinearly to the input size. Batch, height and width are
dynamic. One self-contained .onnx file carries the class names, palette, config hash and
normalisation as metadata, which `memseg predict` reads.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from memseg_bench.errors import UserError
from memseg_bench.fileio import atomic_path, write_json

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
PARITY_PROVIDER = "CPUExecutionProvider"


class FullResolution(nn.Module):
    """Segmenter logits upsampled to the input size; the features are dropped."""

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits, _ = self.segmenter(image)
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


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


def ort_session(path: Path, providers: Sequence[str], threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


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
) -> dict:
    """Export the segmenter in `model_file` to `onnx_path` and write the parity report.

    The .onnx file only appears when parity passes, and its report after it; on failure the report
    is still written and a UserError is raised."""
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
    # After the model is in place: a passing report never names a model that is not there.
    write_json(report_path, report)
    return report
