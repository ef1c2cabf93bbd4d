"""Statistics: region-level group comparisons (and, later, voxel-wise maps).

Submodules are imported on first use, so ``import ketamap.stats`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=["regions"],
    submod_attrs={"regions": ["StatsParams", "compare_regions", "benjamini_hochberg"]},
)
