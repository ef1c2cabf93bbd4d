"""Proofreading, without a screen: the order of the candidates, the labels, training.

:class:`Proofreader` is what the napari widget drives (and what a test or a
script can drive alone): it walks a subject's candidates in an order — the
lowest confidence first, or a seeded random sample whose labels estimate the
detector's precision without bias — records *cell* / *not a cell* for the
current one and rewrites the labels file (:mod:`ketamap.io.labels`) atomically
after every label, so a crash loses nothing. Labels already in the file are
picked up (the same file resumes the session); labels that match none of the
candidates (after a re-detection) are kept in the file, never dropped.

:func:`train_from_labels` trains the second-pass classifier of ``ketamap detect
train`` (:mod:`ketamap.wholebrain.classify`) from the labelled candidates,
whose features (SNR, contrast, intensity) the cells table already holds, and
cross-validates it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.errors import InputError, ParameterError
from ketamap.io.labels import (
    LABEL_COLUMNS,
    LABEL_VALUES,
    match_labels,
    precision_estimate,
    read_labels,
    write_labels,
)

__all__ = [
    "ORDERS",
    "CONFIDENCE_COLUMNS",
    "confidence_column",
    "candidate_order",
    "Proofreader",
    "labels_vector",
    "train_from_labels",
]

#: How candidates are visited: the lowest confidence first, or a seeded random sample.
ORDERS = ("lowest", "random")
#: Columns read as a candidate's confidence, first found first (higher = more likely a cell).
CONFIDENCE_COLUMNS = ("cell_probability", "p_cell", "score", "snr")
_VOX = ["z_vox", "y_vox", "x_vox"]


def confidence_column(cells: pd.DataFrame) -> str | None:
    """Return the column that orders candidates by confidence (:data:`CONFIDENCE_COLUMNS`)."""
    return next((c for c in CONFIDENCE_COLUMNS if c in cells.columns), None)


def candidate_order(cells: pd.DataFrame, order: str = "lowest", *, seed: int = 0) -> np.ndarray:
    """Return the order in which the candidates are shown.

    Parameters
    ----------
    cells : DataFrame
        The candidates.
    order : {"lowest", "random"}
        ``"lowest"``: ascending confidence (:func:`confidence_column`; table order
        when there is none), ties in table order. ``"random"``: a random
        permutation drawn from ``seed``; its first *n* candidates are a simple
        random sample, so their labels estimate the precision without bias.
    seed : int
        Seed of the random order.

    Returns
    -------
    ndarray of int
        Row positions into ``cells``.

    Raises
    ------
    ParameterError
        For an unknown order.

    Examples
    --------
    >>> cells = pd.DataFrame({"snr": [9.0, 3.0, 5.0]})
    >>> candidate_order(cells).tolist()
    [1, 2, 0]
    """
    n = len(cells)
    if order == "lowest":
        column = confidence_column(cells)
        if column is None:
            return np.arange(n)
        key = pd.to_numeric(cells[column], errors="coerce").to_numpy(dtype=float)
        key = np.where(np.isfinite(key), key, -np.inf)  # unknown confidence first
        return np.argsort(key, kind="stable")
    if order == "random":
        return np.random.default_rng(seed).permutation(n)
    raise ParameterError(f"order must be one of {', '.join(ORDERS)}, got {order!r}.")


class Proofreader:
    """Walk through candidates, record labels, rewrite the labels file after each one.

    Parameters
    ----------
    cells : DataFrame
        The candidates (``z_vox, y_vox, x_vox`` and features); the index is reset.
    labels_path : path-like
        The labels file; labels already in it are matched to the candidates and
        kept.
    order : {"lowest", "random"}
        See :func:`candidate_order`.
    seed : int
        Seed of the random order.
    tolerance_vox : float
        Distance within which a label in the file belongs to a candidate.

    Attributes
    ----------
    labels : ndarray of object
        Per candidate: ``"cell"``, ``"not_cell"`` or None.
    orphans : DataFrame
        Labels of the file that match no candidate; they are written back with
        every save.
    order : ndarray of int
        The visiting order.
    position : int
        Where the walk is in ``order`` (``len(order)`` when it is done).

    Raises
    ------
    InputError
        If the cells lack a coordinate column or the labels file is unreadable.
    """

    def __init__(
        self,
        cells: pd.DataFrame,
        labels_path: str | os.PathLike,
        *,
        order: str = "lowest",
        seed: int = 0,
        tolerance_vox: float = 1.0,
    ):
        missing = [c for c in _VOX if c not in cells.columns]
        if missing:
            raise InputError(f"The candidates lack the column(s) {', '.join(missing)}.")
        self.cells = cells.reset_index(drop=True)
        self.path = Path(labels_path)
        self.order_name = order
        self.seed = int(seed)
        self.tolerance_vox = float(tolerance_vox)
        self.order = candidate_order(self.cells, order, seed=seed)
        self.labels = np.full(len(self.cells), None, dtype=object)
        self.orphans = pd.DataFrame(columns=list(LABEL_COLUMNS))
        if self.path.is_file():
            per_cell, unmatched = match_labels(self.cells, read_labels(self.path), tolerance_vox)
            self.labels[:] = per_cell.to_numpy(dtype=object)
            self.orphans = unmatched.reset_index(drop=True)
        self.history: list[int] = []
        self.position = 0
        if self.current is not None and self.labels[self.current] is not None:
            self._advance()

    # ------------------------------------------------------------------ walking

    @property
    def current(self) -> int | None:
        """Return the row of the candidate shown now (None once every candidate was visited)."""
        return int(self.order[self.position]) if self.position < len(self.order) else None

    @property
    def done(self) -> bool:
        """Tell whether the walk has passed the last candidate."""
        return self.current is None

    def _advance(self) -> None:
        """Move to the next candidate in the order that has no label yet."""
        nxt = self.position + 1
        while nxt < len(self.order) and self.labels[self.order[nxt]] is not None:
            nxt += 1
        self.position = min(nxt, len(self.order))

    def label(self, value: str) -> Path:
        """Label the current candidate, save the file, move on; return the file's path.

        Raises
        ------
        ParameterError
            For a value other than ``"cell"`` or ``"not_cell"``.
        InputError
            When there is no current candidate (the walk is done).
        """
        if value not in LABEL_VALUES:
            raise ParameterError(f"A label is cell or not_cell, got {value!r}.")
        row = self.current
        if row is None:
            raise InputError("Every candidate has been visited; there is none to label.")
        self.labels[row] = value
        path = self.save()
        self.history.append(self.position)
        self._advance()
        return path

    def skip(self) -> None:
        """Move on without labelling the current candidate (nothing is written)."""
        if self.current is not None:
            self.history.append(self.position)
            self._advance()

    def back(self) -> None:
        """Return to the candidate shown before (to correct its label)."""
        if self.history:
            self.position = self.history.pop()

    def go_to(self, row: int) -> None:
        """Show the candidate at row ``row`` next (e.g. one clicked in the viewer)."""
        where = np.flatnonzero(self.order == int(row))
        if len(where):
            self.history.append(self.position)
            self.position = int(where[0])

    # ------------------------------------------------------------------ labels

    def table(self) -> pd.DataFrame:
        """Return the labels file's rows: the labelled candidates, then the orphans."""
        mask = np.array([v is not None for v in self.labels], dtype=bool)
        mine = self.cells.loc[mask, _VOX].assign(label=self.labels[mask])
        parts = [mine] + ([self.orphans[list(LABEL_COLUMNS)]] if len(self.orphans) else [])
        return pd.concat(parts, ignore_index=True)[list(LABEL_COLUMNS)]

    def save(self) -> Path:
        """Rewrite the labels file atomically; return its path."""
        return write_labels(self.table(), self.path)

    def estimate(self) -> dict:
        """Estimate the precision from the labels (:func:`precision_estimate`).

        Adds ``order`` (an unbiased estimate needs ``"random"``), ``n_candidates``
        and ``n_orphans``.
        """
        est = precision_estimate(pd.Series(self.labels, dtype=object))
        return est | {
            "order": self.order_name,
            "n_candidates": len(self.cells),
            "n_orphans": len(self.orphans),
        }


