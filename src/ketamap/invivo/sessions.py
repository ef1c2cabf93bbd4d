"""The sessions file: several imaging sessions of one field of view, as TOML.

Example::

    [field_of_view]
    name = "mouse1-fov1"
    frame_rate_hz = 15.0          # default for every session (optional)

    [[sessions]]
    label = "baseline"
    time_h = 0.0
    data = "baseline/suite2p/plane0"   # suite2p folder, or a .npy / .csv array
    # neuropil = "baseline_Fneu.npy"  # for plain arrays (optional)
    # frame_rate_hz = 15.0            # overrides the field-of-view default

    [[sessions]]
    label = "stress"
    time_h = 168.0
    data = "stress/suite2p/plane0"

    [params]                      # optional EnsembleParams overrides
    bin_s = 0.2

Relative paths are relative to the sessions file. Cells are matched across
sessions by their index in the input (the same ROI set imaged in every
session, as when suite2p is run on concatenated sessions). :func:`load_sessions`
validates everything and raises one :class:`~ketamap.errors.ManifestError`
sentence for the first problem; it reads no data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ketamap.errors import ManifestError
from ketamap.tomlfile import check_keys, read_toml

__all__ = ["Session", "SessionsFile", "load_sessions", "parse_sessions"]

_TOP_KEYS = ("field_of_view", "sessions", "params")
_FOV_KEYS = ("name", "frame_rate_hz", "description")
_SESSION_KEYS = ("label", "time_h", "data", "neuropil", "frame_rate_hz")


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
        Frame rate; None means "read it from suite2p's ops/settings".
    """

    label: str
    time_h: float
    data: Path
    neuropil: Path | None = None
    frame_rate_hz: float | None = None


@dataclass(frozen=True)
class SessionsFile:
    """A validated sessions file.

    Attributes
    ----------
    name : str
        Field-of-view name.
    sessions : tuple of Session
        In the order given (sorted by time is recommended, not required).
    params : dict
        The ``[params]`` table, validated by the stage.
    root : Path
        Folder of the sessions file.
    """

    name: str
    sessions: tuple[Session, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    root: Path = Path(".")


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
        default_rate = _number(fov["frame_rate_hz"], "frame_rate_hz", f"[field_of_view] of {where}",
                               positive=True)
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
        if not isinstance(s["data"], str):
            raise ManifestError(f"data in {w} must be a path string, got {s['data']!r}.")
        data = (root / s["data"]).resolve()
        neuropil = None
        if "neuropil" in s:
            if not isinstance(s["neuropil"], str):
                raise ManifestError(f"neuropil in {w} must be a path string.")
            neuropil = (root / s["neuropil"]).resolve()
        rate = default_rate
        if "frame_rate_hz" in s:
            rate = _number(s["frame_rate_hz"], "frame_rate_hz", w, positive=True)
        if data.is_file() and rate is None:
            raise ManifestError(
                f"{w} points at the array {data.name}, which records no frame rate; "
                "give frame_rate_hz in the session or in [field_of_view]."
            )
        sessions.append(Session(label, time_h, data, neuropil, rate))
    params = doc.get("params", {})
    if not isinstance(params, Mapping):
        raise ManifestError(f"[params] in {where} must be a table.")
    return SessionsFile(name, tuple(sessions), dict(params), root)


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
