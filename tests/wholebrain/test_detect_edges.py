"""Edge cases of ``detect_cells`` and ``ketamap detect``, through the public API only.

Empty and constant volumes, saturated voxels, a single plane, NaN / inf,
extreme anisotropy, every numeric dtype, non-numeric dtypes, and the command
line on a volume it cannot use.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from ketamap.errors import InputError
from ketamap.wholebrain import DetectionParams, detect_cells
from ketamap.wholebrain.detect import CELL_COLUMNS

FINE = (5.0, 2.0, 2.0)


def _blobs(shape, centres, voxel_um, *, peak=300.0, base=100.0, noise=4.0, diameter_um=15.0,
           psf_um=(4.0, 1.5, 1.5), seed=0):  # fmt: skip
    """Gaussian somata of sigma sqrt((d/4)^2 + psf^2) on a flat background, Gaussian noise."""
    rng = np.random.default_rng(seed)
    sigma = np.sqrt((diameter_um / 4) ** 2 + np.asarray(psf_um) ** 2) / np.asarray(voxel_um)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    vol = np.full(shape, base, dtype=np.float64)
    for c in np.asarray(centres, dtype=float).reshape(-1, 3):
        r2 = sum(((g - ci) / s) ** 2 for g, ci, s in zip(grids, c, sigma, strict=True))
        vol += peak * np.exp(-0.5 * r2)
    return vol + rng.normal(0.0, noise, shape)


def _xyz(cells: pd.DataFrame) -> np.ndarray:
    return cells[["z_vox", "y_vox", "x_vox"]].to_numpy()


def _assert_found_once(cells, centres, voxel_um, tol_um=10.0):
    """Every centre has exactly one detection within tol_um, and nothing else is found."""
    centres = np.asarray(centres, dtype=float).reshape(-1, 3)
    assert len(cells) == len(centres), _xyz(cells)
    vs = np.asarray(voxel_um)
    d, i = cKDTree(_xyz(cells) * vs).query(centres * vs)
    assert np.all(d <= tol_um), (d, _xyz(cells))
    assert len(set(i.tolist())) == len(centres)


def _assert_empty(cells):
    assert list(cells.columns) == list(CELL_COLUMNS)
    assert len(cells) == 0
    assert all(cells[c].dtype == np.float64 for c in CELL_COLUMNS)


def _one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


# --------------------------------------------------------------------------- empty / constant


@pytest.mark.parametrize("shape", [(0, 20, 20), (10, 0, 20), (10, 20, 0), (0, 0, 0)])
def test_size_zero_on_any_axis_gives_an_empty_table(shape):
    _assert_empty(detect_cells(np.zeros(shape, np.uint16), voxel_size_um=FINE))


@pytest.mark.parametrize(
    "volume",
    [
        np.zeros((12, 40, 40), np.uint16),
        np.full((12, 40, 40), 1234.5, np.float32),
        np.full((12, 40, 40), 65535, np.uint16),
        np.full((12, 40, 40), -7.0, np.float64),
        np.full((1, 40, 40), 300, np.uint16),
    ],
    ids=["zeros", "constant-float", "all-saturated", "negative", "constant-plane"],
)
def test_constant_volumes_have_no_cells(volume):
    _assert_empty(detect_cells(volume, voxel_size_um=FINE))


def test_constant_dask_volume_in_several_chunks():
    vol = da.full((64, 192, 192), 500, dtype=np.uint16, chunks=(32, 96, 96))
    params = DetectionParams(chunk_size_vox=(32, 96, 96))
    _assert_empty(detect_cells(vol, voxel_size_um=FINE, params=params))


# --------------------------------------------------------------------------- saturation


def test_saturated_soma_is_found_once():
    """A soma three times brighter than the camera range: a flat plateau of 65535."""
    shape, centre = (24, 64, 64), (12.0, 31.5, 32.3)
    vol = _blobs(shape, [centre], FINE, peak=3 * 65535.0, seed=1)
    vol = np.clip(np.round(vol), 0, 65535).astype(np.uint16)
    assert (vol == 65535).sum() >= 50  # a real plateau, not one voxel
    _assert_found_once(detect_cells(vol, voxel_size_um=FINE), [centre], FINE)


def test_saturated_block_is_one_cell():
    """A soma-sized block (3 x 8 x 8 voxels = 15 x 16 x 16 µm) of 65535 in noise."""
    rng = np.random.default_rng(2)
    vol = np.clip(rng.normal(100.0, 5.0, (24, 64, 64)), 0, None).astype(np.uint16)
    vol[11:14, 28:36, 28:36] = 65535
    _assert_found_once(detect_cells(vol, voxel_size_um=FINE), [(12.0, 31.5, 31.5)], FINE)


def test_saturated_cells_beside_normal_cells():
    """Saturation of one cell does not hide a normal cell 40 µm away, nor split either."""
    shape = (24, 64, 96)
    centres = [(12.0, 32.0, 28.0), (12.0, 32.0, 68.0)]
    vol = _blobs(shape, centres[:1], FINE, peak=3 * 65535.0, seed=3)
    vol += _blobs(shape, centres[1:], FINE, peak=400.0, base=0.0, noise=0.0)
    vol = np.clip(np.round(vol), 0, 65535).astype(np.uint16)
    _assert_found_once(detect_cells(vol, voxel_size_um=FINE), centres, FINE)


# --------------------------------------------------------------------------- single plane


def test_single_plane_finds_cells_in_2d():
    centres = [(0.0, 20.0, 20.0), (0.0, 20.0, 60.0), (0.0, 60.0, 40.0)]
    vol = _blobs((1, 80, 80), centres, FINE, seed=4).astype(np.float32)
    cells = detect_cells(vol, voxel_size_um=FINE)
    _assert_found_once(cells, centres, FINE, tol_um=4.0)
    assert np.all(cells["z_vox"] == 0.0)


def test_single_plane_as_uint16_dask():
    centres = [(0.0, 30.0, 30.0)]
    vol = np.clip(_blobs((1, 64, 64), centres, FINE, seed=5), 0, None).astype(np.uint16)
    cells = detect_cells(da.from_array(vol, chunks=(1, 32, 32)), voxel_size_um=FINE)
    _assert_found_once(cells, centres, FINE, tol_um=4.0)


# --------------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_one_sentence(bad):
    vol = _blobs((12, 40, 40), [(6, 20, 20)], FINE).astype(np.float32)
    vol[4, 7, 9] = bad
    with pytest.raises(InputError) as excinfo:
        detect_cells(vol, voxel_size_um=FINE)
    assert "NaN or infinite" in _one_line_error(excinfo)


def test_nan_in_a_dask_chunk_and_in_the_background():
    vol = _blobs((16, 64, 64), [(8, 32, 32)], FINE).astype(np.float32)
    lazy = da.from_array(vol, chunks=(8, 32, 32))
    bad = vol.copy()
    bad[15, 63, 63] = np.nan  # in the last chunk, at the far corner
    params = DetectionParams(chunk_size_vox=(16, 128, 128))
    with pytest.raises(InputError) as excinfo:
        detect_cells(da.from_array(bad, chunks=(8, 32, 32)), voxel_size_um=FINE, params=params)
    _one_line_error(excinfo)
    with pytest.raises(InputError) as excinfo:
        detect_cells(lazy, voxel_size_um=FINE, params=params, background=bad)
    _one_line_error(excinfo)


# --------------------------------------------------------------------------- anisotropy


def test_extreme_anisotropy_coarse_z():
    """50 x 1 x 1 µm voxels: a 15 µm soma lies within one plane."""
    vs = (50.0, 1.0, 1.0)
    centres = [(2.0, 30.0, 30.0), (5.0, 30.0, 90.0), (5.0, 90.0, 50.0)]
    vol = _blobs((8, 120, 120), centres, vs, seed=6).astype(np.float32)
    cells = detect_cells(vol, voxel_size_um=vs)
    _assert_found_once(cells, centres, vs, tol_um=10.0)
    np.testing.assert_allclose(_xyz(cells)[np.argsort(cells["x_vox"].to_numpy())][:, 0],
                               [2.0, 5.0, 5.0], atol=0.5)  # fmt: skip


def _coarse_x_volume():
    vs = (1.0, 1.0, 50.0)
    centres = [(30.0, 30.0, 2.0), (90.0, 30.0, 5.0), (50.0, 90.0, 5.0)]
    vol = _blobs((120, 120, 8), centres, vs, psf_um=(1.5, 1.5, 4.0), seed=7).astype(np.float32)
    return vol, centres, vs


def test_extreme_anisotropy_coarse_x():
    """1 x 1 x 50 µm voxels: the long axis is x (e.g. a resliced stack)."""
    vol, centres, vs = _coarse_x_volume()
    params = DetectionParams(chunk_size_vox=(128, 128, 8))
    _assert_found_once(detect_cells(vol, voxel_size_um=vs, params=params), centres, vs)


def test_extreme_anisotropy_fine_z_with_default_parameters():
    vol, centres, vs = _coarse_x_volume()
    _assert_found_once(detect_cells(vol, voxel_size_um=vs), centres, vs)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_every_numeric_dtype_gives_the_same_cells(dtype):
    centres = [(8.0, 20.0, 20.0), (8.0, 20.0, 50.0), (16.0, 45.0, 35.0)]
    values = np.clip(np.round(_blobs((24, 64, 64), centres, FINE, peak=150.0, base=40.0,
                                      noise=3.0, seed=8)), 0, 255)  # fmt: skip
    reference = detect_cells(values.astype(np.float32), voxel_size_um=FINE)
    _assert_found_once(reference, centres, FINE)
    cells = detect_cells(values.astype(dtype), voxel_size_um=FINE)
    pd.testing.assert_frame_equal(cells, reference)


def test_signed_integers_below_zero():
    """int16 with a negative offset (e.g. after a dark-frame subtraction) works like float."""
    centres = [(12.0, 32.0, 32.0)]
    values = np.round(_blobs((24, 64, 64), centres, FINE, base=-50.0, seed=9))
    cells = detect_cells(values.astype(np.int16), voxel_size_um=FINE)
    pd.testing.assert_frame_equal(cells, detect_cells(values, voxel_size_um=FINE))
    _assert_found_once(cells, centres, FINE)


@pytest.mark.parametrize(
    "volume",
    [
        np.zeros((4, 8, 8), dtype=bool),
        np.zeros((4, 8, 8), dtype=np.complex64),
        np.full((4, 8, 8), "a"),
        np.zeros((4, 8, 8), dtype="datetime64[s]"),
        np.empty((4, 8, 8), dtype=object),
    ],
    ids=["bool", "complex", "str", "datetime", "object"],
)
def test_non_numeric_dtype_is_one_sentence(volume):
    with pytest.raises(InputError) as excinfo:
        detect_cells(volume, voxel_size_um=FINE)
    assert "dtype" in _one_line_error(excinfo)


# --------------------------------------------------------------------------- command line


def _one_line_exit_2(run_cli, capsys, *args):
    code = run_cli(*args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error:") and "Traceback" not in err, err
    # one sentence; the console wraps it to the terminal width
    assert err.count("error:") == 1 and err.strip().endswith("."), err
    return err


def test_cli_on_bad_volumes_exits_2_with_one_sentence(run_cli, capsys, tmp_path):
    import tifffile

    nan = np.ones((6, 32, 32), np.float32)
    nan[2, 3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    (tmp_path / "junk.tif").write_bytes(b"this is not a TIFF file at all")
    tifffile.imwrite(tmp_path / "flag.tif", np.zeros((6, 32, 32), bool))
    (tmp_path / "empty_dir").mkdir()
    for name, words in [
        ("nan.tif", "NaN"),
        ("junk.tif", "junk.tif"),
        ("flag.tif", "dtype"),
        ("empty_dir", "empty_dir"),
    ]:
        out = tmp_path / f"out_{name}"
        err = _one_line_exit_2(run_cli, capsys, "detect", tmp_path / name, "--voxel-size",
                               *FINE, "--out", out)  # fmt: skip
        assert words in err.replace("\n", ""), err
        assert not out.exists()
