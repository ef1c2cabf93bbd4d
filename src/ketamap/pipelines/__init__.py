"""The analyses as stages run by the engine: the census, ensembles and spines.

- :func:`run_study` (:mod:`~ketamap.pipelines.census`): per subject detect,
  register and quantify (:mod:`~ketamap.pipelines.census_stages`), then the
  study's statistics and report;
- :func:`run_ensembles`, :func:`run_ensembles_mice` (:mod:`~ketamap.pipelines.ensembles`);
- :func:`run_spines` (:mod:`~ketamap.pipelines.spines`).

Each stage writes one folder through :func:`ketamap.engine.run_stage`: atomic,
with its provenance, skipped when up to date, resumed after a kill. The names
are imported on first use, so ``import ketamap.pipelines`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
