"""The files users write, read into validated, typed objects by one mechanism.

Three kinds: the census study manifest (:func:`load_study`), the ensembles
sessions file (:func:`load_sessions`) and the spines sessions file
(:func:`load_spine_sessions`). Each declares its tables as frozen dataclasses and
reads them with :func:`ketamap.params.from_mapping` (:mod:`ketamap.manifest.base`),
so all three share the same rules: did-you-mean on unknown keys, type errors that
name the key and the file, one path rule (relative to the file's folder and never
leaving it; absolute for data kept elsewhere), every data path checked up front,
and one sentence per mistake (:class:`~ketamap.errors.ManifestError`, or
:class:`~ketamap.errors.InputNotFoundError` for data that are not there).
"""

from ketamap.errors import ManifestNotFoundError
from ketamap.manifest.ensembles import Session, SessionsFile, load_sessions, parse_sessions
from ketamap.manifest.spines import (
    Dendrite,
    SpineSessions,
    load_spine_sessions,
    parse_spine_sessions,
)
from ketamap.manifest.study import (
    DEFAULT_KEY_REGIONS,
    SCHEDULES,
    Group,
    Imaging,
    Study,
    Subject,
    load_study,
    parse_study,
    study_to_toml,
)

__all__ = [
    "ManifestNotFoundError",
    "DEFAULT_KEY_REGIONS",
    "SCHEDULES",
    "Group",
    "Imaging",
    "Study",
    "Subject",
    "load_study",
    "parse_study",
    "study_to_toml",
    "Session",
    "SessionsFile",
    "load_sessions",
    "parse_sessions",
    "Dendrite",
    "SpineSessions",
    "load_spine_sessions",
    "parse_spine_sessions",
]
