"""Import torchvision through here, never directly.

A CUDA build of torchvision beside a CPU build of torch fails at import time because its compiled
extension cannot load, and torchvision then registers Python fallbacks for ops whose schemas were
never declared. Declaring the two missing schemas lets the pure-Python parts (models, transforms)
import normally. When the extension loads, this module does nothing.
"""

from __future__ import annotations

import sys
from types import ModuleType

_schemas_library = None


def _declare_missing_schemas() -> None:
    global _schemas_library
    import torch

    if _schemas_library is not None:
        return
    _schemas_library = torch.library.Library("torchvision", "DEF")
    _schemas_library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _schemas_library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")


def import_torchvision() -> ModuleType:
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _declare_missing_schemas()
        import torchvision
    return torchvision


def tv_models() -> ModuleType:
    import_torchvision()
    import torchvision.models

    return torchvision.models
