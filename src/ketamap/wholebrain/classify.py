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
    "train_classifier",
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
) -> np.ndarray:
    """Label each candidate from annotated points: 1 cell, 0 non-cell, -1 unlabelled.

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
        A candidate takes the label of the nearest annotated point within this
        distance (µm); farther candidates are unlabelled (-1).

    Returns
    -------
    numpy.ndarray of int64, shape (n,)
    """
    labels = np.full(len(cells), -1, dtype=np.int64)
    if len(cells) == 0 or len(points) == 0:
        return labels
    vs = np.asarray(voxel_size_um, dtype=np.float64)
    cols = ["z_vox", "y_vox", "x_vox"]
    d, i = cKDTree(points[cols].to_numpy(dtype=np.float64) * vs).query(
        cells[cols].to_numpy(dtype=np.float64) * vs
    )
    near = d <= tolerance_um
    types = points["cell_type"].to_numpy() if "cell_type" in points else np.full(len(points), 2)
    labels[near] = (types[i[near]] == 2).astype(np.int64)
    return labels


def train_classifier(
    cells: pd.DataFrame,
    labels,
    *,
    l2: float = 1.0,
    threshold: float = 0.5,
    features: tuple[str, ...] = CLASSIFIER_FEATURES,
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

    def loss(w):
        t = z @ w[1:] + w[0]
        value = np.sum(np.logaddexp(0.0, t) - y * t) + 0.5 * l2 * np.sum(w[1:] ** 2)
        p = 0.5 * (1.0 + np.tanh(0.5 * t))
        g = np.concatenate([[np.sum(p - y)], z.T @ (p - y) + l2 * w[1:]])
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
