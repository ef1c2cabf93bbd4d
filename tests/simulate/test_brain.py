"""The brain simulator: deterministic, true to its own ground truth, realistic variability."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from ketamap.atlas import make_phantom
from ketamap.simulate import BrainParams, get_scenario, simulate_brain
from ketamap.simulate.brain import _frame_to_atlas_um

SCEN = get_scenario("ketamine-10day")


@pytest.fixture(scope="module")
def atlas():
    return make_phantom(resolution_um=100.0)


def sim(atlas, group=0, seed=0, **kw):
    params = BrainParams(**({"voxel_size_um": (60.0, 60.0, 60.0)} | kw))
    g = SCEN.groups[group]
    # densities scaled up so that counts are large enough to measure variability
    dens = {k: v * 4 for k, v in SCEN.densities_per_mm3.items()}
    return simulate_brain(
        atlas,
        fold_changes=g.fold_changes,
        densities=dens,
        default_density=SCEN.default_density_per_mm3,
        zero_density=SCEN.zero_density,
        params=params,
        seed=seed,
    )


def test_deterministic(atlas):
    a, b = sim(atlas, seed=3), sim(atlas, seed=3)
    np.testing.assert_array_equal(a.signal, b.signal)
    cols = ["z_vox", "atlas_z_vox"]
    np.testing.assert_array_equal(a.cells[cols], b.cells[cols])
    c = sim(atlas, seed=4)
    assert not np.array_equal(a.signal, c.signal)


def test_outputs_are_typed_and_oriented(atlas):
    b = sim(atlas, orientation="psl")
    assert b.signal.dtype == np.uint16 and b.background.dtype == np.uint16
    assert b.signal.shape == b.background.shape
    # psl: axis 0 runs along AP, as does atlas axis 0 (asr), axis 2 along LR
    assert b.signal.shape[0] > b.signal.shape[1]
    assert set(b.cells.columns) >= {
        "z_vox",
        "y_vox",
        "x_vox",
        "z_um",
        "atlas_z_vox",
        "region_id",
        "hemisphere",
    }
    assert (b.cells["region_id"] > 0).all()


@pytest.mark.parametrize("orientation", ["asr", "psl", "ial"])
def test_cells_are_bright_where_the_truth_says(atlas, orientation):
    b = sim(atlas, orientation=orientation, voxel_size_um=(50.0, 50.0, 50.0))
    idx = np.rint(b.cells[["z_vox", "y_vox", "x_vox"]].to_numpy()).astype(int)
    near = np.clip(idx + [0, 0, 4], 0, np.asarray(b.signal.shape) - 1)
    at_cells = b.signal[tuple(idx.T)].astype(float)
    beside = b.signal[tuple(near.T)].astype(float)
    assert np.median(at_cells - beside) > 50


def test_true_transform_maps_tissue_onto_atlas_tissue(atlas):
    """Voxels with tissue in the sample's frame map onto atlas voxels inside the brain."""
    b = sim(atlas, orientation="asr")
    tf = b.transform
    vf = np.asarray(tf["frame_voxel_um"])
    bright = np.argwhere(b.background > np.percentile(b.background, 80))[::50]
    atlas_vox = _frame_to_atlas_um(bright * vf, tf) / np.asarray(atlas.resolution_um)
    labels, _ = atlas.labels_at(atlas_vox)
    assert (labels > 0).mean() > 0.95


def test_count_variability_and_fold_changes(atlas):
    """Regional counts vary between mice with a CV of about 15-20%; folds are applied."""
    saline = [sim(atlas, group=0, seed=s).expected_counts for s in range(6)]
    treated = [sim(atlas, group=1, seed=100 + s).expected_counts for s in range(6)]
    onto = atlas.ontology

    def counts(tables, acronym):
        rid = set(onto.descendants(onto.lookup(acronym), include_self=True))
        return np.array([t.loc[t["region_id"].isin(rid), "count"].sum() for t in tables])

    big = ["ZI", "SNr", "LHA", "VTA"]
    cvs = [counts(saline, a).std(ddof=1) / counts(saline, a).mean() for a in big]
    assert 0.08 < np.median(cvs) < 0.30, cvs
    for acronym, fold in SCEN.groups[1].fold_changes.items():
        ratio = counts(treated, acronym).mean() / counts(saline, acronym).mean()
        assert abs(np.log(ratio / fold)) < 0.35, (acronym, ratio, fold)


def test_params_are_validated():
    from ketamap.errors import KetamapError

    with pytest.raises(KetamapError, match="voxel_size_um"):
        BrainParams(voxel_size_um=(0.0, 1.0, 1.0))
    with pytest.raises(KetamapError, match="orientation"):
        BrainParams(orientation="xyz")


# ----------------------------------------------------------------- artefacts (off by default)

# sim(atlas, seed=3) ("psl", 60 µm) as measured before the artefact fields existed: the
# demo's and tests' truth must not move. The signal and the true cells are compared
# byte for byte (sha256); the background by its sum and sum of squares, since BLAS
# kernels round differently from CPU to CPU and move a voxel or two of it by one count
# (OpenBLAS's SkylakeX kernel: one voxel, against the Haswell kernel's bytes).
_UNCHANGED_SIGNAL_SHA256 = "bee0213110befbb267a64150c6fdaf3acd0bf0147f75ad55ed4d309f02d925ba"
_UNCHANGED_CELLS_SHA256 = "df46eb49d700dfa41af80b609fb061cb9adb71c6bed7de7ea70e6b816bdbc54f"
_UNCHANGED_BACKGROUND_SUMS = (1048569234, 210916624718)  # sum, sum of squares (counts)


