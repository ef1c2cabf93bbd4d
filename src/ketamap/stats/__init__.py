"""Statistics: region-level group comparisons, voxel-wise maps and correlation networks.

Submodules are imported on first use, so ``import ketamap.stats`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=["multitest", "regions", "voxels", "network"],
    submod_attrs={
        "multitest": ["benjamini_hochberg", "holm"],
        "regions": ["StatsParams", "compare_regions"],
        "voxels": ["VoxelParams", "density_map", "group_maps", "voxel_test"],
        "network": ["NetworkParams", "compare_networks"],
    },
)
