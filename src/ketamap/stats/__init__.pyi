"""Public names of ``ketamap.stats``, imported lazily by ``__init__.py``."""

__all__ = [
    "NetworkParams",
    "StatsParams",
    "VoxelParams",
    "benjamini_hochberg",
    "compare_networks",
    "compare_regions",
    "density_map",
    "group_maps",
    "holm",
    "multitest",
    "network",
    "regions",
    "voxel_test",
    "voxels",
]

from . import multitest, network, regions, voxels
from .multitest import benjamini_hochberg, holm
from .network import NetworkParams, compare_networks
from .regions import StatsParams, compare_regions
from .voxels import VoxelParams, density_map, group_maps, voxel_test
