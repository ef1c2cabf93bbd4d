"""Voxel-wise density maps and permutation tests with family-wise error control."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ketamap.errors import InputError, ParameterError, StatsError
from ketamap.stats.voxels import (
    CLUSTER_COLUMNS,
    VoxelParams,
    density_map,
    group_maps,
    tfce,
    voxel_test,
)


@pytest.mark.parametrize("kernel", ["gaussian", "sphere"])
def test_one_cell_integrates_to_one_and_peaks_at_its_voxel(kernel):
    d = density_map([[900.0, 1100.0, 1000.0]], (20, 20, 20), voxel_size_um=100.0,
                    radius_um=150.0, kernel=kernel)  # fmt: skip
    assert d.dtype == np.float32 and d.shape == (20, 20, 20)
    assert d.sum() * 0.1**3 == pytest.approx(1.0, rel=1e-3)
    assert ndimage.center_of_mass(d) == pytest.approx((9, 11, 10), abs=1e-3)


@pytest.mark.parametrize("kernel", ["gaussian", "sphere"])
def test_uniform_cells_give_their_density(kernel):
    rng = np.random.default_rng(1)
    true_per_mm3 = 2000.0
    side_um = 3000.0
    n = rng.poisson(true_per_mm3 * (side_um / 1000) ** 3)
    pts = rng.uniform(0, side_um, (n, 3))
    d = density_map(pts, (31, 31, 31), voxel_size_um=100.0, radius_um=200.0, kernel=kernel)
    interior = d[8:23, 8:23, 8:23]
    assert interior.mean() == pytest.approx(true_per_mm3, rel=0.05)


def test_anisotropic_grid_and_points_outside_are_dropped():
    pts = np.array([[200.0, 80.0, 80.0], [-500.0, 0, 0], [1e6, 0, 0]])
    d = density_map(pts, (9, 9, 9), voxel_size_um=(50.0, 20.0, 20.0), radius_um=20.0)
    assert d.sum() * (50 * 20 * 20) * 1e-9 == pytest.approx(1.0, rel=1e-3)
    assert np.unravel_index(np.argmax(d), d.shape) == (4, 4, 4)
    empty = density_map(np.zeros((0, 3)), (3, 3, 3), voxel_size_um=10, radius_um=10)
    assert empty.shape == (3, 3, 3) and not empty.any()


def test_density_map_errors_are_one_sentence():
    with pytest.raises(InputError, match=r"\(n, 3\)"):
        density_map(np.zeros((4, 2)), (3, 3, 3), voxel_size_um=10, radius_um=10)
    with pytest.raises(ParameterError, match="kernel"):
        density_map(np.zeros((1, 3)), (3, 3, 3), voxel_size_um=10, radius_um=10, kernel="box")
    with pytest.raises(ParameterError, match="voxel_size_um"):
        density_map(np.zeros((1, 3)), (3, 3, 3), voxel_size_um=-1, radius_um=10)
    with pytest.raises(InputError, match="NaN"):
        density_map([[np.nan, 0, 0]], (3, 3, 3), voxel_size_um=10, radius_um=10)


def test_group_maps_means_per_group():
    maps = np.arange(4 * 8, dtype=np.float32).reshape(4, 2, 2, 2)
    out = group_maps(maps, ["a", "b", "a", "b"])
    assert list(out) == ["a", "b"]
    np.testing.assert_allclose(out["a"], (maps[0] + maps[2]) / 2)
    with pytest.raises(InputError):
        group_maps(maps, ["a", "b"])


def test_tfce_matches_hand_computation_and_grows_with_extent():
    s = np.zeros((7, 7, 7), np.float32)
    s[1, 1, 1] = 2.0
    s[4:6, 4:6, 4:6] = -2.0  # a cluster of 8 voxels, same height
    e = tfce(s, steps=2)
    assert e[1, 1, 1] == pytest.approx(1 * (1 + 4))  # sum over h of 1**0.5 * h**2 * dh
    assert e[4, 4, 4] == pytest.approx(-(8**0.5) * (1 + 4))
    assert e[0, 0, 0] == 0


def _blocks(rng, n, shape=(14, 14, 14), effect=0.0, smooth=1.0):
    maps = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), smooth) for _ in range(n)])
    maps /= maps.std()
    maps[:, 4:9, 4:9, 4:9] += effect
    return maps.astype(np.float32)


@pytest.mark.parametrize("method", ["tfce", "cluster_mass"])
def test_planted_block_is_found_with_its_sign(method):
    rng = np.random.default_rng(0)
    a = _blocks(rng, 5)
    b = _blocks(rng, 5, effect=-2.5)
    mask = np.ones(a.shape[1:], bool)
    mask[0] = False
    vp = VoxelParams(method=method, n_permutations=300, seed=1)
    res = voxel_test(a, b, mask=mask, params=vp, voxel_size_um=100.0)
    t, p_fwe, clusters = res.t, res.p_fwe, res.clusters
    assert res.n_permutations == 252 and res.exact  # C(10, 5) <= 300: all enumerated
    assert t.dtype == np.float32 and p_fwe.shape == mask.shape
    assert p_fwe[6, 6, 6] < 0.05 and t[6, 6, 6] < 0
    assert np.all(p_fwe[0] == 1) and np.all(t[0] == 0)
    assert list(clusters.columns) == list(CLUSTER_COLUMNS)
    top = clusters.iloc[0]
    assert top["sign"] == "decrease" and top["p_fwe"] < 0.05
    assert 4 <= top["peak_z_vox"] <= 8 and top["volume_mm3"] == pytest.approx(
        top["n_voxels"] * 1e-3
    )
    # called voxels sit on or near the block
    called = p_fwe < 0.05
    near = np.zeros_like(called)
    near[2:11, 2:11, 2:11] = True
    assert called[near].sum() > 0.9 * called.sum()


def test_random_relabellings_when_there_are_too_many():
    rng = np.random.default_rng(2)
    a, b = _blocks(rng, 6), _blocks(rng, 6, effect=3.0)
    res = voxel_test(a, b, params=VoxelParams(method="cluster_mass", n_permutations=99))
    assert not res.exact and res.n_permutations == 99
    assert res.p_fwe.min() == pytest.approx(1 / 99)  # (1 + 0) / (1 + 98)
    again = voxel_test(a, b, params=VoxelParams(method="cluster_mass", n_permutations=99))
    np.testing.assert_array_equal(res.p_fwe, again.p_fwe)


@pytest.mark.parametrize("method", ["tfce", "cluster_mass"])
def test_family_wise_error_under_the_null(method):
    """Null cohorts of 4 v 4 smooth noise maps: few have any call (5 % expected)."""
    rng = np.random.default_rng(5)
    n_rep, limit = (40, 6) if method == "cluster_mass" else (25, 5)  # P(exceeded) < 0.01
    hits = 0
    for rep in range(n_rep):
        maps = _blocks(rng, 8, shape=(10, 10, 10))
        vp = VoxelParams(method=method, n_permutations=100, tfce_steps=10, seed=rep)
        res = voxel_test(maps[:4], maps[4:], params=vp)
        hits += bool((res.p_fwe < 0.05).any())
    assert hits <= limit


def test_errors_speak_to_the_user():
    rng = np.random.default_rng(3)
    a = _blocks(rng, 3, shape=(5, 5, 5))
    with pytest.raises(StatsError, match="at least 2 maps"):
        voxel_test(a, a[:1])
    with pytest.raises(InputError, match="mask"):
        voxel_test(a, a, mask=np.ones((4, 4, 4), bool))
    with pytest.raises(InputError, match="empty"):
        voxel_test(a, a, mask=np.zeros((5, 5, 5), bool))
    with pytest.raises(InputError, match="one shape"):
        voxel_test(a, a[:, :4])
    with pytest.raises(ParameterError, match="method"):
        voxel_test(a, a, params=VoxelParams(method="fdr"))
    with pytest.raises(ParameterError, match="VoxelParams"):
        voxel_test(a, a, params={"method": "tfce"})
    with pytest.raises(ParameterError, match="radius_um"):
        VoxelParams(radius_um=0)
    with pytest.raises(ParameterError, match="connectivity"):
        VoxelParams(connectivity=8)


def test_weighted_points_give_a_density_of_their_weight():
    pts = [[700.0, 700.0, 700.0], [700.0, 700.0, 700.0], [1100.0, 600.0, 900.0]]
    w = [0.5, 0.25, 2.0]  # e.g. mm of fibre
    plain = density_map(pts, (20, 20, 20), voxel_size_um=100.0, radius_um=0, weights=w)
    assert plain[7, 7, 7] * 0.1**3 == pytest.approx(0.75)
    assert plain[11, 6, 9] * 0.1**3 == pytest.approx(2.0)
    assert np.count_nonzero(plain) == 2
    for kernel in ("gaussian", "sphere"):
        d = density_map(pts, (20, 20, 20), voxel_size_um=100.0, radius_um=150.0, kernel=kernel,
                        weights=w)  # fmt: skip
        assert d.sum() * 0.1**3 == pytest.approx(2.75, rel=1e-3)
    with pytest.raises(InputError, match="one finite number per point"):
        density_map(pts, (20, 20, 20), voxel_size_um=100.0, radius_um=0, weights=[1.0])
    with pytest.raises(ParameterError, match="radius_um"):
        density_map(pts, (20, 20, 20), voxel_size_um=100.0, radius_um=-1)
