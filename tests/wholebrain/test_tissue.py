"""Tests of the coarse tissue mask (ketamap.wholebrain.tissue)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from ketamap.errors import InputError, ParameterError
from ketamap.simulate.crop import CropParams, simulate_crop
from ketamap.wholebrain.detect import DetectionParams
from ketamap.wholebrain.tissue import TissueMask, _block_moments, find_tissue

ALL = (slice(None), slice(None), slice(None))


def _smooth(shape, rng, amplitude=0.3):
    """1 + a smooth field spanning exactly [-amplitude, +amplitude]."""
    z, y, x = (np.arange(n, dtype=np.float64) for n in shape)
    field = np.zeros(shape)
    for _ in range(3):
        k = rng.uniform(0.03, 0.08, 3)
        p = rng.uniform(0, 2 * np.pi, 3)
        field += (
            np.sin(k[0] * z + p[0])[:, None, None]
            * np.sin(k[1] * y + p[1])[None, :, None]
            * np.sin(k[2] * x + p[2])[None, None, :]
        )
    field -= field.min()
    return 1.0 + amplitude * (2.0 * field / field.max() - 1.0)


def _crop(
    shape=(80, 112, 112),
    radii=(34, 46, 44),
    offset=12.0,
    read_noise=1.5,
    photons=300.0,
    seed=0,
    hot=40,
):
    """Ellipsoid of tissue (Poisson photons, +-30 % smooth variation) in camera void."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = [(n - 1) / 2 for n in shape]
    inside = (
        ((z - c[0]) / radii[0]) ** 2 + ((y - c[1]) / radii[1]) ** 2 + ((x - c[2]) / radii[2]) ** 2
    ) <= 1
    lam = np.where(inside, photons * _smooth(shape, rng), 0.0)
    vol = offset + rng.poisson(lam) + rng.normal(0.0, read_noise, shape)
    # hot pixels: single voxels of 50-3000 counts in the void, half of them in the corners
    void = np.flatnonzero(~inside.ravel())
    hot_idx = rng.choice(void, hot, replace=False)
    vol.ravel()[hot_idx] = rng.uniform(50, 3000, hot)
    z1, y1, x1 = (n - 3 for n in shape)
    corners = np.array([[2, 2, 2], [2, 2, x1], [z1, 2, 2], [2, y1, x1], [z1, y1, x1]])
    vol[tuple(corners.T)] = 3000.0
    return vol.astype(np.float32), inside, corners


