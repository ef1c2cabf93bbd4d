"""Imaris (.ims) and NIfTI readers: lazy, cropped, right axes and voxel size; convert."""

from __future__ import annotations

import pickle

import dask
import dask.array as da
import h5py
import nibabel as nib
import numpy as np
import pytest

from ketamap.errors import InputError, ParameterError
from ketamap.io.formats import imaris_channels, open_imaris, open_nifti
from ketamap.io.volumes import open_volume, read_voxel_size_um


def _chars(value) -> np.ndarray:
    """Imaris stores every attribute as an array of single characters."""
    return np.array([c.encode() for c in str(value)], dtype="S1")


def write_ims(path, channels, *, voxel_um=(5.0, 2.0, 1.5), pad=(3, 5, 7), unit="um"):
    """A minimal Imaris 5.5 file: data padded beyond ImageSize as Imaris does."""
    shape = channels[0].shape
    with h5py.File(path, "w") as f:
        f.attrs["ImarisDataSet"] = _chars("ImarisDataSet")
        f.attrs["ImarisVersion"] = _chars("5.5.0")
        info = f.create_group("DataSetInfo/Image")
        for axis, n, v, i in zip("ZYX", shape, voxel_um, (2, 1, 0), strict=True):
            info.attrs[f"ImageSize{axis}"] = _chars(n)
            info.attrs[f"ExtMin{i}"] = _chars(-10.0)
            info.attrs[f"ExtMax{i}"] = _chars(-10.0 + n * v)
        info.attrs["Unit"] = _chars(unit)
        for c, vol in enumerate(channels):
            padded = np.zeros(tuple(n + p for n, p in zip(shape, pad, strict=True)), vol.dtype)
            padded[: shape[0], : shape[1], : shape[2]] = vol
            padded[shape[0] :] = 999  # padding that must never be read as data
            g = f.create_group(f"DataSet/ResolutionLevel 0/TimePoint 0/Channel {c}")
            g.create_dataset("Data", data=padded, chunks=(4, 8, 8), compression="gzip")
    return path


@pytest.fixture
def vols():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 3000, (9, 20, 17), dtype=np.uint16) for _ in range(2)]


def test_imaris_channels_crop_and_voxel_size(tmp_path, vols):
    path = write_ims(tmp_path / "brain.ims", vols)
    assert imaris_channels(path) == 2
    for c in range(2):
        arr, voxel = open_imaris(path, channel=c, chunks=(4, 8, 8))
        assert isinstance(arr, da.Array) and arr.shape == (9, 20, 17)
        np.testing.assert_array_equal(arr.compute(), vols[c])
        np.testing.assert_allclose(voxel, (5.0, 2.0, 1.5))
    np.testing.assert_array_equal(open_volume(path, channel=1).compute(), vols[1])
    np.testing.assert_allclose(read_voxel_size_um(path), (5.0, 2.0, 1.5))
    with pytest.raises(ParameterError, match="2 channel"):
        open_imaris(path, channel=2)


def test_imaris_units_and_processes(tmp_path, vols):
    path = write_ims(tmp_path / "nm.ims", vols[:1], voxel_um=(5000.0, 2000.0, 1000.0), unit="nm")
    arr, voxel = open_imaris(path, chunks=(4, 8, 8))
    np.testing.assert_allclose(voxel, (5.0, 2.0, 1.0))
    # the graph holds no open file handle: it pickles, and computes in other processes
    pickle.loads(pickle.dumps(arr))
    with dask.config.set(scheduler="processes", num_workers=2):
        np.testing.assert_array_equal(arr.compute(), vols[0])


def test_imaris_malformed(tmp_path, vols):
    (tmp_path / "junk.ims").write_bytes(b"not hdf5 at all")
    with pytest.raises(InputError, match="not a readable HDF5"):
        open_volume(tmp_path / "junk.ims")
    with h5py.File(tmp_path / "empty.ims", "w") as f:
        f.create_group("DataSetInfo/Image")
    with pytest.raises(InputError, match="no DataSet"):
        open_volume(tmp_path / "empty.ims")
    path = write_ims(tmp_path / "big.ims", vols[:1])
    with h5py.File(path, "a") as f:
        f["DataSetInfo/Image"].attrs["ImageSizeX"] = _chars(5000)
    with pytest.raises(InputError, match="cannot hold"):
        open_volume(path)


def write_nifti(path, vol_zyx, voxel_zyx_mm, *, slope=None):
    img = nib.Nifti1Image(np.ascontiguousarray(vol_zyx.T), affine=np.diag([*voxel_zyx_mm[::-1], 1]))
    img.header.set_zooms(voxel_zyx_mm[::-1])
    img.header.set_xyzt_units("mm")
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("name", ["brain.nii", "brain.nii.gz"])
def test_nifti_axes_voxel_size_and_lazy(tmp_path, vols, name):
    path = write_nifti(tmp_path / name, vols[0], (0.005, 0.002, 0.0015))
    arr, voxel = open_nifti(path, chunks=(4, 20, 17))
    assert arr.shape == (9, 20, 17) and arr.dtype == np.uint16 and arr.numblocks[0] == 3
    np.testing.assert_array_equal(arr.compute(), vols[0])
    np.testing.assert_allclose(voxel, (5.0, 2.0, 1.5))
    np.testing.assert_array_equal(
        open_volume(path)[2:7, 3:9, 1:4].compute(), vols[0][2:7, 3:9, 1:4]
    )
    np.testing.assert_allclose(read_voxel_size_um(path), (5.0, 2.0, 1.5))
    with dask.config.set(scheduler="processes", num_workers=2):
        np.testing.assert_array_equal(arr.compute(), vols[0])


def test_nifti_scaled_and_corrupt(tmp_path, vols):
    path = write_nifti(tmp_path / "scaled.nii", vols[0], (0.01, 0.01, 0.01), slope=2.0)
    arr, _ = open_nifti(path)
    assert arr.dtype.kind == "f"
    np.testing.assert_allclose(arr.compute(), vols[0] * 2.0)
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(InputError, match="bad.nii.gz"):
        open_volume(tmp_path / "bad.nii.gz")


def test_convert_imaris_and_nifti_to_multiscale(tmp_path, vols, run_cli):
    ims = write_ims(tmp_path / "b.ims", vols)
    assert run_cli("convert", ims, "--out", tmp_path / "b.ome.zarr", "--channel", "1") == 0
    np.testing.assert_array_equal(open_volume(tmp_path / "b.ome.zarr").compute(), vols[1])
    np.testing.assert_allclose(read_voxel_size_um(tmp_path / "b.ome.zarr"), (5.0, 2.0, 1.5))
    nii = write_nifti(tmp_path / "b.nii.gz", vols[0], (0.005, 0.002, 0.002))
    out = tmp_path / "n.ome.zarr"
    assert run_cli("convert", nii, "--out", out, "--levels", "3") == 0
    np.testing.assert_array_equal(open_volume(out).compute(), vols[0])
    # level 1 halves y, x (voxel 5, 4, 4 µm: near isotropic), level 2 halves z too
    assert open_volume(out, level=2).shape == (5, 5, 5)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_bigtiff_multipage(tmp_path, vols, compression):
    import tifffile

    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, vols[0], bigtiff=True, compression=compression)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_bigtiff
    arr = open_volume(path)
    assert arr.shape == vols[0].shape
    np.testing.assert_array_equal(arr.compute(), vols[0])
