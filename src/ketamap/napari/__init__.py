"""The napari plugin: open ketamap's outputs, proofread cells, train the second pass.

An npe2 plugin (``napari.yaml``, shipped with the package) with readers for a
census subject, a cells file and the spines and ensembles outputs
(:mod:`ketamap.napari.readers`, :mod:`ketamap.napari.invivo`), a writer of
points to cellfinder XML or ketamap's labels table (:mod:`ketamap.napari.writers`),
a simulated brain as sample data (:mod:`ketamap.napari.sample`) and the
proofreading widget (:mod:`ketamap.napari.widget`, on :mod:`ketamap.napari.proofread`).

The readers, the writer and the proofreading logic need neither napari nor Qt;
the widget needs both (``pip install "ketamap[napari]"``). Names are imported
on first use (their list is ``__init__.pyi``), so ``import ketamap.napari`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
