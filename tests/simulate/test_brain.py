"""The brain simulator: deterministic, true to its own ground truth, realistic variability."""

from __future__ import annotations

import numpy as np
import pytest

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
    return simulate_brain(atlas, fold_changes=g.fold_changes, densities=dens,
                          default_density=SCEN.default_density_per_mm3,
                          zero_density=SCEN.zero_density, params=params, seed=seed)


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
    assert set(b.cells.columns) >= {"z_vox", "y_vox", "x_vox", "z_um", "atlas_z_vox",
                                    "region_id", "hemisphere"}
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
