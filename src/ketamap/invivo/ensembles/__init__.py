"""Coactive ensembles from calcium imaging, and their coordination across sessions.

Public entry points: :func:`analyse_session` (the pure core of one session:
traces in, events, coactivity and ensembles out) with :class:`EnsembleParams`,
:func:`compare_sessions` (sessions of one field compared on their shared cells),
:func:`compare_mice` (sessions compared across mice by a mixed model) and
cross-session cell matching :func:`match_cells` / :func:`track_cells`.

The names are imported on first use (their list is ``__init__.pyi``), so
``import ketamap.invivo.ensembles`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
