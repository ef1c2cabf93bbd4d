"""Public names of ``ketamap.wholebrain``, imported lazily by ``__init__.py``."""

__all__ = [
    "DetectionParams",
    "FibreParams",
    "detect_cells",
    "fibre_length_table",
    "segment_fibres",
]

from .detect import DetectionParams, detect_cells
from .fibres import FibreParams, fibre_length_table, segment_fibres
