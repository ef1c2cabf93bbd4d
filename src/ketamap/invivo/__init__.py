"""In-vivo imaging analyses: calcium-imaging ensembles and their coordination across sessions.

Public entry points: :func:`run_ensembles` (the stage), :func:`run_ensembles_mice`
(the stage over several mice) and :func:`compare_mice`, :func:`analyse_session`
(the pure core of one session), :class:`EnsembleParams`, :func:`load_sessions`,
the readers :func:`read_suite2p` / :func:`read_nwb` / :func:`read_recording`
and cross-session cell matching :func:`match_cells` / :func:`track_cells`.
"""

from ketamap.invivo.cohort import run_ensembles_mice
from ketamap.invivo.matching import match_cells, track_cells
from ketamap.invivo.mice import compare_mice
from ketamap.invivo.nwb_io import read_nwb
from ketamap.invivo.run import EnsembleParams, analyse_session, compare_sessions, run_ensembles
from ketamap.invivo.sessions import Session, SessionsFile, load_sessions
from ketamap.invivo.suite2p_io import Recording, read_array, read_recording, read_suite2p

__all__ = [
    "EnsembleParams",
    "analyse_session",
    "compare_sessions",
    "compare_mice",
    "run_ensembles",
    "run_ensembles_mice",
    "Session",
    "SessionsFile",
    "load_sessions",
    "Recording",
    "read_array",
    "read_recording",
    "read_suite2p",
    "read_nwb",
    "match_cells",
    "track_cells",
]
