"""Proofread labels: which detected candidates a person called a cell, and which not.

A labels file is a CSV with one row per labelled candidate::

    z_vox,y_vox,x_vox,label
    41.0,812.5,1033.25,cell
    41.5,97.0,2210.0,not_cell

``z_vox``, ``y_vox``, ``x_vox`` are the candidate's voxel coordinates on the
signal's full-resolution grid, exactly as in the subject's ``detect/cells.parquet``;
``label`` is ``cell`` or ``not_cell``. Candidates that were looked at and skipped
are not written. Other columns are allowed and ignored when reading.

The napari proofreading widget rewrites the file (atomically) after every label;
the census reads it to count corrected cells. :func:`match_labels` ties a file to
a cells table, one label to one candidate, and returns the labels that match no
candidate (after a re-detection) instead of dropping them;
:func:`precision_estimate` turns the labels into a precision with its Wilson
95 % interval.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.errors import InputError, InputNotFoundError, ParameterError
from ketamap.io.atomic import atomic_path

__all__ = [
    "LABEL_COLUMNS",
    "LABEL_VALUES",
    "read_labels",
    "write_labels",
    "match_labels",
    "wilson_interval",
    "precision_estimate",
]

#: The columns of a labels file, in the order they are written.
LABEL_COLUMNS = ("z_vox", "y_vox", "x_vox", "label")
#: The values of the ``label`` column.
LABEL_VALUES = ("cell", "not_cell")
_VOX = ["z_vox", "y_vox", "x_vox"]


def _check(table: pd.DataFrame, where: str) -> pd.DataFrame:
    """Return the four label columns, checked: numeric finite coordinates, known labels."""
    missing = [c for c in LABEL_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(
            f"{where} lacks the column(s) {', '.join(missing)}; a labels file has the columns "
            f"{', '.join(LABEL_COLUMNS)}."
        )
    out = pd.DataFrame(index=range(len(table)))
    for c in _VOX:
        values = pd.to_numeric(table[c], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise InputError(
                f"{where}: row {int(bad[0]) + 1} has no numeric {c} ({table[c].iloc[bad[0]]!r})."
            )
        out[c] = values
    label = table["label"].astype("string").str.strip()
    unknown = ~label.isin(LABEL_VALUES).fillna(False).to_numpy(dtype=bool)
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise InputError(
            f"{where}: row {row + 1} has the label {table['label'].iloc[row]!r}; "
            "a label is cell or not_cell."
        )
    out["label"] = label.to_numpy(dtype=object)
    dup = out.duplicated(subset=_VOX, keep="first").to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        z, y, x = out.loc[row, _VOX]
        raise InputError(
            f"{where}: the candidate at voxel ({z:g}, {y:g}, {x:g}) is labelled twice "
            f"(row {row + 1}); keep one row per candidate."
        )
    return out


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    r"""Read a labels file.

    Parameters
    ----------
    path : path-like
        The CSV (``z_vox, y_vox, x_vox, label``).

    Returns
    -------
    DataFrame
        The columns :data:`LABEL_COLUMNS`: coordinates as float64, ``label`` as
        ``"cell"`` or ``"not_cell"``; one row per labelled candidate, in file order.

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    InputError
        If it is not a CSV table, lacks a column, holds a label other than
        ``cell`` / ``not_cell``, a non-numeric coordinate, or one candidate twice.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "labels.csv"
    >>> _ = path.write_text("z_vox,y_vox,x_vox,label\n1,2,3,cell\n")
    >>> read_labels(path)["label"].tolist()
    ['cell']
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"Labels file {path} does not exist.")
    try:
        table = pd.read_csv(path, float_precision="round_trip")
    except pd.errors.EmptyDataError:
        table = pd.DataFrame(columns=list(LABEL_COLUMNS))
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"Labels file {path} is not a readable CSV table ({e}).") from e
    return _check(table, f"Labels file {path}")


