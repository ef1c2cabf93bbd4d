"""The fine-grid crop simulator: the old model bit for bit, and each failure mode as it says."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from ketamap.errors import ParameterError
from ketamap.simulate.crop import CropParams, score_detections, simulate_crop

SHAPE = (20, 96, 96)


def _old_simulate_volume(shape, *, snr, density_per_mm3, seed):
    """Verbatim copy of benchmarks/bench_detect_curves.simulate_volume before the move."""
    rng = np.random.default_rng(seed)
    vs = np.asarray((5.0, 2.0, 2.0))
    extent = (np.asarray(shape) - 1) * vs
    n = rng.poisson(density_per_mm3 * np.prod(np.asarray(shape) * vs) * 1e-9)
    pts = np.empty((0, 3))
    for _ in range(100):
        need = n - len(pts)
        if need <= 0:
            break
        cand = rng.uniform(0, 1, (need, 3)) * extent
        if len(pts):
            d, _ = cKDTree(pts).query(cand, distance_upper_bound=10.0)
            cand = cand[~(d < 10.0)]
        keep = np.ones(len(cand), bool)
        neighbours: dict[int, list[int]] = {}
        for i, j in cKDTree(cand).query_pairs(10.0):
            neighbours.setdefault(min(i, j), []).append(max(i, j))
        for i in range(len(cand)):
            if keep[i]:
                for j in neighbours.get(i, ()):
                    keep[j] = False
        pts = np.vstack([pts, cand[keep]])
    truth = pts[:n] / vs
    field = ndi.gaussian_filter(rng.standard_normal(shape), 50.0 / vs)
    field = 1 + 0.3 * field / (np.abs(field).max() or 1)
    photons = (0.2 * 300.0 * field).astype(np.float32)
    brightness = snr * float(np.sqrt(0.2 * 300.0 + 6.0**2))
    cv = 0.25
    peaks = brightness * np.exp(
        rng.normal(-0.5 * np.log1p(cv**2), np.sqrt(np.log1p(cv**2)), len(truth))
    )
    diam = rng.uniform(12.0, 18.0, len(truth))
    psf = np.asarray((4.0, 1.5, 1.5))
    for c, peak, d in zip(truth, peaks, diam, strict=True):
        sig = np.sqrt((d / 4) ** 2 + psf**2) / vs
        lo = np.maximum(np.floor(c - 4 * sig).astype(int), 0)
        hi = np.minimum(np.ceil(c + 4 * sig).astype(int) + 1, shape)
        prof = [np.exp(-0.5 * ((np.arange(lo[a], hi[a]) - c[a]) / sig[a]) ** 2) for a in range(3)]
        blob = prof[0][:, None, None] * prof[1][None, :, None] * prof[2][None, None, :]
        photons[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += np.float32(peak) * blob
    x = np.linspace(0, 1, shape[2], dtype=np.float32)
    gradient = 1 - 0.3 * x
    stripes = ndi.gaussian_filter1d(rng.standard_normal(shape[:2]), 0.7, axis=1)
    stripes = ndi.gaussian_filter1d(stripes, 3.0, axis=0)
    stripes = 1 + 0.1 * stripes / (stripes.std() or 1)
    photons *= (np.clip(stripes, 0.2, None)[:, :, None] * gradient[None, None, :]).astype(
        np.float32
    )
    sd = np.sqrt(photons + np.float32(6.0**2))
    photons += sd * rng.standard_normal(shape, dtype=np.float32)
    photons += np.float32(100.0)
    return np.clip(np.rint(photons), 0, 65535).astype(np.uint16), truth


def crop(seed=0, **kw):
    return simulate_crop(SHAPE, params=CropParams(**kw), seed=seed)


@pytest.mark.parametrize(("snr", "density", "seed"), [(51.0, 50_000.0, 0), (8.0, 20_000.0, 3)])
def test_identical_to_the_old_generator_with_every_failure_mode_off(snr, density, seed):
    old, truth = _old_simulate_volume(SHAPE, snr=snr, density_per_mm3=density, seed=seed)
    new = simulate_crop(SHAPE, params=CropParams(snr=snr, density_per_mm3=density), seed=seed)
    assert len(truth) > 10
    np.testing.assert_array_equal(new.signal, old)
    np.testing.assert_array_equal(new.cells[["z_vox", "y_vox", "x_vox"]].to_numpy(), truth)
    assert new.tissue.all() and new.seams == {} and len(new.hot_pixels) == 0


def test_outputs_are_typed():
    c = crop(density_per_mm3=20_000.0)
    assert c.signal.dtype == np.uint16 and c.background.dtype == np.uint16
    assert c.signal.shape == c.background.shape == c.tissue.shape == SHAPE
    assert c.tissue.dtype == bool
    assert set(c.cells.columns) >= {
        "z_vox", "y_vox", "x_vox", "z_um", "y_um", "x_um", "brightness", "nn_distance_um",
        "in_cluster",
    }  # fmt: skip
    np.testing.assert_allclose(c.cells["y_um"], c.cells["y_vox"] * 2.0)
    assert c.hot_pixels.shape == (0, 3) and c.voxel_size_um == (5.0, 2.0, 2.0)
    # the autofluorescence channel is brighter than its bleed-through into the signal
    assert np.median(c.background) - 100 > 3 * (np.median(c.signal) - 100)


def test_deterministic_by_seed():
    kw = dict(
        tissue_fraction=0.6, hot_pixel_rate_per_voxel=1e-4, tile_shape_vox=(40, 40),
        tile_gain_cv=0.2, edge_photons=50.0, cluster_fraction=0.5, density_per_mm3=20_000.0,
    )  # fmt: skip
    a, b, c = crop(seed=5, **kw), crop(seed=5, **kw), crop(seed=6, **kw)
    np.testing.assert_array_equal(a.signal, b.signal)
    np.testing.assert_array_equal(a.background, b.background)
    np.testing.assert_array_equal(a.hot_pixels, b.hot_pixels)
    assert a.cells.equals(b.cells)
    assert not np.array_equal(a.signal, c.signal)


def test_void_holds_only_offset_and_read_noise():
    c = crop(tissue_fraction=0.5, camera_offset=12.0, read_noise=1.5, density_per_mm3=20_000.0)
    assert abs(c.tissue.mean() - 0.5) < 0.01
    void = c.signal[~c.tissue].astype(float)
    assert abs(void.mean() - 12.0) < 0.05 and abs(void.std() - 1.5) < 0.1
    bg_void = c.background[~c.tissue].astype(float)
    assert abs(bg_void.mean() - 12.0) < 0.05
    assert c.signal[c.tissue].mean() > 12.0 + 40
    idx = np.rint(c.cells[["z_vox", "y_vox", "x_vox"]].to_numpy()).astype(int)
    assert len(idx) and c.tissue[tuple(idx.T)].all()
    # the surface is one smooth connected boundary: void and tissue are each one piece
    assert ndi.label(c.tissue)[1] == 1 and ndi.label(~c.tissue)[1] == 1


def test_hot_pixels_and_streaks_at_their_positions():
    base = crop()
    c = crop(hot_pixel_rate_per_voxel=2e-4, hot_pixel_counts=(30.0, 3000.0),
             streak_rate_per_plane=0.5)  # fmt: skip
    assert len(c.hot_pixels) > 10 and len(c.streaks) > 2
    diff = c.signal.astype(np.int64) - base.signal.astype(np.int64)
    expected = np.zeros(SHAPE)
    expected[tuple(c.hot_pixels.T)] += c.hot_pixel_amplitudes
    for z, y, x0, n in c.streaks:
        assert 1 <= n <= 40
        expected[z, y, x0 : x0 + n] += 1  # marks the streak
    hot = diff[tuple(c.hot_pixels.T)]
    np.testing.assert_allclose(hot, np.rint(c.hot_pixel_amplitudes), atol=1)
    assert (c.hot_pixel_amplitudes >= 30).all() and (c.hot_pixel_amplitudes <= 3000).all()
    assert (diff[expected == 0] == 0).all()  # nothing else moved
    for z, y, x0, n in c.streaks:
        assert (diff[z, y, x0 : x0 + n] >= 29).all()
    np.testing.assert_array_equal(c.background, base.background)


def test_tile_gains_make_steps_at_seams():
    base = crop(read_noise=0.0)
    c = crop(tile_shape_vox=(32, 32), tile_gain_cv=0.3, read_noise=0.0)
    seams = c.seams
    assert len(seams["y_seams_vox"]) >= 2 and len(seams["x_seams_vox"]) >= 2
    gains = seams["gains"]
    assert gains.shape == (seams["y_tile"].max() + 1, seams["x_tile"].max() + 1)
    assert np.std(np.log(gains)) > 0.1
    for r, cc in np.ndindex(*gains.shape):
        sel = (seams["y_tile"][:, None] == r) & (seams["x_tile"][None, :] == cc)
        if sel.sum() < 200:
            continue
        ratio = (c.background[:, sel].astype(float) - 100).mean() / (
            base.background[:, sel].astype(float) - 100
        ).mean()
        assert abs(ratio / gains[r, cc] - 1) < 0.03, (r, cc, ratio, gains[r, cc])
    # a hard step: the two columns either side of a seam differ by the gain ratio
    x = int(seams["x_seams_vox"][0])
    left, right = seams["x_tile"][x - 1], seams["x_tile"][x]
    y = seams["y_tile"] == seams["y_tile"][SHAPE[1] // 2]
    row = seams["y_tile"][SHAPE[1] // 2]
    step = (c.background[:, y, x].astype(float) - 100).mean() / (
        c.background[:, y, x - 1].astype(float) - 100
    ).mean()
    assert abs(step / (gains[row, right] / gains[row, left]) - 1) < 0.05


def test_dark_tile_is_unlabelled():
    c = crop(tile_shape_vox=(48, 48), dark_tile=True, density_per_mm3=20_000.0)
    r, cc = c.seams["dark_tile"]
    sel = (c.seams["y_tile"][:, None] == r) & (c.seams["x_tile"][None, :] == cc)
    dark = c.signal[:, sel].astype(float)
    assert abs(dark.mean() - 100) < 0.2 and abs(dark.std() - 6.0) < 0.3
    assert c.background[:, sel].mean() > 200  # autofluorescence is still imaged
    idx = np.rint(c.cells[["y_vox", "x_vox"]].to_numpy()).astype(int)
    assert not sel[idx[:, 0], idx[:, 1]].any()
    assert sel[c.signal.mean(axis=0) > 130].sum() == 0


def test_bright_edge_rim_inside_the_tissue():
    kw = dict(tissue_fraction=0.6, density_per_mm3=0.0)
    base, c = crop(**kw), crop(edge_photons=150.0, edge_width_um=20.0, **kw)
    np.testing.assert_array_equal(base.tissue, c.tissue)
    d = c.background.astype(float) - base.background.astype(float)
    depth_vox = ndi.distance_transform_edt(c.tissue, sampling=(5.0, 2.0, 2.0))
    rim = c.tissue & (depth_vox < 15.0)
    deep = c.tissue & (depth_vox > 30.0)
    assert d[rim].mean() > 0.5 * 150 and (d[deep] == 0).all() and (d[~c.tissue] == 0).all()
    s = c.signal.astype(float) - base.signal.astype(float)
    assert s[rim].mean() > 0.5 * 0.2 * 150


def test_clusters_sit_one_to_one_and_a_half_diameters_apart():
    c = simulate_crop(
        (30, 160, 160),
        params=CropParams(
            density_per_mm3=20_000.0, cluster_fraction=0.6, cluster_size=(3, 8),
            soma_diameter_um=(12.0, 12.0), cluster_spacing_diameters=(1.0, 1.5),
        ),
        seed=2,
    )  # fmt: skip
    cells = c.cells
    assert (cells["diameter_um"] == 12.0).all()
    assert abs(cells["in_cluster"].mean() - 0.6) < 0.1
    nn = cells.loc[cells["in_cluster"], "nn_distance_um"] / 12.0
    assert len(nn) > 50 and nn.min() >= 1.0 - 1e-9 and nn.max() <= 1.5 + 1e-9
    assert cells["nn_distance_um"].min() >= 10.0 - 1e-9  # the hard core still holds
    pts = cells[["z_um", "y_um", "x_um"]].to_numpy()
    d, _ = cKDTree(pts).query(pts, k=2)
    np.testing.assert_allclose(cells["nn_distance_um"], d[:, 1])
    # the count still follows the density
    volume_mm3 = np.prod(np.asarray((30, 160, 160)) * np.asarray((5.0, 2.0, 2.0))) * 1e-9
    assert abs(len(cells) / volume_mm3 / 20_000 - 1) < 0.15


@pytest.mark.parametrize(
    "kw",
    [
        {"soma_diameter_um": (18.0, 12.0)},
        {"tissue_fraction": 0.0},
        {"tissue_fraction": 1.5},
        {"hot_pixel_rate_per_voxel": -1e-6},
        {"hot_pixel_counts": (3000.0, 30.0)},
        {"dark_tile": True},
        {"tile_shape_vox": (0, 10)},
        {"cluster_fraction": 1.2},
        {"cluster_size": (1, 4)},
        {"psf_sigma_um": (4.0, 1.5)},
        {"voxel_size_um": (0.0, 2.0, 2.0)},
    ],
)
def test_bad_params_raise(kw):
    with pytest.raises(ParameterError):
        CropParams(**kw)


def test_bad_shape_raises():
    with pytest.raises(ParameterError, match="shape"):
        simulate_crop((10, 10), params=CropParams())
    with pytest.raises(ParameterError, match="CropParams"):
        simulate_crop((10, 10, 10), params={"snr": 5})


def test_replace_keeps_validation():
    with pytest.raises(ParameterError):
        replace(CropParams(), edge_width_um=-1.0)


def test_score_detections():
    truth = np.array([[5.0, 20.0, 20.0], [5.0, 40.0, 40.0], [5.0, 60.0, 60.0]])
    found = np.array([[5.0, 21.0, 20.0], [5.0, 40.0, 43.0], [5.0, 10.0, 70.0]])
    s = score_detections(found, truth, (10, 80, 80), voxel_size_um=(5.0, 2.0, 2.0))
    assert (s["tp"], s["fn"], s["fp"]) == (2, 1, 1)
    assert s["recall"] == pytest.approx(2 / 3) and s["precision"] == pytest.approx(2 / 3)
