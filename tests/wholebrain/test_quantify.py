"""Counting cells per region at every hierarchy level."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ketamap.atlas import Atlas, Ontology
from ketamap.wholebrain.quantify import (
    assign_regions,
    cell_summary,
    count_regions,
    label_volumes_mm3,
)

BIG = 614454277  # a real Allen id above 65535


@pytest.fixture
def onto():
    return Ontology(
        pd.DataFrame(
            {
                "id": [997, 8, 100, 200, BIG],
                "acronym": ["root", "grey", "A", "B", "B1"],
                "name": ["root", "Basic cell groups", "Region A", "Region B", "Region B one"],
                "parent_id": [pd.NA, 997, 8, 8, 200],
            }
        )
    )


@pytest.fixture
def atlas(onto):
    ann = np.zeros((4, 4, 4), np.uint32)
    ann[1:3, 1:3, 0:2] = 100
    ann[1:3, 1:3, 2:4] = BIG
    hemi = np.ones_like(ann, dtype=np.uint8)
    hemi[:, :, 2:] = 2
    return Atlas(
        name="tiny",
        annotation=ann,
        hemispheres=hemi,
        resolution_um=(100.0, 100.0, 100.0),
        orientation="asr",
        ontology=onto,
    )


def test_label_volumes(atlas):
    v = label_volumes_mm3(atlas.annotation, atlas.hemispheres, atlas.resolution_um)
    assert set(v["region_id"]) == {100, BIG}
    assert v["volume_mm3"].sum() == pytest.approx(16 * 1e-3)
    assert v["region_id"].dtype == np.int64


def test_assign_and_count_roll_up_to_every_level(atlas, onto):
    pts = np.array([[1, 1, 0], [2, 2, 1], [1.2, 1.1, 2.9], [9, 9, 9], [0, 0, 0]], float)
    assigned = assign_regions(pts, atlas)
    assert assigned["region_id"].tolist() == [100, 100, BIG, 0, 0]
    assert assigned["inside_volume"].tolist() == [True, True, True, False, True]
    summary = cell_summary(assigned)
    assert summary == {
        "n_cells": 5,
        "n_outside_volume": 1,
        "n_unlabelled": 1,
        "n_in_regions": 3,
        "n_left": 2,
        "n_right": 1,
    }
    vols = label_volumes_mm3(atlas.annotation, atlas.hemispheres, atlas.resolution_um)
    table = count_regions(assigned, vols, onto).set_index("acronym")
    assert table.loc["A", "count"] == 2 and table.loc["A", "count_left"] == 2
    assert table.loc["B1", "count"] == 1 and table.loc["B1", "count_right"] == 1
    assert table.loc["B", "count"] == 1  # parent of B1 (no voxels of its own)
    assert table.loc["grey", "count"] == 3 and table.loc["root", "count"] == 3
    assert table.loc["root", "volume_mm3"] == pytest.approx(0.016)
    assert table.loc["A", "density_per_mm3"] == pytest.approx(2 / 0.008)
    assert table.loc["root", "level"] == 0 and table.loc["B1", "level"] == 3
    assert table.loc["B1", "region_id"] == BIG
    assert table["count"].dtype == np.int64


def test_no_cells_gives_zero_counts_not_missing_rows(atlas, onto):
    assigned = assign_regions(np.zeros((0, 3)), atlas)
    vols = label_volumes_mm3(atlas.annotation, atlas.hemispheres, atlas.resolution_um)
    table = count_regions(assigned, vols, onto)
    assert len(table) == 5 and (table["count"] == 0).all()


def test_unknown_label_is_a_clear_error(atlas, onto):
    from ketamap.errors import AtlasError

    cells = pd.DataFrame({"region_id": [12345], "hemisphere": [1]})
    vols = label_volumes_mm3(atlas.annotation, atlas.hemispheres, atlas.resolution_um)
    with pytest.raises(AtlasError, match="12345"):
        count_regions(cells, vols, onto)
