"""Ontology: validation, lookups, ancestry and vectorised roll-up."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ketamap.atlas import Ontology
from ketamap.errors import AtlasError, ParameterError

BIG = 484682512  # a real Allen id above 65535 (scwm)


def _table(rows):
    return pd.DataFrame(rows, columns=["id", "acronym", "name", "parent_id"])


@pytest.fixture(scope="module")
def onto() -> Ontology:
    return Ontology(
        _table(
            [
                (997, "root", "root", None),
                (8, "grey", "Basic cell groups and regions", 997),
                (343, "BS", "Brain stem", 8),
                (313, "MB", "Midbrain", 343),
                (323, "MBmot", "Midbrain motor related", 313),
                (749, "VTA", "Ventral tegmental area", 323),
                (381, "SNr", "Substantia nigra reticular part", 323),
                (1009, "fiber tracts", "fiber tracts", 997),
                (BIG, "scwm", "supra-callosal cerebral white matter", 1009),
                (BIG + 1, "scwm-x", "a made-up child of scwm", BIG),
            ]
        )
    )


def test_table_columns_and_derived_fields(onto):
    t = onto.table
    assert list(t.columns) == [
        "id",
        "acronym",
        "name",
        "parent_id",
        "depth",
        "structure_id_path",
        "color_hex",
    ]
    assert t["id"].dtype == np.int64
    assert str(t["parent_id"].dtype) == "Int64"
    assert pd.isna(t.loc[t.id == 997, "parent_id"]).all()
    assert onto.root_id == 997
    assert onto.max_depth == 5
    assert onto.ids.dtype == np.int64
    assert t.set_index("acronym").loc["VTA", "structure_id_path"] == "/997/8/343/313/323/749/"
    assert onto.depth(749) == 5 and onto.depth(997) == 0


def test_ancestors_descendants_parent(onto):
    assert onto.ancestors(749) == [997, 8, 343, 313, 323]
    assert onto.ancestors(749, include_self=True)[-1] == 749
    assert onto.ancestors(997) == []
    assert sorted(onto.descendants(313)) == [323, 381, 749]
    assert onto.descendants(313, include_self=True)[0] == 313
    assert onto.descendants(BIG + 1) == []
    assert onto.parent(BIG + 1) == BIG
    assert onto.parent(997) is None
    assert onto.children(323) == [749, 381]


def test_lookup_by_id_acronym_and_name(onto):
    assert onto.lookup(749) == 749
    assert onto.lookup(np.int64(BIG)) == BIG
    assert onto.lookup("VTA") == 749
    assert onto.lookup("vta") == 749
    assert onto.lookup("Ventral tegmental area") == 749
    assert onto.lookup("ventral TEGMENTAL area") == 749
    assert onto.lookup(str(BIG)) == BIG
    assert onto.acronym(BIG) == "scwm"
    assert onto.name(381) == "Substantia nigra reticular part"


def test_unknown_region_suggests_the_closest(onto):
    with pytest.raises(AtlasError, match='did you mean "VTA"'):
        onto.lookup("VTAA")
    with pytest.raises(AtlasError, match="not in the ontology"):
        onto.lookup(12345)
    assert "VTA" in onto and "nope" not in onto


def test_rollup_vectorised_with_big_ids(onto):
    labels = np.array([[0, 749, 381], [BIG + 1, BIG, 313]], dtype=np.uint32)
    out = onto.rollup(labels, 3)
    assert out.dtype == np.uint32 and out.shape == labels.shape
    assert out.tolist() == [[0, 313, 313], [BIG + 1, BIG, 313]]
    # deeper than level -> ancestor at that level; shallower stays itself
    assert onto.rollup(labels, 2).tolist() == [[0, 343, 343], [BIG, BIG, 343]]
    assert onto.rollup(labels, 0).tolist() == [[0, 997, 997], [997, 997, 997]]
    assert onto.rollup(labels, 99).tolist() == labels.tolist()
    assert onto.rollup(np.array([], dtype=np.int64), 2).shape == (0,)
    # a dtype too small for the ids falls back to int64
    assert onto.rollup(np.array([749], dtype=np.uint16), 1).dtype == np.int64


def test_rollup_errors(onto):
    with pytest.raises(AtlasError, match="not in the ontology, e.g. 5"):
        onto.rollup(np.array([749, 5]), 2)
    with pytest.raises(ParameterError, match="non-negative int"):
        onto.rollup(np.array([749]), -1)


def test_ancestor_pairs_aggregate_with_one_merge(onto):
    pairs = onto.ancestor_pairs()
    assert list(pairs.columns) == ["id", "ancestor_id"]
    assert len(pairs) == sum(onto.depth(i) + 1 for i in onto.ids)
    counts = pd.DataFrame({"id": [749, 381, BIG + 1], "n": [3, 4, 5]})
    total = counts.merge(pairs, on="id").groupby("ancestor_id")["n"].sum()
    assert total[313] == 7 and total[997] == 12 and total[BIG] == 5 and total[1009] == 5


@pytest.mark.parametrize(
    "rows, message",
    [
        ([(1, "a", "A", None), (1, "b", "B", 1)], "duplicated region ids"),
        ([(1, "a", "A", None), (2, "a", "B", 1)], "duplicated acronyms"),
        ([(1, "a", "A", None), (2, "b", "B", None)], "exactly one root"),
        ([(1, "a", "A", None), (2, "b", "B", 7)], "parent 7, which is not in the ontology"),
        ([(1, "a", "A", None), (2, "b", "B", 3), (3, "c", "C", 2)], "cycle"),
        ([(0, "a", "A", None)], "positive"),
    ],
)
def test_malformed_trees_are_rejected(rows, message):
    with pytest.raises(AtlasError, match=message):
        Ontology(_table(rows))


def test_missing_column_is_named():
    with pytest.raises(AtlasError, match="parent_id"):
        Ontology(pd.DataFrame({"id": [1], "acronym": ["a"], "name": ["A"]}))


def test_equality_and_subset(onto):
    same = Ontology(onto.table[["id", "acronym", "name", "parent_id"]].iloc[::-1])
    assert same == onto
    sub = onto.subset([749])
    assert sorted(sub.ids) == [8, 313, 323, 343, 749, 997]
    assert sub != onto
