"""Atlases: annotation, hemispheres, reference and the region ontology.

Loaders for the phantom (no files needed), the Allen CCFv3 files and
BrainGlobe atlas folders, all returning one :class:`Atlas` type in the
atlas' own orientation (``"asr"`` for Allen and BrainGlobe atlases).

The names below are imported on first use (their list is ``__init__.pyi``),
so ``import ketamap.atlas`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
