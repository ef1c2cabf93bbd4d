"""The ensembles sessions file: several imaging sessions of one field of view, as TOML.

Example::

    [field_of_view]
    name = "mouse1-fov1"
    mouse = "mouse1"              # the mouse imaged (optional; default: the name)
    frame_rate_hz = 15.0          # default for every session (optional)
    # cell_map = "cells.csv"      # given mapping: columns session, cell, global_cell (optional)

    [[sessions]]
    label = "baseline"
    time_h = 0.0
    data = "baseline/suite2p/plane0"   # suite2p folder, an .nwb file, or a .npy / .csv array
    # series = "RoiResponseSeries"    # which RoiResponseSeries of an NWB file (optional)
    # neuropil = "baseline_Fneu.npy"  # for plain arrays (optional)
    # frame_rate_hz = 15.0            # overrides the field-of-view default

    [[sessions]]
    label = "stress"
    time_h = 168.0
    data = "stress/suite2p/plane0"

    [params]                      # optional EnsembleParams overrides
    bin_s = 0.2

Paths follow the one rule of every manifest (:func:`ketamap.manifest.base.data_path`).
How cells are matched across sessions is set by ``cell_matching`` in ``[params]``
(see :mod:`ketamap.invivo.ensembles.matching`): by ROI footprints after registering the mean
images, by input index, or by the ``cell_map`` file when one is given.
:func:`load_sessions` validates everything, checks that every path exists, and
raises one sentence for the first problem; it reads no data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ketamap.errors import ManifestError
from ketamap.manifest.base import read_toml, source
from ketamap.params import bounds, from_mapping, tables

__all__ = ["Session", "SessionsFile", "load_sessions", "parse_sessions"]


@dataclass(frozen=True)
class Session:
    """One imaging session.

    Attributes
    ----------
    label : str
        Unique label (e.g. ``"ketamine-3h"``).
    time_h : float
        Time of the session in hours from the first.
    data : Path
        Suite2p folder or trace array (absolute).
    neuropil : Path or None
        Neuropil array for plain-array inputs.
    frame_rate_hz : float or None
        Frame rate; None means "read it from suite2p's ops/settings or the NWB file".
    series : str or None
        Name of the ``RoiResponseSeries`` to read from an NWB file.
    """

    label: str
    time_h: float
    data: Path
    neuropil: Path | None = None
    frame_rate_hz: float | None = None
    series: str | None = None


@dataclass(frozen=True)
class SessionsFile:
    """A validated sessions file.

    Attributes
    ----------
    name : str
        Field-of-view name.
    sessions : tuple of Session
        In time order (``time_h``; sessions at the same time keep the file's order):
        the first is the reference of every comparison.
    params : dict
        The ``[params]`` table, validated by the stage.
    root : Path
        Folder of the sessions file.
    cell_map : Path or None
        A given cell mapping (CSV with ``session, cell, global_cell``).
    mouse : str
        The mouse imaged (``mouse`` in ``[field_of_view]``; by default the field's
        name): fields of one mouse are not independent when mice are compared.
    """

    name: str
    sessions: tuple[Session, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    root: Path = Path(".")
    cell_map: Path | None = None
    mouse: str = ""


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True, kw_only=True)
class FieldOfViewTable:
    """``[field_of_view]``."""

    name: str = field(default="fov", metadata=bounds(nonempty=True))
    mouse: str | None = field(default=None, metadata=bounds(nonempty=True))
    frame_rate_hz: float | None = field(default=None, metadata=bounds(gt=0))
    description: str = ""
    cell_map: Path | None = None


@dataclass(frozen=True, kw_only=True)
class SessionTable:
    """One ``[[sessions]]`` table."""

    label: str = field(metadata=bounds(nonempty=True))
    time_h: float
    data: Path
    neuropil: Path | None = None
    frame_rate_hz: float | None = field(default=None, metadata=bounds(gt=0))
    series: str | None = None


@dataclass(frozen=True, kw_only=True)
class EnsemblesFile:
    """The whole sessions file; ``[params]`` is checked by the stage's parameters class."""

    field_of_view: FieldOfViewTable = field(default_factory=FieldOfViewTable)
    sessions: tuple[SessionTable, ...] = field(
        default=(), metadata=tables("session", label="label", unique=True, at_least=1)
    )
    params: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- parsing


def parse_sessions(
    doc: Mapping[str, Any], *, root: str | os.PathLike, where: str = "sessions file"
) -> SessionsFile:
    """Validate a parsed sessions TOML document.

    Parameters
    ----------
    doc : mapping
        The parsed TOML.
    root : path-like
        Folder that relative paths are resolved against.
    where : str
        Name of the file, for error messages.

    Returns
    -------
    SessionsFile

    Raises
    ------
    ManifestError
        One sentence naming the first problem.
    InputNotFoundError
        If a path it names does not exist.
    """
    root = Path(root).resolve()
    f = from_mapping(EnsemblesFile, doc, where=where, source=source(root, folder="sessions file's"))
    fov = f.field_of_view
    sessions = []
    for s in f.sessions:
        rate = fov.frame_rate_hz if s.frame_rate_hz is None else s.frame_rate_hz
        if s.data.is_file() and rate is None and s.data.suffix.lower() != ".nwb":
            raise ManifestError(
                f'session "{s.label}" of {where} points at the array {s.data.name}, which '
                "records no frame rate; give frame_rate_hz in the session or in [field_of_view]."
            )
        sessions.append(Session(s.label, s.time_h, s.data, s.neuropil, rate, s.series))
    sessions.sort(key=lambda s: s.time_h)  # stable: ties keep the file's order
    mouse = fov.name if fov.mouse is None else fov.mouse
    return SessionsFile(fov.name, tuple(sessions), dict(f.params), root, fov.cell_map, mouse)


def load_sessions(path: str | os.PathLike) -> SessionsFile:
    """Read and validate a sessions TOML file.

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    SessionsFile

    Raises
    ------
    InputNotFoundError
        If the file, or a path it names, does not exist.
    ManifestError
        If it is not valid TOML or fails validation.
    """
    path = Path(path)
    doc = read_toml(path, what="Sessions file")
    return parse_sessions(doc, root=path.parent, where=str(path))
