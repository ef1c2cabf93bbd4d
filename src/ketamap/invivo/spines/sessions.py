"""The spine sessions file: dendrites imaged over sessions, as TOML.

Example::

    name = "cohort-1"
    pixel_size_um = 0.15           # default for every dendrite

    [[sessions]]                   # in time order
    label = "baseline-1"
    time_h = 0.0

    [[sessions]]
    label = "stress"
    time_h = 504.0

    [[dendrites]]
    name = "m1-d1"
    mouse = "m1"
    # pixel_size_um = 0.12         # overrides the default
    images = { "baseline-1" = "images/m1-d1_b1.tif", "stress" = "images/m1-d1_s.tif" }

    [params]                       # optional SpineParams overrides
    match_tolerance_um = 1.0

Images are 2D (y, x) projections or 3D (z, y, x) stacks (maximum-projected
along z). Relative paths are relative to the sessions file. Every dendrite
must give an image for every session. :func:`load_spine_sessions` reads no
image; it raises one :class:`~ketamap.errors.ManifestError` sentence for the
first problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ketamap.errors import ManifestError
from ketamap.tomlfile import check_keys, data_path, read_toml

__all__ = ["Dendrite", "SpineSessions", "load_spine_sessions"]

_TOP = ("name", "pixel_size_um", "sessions", "dendrites", "params")
_SESSION = ("label", "time_h")
_DENDRITE = ("name", "mouse", "pixel_size_um", "images")


@dataclass(frozen=True)
class Dendrite:
    """One dendrite: its mouse, pixel size and one image per session label."""

    name: str
    mouse: str
    pixel_size_um: float
    images: dict


@dataclass(frozen=True)
class SpineSessions:
    """A validated spine sessions file."""

    name: str
    labels: list
    times_h: list
    dendrites: list
    params: dict = field(default_factory=dict)
    path: Path | None = None


def _pixel(value: Any, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and 0 < value <= 5)
    ):
        raise ManifestError(f"pixel_size_um {where} must be a number in (0, 5] µm, got {value!r}.")
    return float(value)


def load_spine_sessions(path: str | Path) -> SpineSessions:
    """Read and validate a spine sessions file (see the module docs).

    Parameters
    ----------
    path : path-like
        The TOML file.

    Returns
    -------
    SpineSessions

    Raises
    ------
    InputNotFoundError
        If the file or an image it names does not exist.
    ManifestError
        For a malformed file (one sentence naming the key and place).
    """
    path = Path(path)
    doc = read_toml(path, what="Spine sessions file")
    where = f'spine sessions file "{path}"'
    check_keys(doc, _TOP, where)
    sessions = doc.get("sessions")
    if not isinstance(sessions, list) or len(sessions) < 2:
        raise ManifestError(f"{where} needs at least two [[sessions]] tables.")
    labels, times = [], []
    for i, s in enumerate(sessions):
        check_keys(s, _SESSION, f"[[sessions]] #{i + 1} of {where}")
        label, t = s.get("label"), s.get("time_h")
        if not isinstance(label, str) or not label:
            raise ManifestError(f"[[sessions]] #{i + 1} of {where} needs a text label.")
        if label in labels:
            raise ManifestError(f'session label "{label}" appears twice in {where}.')
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ManifestError(f'session "{label}" in {where} needs a numeric time_h.')
        if times and t <= times[-1]:
            raise ManifestError(f'sessions in {where} must be in time order ("{label}" is not).')
        labels.append(label)
        times.append(float(t))
    default_px = doc.get("pixel_size_um")
    if default_px is not None:
        default_px = _pixel(default_px, f"in {where}")
    dendrites, names = [], set()
    raw = doc.get("dendrites")
    if not isinstance(raw, list) or not raw:
        raise ManifestError(f"{where} needs at least one [[dendrites]] table.")
    for i, d in enumerate(raw):
        dwhere = f"[[dendrites]] #{i + 1} of {where}"
        check_keys(d, _DENDRITE, dwhere)
        name = d.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise ManifestError(f"{dwhere} needs a unique text name, got {name!r}.")
        names.add(name)
        px = d.get("pixel_size_um", default_px)
        if px is None:
            raise ManifestError(f'dendrite "{name}" in {where} has no pixel_size_um.')
        px = _pixel(px, f'of dendrite "{name}"')
        images = d.get("images")
        if not isinstance(images, dict):
            raise ManifestError(f'dendrite "{name}" in {where} needs an images table.')
        check_keys(images, labels, f'the images of dendrite "{name}"')
        resolved = {}
        for label in labels:
            if label not in images:
                raise ManifestError(f'dendrite "{name}" has no image for session "{label}".')
            resolved[label] = data_path(
                images[label],
                path.parent,
                f'the image of session "{label}"',
                f'dendrite "{name}" in {where}',
            )
        dendrites.append(Dendrite(name, str(d.get("mouse", name)), px, resolved))
    params = doc.get("params", {})
    if not isinstance(params, dict):
        raise ManifestError(f"[params] in {where} must be a table.")
    return SpineSessions(str(doc.get("name", path.stem)), labels, times, dendrites, params, path)
