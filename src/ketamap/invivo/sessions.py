"""The sessions file: several imaging sessions of one field of view, as TOML.

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

Relative paths are relative to the sessions file. How cells are matched across
sessions is set by ``cell_matching`` in ``[params]`` (see
:mod:`ketamap.invivo.matching`): by ROI footprints after registering the mean
images, by input index, or by the ``cell_map`` file when one is given.
:func:`load_sessions` validates everything and raises one
:class:`~ketamap.errors.ManifestError` sentence for the first problem; it
reads no data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ketamap.errors import InputError, InputNotFoundError, ManifestError
from ketamap.tomlfile import check_keys, data_path, read_toml

__all__ = [
    "Session",
    "SessionsFile",
    "load_sessions",
    "parse_sessions",
    "read_cell_map",
    "apply_cell_map",
]

_TOP_KEYS = ("field_of_view", "sessions", "params")
_FOV_KEYS = ("name", "mouse", "frame_rate_hz", "description", "cell_map")
_SESSION_KEYS = ("label", "time_h", "data", "neuropil", "frame_rate_hz", "series")


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


def _number(value: Any, key: str, where: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ManifestError(f"{key} in {where} must be a finite number, got {value!r}.")
    if positive and value <= 0:
        raise ManifestError(f"{key} in {where} must be greater than 0, got {value!r}.")
    return float(value)


def parse_sessions(
    doc: Mapping[str, Any], *, root: Path, where: str = "sessions file"
) -> SessionsFile:
    """Validate a parsed sessions TOML document.

    Parameters
    ----------
    doc : mapping
        The parsed TOML.
    root : Path
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
    """
    check_keys(doc, _TOP_KEYS, where)
    fov = doc.get("field_of_view", {})
    if not isinstance(fov, Mapping):
        raise ManifestError(f"[field_of_view] in {where} must be a table.")
    check_keys(fov, _FOV_KEYS, f"[field_of_view] of {where}")
    name = fov.get("name", "fov")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"name in [field_of_view] of {where} must be a non-empty string.")
    default_rate = None
    if "frame_rate_hz" in fov:
        default_rate = _number(
            fov["frame_rate_hz"], "frame_rate_hz", f"[field_of_view] of {where}", positive=True
        )
    raw = doc.get("sessions")
    if not isinstance(raw, list) or not raw:
        raise ManifestError(f"{where} must list at least one [[sessions]] table.")
    sessions, labels = [], set()
    for i, s in enumerate(raw, start=1):
        w = f"session {i} of {where}"
        if not isinstance(s, Mapping):
            raise ManifestError(f"{w} must be a table.")
        check_keys(s, _SESSION_KEYS, w)
        for key in ("label", "time_h", "data"):
            if key not in s:
                raise ManifestError(f'{w} is missing the required key "{key}".')
        label = s["label"]
        if not isinstance(label, str) or not label.strip():
            raise ManifestError(f"label in {w} must be a non-empty string, got {label!r}.")
        if label in labels:
            raise ManifestError(f'label "{label}" appears twice in {where}; labels must be unique.')
        labels.add(label)
        time_h = _number(s["time_h"], "time_h", w, positive=False)
        data = data_path(s["data"], root, "data", w).resolve()
        neuropil = None
        if "neuropil" in s:
            neuropil = data_path(s["neuropil"], root, "neuropil", w).resolve()
        rate = default_rate
        if "frame_rate_hz" in s:
            rate = _number(s["frame_rate_hz"], "frame_rate_hz", w, positive=True)
        series = s.get("series")
        if series is not None and not isinstance(series, str):
            raise ManifestError(f"series in {w} must be a string, got {series!r}.")
        if data.is_file() and rate is None and data.suffix.lower() != ".nwb":
            raise ManifestError(
                f"{w} points at the array {data.name}, which records no frame rate; "
                "give frame_rate_hz in the session or in [field_of_view]."
            )
        sessions.append(Session(label, time_h, data, neuropil, rate, series))
    params = doc.get("params", {})
    if not isinstance(params, Mapping):
        raise ManifestError(f"[params] in {where} must be a table.")
    cell_map = None
    if "cell_map" in fov:
        cell_map = data_path(
            fov["cell_map"], root, "cell_map", f"[field_of_view] of {where}"
        ).resolve()
    mouse = fov.get("mouse", name)
    if not isinstance(mouse, str) or not mouse:
        raise ManifestError(f"mouse in [field_of_view] of {where} must be a non-empty string.")
    sessions.sort(key=lambda s: s.time_h)  # stable: ties keep the file's order
    return SessionsFile(name, tuple(sessions), dict(params), root, cell_map, mouse)


def load_sessions(path: str | Path) -> SessionsFile:
    """Read and validate a sessions TOML file.

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    ManifestError
        If it is not valid TOML or fails validation.
    """
    path = Path(path)
    doc = read_toml(path, what="Sessions file")
    return parse_sessions(doc, root=path.resolve().parent, where=str(path))


def read_cell_map(path: str | Path, labels) -> pd.DataFrame:
    """Read a given cell mapping: CSV with columns ``session, cell, global_cell``.

    ``cell`` is a cell's index in that session's input, ``global_cell`` any
    integer naming the same cell in every session.

    Parameters
    ----------
    path : path-like
        The CSV file.
    labels : sequence of str
        Session labels of the sessions file.

    Returns
    -------
    DataFrame
        ``session, cell, global_cell`` (int64 ids).

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    InputError
        For missing columns, non-integer ids, unknown sessions or a cell (or
        a global cell) listed twice in one session.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"cell map {path} does not exist.")
    try:
        df = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as e:
        raise InputError(f"cell map {path} could not be read as CSV: {e}.") from e
    missing = [c for c in ("session", "cell", "global_cell") if c not in df.columns]
    if missing:
        raise InputError(
            f"cell map {path} lacks the column(s) {', '.join(missing)}; "
            "it needs session, cell, global_cell."
        )
    df = df[["session", "cell", "global_cell"]].copy()
    df["session"] = df["session"].astype(str)
    for col in ("cell", "global_cell"):
        v = pd.to_numeric(df[col], errors="coerce")
        if v.isna().any() or (v != np.round(v)).any():
            raise InputError(f"column {col} of cell map {path} must hold integers only.")
        df[col] = v.astype(np.int64)
    unknown = sorted(set(df["session"]) - set(labels))
    if unknown:
        raise InputError(
            f"cell map {path} names session {unknown[0]!r}, which is not in the sessions file."
        )
    for col in ("cell", "global_cell"):
        dup = df.duplicated(["session", col])
        if dup.any():
            r = df[dup].iloc[0]
            raise InputError(
                f"cell map {path} lists {col} {r[col]} twice in session {r['session']!r}."
            )
    return df


def apply_cell_map(cell_map: pd.DataFrame, labels, cell_indices) -> list[np.ndarray]:
    """Global id of every cell of every session from a mapping table.

    Cells of a session that the map does not list get new ids of their own
    (they are analysed in their session but compared with no other).

    Parameters
    ----------
    cell_map : DataFrame
        ``session, cell, global_cell`` (see :func:`read_cell_map`).
    labels : sequence of str
        Session labels, in order.
    cell_indices : sequence of ndarray of int
        Input index of each kept cell, per session.

    Returns
    -------
    list of ndarray of int64
    """
    next_id = int(cell_map["global_cell"].max()) + 1 if len(cell_map) else 0
    out = []
    for label, idx in zip(labels, cell_indices, strict=True):
        m = cell_map[cell_map.session == label].set_index("cell")["global_cell"]
        g = m.reindex(np.asarray(idx)).to_numpy(dtype=float)
        new = np.isnan(g)
        g[new] = next_id + np.arange(new.sum())
        next_id += int(new.sum())
        out.append(g.astype(np.int64))
    return out
