"""Optional second pass: a cell / non-cell classifier trained from annotated points.

The model is an L2-regularised logistic regression on standardised candidate
features (fitted with scipy's L-BFGS; no scikit-learn needed). It is saved as a
small, versioned JSON document (feature names, means, scales, weights), so a
model file is data, never code: loading one cannot execute anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize
from scipy.spatial import cKDTree

from ketamap.errors import InputError, InputNotFoundError, ParameterError

__all__ = [
    "CellClassifier",
    "CLASSIFIER_FEATURES",
    "label_candidates",
    "combine_annotations",
    "train_classifier",
    "cross_validate",
    "train_from_annotations",
    "TrainingResult",
    "classify_cells",
    "save_classifier",
    "load_classifier",
]

#: Candidate columns used as features (log-transformed, then standardised).
CLASSIFIER_FEATURES = ("intensity", "snr", "contrast")

_FORMAT = "ketamap-cell-classifier"
_VERSION = 1


@dataclass(frozen=True)
class CellClassifier:
    """A trained logistic-regression cell classifier.

    Parameters
    ----------
    features : tuple of str
        Candidate columns, in the order of ``weights``.
    mean, scale : tuple of float
        Standardisation of the log-features.
    weights : tuple of float
        One weight per feature.
    intercept : float
        Bias term.
    threshold : float
        Probability at or above which a candidate is kept as a cell.
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    intercept: float
    threshold: float = 0.5

    def probability(self, cells: pd.DataFrame) -> np.ndarray:
        """Probability (n,) that each candidate is a cell."""
        x = _design(cells, self.features)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.weights) + self.intercept)))


def _design(cells: pd.DataFrame, features) -> np.ndarray:
    missing = [f for f in features if f not in cells.columns]
    if missing:
        raise InputError(f"The cell table lacks the feature column(s) {', '.join(missing)}.")
    x = cells[list(features)].to_numpy(dtype=np.float64)
    x = np.log(np.clip(x, 1e-6, 1e12))
    return x


def label_candidates(
    cells: pd.DataFrame,
    points: pd.DataFrame,
    *,
    voxel_size_um: tuple[float, float, float],
    tolerance_um: float = 10.0,
    non_cells_beyond_um: float | None = None,
) -> np.ndarray:
    """Label each candidate from annotated points: 1 cell, 0 non-cell, -1 unlabelled.

    One annotation labels one candidate: pairs closer than ``tolerance_um`` are matched
    nearest first, each annotation and each candidate at most once, so a marker with
    several candidates around it (a soma split in two) labels only the nearest.

    Parameters
    ----------
    cells : DataFrame
        Candidates from :func:`~ketamap.wholebrain.detect_cells` (``z_vox``,
        ``y_vox``, ``x_vox``).
    points : DataFrame
        Annotated points (``z_vox``, ``y_vox``, ``x_vox``, ``cell_type``: 2 =
        cell, 1 = non-cell), e.g. from :func:`ketamap.io.points.read_points`.
    voxel_size_um : tuple of float
        Voxel size (z, y, x) in µm.
    tolerance_um : float
        Largest distance (µm) between a candidate and the annotation that labels it.
    non_cells_beyond_um : float, optional
        For annotations that mark every cell of the volume (and nothing else):
        unmatched candidates farther than this (µm) from every annotated cell are
        labelled non-cells. Wrong where cells were left unannotated.

    Returns
    -------
    numpy.ndarray of int64, shape (n,)

    Examples
    --------
    >>> cand = pd.DataFrame({"z_vox": [5.0, 5.0, 5.0], "y_vox": [10.0, 12.0, 90.0],
    ...                      "x_vox": [10.0, 10.0, 90.0]})
    >>> ann = pd.DataFrame({"z_vox": [5.0], "y_vox": [10.5], "x_vox": [10.0]})
    >>> label_candidates(cand, ann, voxel_size_um=(5, 2, 2)).tolist()
    [1, -1, -1]
    >>> label_candidates(cand, ann, voxel_size_um=(5, 2, 2), non_cells_beyond_um=30).tolist()
    [1, -1, 0]
    """
    labels = np.full(len(cells), -1, dtype=np.int64)
    if len(cells) == 0 or len(points) == 0:
        return labels
    vs = np.asarray(voxel_size_um, dtype=np.float64)
    cols = ["z_vox", "y_vox", "x_vox"]
    ann = points[cols].to_numpy(dtype=np.float64) * vs
    cand = cells[cols].to_numpy(dtype=np.float64) * vs
    types = points["cell_type"].to_numpy() if "cell_type" in points else np.full(len(points), 2)
    pairs = cKDTree(ann).sparse_distance_matrix(
        cKDTree(cand), tolerance_um, output_type="coo_matrix"
    )
    taken_a = np.zeros(len(ann), dtype=bool)
    for k in np.argsort(pairs.data, kind="stable"):  # nearest pairs first
        a, c = pairs.row[k], pairs.col[k]
        if not taken_a[a] and labels[c] < 0:
            taken_a[a] = True
            labels[c] = int(types[a] == 2)
    if non_cells_beyond_um is not None and (types == 2).any():
        d, _ = cKDTree(ann[types == 2]).query(cand)
        labels[(labels < 0) & (d > non_cells_beyond_um)] = 0
    return labels


