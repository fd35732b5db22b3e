"""memseg_bench: semi-supervised semantic segmentation with a class-wise memory bank."""

__version__ = "0.1.0"
