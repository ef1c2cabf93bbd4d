"""The optional second-pass classifier: learns from labels, round-trips through JSON."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ketamap.errors import InputError, InputNotFoundError, ParameterError
from ketamap.wholebrain.classify import (
    classify_cells,
    label_candidates,
    load_classifier,
    save_classifier,
    train_classifier,
)


def _candidates(n, seed=0):
    """Cells: high snr and contrast; non-cells (noise, structure): low."""
    rng = np.random.default_rng(seed)
    is_cell = rng.random(n) < 0.4
    snr = np.where(is_cell, rng.lognormal(np.log(20), 0.3, n), rng.lognormal(np.log(7), 0.3, n))
    high, low = rng.lognormal(np.log(9), 0.3, n), rng.lognormal(np.log(5.5), 0.3, n)
    contrast = np.where(is_cell, high, low)
    cells = pd.DataFrame(
        {
            "z_vox": rng.uniform(0, 30, n),
            "y_vox": rng.uniform(0, 500, n),
            "x_vox": rng.uniform(0, 500, n),
            "intensity": snr * 50.0,
            "snr": snr,
            "contrast": contrast,
        }
    )
    return cells, is_cell.astype(np.int64)


def test_trained_classifier_separates_and_round_trips(tmp_path):
    train, y = _candidates(400, seed=0)
    test, y_test = _candidates(400, seed=1)
    model = train_classifier(train, y)
    kept = classify_cells(test, model)
    pred = model.probability(test) >= 0.5
    assert np.mean(pred == y_test.astype(bool)) >= 0.9
    assert len(kept) == pred.sum() and kept["cell_probability"].min() >= 0.5
    path = tmp_path / "model.json"
    save_classifier(model, path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "ketamap-cell-classifier" and doc["version"] == 1
    again = load_classifier(path)
    np.testing.assert_allclose(again.probability(test), model.probability(test), rtol=1e-12)


def test_labels_from_annotated_points():
    cells = pd.DataFrame(
        {
            "z_vox": [10.0, 10.0, 20.0],
            "y_vox": [100.0, 200.0, 300.0],
            "x_vox": [100.0, 200.0, 300.0],
        }
    )
    points = pd.DataFrame(
        {
            "z_vox": [11.0, 10.0],
            "y_vox": [101.0, 203.0],
            "x_vox": [100.0, 200.0],
            "cell_type": [2, 1],
        }
    )
    labels = label_candidates(cells, points, voxel_size_um=(5.0, 2.0, 2.0), tolerance_um=10.0)
    assert labels.tolist() == [1, 0, -1]


def test_bad_training_and_bad_files(tmp_path):
    cells, y = _candidates(50)
    with pytest.raises(InputError, match="cells and non-cells"):
        train_classifier(cells, np.ones(50, dtype=int))
    with pytest.raises(ParameterError, match="l2"):
        train_classifier(cells, y, l2=0.0)
    with pytest.raises(InputNotFoundError):
        load_classifier(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "ketamap-cell-classifier", "version": 99}))
    with pytest.raises(InputError, match="version"):
        load_classifier(bad)
    bad.write_text("\x80 not json")
    with pytest.raises(InputError):
        load_classifier(bad)