def labels_vector(cells: pd.DataFrame, labels: pd.DataFrame, *, tolerance_vox: float = 1.0):
    """Return the candidates' labels as the classifier's codes: 1 cell, 0 non-cell, -1 none.

    Examples
    --------
    >>> cells = pd.DataFrame({"z_vox": [1.0, 2.0], "y_vox": [1.0, 2.0], "x_vox": [1.0, 2.0]})
    >>> labels = pd.DataFrame({"z_vox": [2.0], "y_vox": [2.0], "x_vox": [2.0],
    ...                        "label": ["not_cell"]})
    >>> labels_vector(cells, labels).tolist()
    [-1, 0]
    """
    per_cell, _ = match_labels(cells, labels, tolerance_vox)
    codes = {"cell": 1, "not_cell": 0}
    return np.array([codes.get(v, -1) for v in per_cell], dtype=np.int64)


def train_from_labels(
    cells: pd.DataFrame,
    labels: pd.DataFrame,
    *,
    threshold: float = 0.5,
    tolerance_vox: float = 1.0,
    n_folds: int = 5,
    seed: int = 0,
):
    """Train and cross-validate the second-pass classifier on proofread candidates.

    The training of ``ketamap detect train``
    (:func:`~ketamap.wholebrain.classify.train_from_annotations`) after its
    detection: the candidates here are the subject's detections with their
    features, so they are labelled directly instead of being detected again.

    Parameters
    ----------
    cells : DataFrame
        The candidates with the classifier's features (``intensity, snr, contrast``).
    labels : DataFrame
        A labels table (:func:`ketamap.io.labels.read_labels`).
    threshold : float
        Cell probability at or above which the model keeps a candidate.
    tolerance_vox : float
        Distance within which a label belongs to a candidate.
    n_folds, seed
        Cross-validation folds and their seed.

    Returns
    -------
    TrainingResult
        The model, its cross-validation, the candidates and their codes.

    Raises
    ------
    InputError
        When the labels hold no cell or no non-cell among these candidates, or
        the candidates lack a feature column.
    """
    from ketamap.wholebrain.classify import TrainingResult, cross_validate, train_classifier

    cells = cells.reset_index(drop=True)
    y = labels_vector(cells, labels, tolerance_vox=tolerance_vox)
    n_cell, n_not = int((y == 1).sum()), int((y == 0).sum())
    if n_cell == 0 or n_not == 0:
        raise InputError(
            f"Training needs both cells and non-cells among the labelled candidates; the labels "
            f"give {n_cell} cell(s) and {n_not} non-cell(s) of {len(cells)} candidates."
        )
    model = train_classifier(cells, y, threshold=threshold)
    cv = cross_validate(cells, y, threshold=threshold, n_folds=n_folds, seed=seed)
    return TrainingResult(model, cv, cells, y)
