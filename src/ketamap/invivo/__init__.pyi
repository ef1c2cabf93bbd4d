"""Public names of ``ketamap.invivo``, imported lazily by ``__init__.py``."""

__all__ = ["ensembles", "spines"]

from . import ensembles, spines
