"""A given cell mapping across sessions: its CSV file, and global cell ids from it.

The ``cell_map`` of a sessions file (:mod:`ketamap.manifest.ensembles`) names a
CSV with columns ``session, cell, global_cell``: ``cell`` is a cell's index in
that session's input, ``global_cell`` any integer naming the same cell in every
session. :func:`read_cell_map` reads and checks it; :func:`apply_cell_map` (pure)
gives every cell of every session its global id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.errors import InputError, InputNotFoundError

__all__ = ["read_cell_map", "apply_cell_map"]


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
