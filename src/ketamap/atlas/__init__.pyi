"""Public names of ``ketamap.atlas``, imported lazily by ``__init__.py``."""

__all__ = [
    "Atlas",
    "Ontology",
    "PHANTOM_REGIONS",
    "load_allen",
    "load_atlas",
    "load_brainglobe",
    "make_phantom",
    "write_brainglobe",
]

from .allen import load_allen
from .brainglobe import load_atlas, load_brainglobe, write_brainglobe
from .core import Atlas
from .ontology import Ontology
from .phantom import PHANTOM_REGIONS, make_phantom
