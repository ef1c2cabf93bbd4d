"""Tests for ketamap.io.volumes: TIFF folders, multipage TIFF, OME-Zarr, .npy."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from ketamap.errors import InputError, InputNotFoundError
from ketamap.io.volumes import open_volume, read_voxel_size_um, write_ome_zarr


@pytest.fixture
def volume():
    return np.random.default_rng(0).integers(0, 4000, (5, 12, 9), dtype=np.uint16)


def _write_planes(folder, vol, names=None):
    folder.mkdir()
    names = names or [f"plane_{i}.tif" for i in range(len(vol))]
    for name, plane in zip(names, vol, strict=True):
        tifffile.imwrite(folder / name, plane)
    return folder


def test_tiff_folder_natural_order_and_lazy(tmp_path, volume):
    # plane_10 must come after plane_9 (natural, not lexical, sort)
    vol = np.concatenate([volume, volume + 1])
    folder = _write_planes(tmp_path / "planes", vol, [f"p_{i}.tif" for i in range(len(vol))])
    arr = open_volume(folder)
    assert isinstance(arr, da.Array) and arr.shape == vol.shape and arr.dtype == np.uint16
    np.testing.assert_array_equal(arr.compute(), vol)
    assert open_volume(folder, chunks=(4, 6, 9)).chunks[0] == (4, 4, 2)


def test_tiff_folder_missing_plane(tmp_path, volume):
    names = ["img_0000.tif", "img_0001.tif", "img_0003.tif", "img_0004.tif", "img_0005.tif"]
    folder = _write_planes(tmp_path / "planes", volume, names)
    with pytest.raises(InputError, match="img_0001.tif.*img_0003.tif"):
        open_volume(folder)


def test_tiff_folder_shape_mismatch_names_file(tmp_path, volume):
    folder = _write_planes(tmp_path / "planes", volume)
    tifffile.imwrite(folder / "plane_3.tif", volume[3, :10])
    with pytest.raises(InputError, match="plane_3.tif"):
        open_volume(folder)


def test_tiff_folder_dtype_mismatch_and_unreadable(tmp_path, volume):
    folder = _write_planes(tmp_path / "planes", volume)
    tifffile.imwrite(folder / "plane_2.tif", volume[2].astype(np.float32))
    with pytest.raises(InputError, match="plane_2.tif"):
        open_volume(folder)
    (folder / "plane_2.tif").write_bytes(b"not a tiff")
    with pytest.raises(InputError, match="plane_2.tif"):
        open_volume(folder)


def test_plane_removed_after_open_names_file(tmp_path, volume):
    folder = _write_planes(tmp_path / "planes", volume)
    arr = open_volume(folder)
    (folder / "plane_4.tif").unlink()
    with pytest.raises(InputError, match="plane_4.tif"):
        arr.compute()


def test_multipage_tiff_memmap_and_compressed(tmp_path, volume):
    plain = tmp_path / "stack.tif"
    tifffile.imwrite(plain, volume)
    np.testing.assert_array_equal(open_volume(plain).compute(), volume)
    packed = tmp_path / "packed.tiff"
    tifffile.imwrite(packed, volume, compression="zlib")
    arr = open_volume(packed, chunks=(2, 12, 9))
    assert arr.chunks[0] == (2, 2, 1)
    np.testing.assert_array_equal(arr.compute(), volume)


def test_npy_and_2d(tmp_path, volume):
    np.save(tmp_path / "v.npy", volume)
    np.testing.assert_array_equal(open_volume(tmp_path / "v.npy").compute(), volume)
    np.save(tmp_path / "p.npy", volume[0])
    assert open_volume(tmp_path / "p.npy").shape == (1, 12, 9)


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(InputNotFoundError):
        open_volume(tmp_path / "nope.tif")
    (tmp_path / "v.nii").write_bytes(b"x")
    with pytest.raises(InputError, match="supported|TIFF"):
        open_volume(tmp_path / "v.nii")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no TIFF planes"):
        open_volume(tmp_path / "empty")


@pytest.mark.parametrize("lazy", [False, True])
def test_ome_zarr_round_trip(tmp_path, volume, lazy):
    src = da.from_array(volume, chunks=(2, 5, 4)) if lazy else volume
    path = write_ome_zarr(src, tmp_path / "v.ome.zarr", voxel_size_um=(5, 2, 2), chunks=(2, 8, 8))
    assert read_voxel_size_um(path) == (5.0, 2.0, 2.0)
    meta = json.loads((path / ".zattrs").read_text())["multiscales"][0]
    assert meta["version"] == "0.4" and [a["name"] for a in meta["axes"]] == ["z", "y", "x"]
    assert all(a["unit"] == "micrometer" for a in meta["axes"])
    arr = open_volume(path)
    assert arr.chunks[0] == (2, 2, 1)
    np.testing.assert_array_equal(arr.compute(), volume)
    # no temporary folders left behind; rewriting replaces atomically
    write_ome_zarr(volume * 0, path, voxel_size_um=(1, 1, 1))
    assert read_voxel_size_um(path) == (1.0, 1.0, 1.0)
    assert open_volume(path).compute().max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.ome.zarr"]


def test_plain_zarr_array_and_voxel_size_none(tmp_path, volume):
    z = zarr.open(str(tmp_path / "plain.zarr"), mode="w", shape=volume.shape, dtype=volume.dtype)
    z[...] = volume
    np.testing.assert_array_equal(open_volume(tmp_path / "plain.zarr").compute(), volume)
    assert read_voxel_size_um(tmp_path / "plain.zarr") is None
    np.save(tmp_path / "v.npy", volume)
    assert read_voxel_size_um(tmp_path / "v.npy") is None
    with pytest.raises(InputNotFoundError):
        read_voxel_size_um(tmp_path / "missing.zarr")


def test_write_ome_zarr_bad_inputs(tmp_path, volume):
    with pytest.raises(InputError):
        write_ome_zarr(volume, tmp_path / "a.zarr", voxel_size_um=(0, 1, 1))
    with pytest.raises(InputError):
        write_ome_zarr(volume, tmp_path / "a.zarr", voxel_size_um=(1, 1))
    with pytest.raises(InputError):
        write_ome_zarr(volume[0], tmp_path / "a.zarr", voxel_size_um=(1, 1, 1))
    assert not (tmp_path / "a.zarr").exists()


_OPEN_PEAK = """
import resource, sys
import numpy as np
from ketamap.io.volumes import open_volume
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
arr = open_volume(sys.argv[1])
plane = np.asarray(arr[arr.shape[0] // 2].compute())
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


@pytest.mark.parametrize("suffix", [".npy", ".tif"])
def test_memory_mapped_volume_is_not_read_whole_on_opening(tmp_path, suffix):
    """A 256 MiB .npy or uncompressed multipage TIFF opens and gives a plane within 48 MiB
    of peak memory (Dask's from_array copies NumPy arrays and memory maps whole)."""
    import subprocess
    import sys

    shape = (128, 1024, 1024)
    path = tmp_path / f"big{suffix}"
    if suffix == ".npy":
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=shape).flush()
    else:
        tifffile.imwrite(path, np.zeros(shape, np.uint16))
    out = subprocess.run(
        [sys.executable, "-c", _OPEN_PEAK, str(path)], capture_output=True, text=True, check=True
    )
    assert float(out.stdout.strip().splitlines()[-1]) < 48, out.stdout


def test_lazy_array_does_not_copy_its_input():
    import resource

    from ketamap.io.volumes import lazy_array

    a = np.ones((64, 1024, 512), dtype=np.uint16)  # 64 MiB
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d = lazy_array(a, chunks=(8, 1024, 512))
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024 < 16
    b = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    np.testing.assert_array_equal(lazy_array(b, chunks=(1, 3, 2)).compute(), b)
    assert d.dtype == a.dtype and d.shape == a.shape