def write_labels(labels: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write labels as a labels file, atomically (a crash leaves the previous file).

    Parameters
    ----------
    labels : DataFrame
        ``z_vox, y_vox, x_vox, label`` (other columns are not written).
    path : path-like
        Destination CSV.

    Returns
    -------
    Path

    Raises
    ------
    InputError
        As :func:`read_labels`, for a table that would not read back.
    OutputError
        If the file cannot be written (no space left, permission denied).

    Examples
    --------
    >>> import tempfile
    >>> table = pd.DataFrame({"z_vox": [1.5], "y_vox": [2.0], "x_vox": [3.0],
    ...                       "label": ["not_cell"]})
    >>> path = write_labels(table, Path(tempfile.mkdtemp()) / "labels.csv")
    >>> path.read_text().splitlines()
    ['z_vox,y_vox,x_vox,label', '1.5,2.0,3.0,not_cell']
    """
    table = _check(labels.reset_index(drop=True), "The labels table")
    path = Path(path)
    with atomic_path(path) as tmp:
        # repr precision: the coordinates read back bit for bit
        table.to_csv(tmp, index=False, columns=list(LABEL_COLUMNS))
    return path


def match_labels(
    cells: pd.DataFrame, labels: pd.DataFrame, tolerance_vox: float = 1.0
) -> tuple[pd.Series, pd.DataFrame]:
    """Give each candidate its label: one label to one candidate, nearest pairs first.

    Parameters
    ----------
    cells : DataFrame
        The candidates (``z_vox, y_vox, x_vox``), e.g. ``detect/cells.parquet``.
    labels : DataFrame
        Labels (:func:`read_labels`).
    tolerance_vox : float
        Largest distance, in voxels, between a label and the candidate it labels
        (0 for exact coordinates only).

    Returns
    -------
    per_cell : Series of object
        Indexed like ``cells``: ``"cell"``, ``"not_cell"`` or None (not labelled).
    unmatched : DataFrame
        The rows of ``labels`` that label no candidate (e.g. after a re-detection
        moved or removed it), with their original index.

    Raises
    ------
    ParameterError
        If ``tolerance_vox`` is negative or not finite.
    InputError
        If a table lacks a coordinate column or ``labels`` lacks ``label``.

    Examples
    --------
    >>> cells = pd.DataFrame({"z_vox": [1.0, 5.0], "y_vox": [1.0, 5.0], "x_vox": [1.0, 5.0]})
    >>> labels = pd.DataFrame({"z_vox": [1.0, 9.0], "y_vox": [1.0, 9.0], "x_vox": [1.4, 9.0],
    ...                        "label": ["cell", "not_cell"]})
    >>> per_cell, unmatched = match_labels(cells, labels)
    >>> per_cell.tolist(), len(unmatched)
    (['cell', None], 1)
    """
    try:
        tol = float(tolerance_vox)
    except (TypeError, ValueError):
        tol = math.nan
    if not (math.isfinite(tol) and tol >= 0):
        raise ParameterError(
            f"tolerance_vox must be a number of voxels >= 0, got {tolerance_vox!r}."
        )
    for table, what, cols in (
        (cells, "The cells table", _VOX),
        (labels, "The labels", LABEL_COLUMNS),
    ):
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise InputError(f"{what} lack(s) the column(s) {', '.join(missing)}.")
    per_cell = np.full(len(cells), None, dtype=object)
    taken = np.zeros(len(labels), dtype=bool)
    if len(cells) and len(labels):
        from scipy.spatial import cKDTree

        a = labels[_VOX].to_numpy(dtype=np.float64)
        b = cells[_VOX].to_numpy(dtype=np.float64)
        pairs = cKDTree(a).sparse_distance_matrix(cKDTree(b), tol, output_type="ndarray")
        values = labels["label"].to_numpy(dtype=object)
        for k in np.argsort(pairs["v"], kind="stable"):  # nearest pairs first
            i, j = int(pairs["i"][k]), int(pairs["j"][k])
            if not taken[i] and per_cell[j] is None:
                taken[i] = True
                per_cell[j] = values[i]
    return pd.Series(per_cell, index=cells.index, dtype=object), labels[~taken]


def wilson_interval(k: int, n: int, *, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (95 % by default).

    Parameters
    ----------
    k, n : int
        Successes and trials (0 <= k <= n).
    z : float
        Normal quantile of the two-sided level (1.96 for 95 %).

    Returns
    -------
    (float, float)
        Lower and upper bound; (0, 1) when ``n`` is 0.

    Raises
    ------
    ParameterError
        If ``k`` or ``n`` is negative or ``k > n``.

    Examples
    --------
    >>> [round(v, 4) for v in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    if n < 0 or k < 0 or k > n:
        raise ParameterError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}.")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def precision_estimate(labels: pd.DataFrame | pd.Series) -> dict:
    """Share of labelled candidates that are cells, with its Wilson 95 % interval.

    It estimates the detector's precision only when the candidates were labelled
    in a random sample (the proofreading widget's "random" order); labels made
    lowest-confidence first over-represent the doubtful candidates.

    Parameters
    ----------
    labels : DataFrame or Series
        A labels table (its ``label`` column) or the labels themselves; None /
        missing entries are not counted.

    Returns
    -------
    dict
        ``n_cell``, ``n_not_cell``, ``n_labelled``, ``precision`` (NaN when nothing
        is labelled), ``low``, ``high``.

    Examples
    --------
    >>> est = precision_estimate(pd.Series(["cell"] * 8 + ["not_cell"] * 2))
    >>> est["precision"], round(est["low"], 3), round(est["high"], 3)
    (0.8, 0.49, 0.943)
    """
    values = labels["label"] if isinstance(labels, pd.DataFrame) else labels
    values = pd.Series(values, dtype=object)
    n_cell = int((values == "cell").sum())
    n_not = int((values == "not_cell").sum())
    n = n_cell + n_not
    low, high = wilson_interval(n_cell, n)
    return {
        "n_cell": n_cell,
        "n_not_cell": n_not,
        "n_labelled": n,
        "precision": n_cell / n if n else math.nan,
        "low": low,
        "high": high,
    }
