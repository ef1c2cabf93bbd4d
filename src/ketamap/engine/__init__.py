"""The engine: one stage runner for every analysis, and the Dask scheduler choice.

See :mod:`ketamap.engine.stage` for the rules every stage follows (provenance,
skip what is up to date, atomic outputs, resume after a kill). The names are
imported on first use, so ``import ketamap.engine`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
