"""Multiscale OME-Zarr: levels, mean downsampling, NGFF metadata, level-0 reading."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest

from ketamap.errors import ParameterError
from ketamap.io.volumes import open_volume, pyramid_factors, read_voxel_size_um, write_ome_zarr


def test_pyramid_factors_anisotropic_then_isotropic():
    # 5 x 2 x 2 µm: y/x only until the voxel is near isotropic, then z too
    assert pyramid_factors((64, 256, 256), (5.0, 2.0, 2.0), levels=4) == [
        (1, 2, 2),
        (2, 2, 2),
        (2, 2, 2),
    ]
    assert pyramid_factors((10, 10, 10), (1.0, 1.0, 1.0), levels=1) == []
    # auto: stop once the smallest level fits in one chunk
    f = pyramid_factors((100, 1000, 1000), (2.0, 2.0, 2.0), chunks=(64, 128, 128))
    assert f == [(2, 2, 2)] * 3
    with pytest.raises(ParameterError, match="levels"):
        pyramid_factors((4, 4, 4), (1.0, 1.0, 1.0), levels=0)


def test_levels_are_block_means_and_metadata_is_ngff(tmp_path):
    rng = np.random.default_rng(3)
    vol = rng.integers(0, 60000, (7, 21, 19), dtype=np.uint16)
    path = write_ome_zarr(
        da.from_array(vol, chunks=(3, 8, 8)),
        tmp_path / "v.ome.zarr",
        voxel_size_um=(2.0, 2.0, 2.0),
        chunks=(4, 8, 8),
        levels=None,
    )
    ms = json.loads((path / ".zattrs").read_text())["multiscales"][0]
    assert ms["version"] == "0.4" and [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[2.0, 2.0, 2.0], [4.0, 4.0, 4.0], [8.0, 8.0, 8.0]]
    assert ms["datasets"][1]["coordinateTransformations"][1]["translation"] == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(open_volume(path).compute(), vol)  # level 0 by default
    assert read_voxel_size_um(path) == (2.0, 2.0, 2.0)
    lvl1 = open_volume(path, level=1).compute()
    assert lvl1.shape == (4, 11, 10) and lvl1.dtype == np.uint16
    padded = np.pad(vol.astype(np.float64), [(0, 1), (0, 1), (0, 1)], mode="edge")
    expected = padded.reshape(4, 2, 11, 2, 10, 2).mean(axis=(1, 3, 5))
    np.testing.assert_array_equal(lvl1, np.round(expected).astype(np.uint16))
    assert open_volume(path, level=2).shape == (2, 6, 5)
    with pytest.raises(ParameterError, match="3 resolution level"):
        open_volume(path, level=3)


def test_float_volume_and_single_level_default(tmp_path):
    vol = np.linspace(0, 1, 2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6)
    one = write_ome_zarr(vol, tmp_path / "a.ome.zarr", voxel_size_um=(1, 1, 1))
    assert len(json.loads((one / ".zattrs").read_text())["multiscales"][0]["datasets"]) == 1
    two = write_ome_zarr(vol, tmp_path / "b.ome.zarr", voxel_size_um=(1, 1, 1), levels=2)
    lvl = open_volume(two, level=1).compute()
    assert lvl.dtype == np.float32
    np.testing.assert_allclose(lvl, vol.reshape(1, 2, 3, 2, 3, 2).mean(axis=(1, 3, 5)), rtol=1e-6)


def test_convert_tiff_planes_with_chunks_and_levels(tmp_path, run_cli, capsys):
    import tifffile
    import zarr

    vol = np.random.default_rng(4).integers(0, 900, (6, 40, 36), dtype=np.uint16)
    (tmp_path / "planes").mkdir()
    for i, plane in enumerate(vol):
        tifffile.imwrite(tmp_path / "planes" / f"p_{i:03d}.tif", plane)
    out = tmp_path / "v.ome.zarr"
    args = ["convert", tmp_path / "planes", "--voxel-size", 5, 2, 2, "--out", out]
    assert run_cli(*args, "--chunks", 2, 16, 16, "--levels", 2) == 0
    group = zarr.open(str(out), mode="r")
    assert group["0"].chunks == (2, 16, 16) and group["1"].shape == (6, 20, 18)
    np.testing.assert_array_equal(open_volume(out).compute(), vol)
    # no voxel size in TIFF planes: one sentence asking for it
    assert run_cli("convert", tmp_path / "planes", "--out", tmp_path / "w.ome.zarr") == 2
    assert "--voxel-size" in capsys.readouterr().err
    assert not (tmp_path / "w.ome.zarr").exists()
