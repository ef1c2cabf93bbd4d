"""The fibre simulator: its truth (lengths, footprint), its imaging, its nuisances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from ketamap.errors import InputError, ParameterError
from ketamap.simulate.evaluate import score_fibres
from ketamap.simulate.fibres import (
    FibreSimParams,
    _render,
    image_sigma_um,
    plant_fibres,
    region_slabs,
    simulate_fibres,
    true_length_table,
)

SHAPE = (24, 120, 120)


@pytest.fixture(scope="module")
def sim():
    labels, hemi = region_slabs(SHAPE, (1, 2, 3))
    return simulate_fibres(
        labels,
        densities_mm_per_mm3={1: 3000.0, 2: 1000.0, 3: 0.0},
        hemispheres=hemi,
        params=FibreSimParams(soma_density_per_mm3=2000.0),
        seed=3,
    ), labels


def test_one_region_holds_exactly_the_drawn_length():
    # a single region at density rho: the walks (on the torus of the box) hold rho x V
    labels = np.ones(SHAPE, dtype=np.int32)
    rho = 1500.0
    s = simulate_fibres(labels, densities_mm_per_mm3={1: rho}, seed=1)
    volume_um3 = math.prod(n * v for n, v in zip(SHAPE, s.voxel_size_um))
    total = s.points["length_um"].sum()
    assert total == pytest.approx(rho * 1e-6 * volume_um3, abs=2 * s.params.step_um)
    assert s.lengths["length_um"].sum() == pytest.approx(total)
    assert s.lengths["density_mm_per_mm3"].iloc[0] == pytest.approx(rho, rel=1e-3)


def test_regions_and_hemispheres_split_the_truth(sim):
    s, labels = sim
    lengths = s.lengths.set_index(["region_id", "hemisphere"])
    # every drawn piece is counted once, in the region of its voxel
    assert lengths["length_um"].sum() == pytest.approx(s.points["length_um"].sum())
    assert set(lengths.index.get_level_values("hemisphere")) == {1, 2}
    # a region of density 0 holds no fibre; the others about their density
    assert lengths.loc[3, "length_um"].sum() == 0.0
    dens = s.lengths.groupby("region_id")[["length_um", "volume_mm3"]].sum()
    dens = dens["length_um"] * 1e-3 / dens["volume_mm3"]
    assert dens[1] > dens[2] > 0
    assert s.lengths.groupby("region_id")["target_mm_per_mm3"].first().to_dict() == {
        1: 3000.0,
        2: 1000.0,
        3: 0.0,
    }
    # the same table from the points and labels
    again = true_length_table(s.points, labels, None, s.voxel_size_um)
    assert again.groupby("region_id")["length_um"].sum().to_dict() == pytest.approx(
        s.lengths.groupby("region_id")["length_um"].sum().to_dict()
    )


def test_true_mask_is_the_one_voxel_tube(sim):
    s, _ = sim
    vs = np.asarray(s.voxel_size_um)
    pts = s.points[["z_um", "y_um", "x_um"]].to_numpy() / vs  # voxel units
    tree = cKDTree(pts)
    inside = np.argwhere(s.true_mask > 0)
    d, _ = tree.query(inside)
    assert d.max() <= 1.0 + 1e-9  # every mask voxel within one voxel of the centreline
    outside = np.argwhere(s.true_mask == 0)
    d, _ = tree.query(outside)
    # the centreline is sampled every sample_um: a voxel just outside can be a hair closer
    step = s.params.sample_um / float(vs.min())
    assert d.min() > 1.0 - step
    assert s.true_mask.dtype == np.uint8


def test_rendered_fibre_peak_matches_its_calibration():
    # a straight line along x: peak = photons per µm x voxel volume / (2 pi s_y s_z)
    p = FibreSimParams()
    vs = np.asarray(p.voxel_size_um)
    sig = np.asarray(image_sigma_um(p))
    shape = (16, 24, 60)
    x = np.arange(-40.0, 160.0, 0.5)
    pts = np.stack([np.full_like(x, 8 * vs[0]), np.full_like(x, 12 * vs[1]), x], axis=1)
    per_um = 10.0
    img = _render(shape, pts, np.full(len(x), per_um * 0.5), vs, sig)
    expected = per_um * np.prod(vs) / (2 * math.pi * sig[0] * sig[1])
    assert img[8, 12, 20:40].mean() == pytest.approx(expected, rel=0.01)


def test_imaging_channels_and_somata(sim):
    s, _ = sim
    assert s.signal.dtype == np.uint16 and s.background.dtype == np.uint16
    assert s.signal.shape == SHAPE
    # somata: in the volume, 10-12 µm, brighter than any fibre stretch around them
    assert len(s.somata) > 0
    assert s.somata["diameter_um"].between(10.0, 12.0).all()
    z, y, x = (np.rint(s.somata[c]).astype(int) for c in ("z_vox", "y_vox", "x_vox"))
    bg = np.median(s.signal)
    assert np.all(s.signal[z, y, x] > bg + 20 * s.params.noise_sd_photons)


@pytest.mark.parametrize("spacing", [2.0, 1.0, 0.8])
def test_somata_keep_their_spacing(spacing):
    """Centres at least ``soma_spacing_diameters`` largest diameters apart; 1 packs them."""
    from scipy.spatial import cKDTree

    params = FibreSimParams(soma_density_per_mm3=60000.0, soma_spacing_diameters=spacing)
    s = simulate_fibres(np.ones((20, 120, 120), np.uint8), densities_mm_per_mm3={1: 0.0},
                        params=params, seed=2)  # fmt: skip
    xyz = s.somata[["z_um", "y_um", "x_um"]].to_numpy()
    nearest = cKDTree(xyz).query(xyz, k=2)[0][:, 1]
    gap = spacing * params.soma_diameter_um[1]
    assert nearest.min() > gap
    if spacing < 2.0:  # a packed layer: neighbours closer than two diameters
        assert (nearest < 2 * params.soma_diameter_um[1]).mean() > 0.3


def test_same_seed_same_volume():
    labels = np.ones((12, 40, 40), dtype=np.int32)
    a = simulate_fibres(labels, densities_mm_per_mm3={1: 2000.0}, seed=5)
    b = simulate_fibres(labels, densities_mm_per_mm3={1: 2000.0}, seed=5)
    c = simulate_fibres(labels, densities_mm_per_mm3={1: 2000.0}, seed=6)
    assert np.array_equal(a.signal, b.signal)
    assert not np.array_equal(a.signal, c.signal)


def test_nuisances():
    labels = np.ones((16, 80, 80), dtype=np.int32)
    params = FibreSimParams(
        tissue_fraction=0.5,
        hot_pixel_rate_per_voxel=1e-3,
        tile_shape_vox=(40, 40),
        tile_gain_cv=0.3,
        camera_offset=12.0,
        read_noise=1.5,
    )
    s = simulate_fibres(labels, densities_mm_per_mm3={1: 2000.0}, params=params, seed=2)
    void = ~s.tissue
    assert void[:, :, 40:].all() and not void[:, :, :40].any()
    # no fibre in the void (the footprint reaches one voxel past the tissue's edge)
    assert (s.points["x_um"] / s.voxel_size_um[2] < 39.5).all()
    assert s.true_mask[:, :, 41:].sum() == 0
    hot = np.zeros(s.signal.shape, dtype=bool)
    hot[tuple(s.hot_pixels.T)] = True
    assert len(s.hot_pixels) > 0
    # the void holds the camera only: offset and read noise (and the hot pixels)
    quiet = s.signal[void & ~hot].astype(float)
    assert quiet.mean() == pytest.approx(12.0, abs=0.5)
    assert quiet.std() == pytest.approx(1.5, rel=0.2)
    assert s.signal[hot & void].min() > 12 + 10
    # tiles: the background channel steps at the seam between two tiles (rows 39 | 40),
    # far more than between two rows inside a tile
    rows = s.background[:, :, :40].astype(float).mean(axis=(0, 2))
    seam = abs(np.log(rows[40:42].mean() / rows[38:40].mean()))
    inside = abs(np.log(rows[20:22].mean() / rows[18:20].mean()))
    assert seam > 0.05 and seam > 5 * inside


def test_bad_input_is_one_sentence():
    with pytest.raises(InputError, match="labels must be a non-empty 3D integer volume"):
        simulate_fibres(np.ones((4, 4)), densities_mm_per_mm3={1: 1.0})
    with pytest.raises(InputError, match="hemispheres have shape"):
        simulate_fibres(
            np.ones((4, 8, 8), int), densities_mm_per_mm3={1: 1.0}, hemispheres=np.ones((4, 8, 7))
        )
    with pytest.raises(ParameterError, match=r"densities_mm_per_mm3\[1\] must be"):
        simulate_fibres(np.ones((4, 8, 8), int), densities_mm_per_mm3={1: -1.0})
    with pytest.raises(ParameterError, match="fibre_diameter_um must be a range"):
        FibreSimParams(fibre_diameter_um=(2.0, 1.0))
    with pytest.raises(ParameterError, match="params must be a FibreSimParams"):
        simulate_fibres(np.ones((4, 8, 8), int), densities_mm_per_mm3={}, params={})


def test_planted_fibres_are_the_simulated_ones_at_the_volume_noise():
    rng = np.random.default_rng(0)
    real = rng.normal(300, 20, (12, 80, 80)).astype(np.uint16)
    params = FibreSimParams(fibre_snr=10.0)
    hybrid, truth = plant_fibres(real, noise_sd=20.0, density_mm_per_mm3=1500.0,
                                 params=params, seed=4)  # fmt: skip
    same = simulate_fibres(np.ones(real.shape, np.uint8), densities_mm_per_mm3={1: 1500.0},
                           params=params, seed=4)  # fmt: skip
    assert np.array_equal(truth.true_mask, same.true_mask)
    assert hybrid.dtype == np.uint16 and np.all(hybrid >= real)  # only added
    # the fibres' counts are their photons at 20 / noise_sd_photons counts per photon
    k = 20.0 / params.noise_sd_photons
    added = hybrid.astype(float) - real
    assert added.sum() == pytest.approx(k * truth.fibre_image.sum(), rel=0.01)
    assert added[truth.true_mask == 0].mean() < 0.1 * added[truth.true_mask > 0].mean()
    # a float volume stays float, unrounded; an 8-bit one is clipped to its range
    hybrid_f, _ = plant_fibres(real.astype(np.float32), noise_sd=20.0,
                               density_mm_per_mm3=1500.0, params=params, seed=4)  # fmt: skip
    assert hybrid_f.dtype == np.float32 and np.allclose(hybrid_f, hybrid, atol=0.51)
    hybrid_8, _ = plant_fibres(np.full(real.shape, 250, np.uint8), noise_sd=20.0,
                               density_mm_per_mm3=1500.0, params=params, seed=4)  # fmt: skip
    assert hybrid_8.max() == 255


def test_score_of_the_truth_and_of_a_reference():
    labels = np.ones((12, 80, 80), np.uint8)
    truth = simulate_fibres(labels, densities_mm_per_mm3={1: 1500.0}, seed=2)
    # the true footprint and a skeleton of its centreline voxels score as found
    centre = np.zeros(labels.shape, np.uint8)
    vox = np.rint(truth.points[["z_um", "y_um", "x_um"]].to_numpy() / truth.voxel_size_um)
    centre[tuple(np.clip(vox.astype(int), 0, np.array(labels.shape) - 1).T)] = 1
    got = score_fibres(truth.true_mask, centre, truth)
    assert got["recall"] == 1.0 and got["precision"] == 1.0
    assert 0.8 < got["length_ratio"] < 1.2
    # what a reference found is left out of the precision and the length
    extra = truth.true_mask.copy()
    extra[0, 0, :10] = 1
    assert score_fibres(extra, centre, truth)["precision"] < 1.0
    ref = np.zeros_like(extra)
    ref[0, 0, :10] = 1
    got = score_fibres(extra, centre, truth, reference=(ref, np.zeros_like(ref)))
    assert got["precision"] == 1.0
    none = score_fibres(extra, centre, truth, reference=(ref, centre))
    assert none["length_ratio"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(InputError, match=r"The mask has shape \(12, 80, 79\) but the truth"):
        score_fibres(extra[..., 1:], centre, truth)


def test_planting_bad_input_is_one_sentence():
    with pytest.raises(InputError, match="volume must be a non-empty 3D array"):
        plant_fibres(np.ones((4, 4)), noise_sd=1.0, density_mm_per_mm3=1.0)
    with pytest.raises(ParameterError, match="noise_sd must be a finite number > 0"):
        plant_fibres(np.ones((4, 8, 8)), noise_sd=float("nan"), density_mm_per_mm3=1.0)
    with pytest.raises(ParameterError, match="density_mm_per_mm3 must be a finite number > 0"):
        plant_fibres(np.ones((4, 8, 8)), noise_sd=1.0, density_mm_per_mm3=0)
