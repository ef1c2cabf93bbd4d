"""Whole-brain census: detect cells, register to an atlas, count per region.

The names are imported on first use (their list is ``__init__.pyi``), so
``import ketamap.wholebrain`` imports neither the detector's stack nor the
registration libraries.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
