"""Dendritic spine turnover across imaging sessions.

Public entry points: :func:`analyse_dendrite` (the pure core of one
dendrite), :class:`SpineParams`,
the turnover measures of :mod:`ketamap.invivo.spines.metrics`, and the
annotation helpers :func:`export_annotations` / :func:`import_annotations`.
The sessions file is read by :func:`ketamap.manifest.load_spine_sessions`, and the
stage is :func:`ketamap.pipelines.run_spines`.

The names are imported on first use (their list is ``__init__.pyi``), so
``import ketamap.invivo.spines`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
