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
along z). Paths follow the one rule of every manifest
(:func:`ketamap.manifest.base.data_path`). Every dendrite must give an image for
every session. :func:`load_spine_sessions` checks that every image exists but
reads none; it raises one sentence for the first problem.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ketamap.errors import ManifestError
from ketamap.manifest.base import read_toml, source, unknown_keys
from ketamap.params import bounds, from_mapping, tables

__all__ = ["Dendrite", "SpineSessions", "load_spine_sessions", "parse_spine_sessions"]


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


# --------------------------------------------------------------------------- schema

#: Pixel sizes of two-photon dendrite images, in µm.
_PIXEL = bounds(gt=0, le=5)


def _in_time_order(sessions: tuple, *, where: str) -> tuple:
    """Return the sessions if each is later than the one before, else raise."""
    for before, s in zip(sessions, sessions[1:]):
        if s.time_h <= before.time_h:
            raise ManifestError(f'{where} must be in time order ("{s.label}" is not).')
    return sessions


@dataclass(frozen=True, kw_only=True)
class SpineSessionTable:
    """One ``[[sessions]]`` table."""

    label: str = field(metadata=bounds(nonempty=True))
    time_h: float


@dataclass(frozen=True, kw_only=True)
class DendriteTable:
    """One ``[[dendrites]]`` table; ``images`` is keyed by session label."""

    name: str = field(metadata=bounds(nonempty=True))
    mouse: str | None = field(default=None, metadata=bounds(nonempty=True))
    pixel_size_um: float | None = field(default=None, metadata=_PIXEL)
    images: dict[str, Path]


@dataclass(frozen=True, kw_only=True)
class SpinesFile:
    """The whole file; ``[params]`` is checked by the stage's parameters class."""

    name: str | None = field(default=None, metadata=bounds(nonempty=True))
    pixel_size_um: float | None = field(default=None, metadata=_PIXEL)
    sessions: tuple[SpineSessionTable, ...] = field(
        default=(),
        metadata=tables("session", label="label", unique=True, at_least=2, check=_in_time_order),
    )
    dendrites: tuple[DendriteTable, ...] = field(
        default=(), metadata=tables("dendrite", label="name", unique=True, at_least=1)
    )
    params: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- parsing


def parse_spine_sessions(
    doc: Mapping[str, Any],
    *,
    root: str | os.PathLike,
    where: str = "spine sessions file",
    path: Path | None = None,
) -> SpineSessions:
    """Validate a parsed spine sessions TOML document.

    Parameters
    ----------
    doc : mapping
        The parsed TOML.
    root : path-like
        Folder that relative paths are resolved against.
    where : str
        Name of the file, for error messages.
    path : Path, optional
        The file (its stem is the default name).

    Returns
    -------
    SpineSessions

    Raises
    ------
    ManifestError
        One sentence naming the first problem.
    InputNotFoundError
        If an image it names does not exist.
    """
    f = from_mapping(SpinesFile, doc, where=where, source=source(root, folder="sessions file's"))
    labels = [s.label for s in f.sessions]
    times = [s.time_h for s in f.sessions]
    dendrites = []
    for d in f.dendrites:
        at = f'dendrite "{d.name}" of {where}'
        px = f.pixel_size_um if d.pixel_size_um is None else d.pixel_size_um
        if px is None:
            raise ManifestError(f"{at} has no pixel_size_um (give it there or at the top).")
        unknown_keys(d.images, labels, f"images of {at}")
        missing = [label for label in labels if label not in d.images]
        if missing:
            raise ManifestError(f'{at} has no image for session "{missing[0]}".')
        images = {label: d.images[label] for label in labels}
        dendrites.append(Dendrite(d.name, d.name if d.mouse is None else d.mouse, px, images))
    name = f.name if f.name is not None else (path.stem if path is not None else "spines")
    return SpineSessions(name, labels, times, dendrites, dict(f.params), path)


def load_spine_sessions(path: str | os.PathLike) -> SpineSessions:
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
    return parse_spine_sessions(doc, root=path.parent, where=str(path), path=path)
