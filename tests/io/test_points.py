"""Tests for ketamap.io.points: cellfinder XML, Parquet/CSV cell tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ketamap.errors import InputError, InputNotFoundError
from ketamap.io.points import (
    cells_to_cellfinder_xml,
    read_cellfinder_xml,
    read_points,
    write_cells,
)


@pytest.fixture
def cells():
    return pd.DataFrame(
        {
            "z_vox": [1.2, 10.0, 3.5],
            "y_vox": [20.0, 5.4, 7.0],
            "x_vox": [30.6, 2.0, 9.0],
            "intensity": [100.0, 50.0, 75.0],
        }
    )


def test_xml_round_trip(tmp_path, cells):
    path = tmp_path / "c.xml"
    path.write_text(cells_to_cellfinder_xml(cells))
    back = read_cellfinder_xml(path)
    assert list(back.columns) == ["z_vox", "y_vox", "x_vox", "cell_type"]
    assert back["z_vox"].dtype == np.float64 and back["cell_type"].dtype == np.int64
    vox = ["z_vox", "y_vox", "x_vox"]
    np.testing.assert_array_equal(back[vox], np.rint(cells[vox]))
    assert (back["cell_type"] == 2).all()


def test_xml_keeps_cell_type(tmp_path, cells):
    cells = cells.assign(cell_type=[1, 2, 1])
    path = tmp_path / "c.xml"
    path.write_text(cells_to_cellfinder_xml(cells))
    assert sorted(read_cellfinder_xml(path)["cell_type"]) == [1, 1, 2]


def test_empty_table_xml(tmp_path):
    empty = pd.DataFrame({c: np.empty(0) for c in ["z_vox", "y_vox", "x_vox"]})
    path = tmp_path / "e.xml"
    path.write_text(cells_to_cellfinder_xml(empty))
    back = read_cellfinder_xml(path)
    assert len(back) == 0 and back["z_vox"].dtype == np.float64


def test_malformed_xml(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<CellCounter_Marker_File><Marker_Data>")
    with pytest.raises(InputError, match="not valid XML"):
        read_cellfinder_xml(bad)
    other = tmp_path / "other.xml"
    other.write_text("<root/>")
    with pytest.raises(InputError, match="Marker_Data"):
        read_cellfinder_xml(other)
    nocoord = tmp_path / "nocoord.xml"
    nocoord.write_text(
        "<CellCounter_Marker_File><Marker_Data><Marker_Type><Type>2</Type>"
        "<Marker><MarkerX>1</MarkerX><MarkerY>2</MarkerY></Marker>"
        "</Marker_Type></Marker_Data></CellCounter_Marker_File>"
    )
    with pytest.raises(InputError, match="MarkerZ"):
        read_cellfinder_xml(nocoord)
    with pytest.raises(InputNotFoundError):
        read_cellfinder_xml(tmp_path / "missing.xml")


def test_write_cells_and_read_points(tmp_path, cells):
    paths = write_cells(cells, tmp_path / "out")
    assert set(paths) == {"parquet", "csv", "xml"}
    assert all(p.is_file() for p in paths.values())
    for p in paths.values():
        back = read_points(p)
        assert len(back) == 3
        assert back["z_vox"].dtype == np.float64
    pd.testing.assert_frame_equal(read_points(paths["parquet"]), cells)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_read_points_errors(tmp_path):
    with pytest.raises(InputNotFoundError):
        read_points(tmp_path / "none.csv")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported"):
        read_points(tmp_path / "a.txt")
    pd.DataFrame({"z": [1]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(InputError, match="z_vox"):
        read_points(tmp_path / "b.csv")
    with pytest.raises(InputError, match="x_vox"):
        write_cells(pd.DataFrame({"z_vox": [1.0], "y_vox": [1.0]}), tmp_path / "o")


@pytest.mark.shared_data
def test_read_real_cellfinder_xml(shared_data):
    cells = read_points(shared_data / "cellfinder_crop" / "cell_classification.xml")
    assert len(cells) == 56
    assert (cells["cell_type"] == 2).all()
    assert cells["z_vox"].between(0, 29).all()
    assert cells["y_vox"].between(0, 509).all() and cells["x_vox"].between(0, 666).all()
