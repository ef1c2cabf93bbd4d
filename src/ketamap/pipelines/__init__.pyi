"""Public names of ``ketamap.pipelines``, imported lazily by ``__init__.py``."""

__all__ = ["run_ensembles", "run_ensembles_mice", "run_spines", "run_study"]

from .census import run_study
from .ensembles import run_ensembles, run_ensembles_mice
from .spines import run_spines
