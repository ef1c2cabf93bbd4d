"""Reading and writing volumes, points and tables in open formats.

The submodules and names are imported on first use (their list is
``__init__.pyi``), so ``import ketamap.io`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