def combine_annotations(
    cells: pd.DataFrame | None = None,
    non_cells: pd.DataFrame | None = None,
    points: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Gather annotated points into one table with a ``cell_type`` column.

    Parameters
    ----------
    cells, non_cells : DataFrame, optional
        Points (``z_vox``, ``y_vox``, ``x_vox``) that are all cells (type 2) or
        all non-cells (type 1); any ``cell_type`` column in them is ignored.
    points : DataFrame, optional
        Points with their own ``cell_type`` column (2 = cell, 1 = non-cell), as
        in a cellfinder classification XML.

    Returns
    -------
    DataFrame
        Columns ``z_vox``, ``y_vox``, ``x_vox`` (float64) and ``cell_type``
        (int64), the rows of ``cells``, ``non_cells`` then ``points``.

    Raises
    ------
    InputError
        If no table is given, a table lacks a coordinate column, ``points``
        lacks ``cell_type`` or holds a type other than 1 or 2.

    Examples
    --------
    >>> c = pd.DataFrame({"z_vox": [1.0], "y_vox": [2.0], "x_vox": [3.0]})
    >>> combine_annotations(cells=c, non_cells=c)["cell_type"].tolist()
    [2, 1]
    """
    cols = ["z_vox", "y_vox", "x_vox"]
    parts = []
    for name, table, kind in (
        ("cells", cells, 2),
        ("non-cells", non_cells, 1),
        ("points", points, None),
    ):
        if table is None:
            continue
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise InputError(f"The {name} annotations lack the column(s) {', '.join(missing)}.")
        try:
            part = table[cols].astype(np.float64)
        except (TypeError, ValueError) as e:
            raise InputError(f"The {name} annotations hold non-numeric coordinates.") from e
        if kind is None:
            if "cell_type" not in table.columns:
                raise InputError(
                    "The points annotations have no cell_type column (2 = cell, 1 = non-cell); "
                    "give cells and non-cells as separate files instead."
                )
            types = pd.to_numeric(table["cell_type"], errors="coerce").to_numpy()
            if not np.isin(types, (1, 2)).all():
                raise InputError("The points annotations hold a cell_type other than 1 or 2.")
            part = part.assign(cell_type=types.astype(np.int64))
        else:
            part = part.assign(cell_type=np.full(len(part), kind, dtype=np.int64))
        parts.append(part)
    if not parts:
        raise InputError("No annotated points were given (cells, non-cells or points).")
    return pd.concat(parts, ignore_index=True)


def train_classifier(
    cells: pd.DataFrame,
    labels,
    *,
    l2: float = 1.0,
    threshold: float = 0.5,
    features: tuple[str, ...] = CLASSIFIER_FEATURES,
    balanced: bool = True,
) -> CellClassifier:
    """Fit a logistic-regression classifier on labelled candidates.

    Parameters
    ----------
    cells : DataFrame
        Candidates with the ``features`` columns.
    labels : array_like of int, shape (n,)
        1 = cell, 0 = non-cell, -1 = ignore (see :func:`label_candidates`).
    l2 : float
        L2 penalty on the standardised weights (> 0).
    threshold : float
        Probability cut stored in the model, in (0, 1).
    features : tuple of str
        Candidate columns to use.
    balanced : bool
        Weigh the two classes equally in the fit (each sample by n / (2 n_class)),
        so that a minority of cells among many non-cell candidates is not
        sacrificed to overall accuracy; a probability then reads as if cells
        and non-cells were equally common.

    Returns
    -------
    CellClassifier

    Raises
    ------
    ParameterError
        If ``l2`` or ``threshold`` is out of range.
    InputError
        If labels do not match the table or one class is missing.
    """
    if not l2 > 0:
        raise ParameterError(f"l2 must be > 0, got {l2}.")
    if not 0 < threshold < 1:
        raise ParameterError(f"threshold must be in (0, 1), got {threshold}.")
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (len(cells),):
        raise InputError(f"labels has shape {y.shape}, expected ({len(cells)},).")
    use = y >= 0
    x, y = _design(cells, features)[use], y[use].astype(np.float64)
    if y.size == 0 or y.min() == y.max():
        raise InputError(
            "Training needs labelled cells and non-cells; got "
            f"{int((y == 1).sum())} cells and {int((y == 0).sum())} non-cells."
        )
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale

    # balanced: each class weighs as much as the other in total (mean weight 1)
    n1 = y.sum()
    sw = np.where(y == 1, len(y) / (2 * n1), len(y) / (2 * (len(y) - n1))) if balanced else 1.0

    def loss(w):
        t = z @ w[1:] + w[0]
        value = np.sum(sw * (np.logaddexp(0.0, t) - y * t)) + 0.5 * l2 * np.sum(w[1:] ** 2)
        r = sw * (0.5 * (1.0 + np.tanh(0.5 * t)) - y)
        g = np.concatenate([[np.sum(r)], z.T @ r + l2 * w[1:]])
        return value, g

    res = optimize.minimize(loss, np.zeros(len(features) + 1), jac=True, method="L-BFGS-B")
    w = res.x
    return CellClassifier(
        tuple(features),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in scale),
        tuple(float(v) for v in w[1:]),
        float(w[0]),
        float(threshold),
    )


def cross_validate(
    cells: pd.DataFrame,
    labels,
    *,
    n_folds: int = 5,
    seed: int = 0,
    l2: float = 1.0,
    threshold: float = 0.5,
    features: tuple[str, ...] = CLASSIFIER_FEATURES,
    balanced: bool = True,
) -> dict:
    """Stratified k-fold cross-validation of :func:`train_classifier`.

    Parameters
    ----------
    cells : DataFrame
        Candidates with the ``features`` columns.
    labels : array_like of int, shape (n,)
        1 = cell, 0 = non-cell, -1 = ignored.
    n_folds : int
        Number of folds (>= 2); lowered to the size of the smaller class when
        that is smaller.
    seed : int
        Seed of the random assignment of candidates to folds.
    l2, threshold, features, balanced
        As in :func:`train_classifier`.

    Returns
    -------
    dict
        ``n_folds`` (used; 0 when a class has fewer than 2 members, then every
        score is NaN), ``accuracy``, ``cell_recall`` (held-out cells kept),
        ``non_cell_rejection`` (held-out non-cells removed), ``n_cells``,
        ``n_non_cells``.

    Raises
    ------
    ParameterError
        If ``n_folds`` < 2.
    InputError
        If ``labels`` does not match ``cells``.
    """
    if int(n_folds) != n_folds or n_folds < 2:
        raise ParameterError(f"n_folds must be an integer >= 2, got {n_folds}.")
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (len(cells),):
        raise InputError(f"labels has shape {y.shape}, expected ({len(cells)},).")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    k = min(int(n_folds), n_pos, n_neg)
    out = {"n_folds": k, "n_cells": n_pos, "n_non_cells": n_neg}
    if k < 2:
        return {
            **out,
            "n_folds": 0,
            "accuracy": math.nan,
            "cell_recall": math.nan,
            "non_cell_rejection": math.nan,
        }
    rng = np.random.default_rng(seed)
    fold = np.full(len(y), -1, dtype=np.int64)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        fold[rng.permutation(idx)] = np.arange(len(idx)) % k
    pred = np.zeros(len(y), dtype=bool)
    for f in range(k):
        test = fold == f
        train = np.where(test, -1, y)
        model = train_classifier(
            cells, train, l2=l2, threshold=threshold, features=features, balanced=balanced
        )
        pred[test] = model.probability(cells[test]) >= model.threshold
    used = y >= 0
    truth = y == 1
    return {
        **out,
        "accuracy": float(np.mean(pred[used] == truth[used])),
        "cell_recall": float(np.mean(pred[y == 1])),
        "non_cell_rejection": float(np.mean(~pred[y == 0])),
    }


@dataclass(frozen=True)
class TrainingResult:
    """A classifier trained on one volume's annotated candidates.

    Attributes
    ----------
    model : CellClassifier
        Trained on every labelled candidate.
    cross_validation : dict
        :func:`cross_validate` of the labelled candidates.
    candidates : DataFrame
        The detector's candidates of the volume.
    labels : ndarray of int
        Per candidate: 1 cell, 0 non-cell, -1 unlabelled.
    """

    model: CellClassifier
    cross_validation: dict
    candidates: pd.DataFrame
    labels: np.ndarray


def train_from_annotations(
    signal,
    annotations: pd.DataFrame,
    *,
    voxel_size_um: tuple[float, float, float],
    params=None,
    background=None,
    tolerance_um: float = 10.0,
    threshold: float = 0.5,
    non_cells_beyond_um: float | None = None,
) -> TrainingResult:
    """Detect a volume's candidates, label them from annotations, train and cross-validate.

    The library function behind ``ketamap detect train``.

    Parameters
    ----------
    signal, background : array_like or dask.array.Array
        The volume (z, y, x) and its optional autofluorescence channel, as for
        :func:`~ketamap.wholebrain.detect.detect_cells`.
    annotations : DataFrame
        ``z_vox, y_vox, x_vox, cell_type`` (2 cell, 1 non-cell), e.g. from
        :func:`combine_annotations`.
    voxel_size_um : tuple of 3 float
    params : DetectionParams, optional
        The detector's parameters (the defaults when None): train with those the
        classifier will be used with.
    tolerance_um : float
        A candidate takes the label of the nearest annotation within this distance.
    threshold : float
        Cell probability at or above which the model keeps a candidate, in (0, 1).
    non_cells_beyond_um : float, optional
        Every cell of the volume is annotated: candidates farther than this from every
        annotated cell are non-cells (must exceed ``tolerance_um``).

    Returns
    -------
    TrainingResult

    Raises
    ------
    ParameterError
        For a tolerance, threshold or ``non_cells_beyond_um`` out of range.
    InputError
        When no candidate is labelled a non-cell (or none a cell): training needs both;
        the sentence gives the annotations' counts and the ways to supply non-cells.
    """
    from ketamap.wholebrain.detect import DetectionParams, detect_cells

    if not tolerance_um > 0:
        raise ParameterError(f"The tolerance (--tolerance) must be > 0 µm, got {tolerance_um}.")
    if not 0 < threshold < 1:
        raise ParameterError(f"The threshold (--threshold) must be in (0, 1), got {threshold}.")
    if non_cells_beyond_um is not None and not non_cells_beyond_um > tolerance_um:
        raise ParameterError(
            f"The distance beyond which candidates are non-cells (--non-cells-beyond) must "
            f"exceed the tolerance ({tolerance_um:g} µm), got {non_cells_beyond_um:g}."
        )
    params = DetectionParams() if params is None else params
    candidates = detect_cells(
        signal, voxel_size_um=voxel_size_um, params=params, background=background
    )
    labels = label_candidates(
        candidates,
        annotations,
        voxel_size_um=voxel_size_um,
        tolerance_um=tolerance_um,
        non_cells_beyond_um=non_cells_beyond_um,
    )
    n_ann = annotations["cell_type"].value_counts()
    if not (labels == 0).any():
        raise InputError(
            f"The annotations hold {int(n_ann.get(2, 0))} cells and {int(n_ann.get(1, 0))} "
            f"non-cells ({int((labels == 1).sum())} candidates matched a cell, none a "
            "non-cell); training needs both. Give non-cells with --non-cells (a cellfinder "
            "XML or a CSV), a --points XML with both types, or, if every cell of this volume "
            "is annotated, --non-cells-beyond 30 to take candidates farther than 30 µm from "
            "every annotated cell as non-cells."
        )
    model = train_classifier(candidates, labels, threshold=threshold)
    cv = cross_validate(candidates, labels, threshold=threshold)
    return TrainingResult(model, cv, candidates, np.asarray(labels))


def classify_cells(cells: pd.DataFrame, model: CellClassifier) -> pd.DataFrame:
    """Keep the candidates the classifier calls cells, with a ``cell_probability`` column.

    Returns
    -------
    DataFrame
        A copy of the rows with probability >= ``model.threshold``, plus a float64
        ``cell_probability`` column; index reset.
    """
    p = model.probability(cells) if len(cells) else np.empty(0)
    out = cells.assign(cell_probability=np.asarray(p, dtype=np.float64))
    return out[out["cell_probability"] >= model.threshold].reset_index(drop=True)


def save_classifier(model: CellClassifier, path) -> None:
    """Write the model as versioned JSON (no pickle)."""
    doc = {
        "format": _FORMAT,
        "version": _VERSION,
        "features": list(model.features),
        "mean": list(model.mean),
        "scale": list(model.scale),
        "weights": list(model.weights),
        "intercept": model.intercept,
        "threshold": model.threshold,
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def load_classifier(path) -> CellClassifier:
    """Read a model written by :func:`save_classifier`, checking every field.

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    InputError
        If it is not a ketamap classifier of a supported version, or a field is
        missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"Classifier file {path} does not exist.")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"Classifier file {path} is not JSON: {e}.") from e
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise InputError(f"Classifier file {path} is not a ketamap cell classifier.")
    if doc.get("version") != _VERSION:
        raise InputError(
            f"Classifier file {path} has version {doc.get('version')!r}; this ketamap reads "
            f"version {_VERSION}."
        )
    try:
        feats = tuple(str(f) for f in doc["features"])
        vecs = [tuple(float(v) for v in doc[k]) for k in ("mean", "scale", "weights")]
        intercept, threshold = float(doc["intercept"]), float(doc["threshold"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"Classifier file {path} is malformed: {e!r}.") from e
    if any(len(v) != len(feats) for v in vecs) or not all(
        math.isfinite(x) for v in vecs for x in v
    ):
        raise InputError(f"Classifier file {path} has inconsistent or non-finite arrays.")
    if not 0 < threshold < 1 or any(s <= 0 for s in vecs[1]):
        raise InputError(f"Classifier file {path} has an invalid threshold or scale.")
    return CellClassifier(feats, vecs[0], vecs[1], vecs[2], intercept, threshold)