@pytest.fixture(scope="module")
def crop():
    return _crop()


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _far_from_tissue(tm: TissueMask, inside: np.ndarray, blocks: int) -> np.ndarray:
    """Coarse cells more than `blocks` cells (chessboard) from any cell holding tissue."""
    holds = np.zeros(tm.mask.shape, dtype=bool)
    idx = np.nonzero(inside)
    holds[tuple(i // b for i, b in zip(idx, tm.block_vox))] = True
    dist = ndi.distance_transform_cdt(~holds, metric="chessboard")
    return dist > blocks


# --- accuracy on synthetic crops ---------------------------------------------------------


def test_ellipsoid_in_void_matches_true_tissue(crop):
    vol, inside, corners = crop
    tight = find_tissue(vol, voxel_size_um=10.0, block_um=30.0, dilate_blocks=0)
    assert _dice(tight.full_resolution(ALL), inside) >= 0.95
    assert tight.void_level == pytest.approx(12.0, abs=0.5)
    assert tight.tissue_level == pytest.approx(300.0, rel=0.15)
    assert tight.void_level < tight.threshold < tight.tissue_level

    tm = find_tissue(vol, voxel_size_um=10.0)  # defaults: 50 µm blocks, dilated by one
    assert tm.block_vox == (5, 5, 5)
    full = tm.full_resolution(ALL)
    assert full[inside].all()  # no tissue voxel lost at the surface
    assert not tm.mask[_far_from_tissue(tm, inside, 2)].any()
    assert not tm.contains(corners).any()  # hot pixels make no tissue
    assert tm.tissue_fraction == pytest.approx(full.mean())


def test_debris_block_in_the_void_is_removed(crop):
    vol, inside, _ = crop
    vol = vol.copy()
    rng = np.random.default_rng(11)
    vol[0:5, 0:5, 105:110] = 12.0 + rng.poisson(300.0, (5, 5, 5))  # one block of "tissue"
    tm = find_tissue(vol, voxel_size_um=10.0, dilate_blocks=0)
    assert not tm.mask[0, 0, 21]
    vol[5:10, 0:5, 105:110] = 12.0 + rng.poisson(300.0, (5, 5, 5))  # two blocks: kept
    assert find_tissue(vol, voxel_size_um=10.0, dilate_blocks=0).mask[0:2, 0, 21].all()


def test_faint_tissue_over_high_camera_offset():
    vol, inside, _ = _crop(offset=100.0, read_noise=6.0, photons=80.0, seed=1)
    tm = find_tissue(vol, voxel_size_um=10.0, block_um=30.0, dilate_blocks=0)
    assert not math.isnan(tm.threshold)
    assert tm.void_level == pytest.approx(100.0, abs=2.0)
    assert _dice(tm.full_resolution(ALL), inside) >= 0.95


@pytest.mark.parametrize(
    "photons, offset, read_noise", [(300, 12, 1.5), (80, 100, 6), (3000, 100, 2)]
)
def test_all_tissue_stays_tissue(photons, offset, read_noise):
    rng = np.random.default_rng(photons)
    shape = (50, 80, 80)
    # the strongest variation the brief allows: +-30 % in a single smooth wave
    wave = 1.0 + 0.3 * np.sin(np.arange(shape[2]) * 2 * np.pi / shape[2])
    lam = photons * _smooth(shape, rng, 0.1) * wave
    vol = offset + rng.poisson(lam) + rng.normal(0.0, read_noise, shape)
    tm = find_tissue(vol, voxel_size_um=10.0, dilate_blocks=0)
    assert tm.mask.all()
    assert math.isnan(tm.void_level) and math.isnan(tm.threshold)
    assert tm.tissue_level == pytest.approx(offset + photons, rel=0.1)


@pytest.mark.parametrize(
    "vol", [np.full((20, 30, 30), 250.0), np.zeros((20, 30, 30), np.uint16)], ids=["const", "zeros"]
)
def test_constant_volume_is_all_tissue_without_error(vol):
    tm = find_tissue(vol, voxel_size_um=10.0, dilate_blocks=0)
    assert tm.mask.all() and tm.tissue_fraction == 1.0
    assert math.isnan(tm.threshold) and math.isnan(tm.void_level)
    assert tm.tissue_level == float(vol.flat[0])


def _tissue_slab(shape, seed):
    rng = np.random.default_rng(seed)
    return 12.0 + rng.poisson(300.0 * _smooth(shape, rng)) + rng.normal(0.0, 1.5, shape)


def test_dark_tile_through_all_z_stays_void():
    shape = (40, 100, 100)
    vol = _tissue_slab(shape, 3)
    rng = np.random.default_rng(4)
    vol[:, 30:70, 30:70] = 12.0 + rng.normal(0.0, 1.5, (40, 40, 40))
    tm = find_tissue(vol, voxel_size_um=10.0)
    full = tm.full_resolution(ALL)
    assert not full[:, 35:65, 35:65].any()  # the tile's core, after one block of dilation
    assert full[:, :25].all() and full[:, 75:].all()
    tight = find_tissue(vol, voxel_size_um=10.0, dilate_blocks=0)
    truth = np.ones(shape, bool)
    truth[:, 30:70, 30:70] = False
    assert np.array_equal(tight.full_resolution(ALL), truth)


def test_enclosed_dark_cavity_is_filled():
    shape = (60, 60, 60)
    vol = _tissue_slab(shape, 5)
    z, y, x = np.ogrid[:60, :60, :60]
    cavity = (z - 30) ** 2 + (y - 30) ** 2 + (x - 29) ** 2 <= 12**2
    vol[cavity] = 12.0 + np.random.default_rng(6).normal(0.0, 1.5, cavity.sum())
    # void around a cube of tissue, so that a void is found at all
    vol = np.pad(vol, 20, constant_values=0.0)
    vol[vol == 0] = 12.0 + np.random.default_rng(7).normal(0.0, 1.5, (vol == 0).sum())
    tm = find_tissue(vol, voxel_size_um=10.0, dilate_blocks=0)
    assert not math.isnan(tm.threshold)
    assert tm.full_resolution((slice(20, 80),) * 3).all()  # the cavity is tissue
    assert not tm.full_resolution((slice(0, 15),) * 3).any()


# --- illumination gradients: a dimmer region of tissue is not a void ----------------------


@pytest.mark.parametrize("profile", ["linear", "exponential"])
@pytest.mark.parametrize(
    "photons, offset, read_noise", [(300, 12, 1.5), (80, 100, 6), (3000, 100, 2)]
)
def test_tissue_dimmed_tenfold_across_the_field_is_all_tissue(profile, photons, offset, read_noise):
    """Tissue losing 90 % of its light across x, no void: all tissue, on every seed.

    The dim end is darker and (fewer photons) less noisy than the bright end, so
    Otsu's split passed the contrast and noise tests and, before the one-level test,
    the dim end became void (29-44 % of the tissue lost with 300 photons over offset 12,
    both profiles, and 3000 photons, exponential profile).
    """
    shape = (50, 80, 80)
    x = np.linspace(0.0, 1.0, shape[2])
    ramp = 1.0 - 0.9 * x if profile == "linear" else np.power(10.0, -x)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        lam = photons * _smooth(shape, rng, 0.1) * ramp
        vol = offset + rng.poisson(lam) + rng.normal(0.0, read_noise, shape)
        tm = find_tissue(vol, voxel_size_um=10.0, dilate_blocks=0)
        assert tm.mask.all(), (seed, tm)
        assert math.isnan(tm.void_level) and math.isnan(tm.threshold)


def test_void_beside_tissue_with_a_strong_gradient_is_still_found():
    """The ellipsoid of tissue dimmed 3x across x, in camera void: the void is one level."""
    vol, inside, _ = _crop(seed=12)
    ramp = 1.0 - 0.7 * np.linspace(0.0, 1.0, vol.shape[2], dtype=np.float32)
    vol = 12.0 + (vol - 12.0) * np.where(inside, ramp, 1.0)  # the void keeps its level
    tm = find_tissue(vol, voxel_size_um=10.0, block_um=30.0, dilate_blocks=0)
    assert tm.void_level == pytest.approx(12.0, abs=0.5)
    assert _dice(tm.full_resolution(ALL), inside) >= 0.95


# --- simulated light-sheet crops, as detect_cells calls find_tissue -----------------------

CROP_VS = (5.0, 2.0, 2.0)
CROP_SHAPE = (40, 256, 256)


def _mask_as_detect(volume) -> TissueMask:
    """find_tissue as detect_cells calls it with the DetectionParams defaults."""
    return find_tissue(volume, voxel_size_um=CROP_VS, block_um=DetectionParams().tissue_block_um)


def _lost_and_far_void_kept(tm: TissueMask, truth: np.ndarray) -> tuple[int, int, int]:
    """Tissue voxels lost; void voxels > 1 block from any tissue kept as tissue; those in all."""
    full = tm.full_resolution(ALL)
    far = _far_from_tissue(tm, truth, 1)
    far_full = TissueMask(far, tm.block_vox, tm.shape, 0.0, 0.0, 0.0).full_resolution(ALL)
    return (
        int(np.count_nonzero(truth & ~full)),
        int(np.count_nonzero(far_full & full)),
        int(np.count_nonzero(far_full)),
    )


def _all_tissue_lost(gradients, seeds, density_per_mm3) -> tuple[float, list]:
    """Share of tissue voxels lost over all-tissue crops, and the masks that found a void."""
    lost = total = 0
    voids = []
    for gradient in gradients:
        params = CropParams(illumination_gradient=gradient, density_per_mm3=density_per_mm3)
        for seed in seeds:
            crop = simulate_crop(CROP_SHAPE, params=params, seed=seed)
            assert crop.tissue.all()
            for name in ("signal", "background"):
                tm = _mask_as_detect(getattr(crop, name))
                lost += _lost_and_far_void_kept(tm, crop.tissue)[0]
                total += crop.tissue.size
                if not math.isnan(tm.threshold):
                    voids.append((gradient, seed, name, tm.tissue_fraction))
    return lost / total, voids


def test_simulated_all_tissue_crops_with_strong_gradients_lose_no_tissue():
    """Illumination falling by 70 % and 90 % across x, no void, both channels, 6 seeds (cells
    off: the mask reads the autofluorescence): measured 0 tissue voxels lost. Before the
    one-level test: 5.7 % lost, 7 of the 24 masks cut by a fifth (background channel)."""
    lost, voids = _all_tissue_lost((0.7, 0.9), range(6), 0.0)
    assert lost < 0.01 and not voids, (lost, voids)


@pytest.mark.slow
def test_simulated_all_tissue_crops_over_many_seeds():
    """The simulator's defaults (cells on) at gradients 0.7 and 0.9, 20 seeds, both channels:
    measured 0 lost (before: 5.0 % and 19.7 % of the background channel's tissue)."""
    lost, voids = _all_tissue_lost((0.7, 0.9), range(20), CropParams().density_per_mm3)
    assert lost < 0.001 and not voids, (lost, voids)


@pytest.mark.parametrize(
    "params",
    [
        CropParams(tissue_fraction=0.5, camera_offset=12.0, read_noise=1.5, density_per_mm3=0),
        CropParams(
            tissue_fraction=0.6,
            illumination_gradient=0.7,
            camera_offset=12.0,
            read_noise=1.5,
            density_per_mm3=0,
        ),
        CropParams(tile_shape_vox=(128, 128), dark_tile=True, camera_offset=12.0, read_noise=1.5),
    ],
    ids=["void-scmos", "void-gradient", "dark-tile"],
)
def test_simulated_voids_are_still_found(params):
    """A void (and a dark tile of the signal channel) is found on every seed, at most 0.5 %
    of the tissue is lost (measured 0, and <= 0.4 % along the dark tile's edges) and no void
    farther than a block from the tissue is kept."""
    for seed in range(3):
        crop = simulate_crop(CROP_SHAPE, params=params, seed=seed)
        truth = crop.tissue.copy()
        channels = ["signal"]
        if crop.seams.get("dark_tile") is not None:  # unlabelled: no signal photons there
            r, c = crop.seams["dark_tile"]
            truth[:, (crop.seams["y_tile"][:, None] == r) & (crop.seams["x_tile"] == c)] = False
        else:
            channels.append("background")
        for name in channels:
            tm = _mask_as_detect(getattr(crop, name))
            lost, kept, far = _lost_and_far_void_kept(tm, truth)
            assert not math.isnan(tm.threshold), (seed, name, tm)
            assert lost <= 0.005 * truth.sum() and kept == 0 and far > 0, (seed, name, lost, kept)


# --- chunking, partial blocks, NaNs --------------------------------------------------------


def _moments_by_hand(vol, block):
    grid = [-(-n // b) for n, b in zip(vol.shape, block)]
    n, mean, var = (np.zeros(grid) for _ in range(3))
    for i in np.ndindex(*grid):
        v = vol[tuple(slice(c * b, (c + 1) * b) for c, b in zip(i, block))].astype(np.float64)
        v = v[np.isfinite(v)]
        n[i] = v.size
        if v.size:
            mean[i], var[i] = v.mean(), v.var()
    return n, mean, var


def test_block_moments_exact_for_partial_blocks_and_any_chunking():
    rng = np.random.default_rng(8)
    vol = (1e4 + rng.normal(0.0, 1.0, (23, 17, 29)) * rng.uniform(0.5, 50, (23, 17, 29))).astype(
        np.float32
    )
    vol[3, 4, 5] = np.nan
    vol[:4, :5, :6] = np.nan  # a whole block without data
    vol[20, 16, 28] = np.inf
    block = (4, 5, 6)
    n_ref, mean_ref, var_ref = _moments_by_hand(vol, block)
    for chunks in [vol.shape, (5, 7, 11), (1, 17, 3), (9, 2, 29), ((5, 0, 18), (17,), (3, 0, 26))]:
        n, mean, m2 = _block_moments(da.from_array(vol, chunks=chunks), block)
        np.testing.assert_array_equal(n, n_ref)
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-12)
        var = np.divide(m2, n, out=np.zeros_like(m2), where=n > 0)
        np.testing.assert_allclose(var, var_ref, rtol=1e-9, atol=1e-9)
    assert n[0, 0, 0] == 0


def test_numpy_and_dask_give_the_same_mask_on_odd_shapes():
    vol, _, _ = _crop(shape=(77, 103, 109), radii=(30, 44, 47), seed=9)
    ref = find_tissue(vol, voxel_size_um=(10.0, 8.0, 8.0))
    assert ref.block_vox == (5, 6, 6) and ref.mask.shape == (16, 18, 19)
    for chunks in [(13, 29, 31), (77, 7, 109), (4, 103, 17)]:
        tm = find_tissue(da.from_array(vol, chunks=chunks), voxel_size_um=(10.0, 8.0, 8.0))
        assert np.array_equal(tm.mask, ref.mask)
        assert tm.threshold == pytest.approx(ref.threshold, rel=1e-9)
        assert tm.tissue_level == pytest.approx(ref.tissue_level, rel=1e-9)
    assert ref.full_resolution(ALL).shape == vol.shape


def test_nans_are_ignored(crop):
    vol, _, _ = crop
    ref = find_tissue(vol, voxel_size_um=10.0)
    holed = vol.copy()
    holed.ravel()[np.random.default_rng(10).choice(vol.size, 5000, replace=False)] = np.nan
    tm = find_tissue(holed, voxel_size_um=10.0)
    assert tm.threshold == pytest.approx(ref.threshold, rel=0.01)
    assert np.count_nonzero(tm.mask != ref.mask) <= 0.002 * tm.mask.size  # borderline cells
    holed[:, :20] = np.nan  # whole blocks without data are not tissue
    tm = find_tissue(holed, voxel_size_um=10.0, dilate_blocks=0)
    assert not tm.mask[:, :3].any()


def test_anisotropic_voxels():
    vol = np.zeros((25, 60, 60), np.uint16)
    tm = find_tissue(vol, voxel_size_um=(5.0, 2.0, 2.0), block_um=50.0)
    # blocks of 8 voxels or more are sampled every other voxel, so they are made even
    assert tm.block_vox == (10, 26, 26)
    assert tm.mask.shape == (3, 3, 3)
    assert tm.block_size_um((5.0, 2.0, 2.0)) == (50.0, 52.0, 52.0)
    # at least 4 voxels per block, so the coarse grid stays small on coarse whole-brain grids
    assert find_tissue(vol, voxel_size_um=100.0, block_um=30.0).block_vox == (4, 4, 4)


def test_empty_volume_gives_empty_mask():
    tm = find_tissue(np.zeros((0, 10, 12), np.float32), voxel_size_um=10.0)
    assert tm.mask.shape == (0, 2, 3) and tm.mask.dtype == bool
    assert tm.tissue_fraction == 0.0
    assert not tm.contains([[0, 0, 0]]).any()
    assert tm.full_resolution(ALL).shape == (0, 10, 12)


# --- the TissueMask object -----------------------------------------------------------------


@pytest.fixture
def small_mask():
    # shape (7, 5, 5) in blocks (3, 2, 2): cells of 3,3,1 voxels along z; 2,2,1 along y, x
    mask = np.zeros((3, 3, 3), bool)
    mask[0, 0, 0] = True
    mask[2, 2, 2] = True  # the 1x1x1-voxel corner cell
    mask[1, :, :] = True
    return TissueMask(mask, (3, 2, 2), (7, 5, 5), 12.0, 300.0, 80.0)


def test_tissue_fraction_counts_partial_blocks(small_mask):
    expected = (3 * 2 * 2 + 1 * 1 * 1 + 3 * 5 * 5) / (7 * 5 * 5)
    assert small_mask.tissue_fraction == pytest.approx(expected)
    assert small_mask.full_resolution(ALL).mean() == pytest.approx(expected)


def test_contains_rounds_and_clips(small_mask):
    pts = np.array(
        [
            [0, 0, 0],
            [-0.4, -0.4, 1.4],  # rounds to voxel (0, 0, 1): cell (0, 0, 0)
            [2.4, 1.49, 1.49],  # voxel (2, 1, 1): cell (0, 0, 0)
            [2.6, 0, 0],  # voxel (3, 0, 0): cell (1, 0, 0)
            [6.4, 4.4, 4.4],  # the corner cell
            [60, 40, 40],  # outside: clipped to the corner cell
            [-50, -50, -50],  # outside: clipped to cell (0, 0, 0)
            [0, 2.6, 0],  # voxel (0, 3, 0): cell (0, 1, 0), void
            [6, 0, 0],  # cell (2, 0, 0), void
            [np.nan, 0, 0],
        ]
    )
    expected = [True, True, True, True, True, True, True, False, False, False]
    assert small_mask.contains(pts).tolist() == expected
    assert small_mask.contains(np.empty((0, 3))).shape == (0,)
    assert small_mask.contains([]).shape == (0,)


def test_full_resolution_boxes(small_mask):
    full = np.repeat(np.repeat(np.repeat(small_mask.mask, 3, 0), 2, 1), 2, 2)[:7, :5, :5]
    assert np.array_equal(small_mask.full_resolution(ALL), full)
    for box in [
        (slice(2, 5), slice(1, 4), slice(0, 5)),
        (slice(-3, None), slice(None, -1), slice(4, 5)),
        (slice(None, None, 2), slice(None), slice(None, None, -1)),
        (slice(6, 100), slice(3, 3), slice(0, 1)),
    ]:
        assert np.array_equal(small_mask.full_resolution(box), full[box])


def test_mask_is_read_only_and_checked(small_mask):
    with pytest.raises(ValueError):
        small_mask.mask[0, 0, 0] = False
    with pytest.raises(InputError, match="coarse grid of shape"):
        TissueMask(np.ones((2, 2, 2), bool), (3, 2, 2), (7, 5, 5), 1.0, 2.0, 1.5)
    assert "tissue_fraction" in repr(small_mask)


# --- errors --------------------------------------------------------------------------------


def _one_sentence(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg


@pytest.mark.parametrize(
    "volume, match",
    [
        (np.zeros((10, 10)), "3D array"),
        (np.zeros((2, 3, 4, 5)), "3D array"),
        (np.zeros((4, 4, 4), bool), "integers or floats"),
        (np.zeros((4, 4, 4), complex), "integers or floats"),
        (np.full((4, 4, 4), "a"), "integers or floats"),
    ],
)
def test_bad_volume(volume, match):
    with pytest.raises(InputError, match=match) as e:
        find_tissue(volume, voxel_size_um=10.0)
    _one_sentence(e)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"voxel_size_um": 0.0}, InputError),
        ({"voxel_size_um": (1.0, 2.0)}, InputError),
        ({"block_um": 0.0}, ParameterError),
        ({"block_um": -5.0}, ParameterError),
        ({"block_um": float("nan")}, ParameterError),
        ({"block_um": "50"}, ParameterError),
        ({"min_contrast": 0.5}, ParameterError),
        ({"min_noise_ratio": -1.0}, ParameterError),
        ({"dilate_blocks": -1}, ParameterError),
        ({"dilate_blocks": 1.5}, ParameterError),
        ({"dilate_blocks": True}, ParameterError),
    ],
)
def test_bad_parameters(kwargs, error):
    kwargs = {"voxel_size_um": 10.0, **kwargs}
    with pytest.raises(error) as e:
        find_tissue(np.zeros((4, 4, 4)), **kwargs)
    _one_sentence(e)


