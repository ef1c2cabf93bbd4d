"""Public names of ``ketamap.wholebrain``, imported lazily by ``__init__.py``."""

__all__ = [
    "DetectionParams",
    "detect_cells",
]

from .detect import DetectionParams, detect_cells
