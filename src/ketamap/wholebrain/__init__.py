"""Whole-brain census: detect cells, register to an atlas, count per region."""

from ketamap.wholebrain.detect import DetectionParams, detect_cells

__all__ = ["DetectionParams", "detect_cells"]
