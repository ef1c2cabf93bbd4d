"""Public names of ``ketamap.napari``, imported lazily by ``__init__.py``."""

__all__ = [
    "get_reader",
    "invivo",
    "proofread",
    "proofreading_widget",
    "read",
    "readers",
    "simulated_brain",
    "write_points",
    "writers",
]

from . import invivo, proofread, readers, writers
from .readers import get_reader, read
from .sample import simulated_brain
from .widget import proofreading_widget
from .writers import write_points
