"""In-vivo imaging analyses: calcium-imaging ensembles and dendritic spine turnover.

- :mod:`ketamap.invivo.ensembles`: events, coactivity and ensembles of one
  session, cells matched across sessions, sessions compared within a field and
  across mice;
- :mod:`ketamap.invivo.spines`: spines detected, tracked and counted across
  sessions, turnover rates and the return to lost sites.

The stages that read a sessions file and write the tables are in
:mod:`ketamap.pipelines` (:func:`~ketamap.pipelines.run_ensembles`,
:func:`~ketamap.pipelines.run_spines`); traces are read by :mod:`ketamap.io.traces`.
The subpackages are imported on first use, so ``import ketamap.invivo`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