def _sha256(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_artefacts_off_by_default_leave_the_volume_unchanged(atlas):
    plain = sim(atlas, seed=3)
    assert plain.artefacts == {}
    assert _sha256(plain.signal) == _UNCHANGED_SIGNAL_SHA256
    assert _sha256(plain.cells[["z_vox", "y_vox", "x_vox"]].to_numpy()) == _UNCHANGED_CELLS_SHA256
    bg = plain.background.astype(np.int64)
    total, squares = _UNCHANGED_BACKGROUND_SUMS
    assert abs(int(bg.sum()) - total) <= 8  # a few voxels by a count or two
    assert abs(int((bg * bg).sum()) - squares) <= 8 * (2 * int(bg.max()) + 1)
    explicit = sim(
        atlas,
        seed=3,
        hot_pixel_rate_per_voxel=0.0,
        hot_pixel_counts=(30.0, 3000.0),
        tile_shape_um=None,
        tile_gain_cv=0.0,
        edge_photons=0.0,
        edge_width_um=40.0,
    )
    np.testing.assert_array_equal(plain.signal, explicit.signal)
    np.testing.assert_array_equal(plain.background, explicit.background)


SMALL = {"voxel_size_um": (80.0, 80.0, 80.0)}


@pytest.fixture(scope="module")
def base(atlas):
    return sim(atlas, seed=1, **SMALL)


def test_hot_pixels_are_single_voxel_spikes_in_counts(atlas, base):
    b = sim(atlas, seed=1, hot_pixel_rate_per_voxel=1e-4, hot_pixel_counts=(50.0, 2000.0), **SMALL)
    hot, amp = b.artefacts["hot_pixels"], b.artefacts["hot_pixel_amplitudes"]
    assert hot.shape == (len(amp), 3) and abs(len(hot) / (1e-4 * b.signal.size) - 1) < 0.3
    assert (amp >= 50).all() and (amp <= 2000).all()
    diff = b.signal.astype(np.int64) - base.signal.astype(np.int64)
    expected = (
        np.minimum(base.signal[tuple(hot.T)] + np.rint(amp), 65535) - base.signal[tuple(hot.T)]
    )
    np.testing.assert_array_equal(diff[tuple(hot.T)], expected)
    assert np.count_nonzero(diff) == len(hot)  # nothing else moved, void included
    np.testing.assert_array_equal(b.background, base.background)
    in_void = base.background[tuple(hot.T)] < base.background.min() + 40
    assert in_void.any()  # spikes land in the empty margin too
    np.testing.assert_array_equal(b.cells[["z_vox", "x_vox"]], base.cells[["z_vox", "x_vox"]])


def test_tile_gains_multiply_both_channels_per_raw_yx_tile(atlas, base):
    b = sim(atlas, seed=1, tile_shape_um=(2000.0, 2000.0), tile_gain_cv=0.2, **SMALL)
    a = b.artefacts
    gains = a["tile_gains"]
    assert a["tile_shape_vox"] == (25, 25)
    assert gains.shape == (a["y_tile"].max() + 1, a["x_tile"].max() + 1) and gains.size >= 9
    assert 0.1 < np.std(np.log(gains)) < 0.35
    off = 100.0
    for r, c in np.ndindex(*gains.shape):
        sel = (a["y_tile"][:, None] == r) & (a["x_tile"][None, :] == c)
        ref = base.background[:, sel].astype(float) - off
        if sel.sum() < 100 or ref.mean() < 20:
            continue
        for new, old in ((b.background, base.background), (b.signal, base.signal)):
            ratio = (new[:, sel] - off).mean() / (old[:, sel] - off).mean()
            assert abs(ratio / gains[r, c] - 1) < 0.03, (r, c, ratio, gains[r, c])


def test_edge_rim_is_brighter_just_inside_the_surface(atlas, base):
    b = sim(atlas, seed=1, edge_photons=100.0, edge_width_um=80.0, **SMALL)
    rim = b.artefacts["edge_rim"]
    assert rim.shape == b.signal.shape and rim.dtype == bool and rim.any()
    d_bg = b.background.astype(float) - base.background.astype(float)
    d_sig = b.signal.astype(float) - base.signal.astype(float)
    assert (d_bg[~rim] == 0).all() and (d_sig[~rim] == 0).all()
    assert d_bg[rim].mean() > 50 and d_sig[rim].mean() > 0.5 * 0.2 * 100
    # the rim is a thin shell of tissue that borders the empty margin
    smooth = ndi.uniform_filter(base.background.astype(float), 3)
    tissue, void = smooth > 100 + 30, smooth < 100 + 10
    assert tissue[rim].mean() > 0.8
    to_void = ndi.distance_transform_edt(~void)
    assert np.median(to_void[rim]) < 4.5 and np.median(to_void[tissue & ~rim]) > 8
    assert rim.sum() < 0.5 * tissue.sum()


def test_with_artefacts_switches_on_the_realistic_set():
    from ketamap.simulate.brain import REALISTIC_ARTEFACTS

    p = BrainParams().with_artefacts()
    for k, v in REALISTIC_ARTEFACTS.items():
        assert getattr(p, k) == v
    assert p.voxel_size_um == BrainParams().voxel_size_um
    assert BrainParams().with_artefacts(edge_photons=0.0).edge_photons == 0.0


@pytest.mark.parametrize(
    "kw",
    [
        {"hot_pixel_rate_per_voxel": -1.0},
        {"hot_pixel_counts": (2000.0, 50.0)},
        {"tile_shape_um": (0.0, 100.0)},
        {"tile_gain_cv": -0.1},
        {"edge_photons": -1.0},
        {"edge_width_um": 0.0},
    ],
)
def test_artefact_params_are_validated(kw):
    from ketamap.errors import ParameterError

    with pytest.raises(ParameterError):
        BrainParams(**kw)
