"""Public names of ``ketamap.invivo.spines``, imported lazily by ``__init__.py``."""

__all__ = [
    "SpineParams",
    "analyse_dendrite",
    "cluster_sign_flip",
    "export_annotations",
    "export_napari",
    "import_annotations",
    "interval_rates",
    "mixed_model",
    "pooled_rates",
    "presence_matrix",
    "return_to_lost_sites",
    "score_spines",
    "track_spines",
]

from .annotations import export_annotations, export_napari, import_annotations
from .core import analyse_dendrite
from .metrics import (
    cluster_sign_flip,
    interval_rates,
    mixed_model,
    pooled_rates,
    presence_matrix,
    return_to_lost_sites,
)
from .params import SpineParams
from .score import score_spines
from .track import track_spines