@pytest.mark.parametrize("points", [np.zeros((4, 2)), np.zeros(3), [["a", "b", "c"]]])
def test_bad_points(small_mask, points):
    with pytest.raises(InputError, match=r"shape \(n, 3\)") as e:
        small_mask.contains(points)
    _one_sentence(e)


def test_bad_slices(small_mask):
    with pytest.raises(InputError, match="three slices") as e:
        small_mask.full_resolution((slice(None), slice(None)))
    _one_sentence(e)


# --- memory --------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json
    import dask
    import dask.array as da
    import numpy as np
    from ketamap.wholebrain.tissue import find_tissue

    shape, chunks = (1024, 512, 512), (64, 256, 256)  # 1 GiB of float32

    def block(block_info=None):
        (z0, z1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        rng = np.random.default_rng(z0 * 7919 + y0 * 31 + x0)
        out = rng.standard_normal((z1 - z0, y1 - y0, x1 - x0), dtype=np.float32)
        out *= 1.5
        out += 12.0
        t = out[:, max(0, 128 - y0) : max(0, 384 - y0), max(0, 128 - x0) : max(0, 384 - x0)]
        t *= 12.0  # tissue: brighter and noisier than the void
        t += 300.0
        return out

    vol = da.map_blocks(
        block,
        chunks=tuple(tuple([c] * (n // c)) for n, c in zip(shape, chunks)),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )

    def rss(key="VmRSS:"):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

    dask.config.set(scheduler="threads", num_workers=2)  # memory ~ workers x chunk
    before = rss()
    tm = find_tissue(vol, voxel_size_um=(8.0, 2.0, 2.0), dilate_blocks=0)
    # VmHWM, not ru_maxrss: Linux carries the parent's peak RSS across fork + exec into
    # ru_maxrss, so a large test process would inflate it
    peak = rss("VmHWM:")
    print(json.dumps({"volume": int(vol.nbytes), "before": before, "peak": peak,
                      "mask": tm.mask[:, :, 10].tolist(), "threshold": tm.threshold}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_lazy_gigabyte_volume_is_never_materialised():
    # one malloc arena: freed chunks are reused, not kept per thread (RSS tracks live memory)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    env |= {"MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["volume"] == 2**30
    assert out["peak"] - out["before"] < out["volume"] / 4
    assert not math.isnan(out["threshold"])
    mask = np.array(out["mask"])  # blocks of 25 voxels along y: tissue spans 128..383
    assert mask[:, 6:15].all() and not mask[:, :5].any() and not mask[:, 16:].any()
