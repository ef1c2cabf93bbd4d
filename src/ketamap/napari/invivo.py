"""napari readers for the in-vivo outputs: spine turnover and ensemble coactivity.

**Spines** (a ``ketamap spines`` output folder): a 4-D world of (dendrite,
session, y, x) in reference-frame pixels, so that the two sliders walk the
dendrites and the sessions. Layers: every session's image registered to the
dendrite's reference frame (read from the sessions file named in
``summary.json``, when it is still there), the traced centrelines as paths,
and every spine seen in a session coloured by its fate since the previous
session — stable (blue), gained (green) — with a red cross where a spine of the
previous session is gone (lost), the colours of the report's dendrite figure.
Editing the points and saving them with ``File › Save Selected Layers`` as CSV
writes a ``--annotations`` table for ``ketamap spines`` (see :mod:`ketamap.napari.writers`).

**Ensembles** (a ``ketamap ensembles`` output folder): a 3-D world of (session,
y, x) in pixels. The outputs hold the ensembles and the cells but not where
the cells are: ROI footprints and mean images are read from the sessions'
inputs (suite2p folders or NWB files) named in ``summary.json``. Layers: the
mean image of every session, the ROIs of ensemble members coloured by their
ensemble (labels whose hover shows it), and every cell as a point at its ROI
centre with its event rate, mean coactivity and ensemble.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.errors import InputError, KetamapError
from ketamap.napari._layers import contrast_limits, hex_rgba

__all__ = [
    "is_spines_output",
    "is_ensembles_output",
    "read_spines",
    "read_ensembles",
    "spine_fates",
    "FATE_COLOURS",
]

log = logging.getLogger(__name__)

#: Fate colours of the report's dendrite figure: stable, gained, lost.
FATE_COLOURS = {"stable": "#4c9be8", "gained": "#55a868", "lost": "#c44e52"}
#: Ensemble colours (matplotlib's tab10); cells in no ensemble are grey.
ENSEMBLE_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#7f7f7f",
)
NO_ENSEMBLE = "#9aa5b1"


def _summary(folder: Path) -> dict | None:
    try:
        doc = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def is_spines_output(folder: Path) -> bool:
    """Whether ``folder`` is a ``ketamap spines`` output (its tables or its summary)."""
    folder = Path(folder)
    if (folder / "detections.parquet").is_file() and (folder / "centrelines.parquet").is_file():
        return True
    doc = _summary(folder)
    return bool(doc and "spines_from" in doc)


def is_ensembles_output(folder: Path) -> bool:
    """Whether ``folder`` is a ``ketamap ensembles`` output (one field of view)."""
    folder = Path(folder)
    if (folder / "ensembles.parquet").is_file() and (folder / "cell_map.parquet").is_file():
        return True
    doc = _summary(folder)
    return bool(doc and "field_of_view" in doc and "cell_matching" in doc)


def _read_table(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{what} {path.parent} lacks {path.name}; run the stage again.")
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds
        raise InputError(f"{what} table {path} cannot be read ({e}).") from e


def _need(table: pd.DataFrame, columns, path: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"Table {path} lacks the column(s) {', '.join(missing)}.")


# --------------------------------------------------------------------------- spines


def spine_fates(detections: pd.DataFrame, sessions: list[str]) -> pd.DataFrame:
    """Every spine of every session with its fate since the previous session.

    Parameters
    ----------
    detections : DataFrame
        ``dendrite, session, spine_id, ref_y_px, ref_x_px`` (tracked spines in the
        dendrite's reference frame, as ``detections.parquet``).
    sessions : list of str
        Session labels in time order.

    Returns
    -------
    DataFrame
        ``dendrite, session, spine_id, y_px, x_px, fate``: per session, the spines
        seen there (``stable`` when also seen in the previous session, ``gained``
        when not; every spine of the first session is stable) and those of the
        previous session that are gone (``lost``, at their previous position).

    Examples
    --------
    >>> det = pd.DataFrame({"dendrite": "d", "session": ["a", "a", "b"], "spine_id": [1, 2, 2],
    ...                     "ref_y_px": [1.0, 5.0, 5.0], "ref_x_px": [1.0, 5.0, 5.0]})
    >>> spine_fates(det, ["a", "b"])[["session", "spine_id", "fate"]].values.tolist()
    [['a', 1, 'stable'], ['a', 2, 'stable'], ['b', 2, 'stable'], ['b', 1, 'lost']]
    """
    rows = []
    for dend, g in detections.groupby("dendrite", sort=False):
        seen = {
            k: s.groupby("spine_id")[["ref_y_px", "ref_x_px"]].mean()
            for k, s in g.groupby(g["session"].astype(str), sort=False)
        }
        empty = pd.DataFrame(columns=["ref_y_px", "ref_x_px"], dtype=float)
        for j, k in enumerate(sessions):
            now = seen.get(k, empty)
            before = seen.get(sessions[j - 1], empty) if j else now
            parts = (
                ("stable", now[now.index.isin(before.index)]),
                ("gained", now[~now.index.isin(before.index)]),
                ("lost", before[~before.index.isin(now.index)]),
            )
            for fate, t in parts:
                for sid, (y, x) in zip(t.index, t.to_numpy(float)):
                    rows.append((dend, k, int(sid), y, x, fate))
    return pd.DataFrame(rows, columns=["dendrite", "session", "spine_id", "y_px", "x_px", "fate"])


def _registered_images(
    summary: dict, dendrites: list[str], sessions: list[str], registration: pd.DataFrame | None
) -> np.ndarray | None:
    """Every (dendrite, session) image registered to its reference frame, or None."""
    from ketamap.manifest import load_spine_sessions

    source = summary.get("sessions_file")
    if not source or not Path(source).is_file() or registration is None:
        return None
    import tifffile

    from ketamap.invivo.spines.image import Rigid, project

    try:
        sf = load_spine_sessions(source)
        by_name = {d.name: d for d in sf.dendrites}
        reg = registration.set_index(["dendrite", "session"])
        planes = {}
        for a, name in enumerate(dendrites):
            for b, k in enumerate(sessions):
                row = reg.loc[(name, k)]
                t = np.deg2rad(float(row["rotation_deg"]))
                matrix = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
                offset = np.array([row["offset_y_px"], row["offset_x_px"]], dtype=float)
                image = tifffile.imread(by_name[name].images[k])
                planes[a, b] = Rigid(matrix, offset).warp(project(image))
    except (KetamapError, KeyError, OSError, ValueError, tifffile.TiffFileError) as e:
        log.warning("the spine images are not shown (%s)", e)
        return None
    h = max(p.shape[0] for p in planes.values())
    w = max(p.shape[1] for p in planes.values())
    stack = np.zeros((len(dendrites), len(sessions), h, w), dtype=np.float32)
    for (a, b), p in planes.items():
        stack[a, b, : p.shape[0], : p.shape[1]] = p
    return stack


def read_spines(path) -> list[tuple]:
    """Read a ``ketamap spines`` output folder as napari layer data.

    Parameters
    ----------
    path : path-like
        The output folder.

    Returns
    -------
    list of tuple
        The registered images (when the inputs are still there), the centrelines
        (paths) and the spines by fate (points, features ``dendrite, session,
        spine_id, fate``), in a (dendrite, session, y, x) world of pixels.

    Raises
    ------
    InputError
        If a table is missing, unreadable or lacks a column.
    """
    folder = Path(path)
    what = "Spines output"
    det_path, line_path = folder / "detections.parquet", folder / "centrelines.parquet"
    detections = _read_table(det_path, what)
    lines = _read_table(line_path, what)
    _need(detections, ["dendrite", "session", "spine_id", "ref_y_px", "ref_x_px"], det_path)
    _need(lines, ["dendrite", "s_um", "y_px", "x_px"], line_path)
    summary = _summary(folder) or {}
    sessions = [str(s) for s in summary.get("sessions", [])] or list(
        dict.fromkeys(detections["session"].astype(str))
    )
    dendrites = list(
        dict.fromkeys([*lines["dendrite"].astype(str), *detections["dendrite"].astype(str)])
    )
    d_index = {d: i for i, d in enumerate(dendrites)}
    s_index = {s: i for i, s in enumerate(sessions)}
    registration = None
    if (folder / "registration.csv").is_file():
        registration = pd.read_csv(folder / "registration.csv")
        registration["session"] = registration["session"].astype(str)
        registration["dendrite"] = registration["dendrite"].astype(str)
    layers = []
    images = _registered_images(summary, dendrites, sessions, registration)
    if images is not None:
        layers.append(
            (
                images,
                {
                    "name": "spine images (registered)",
                    "colormap": "gray",
                    "contrast_limits": contrast_limits(images),
                },
                "image",
            )
        )

    paths = []
    for name, g in lines.groupby(lines["dendrite"].astype(str), sort=False):
        yx = g.sort_values("s_um")[["y_px", "x_px"]].to_numpy(float)
        for b in range(len(sessions)):
            lead = np.tile([d_index[name], b], (len(yx), 1))
            paths.append(np.hstack([lead, yx]))
    if paths:
        layers.append(
            (
                paths,
                {
                    "name": "dendrite centrelines",
                    "shape_type": "path",
                    "edge_color": "#f2c14e",
                    "edge_width": 0.6,
                    "features": pd.DataFrame(
                        {
                            "dendrite": [
                                n
                                for n in dict.fromkeys(lines["dendrite"].astype(str))
                                for _ in sessions
                            ]
                        }
                    ),
                },
                "shapes",
            )
        )

    det = detections.assign(
        dendrite=detections["dendrite"].astype(str), session=detections["session"].astype(str)
    )
    fates = spine_fates(det, sessions)
    coords = np.column_stack(
        [
            fates["dendrite"].map(d_index).to_numpy(float),
            fates["session"].map(s_index).to_numpy(float),
            fates[["y_px", "x_px"]].to_numpy(float),
        ]
    )
    colours = np.array([hex_rgba(FATE_COLOURS[f]) for f in fates["fate"]]).reshape(-1, 4)
    layers.append(
        (
            coords.reshape(-1, 4),
            {
                "name": "spines by fate",
                "features": fates[["dendrite", "session", "spine_id", "fate"]].reset_index(
                    drop=True
                ),
                "symbol": np.where(fates["fate"] == "lost", "cross", "ring").tolist() or "ring",
                "face_color": colours,
                "border_width": 0.0,
                "size": 6.0,
                "metadata": {
                    "ketamap": {
                        "kind": "spines",
                        "output": str(folder),
                        "dendrites": dendrites,
                        "sessions": sessions,
                    }
                },
            },
            "points",
        )
    )
    return layers


# --------------------------------------------------------------------------- ensembles


def _centre(footprint: dict) -> tuple[float, float]:
    if "med" in footprint:
        y, x = footprint["med"][:2]
        return float(y), float(x)
    y = np.asarray(footprint["ypix"], float)
    x = np.asarray(footprint["xpix"], float)
    w = np.asarray(footprint.get("lam", np.ones_like(y)), float)
    w = w if w.sum() > 0 else np.ones_like(y)
    return float(np.average(y, weights=w)), float(np.average(x, weights=w))


def read_ensembles(path) -> list[tuple]:
    """Read a ``ketamap ensembles`` output folder (one field of view) as napari layer data.

    Parameters
    ----------
    path : path-like
        The output folder.

    Returns
    -------
    list of tuple
        The mean image of every session (when the inputs have one), the ROIs of
        ensemble members as labels coloured by ensemble (hover: ensemble, cell),
        and every cell as a point at its ROI centre (features ``session, cell,
        global_cell, ensemble, event_rate_hz, mean_coactivity``), in a
        (session, y, x) world of pixels.

    Raises
    ------
    InputError
        If a table is missing or unreadable, or the cells cannot be placed: the
        outputs hold no ROI positions, so the sessions' inputs (named in
        ``summary.json``) must still be there and carry ROI footprints.
    """
    from ketamap.io.traces.suite2p import read_recording
    from ketamap.manifest import load_sessions

    folder = Path(path)
    what = "Ensembles output"
    ens_path, cells_path = folder / "ensembles.parquet", folder / "cells.parquet"
    ensembles = _read_table(ens_path, what)
    cells = _read_table(cells_path, what)
    _need(ensembles, ["session", "ensemble", "cell", "weight"], ens_path)
    _need(cells, ["session", "cell"], cells_path)
    summary = _summary(folder) or {}
    source = summary.get("sessions_file")
    if not source or not Path(source).is_file():
        raise InputError(
            f"{what} {folder} holds no ROI positions and its sessions file "
            f"({source or 'not named in summary.json'}) is gone, so its cells cannot be placed."
        )
    sf = load_sessions(source)
    sessions = [s.label for s in sf.sessions]
    means, rois, points = [], [], []
    for b, s in enumerate(sf.sessions):
        rec = read_recording(s.data, neuropil=s.neuropil, series=s.series)
        if rec.footprints is None:
            raise InputError(
                f"{what} {folder} holds no ROI positions and session {s.label!r} ({s.data}) "
                "has no ROI footprints, so its cells cannot be placed."
            )
        index = {int(c): i for i, c in enumerate(rec.cell_index)}
        means.append(rec.mean_image)
        rois.append((rec, index))
        mine = cells[cells["session"].astype(str) == s.label]
        members = ensembles[ensembles["session"].astype(str) == s.label]
        strongest = (
            members.sort_values("weight", ascending=False)
            .drop_duplicates("cell")
            .set_index("cell")["ensemble"]
        )
        for _, row in mine.iterrows():
            c = int(row["cell"])
            if c not in index:
                continue
            y, x = _centre(rec.footprints[index[c]])
            points.append(
                {
                    "session_index": b,
                    "y": y,
                    "x": x,
                    "session": s.label,
                    "cell": c,
                    "ensemble": int(strongest.get(c, -1)),
                }
                | {
                    k: row[k]
                    for k in ("global_cell", "event_rate_hz", "mean_coactivity")
                    if k in row
                }
            )
    shapes = [m.shape for m in means if m is not None]
    for rec, _ in rois:
        for f in rec.footprints:
            shapes.append((int(np.max(f["ypix"])) + 1, int(np.max(f["xpix"])) + 1))
    h = max(s[0] for s in shapes) if shapes else 1
    w = max(s[1] for s in shapes) if shapes else 1
    layers = []
    if any(m is not None for m in means):
        stack = np.zeros((len(sessions), h, w), dtype=np.float32)
        for b, m in enumerate(means):
            if m is not None:
                stack[b, : m.shape[0], : m.shape[1]] = m
        layers.append(
            (
                stack,
                {
                    "name": "mean images",
                    "colormap": "gray",
                    "contrast_limits": contrast_limits(stack),
                },
                "image",
            )
        )
    labels = np.zeros((len(sessions), h, w), dtype=np.uint16)
    table = pd.DataFrame(points)
    for b, (rec, index) in enumerate(rois):
        mine = table[(table["session_index"] == b) & (table["ensemble"] >= 0)] if len(table) else []
        for _, row in mine.iterrows() if len(mine) else ():
            f = rec.footprints[index[int(row["cell"])]]
            labels[b, np.asarray(f["ypix"], int), np.asarray(f["xpix"], int)] = row["ensemble"] + 1
    n_ens = int(table["ensemble"].max()) + 1 if len(table) else 0
    colour = {e: ENSEMBLE_COLOURS[e % len(ENSEMBLE_COLOURS)] for e in range(max(n_ens, 0))}
    layers.append(
        (
            labels,
            {
                "name": "ensemble ROIs",
                "features": pd.DataFrame(
                    {"index": [e + 1 for e in colour], "ensemble": list(colour)}
                ),
                "colormap": {None: "transparent", 0: "transparent"}
                | {e + 1: hex_rgba(c) for e, c in colour.items()},
                "opacity": 0.5,
            },
            "labels",
        )
    )
    if len(table):
        rgba = np.array([hex_rgba(colour.get(e, NO_ENSEMBLE)) for e in table["ensemble"]])
        feats = table.drop(columns=["session_index", "y", "x"]).reset_index(drop=True)
        layers.append(
            (
                table[["session_index", "y", "x"]].to_numpy(float),
                {
                    "name": "cells",
                    "features": feats,
                    "face_color": rgba,
                    "symbol": "ring",
                    "size": 8.0,
                    "border_width": 0.0,
                    "metadata": {
                        "ketamap": {
                            "kind": "ensembles",
                            "output": str(folder),
                            "sessions": sessions,
                        }
                    },
                },
                "points",
            )
        )
    return layers
