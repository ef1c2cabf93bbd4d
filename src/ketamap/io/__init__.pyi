"""Public names of ``ketamap.io``, imported lazily by ``__init__.py``."""

__all__ = [
    "atomic",
    "formats",
    "open_volume",
    "points",
    "read_points",
    "volumes",
    "write_cells",
    "write_json",
    "write_ome_zarr",
    "write_table",
]

from . import atomic, formats, points, volumes
from .atomic import write_json, write_table
from .points import read_points, write_cells
from .volumes import open_volume, write_ome_zarr
