"""Public names of ``ketamap.stats``, imported lazily by ``__init__.py``."""

__all__ = [
    "DensityParams",
    "NetworkParams",
    "StatsParams",
    "VoxelParams",
    "benjamini_hochberg",
    "compare_densities",
    "compare_networks",
    "compare_regions",
    "densities",
    "density_map",
    "group_maps",
    "holm",
    "multitest",
    "network",
    "regions",
    "squeeze_var",
    "voxel_test",
    "voxels",
]

from . import densities, multitest, network, regions, voxels
from .densities import DensityParams, compare_densities, squeeze_var
from .multitest import benjamini_hochberg, holm
from .network import NetworkParams, compare_networks
from .regions import StatsParams, compare_regions
from .voxels import VoxelParams, density_map, group_maps, voxel_test
