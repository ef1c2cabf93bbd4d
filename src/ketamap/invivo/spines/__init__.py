"""Dendritic spine turnover across imaging sessions.

Public entry points: :func:`run_spines` (the stage), :func:`analyse_dendrite`
(the pure core of one dendrite), :class:`SpineParams`,
:func:`load_spine_sessions`, the turnover measures of
:mod:`ketamap.invivo.spines.metrics`, and the annotation helpers
:func:`export_annotations` / :func:`import_annotations`.
"""

from ketamap.invivo.spines.annotations import (
    export_annotations,
    export_napari,
    import_annotations,
)
from ketamap.invivo.spines.core import analyse_dendrite
from ketamap.invivo.spines.metrics import (
    cluster_sign_flip,
    interval_rates,
    mixed_model,
    pooled_rates,
    presence_matrix,
    return_to_lost_sites,
)
from ketamap.invivo.spines.params import SpineParams
from ketamap.invivo.spines.run import run_spines
from ketamap.invivo.spines.score import score_spines
from ketamap.invivo.spines.sessions import load_spine_sessions
from ketamap.invivo.spines.track import track_spines

__all__ = [
    "SpineParams",
    "analyse_dendrite",
    "cluster_sign_flip",
    "export_annotations",
    "export_napari",
    "import_annotations",
    "interval_rates",
    "load_spine_sessions",
    "mixed_model",
    "pooled_rates",
    "presence_matrix",
    "return_to_lost_sites",
    "run_spines",
    "score_spines",
    "track_spines",
]
