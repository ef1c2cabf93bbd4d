"""Public names of ``ketamap.invivo.ensembles``, imported lazily by ``__init__.py``."""

__all__ = [
    "EnsembleParams",
    "SessionResult",
    "analyse_session",
    "compare_mice",
    "compare_sessions",
    "match_cells",
    "track_cells",
]

from .matching import match_cells, track_cells
from .mice import compare_mice
from .session import EnsembleParams, SessionResult, analyse_session, compare_sessions
