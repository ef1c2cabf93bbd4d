"""napari writers: a points layer to cellfinder XML or to ketamap's labels / annotation table.

A points layer's data are voxel coordinates (the plugin's readers keep them so,
with the voxel size as the layer's scale), written as they are:

* ``.xml``: cellfinder / ImageJ CellCounter XML (:func:`ketamap.io.points.cells_to_cellfinder_xml`),
  marker type 2 for a cell and 1 for a non-cell;
* ``.csv``: ``z_vox, y_vox, x_vox, label, cell_type`` — a labels file
  (:mod:`ketamap.io.labels`) that ``ketamap detect train --points`` also reads
  (``cell_type`` 2 cell, 1 non-cell).

A point's kind comes from the layer's ``label`` feature (``cell`` / ``not_cell``),
else from its ``cell_type`` feature, else every point is a cell (an edited cells
layer). A proofread layer also has points without a label (not yet looked at, or
skipped): the labels table leaves them out, as the widget does; the XML, an
export of the cells, keeps them as cells (nobody called them anything else).

A spines layer (2-D or (dendrite, session, y, x) points) written as ``.csv``
becomes a ``ketamap spines --annotations`` table instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.errors import InputError
from ketamap.io.atomic import atomic_path

__all__ = ["write_points", "points_table"]

_VOX = ["z_vox", "y_vox", "x_vox"]


def _features(meta: dict, n: int) -> pd.DataFrame:
    feats = meta.get("features")
    if feats is None:
        return pd.DataFrame(index=range(n))
    feats = pd.DataFrame(feats).reset_index(drop=True)
    return feats if len(feats) == n else pd.DataFrame(index=range(n))


def points_table(data, meta: dict, *, unlabelled: str = "drop") -> pd.DataFrame:
    """Return a points layer as a labels table: ``z_vox, y_vox, x_vox, label, cell_type``.

    Parameters
    ----------
    data : (n, 3) array
        Point coordinates (voxels, z y x).
    meta : dict
        The layer's attributes (``features`` used).
    unlabelled : {"drop", "cell"}
        What becomes of points whose ``label`` feature is empty: left out, or cells.

    Returns
    -------
    DataFrame
        One row per point with a kind (see the module's notes).

    Raises
    ------
    InputError
        If the points are not 3-D, or a ``label`` is neither cell nor not_cell.

    Examples
    --------
    >>> points_table([[1, 2, 3], [4, 5, 6]], {"features": {"label": ["cell", None]}})
       z_vox  y_vox  x_vox label  cell_type
    0    1.0    2.0    3.0  cell          2
    """
    pts = np.asarray(data, dtype=np.float64)
    if pts.size == 0:
        pts = pts.reshape(0, 3)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(
            f"Cells are written as 3-D points (z, y, x); this layer's points have "
            f"{pts.shape[1] if pts.ndim == 2 else pts.ndim} dimension(s)."
        )
    feats = _features(meta, len(pts))
    table = pd.DataFrame(pts, columns=_VOX)
    if "label" in feats:
        label = feats["label"].astype(object).where(feats["label"].notna(), None)
        bad = [v for v in label if v is not None and v not in ("cell", "not_cell")]
        if bad:
            raise InputError(f"The layer's label feature holds {bad[0]!r}; use cell or not_cell.")
    elif "cell_type" in feats:
        types = pd.to_numeric(feats["cell_type"], errors="coerce").to_numpy()
        label = pd.Series(np.where(types == 2, "cell", "not_cell"), dtype=object)
    else:
        label = pd.Series(["cell"] * len(pts), dtype=object)
    table["label"] = label.to_numpy(dtype=object)
    if unlabelled == "cell":
        table["label"] = table["label"].where(table["label"].notna(), "cell")
    table = table[table["label"].notna()].reset_index(drop=True)
    table["cell_type"] = np.where(table["label"] == "cell", 2, 1).astype(np.int64)
    return table


def _spines_annotations(data, meta: dict) -> pd.DataFrame:
    """Return a (dendrite, session, y, x) spines layer as a ``--annotations`` table."""
    pts = np.asarray(data, dtype=np.float64).reshape(len(data), -1)
    kinfo = (meta.get("metadata") or {}).get("ketamap", {})
    dendrites, sessions = kinfo.get("dendrites") or [], kinfo.get("sessions") or []
    feats = _features(meta, len(pts))
    keep = feats["fate"].to_numpy() != "lost" if "fate" in feats else np.ones(len(pts), bool)
    d = np.rint(pts[:, 0]).astype(int)
    s = np.rint(pts[:, 1]).astype(int)
    if len(pts) and (
        d.max() >= len(dendrites) or s.max() >= len(sessions) or min(d.min(), s.min()) < 0
    ):
        raise InputError("A spine lies outside the dendrites and sessions of the layer.")
    spine_id = feats["spine_id"] if "spine_id" in feats else pd.Series([pd.NA] * len(pts))
    table = pd.DataFrame(
        {
            "dendrite": [dendrites[i] for i in d],
            "session": [sessions[i] for i in s],
            "spine_id": pd.array(spine_id, dtype="Int64"),
            "y_px": pts[:, 2],
            "x_px": pts[:, 3],
        }
    )
    return table[keep].reset_index(drop=True)


def write_points(path: str, data, meta: dict) -> list[str]:
    """Write one points layer as ``.xml`` or ``.csv`` (the plugin's writer hook).

    Parameters
    ----------
    path : str
        Destination; its suffix chooses the format.
    data : array
        The layer's data.
    meta : dict
        The layer's attributes.

    Returns
    -------
    list of str
        The path written.

    Raises
    ------
    InputError
        For another suffix, or points that are not cells.
    """
    from ketamap.io.points import cells_to_cellfinder_xml

    path = Path(os.fspath(path))
    suffix = path.suffix.lower()
    kind = ((meta.get("metadata") or {}).get("ketamap") or {}).get("kind")
    if suffix not in (".xml", ".csv"):
        raise InputError(
            f"Points are saved as cellfinder XML (.xml) or a ketamap table (.csv), not {path.name}."
        )
    if kind == "spines":
        if suffix != ".csv":
            raise InputError("Spines are saved as a .csv annotations table for ketamap spines.")
        table = _spines_annotations(data, meta)
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
        return [str(path)]
    table = points_table(data, meta, unlabelled="cell" if suffix == ".xml" else "drop")
    with atomic_path(path) as tmp:
        if suffix == ".xml":
            tmp.write_text(cells_to_cellfinder_xml(table), encoding="utf-8")
        else:
            table.to_csv(tmp, index=False)
    return [str(path)]
