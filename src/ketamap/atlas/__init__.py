"""Atlases: annotation, hemispheres, reference and the region ontology.

Loaders for the phantom (no files needed), the Allen CCFv3 files and
BrainGlobe atlas folders, all returning one :class:`Atlas` type in the
atlas' own orientation (``"asr"`` for Allen and BrainGlobe atlases).
"""

from ketamap.atlas.allen import load_allen
from ketamap.atlas.brainglobe import load_atlas, load_brainglobe, write_brainglobe
from ketamap.atlas.core import Atlas
from ketamap.atlas.ontology import Ontology
from ketamap.atlas.phantom import PHANTOM_REGIONS, make_phantom

__all__ = [
    "Atlas",
    "Ontology",
    "make_phantom",
    "load_allen",
    "load_brainglobe",
    "write_brainglobe",
    "load_atlas",
    "PHANTOM_REGIONS",
]
