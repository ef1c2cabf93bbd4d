"""The proofread labels file: read, write, match to candidates, precision with its interval."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ketamap.errors import InputError, InputNotFoundError, ParameterError
from ketamap.io.labels import (
    LABEL_COLUMNS,
    match_labels,
    precision_estimate,
    read_labels,
    wilson_interval,
    write_labels,
)


def _labels(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "z_vox": rng.uniform(0, 300, n),
            "y_vox": rng.uniform(0, 3000, n),
            "x_vox": rng.uniform(0, 3000, n),
            "label": rng.choice(["cell", "not_cell"], n),
        }
    )


def test_write_then_read_is_exact(tmp_path):
    table = _labels(50)
    path = write_labels(table, tmp_path / "sub" / "labels.csv")
    assert path.read_text().splitlines()[0] == ",".join(LABEL_COLUMNS)
    back = read_labels(path)
    assert list(back.columns) == list(LABEL_COLUMNS)
    # coordinates come back bit for bit, so they match cells.parquet exactly
    np.testing.assert_array_equal(
        back[["z_vox", "y_vox", "x_vox"]], table[["z_vox", "y_vox", "x_vox"]]
    )
    assert back["label"].tolist() == table["label"].tolist()
    assert not list(tmp_path.rglob("*.part"))


def test_extra_columns_are_ignored_and_whitespace_trimmed(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("z_vox,y_vox,x_vox,label,cell_type\n1,2,3, cell ,2\n4,5,6,not_cell,1\n")
    back = read_labels(path)
    assert list(back.columns) == list(LABEL_COLUMNS)
    assert back["label"].tolist() == ["cell", "not_cell"]


def test_empty_labels_file(tmp_path):
    path = write_labels(pd.DataFrame(columns=list(LABEL_COLUMNS)), tmp_path / "l.csv")
    assert len(read_labels(path)) == 0
    (tmp_path / "blank.csv").write_text("")
    assert len(read_labels(tmp_path / "blank.csv")) == 0


@pytest.mark.parametrize(
    "text, match",
    [
        ("z_vox,y_vox,label\n1,2,cell\n", "lacks the column\\(s\\) x_vox"),
        ("z_vox,y_vox,x_vox,label\n1,2,3,maybe\n", "row 1 has the label 'maybe'"),
        ("z_vox,y_vox,x_vox,label\n1,2,3,cell\n1,2,3,\n", "row 2 has the label nan"),
        ("z_vox,y_vox,x_vox,label\n1,two,3,cell\n", "row 1 has no numeric y_vox"),
        ("z_vox,y_vox,x_vox,label\n1,2,3,cell\n1,2,3,not_cell\n", "labelled twice"),
    ],
)
def test_bad_labels_file_is_one_sentence(tmp_path, text, match):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as err:
        read_labels(path)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_missing_file_and_a_table_that_would_not_read_back(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        read_labels(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="label"):
        write_labels(_labels(2).assign(label=["cell", "yes"]), tmp_path / "l.csv")
    assert not (tmp_path / "l.csv").exists()


def test_match_one_label_to_one_candidate():
    cells = pd.DataFrame(
        {
            "z_vox": [10.0, 10.0, 50.0, 80.0],
            "y_vox": [5.0, 5.6, 50.0, 80.0],
            "x_vox": [5.0, 5.0, 50.0, 80.0],
        },
        index=[7, 8, 9, 10],
    )
    labels = pd.DataFrame(
        {
            "z_vox": [10.0, 50.4, 200.0],
            "y_vox": [5.5, 50.0, 200.0],
            "x_vox": [5.0, 50.0, 200.0],
            "label": ["not_cell", "cell", "cell"],
        }
    )
    per_cell, unmatched = match_labels(cells, labels)
    assert per_cell.index.tolist() == [7, 8, 9, 10]
    # the label at y 5.5 is nearer the candidate at 5.6 than the one at 5.0: it labels that one only
    assert per_cell.tolist() == [None, "not_cell", "cell", None]
    assert unmatched.index.tolist() == [2] and unmatched["z_vox"].tolist() == [200.0]
    exact, unmatched = match_labels(cells, labels, tolerance_vox=0)
    assert exact.tolist() == [None, None, None, None] and len(unmatched) == 3
    wide, unmatched = match_labels(cells, labels, tolerance_vox=500)
    assert wide.notna().sum() == 3 and len(unmatched) == 0


def test_match_errors():
    cells = pd.DataFrame({"z_vox": [1.0], "y_vox": [1.0], "x_vox": [1.0]})
    with pytest.raises(ParameterError, match="tolerance_vox"):
        match_labels(cells, _labels(1), tolerance_vox=-1)
    with pytest.raises(InputError, match="x_vox"):
        match_labels(cells.drop(columns="x_vox"), _labels(1))
    per_cell, unmatched = match_labels(cells.iloc[:0], _labels(3))
    assert len(per_cell) == 0 and len(unmatched) == 3


def test_wilson_interval_matches_statsmodels():
    from statsmodels.stats.proportion import proportion_confint

    for k, n in [(0, 10), (3, 10), (10, 10), (170, 200), (1, 1)]:
        low, high = wilson_interval(k, n)
        ref = proportion_confint(k, n, alpha=0.05, method="wilson")
        np.testing.assert_allclose((low, high), ref, atol=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ParameterError):
        wilson_interval(5, 3)


def test_precision_estimate_covers_the_truth_at_95_percent():
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(400):
        sample = np.where(rng.random(60) < 0.8, "cell", "not_cell")
        est = precision_estimate(pd.Series(sample))
        assert est["n_labelled"] == 60 and est["low"] <= est["precision"] <= est["high"]
        covered += est["low"] <= 0.8 <= est["high"]
    assert 0.92 <= covered / 400 <= 0.99
    none = precision_estimate(pd.DataFrame({"label": [None, None]}))
    assert none["n_labelled"] == 0 and np.isnan(none["precision"])
