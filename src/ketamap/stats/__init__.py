"""Statistics: region-level group comparisons, voxel-wise maps and correlation networks.

Submodules are imported on first use (their list is ``__init__.pyi``), so
``import ketamap.stats`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
