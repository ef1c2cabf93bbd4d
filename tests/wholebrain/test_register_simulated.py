"""Registration against the issue's targets on a brain simulated on the real Allen CCFv3 (100 µm).

``simulate_brain`` draws a random pose and a smooth deformation, renders the
Allen anatomy with ``brain_in_ccf_100um.tiff`` as tissue contrast plus
light-sheet artefacts, and knows every cell's true atlas position. The
truth on the prepared grid comes from the simulator's own transform (its
rule is checked on the true cells first). The full per-region tables and
both engines are in ``benchmarks/bench_registration_sim.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

DIVISIONS = ("Isocortex", "OLF", "HPF", "CNU", "TH", "HY", "MB", "P", "MY", "CB")


@pytest.fixture(scope="module")
def simulated(shared_data):
    from ketamap.atlas import load_allen
    from ketamap.simulate import BrainParams, simulate_brain
    from ketamap.wholebrain.register import RegistrationParams, register_to_reference

    allen = shared_data / "allen_ccf_2017"
    atlas = load_allen(
        allen / "ABA_25um_2017_annotation.tif.lzma",
        allen / "structure_tree_safe_2017.csv",
        hemispheres_path=allen / "ABA_25um_2017_hemispheres.tif.lzma",
        reference_path=shared_data / "brainreg_brain" / "brain_in_ccf_100um.tiff",
        resolution_um=100,
    )
    brain = simulate_brain(
        atlas,
        fold_changes={},
        densities={},
        default_density=100.0,  # cells per mm³, as the benchmark: ~2,700 at level 9
        params=BrainParams(voxel_size_um=(50.0, 40.0, 40.0), orientation="psl"),
        seed=11,
    )
    reg = register_to_reference(
        brain.background,
        atlas.reference,
        voxel_size_um=brain.voxel_size_um,
        orientation=brain.orientation,
        atlas_resolution_um=atlas.resolution_um,
        atlas_orientation=atlas.orientation,
        atlas_labels=atlas.annotation,
        params=RegistrationParams(n_threads=1),
    )
    return atlas, brain, reg


def _frame_um_of_prepared(j, brain, res):
    """Simulator frame µm of prepared voxel coordinates ``j`` (see the benchmark's docstring)."""
    vf = np.asarray(brain.transform["frame_voxel_um"], dtype=float)
    return (j + 0.5) * res - vf / 2


@pytest.mark.slow
@pytest.mark.shared_data
def test_simulated_allen_brain_meets_tre_and_cell_targets(simulated):
    from ketamap.wholebrain.register import cells_to_atlas

    atlas, brain, reg = simulated
    assert not reg.flagged, reg.qc
    cells = brain.cells
    found = cells_to_atlas(reg, cells[["z_vox", "y_vox", "x_vox"]].to_numpy(float))
    true = cells[["atlas_z_vox", "atlas_y_vox", "atlas_x_vox"]].to_numpy(float)
    err = np.linalg.norm(found - true, axis=1)
    # measured: median 0.085, p95 0.19 atlas voxels (target: median <= 1.5); the bound
    # catches a loss of the reference blur (0.107 without), of the per-region contrast
    # matching as well (0.121) or of the B-spline (affine alone: 0.21)
    assert np.median(err) <= 0.095, np.median(err)
    onto = atlas.ontology
    found_ids = np.asarray(atlas.labels_at(found)[0], dtype=np.int64)
    true_ids = cells["region_id"].to_numpy(np.int64)
    pct = {}
    for level in range(1, onto.max_depth + 1):
        t, f = onto.rollup(true_ids, level), onto.rollup(found_ids, level)
        # cells whose true region reaches this level (a leaf at level 6 is not scored at 9)
        ids, inverse = np.unique(t, return_inverse=True)
        deep = np.asarray([onto.depth(int(r)) >= level for r in ids])[inverse]
        if deep.any():
            pct[level] = 100 * np.mean(t[deep] == f[deep])
    # measured: 99.6 99.6 99.5 99.4 99.2 99.0 98.7 98.0 97.1 at levels 1-9 (target 95 %)
    assert min(pct.values()) >= 95.0, pct


@pytest.mark.slow
@pytest.mark.shared_data
def test_simulated_allen_brain_division_dice(simulated):
    from ketamap.simulate.brain import _frame_to_atlas_um
    from ketamap.wholebrain.register import warp_labels_to_sample
    from ketamap.wholebrain.transforms import dice, raw_to_prepared_vox

    atlas, brain, reg = simulated
    res = float(atlas.resolution_um[0])
    # the truth rule reproduces the simulator's own atlas position of every cell
    cells = brain.cells
    j = raw_to_prepared_vox(
        cells[["z_vox", "y_vox", "x_vox"]].to_numpy(float),
        shape_vox=brain.background.shape,
        voxel_size_um=brain.voxel_size_um,
        orientation=brain.orientation,
        atlas_orientation=atlas.orientation,
        atlas_resolution_um=res,
    )
    rule = _frame_to_atlas_um(_frame_um_of_prepared(j, brain, res), brain.transform) / res
    true_cells = cells[["atlas_z_vox", "atlas_y_vox", "atlas_x_vox"]].to_numpy(float)
    np.testing.assert_allclose(rule, true_cells, atol=1e-6)

    shape = reg.prepared_shape_vox
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    coords = _frame_to_atlas_um(_frame_um_of_prepared(grid, brain, res), brain.transform) / res
    truth = ndi.map_coordinates(
        atlas.annotation,
        coords.T.reshape(3, *shape),
        order=0,
        mode="constant",
        cval=0,
        output=atlas.annotation.dtype,
    )
    found = warp_labels_to_sample(reg, atlas.annotation)
    onto = atlas.ontology
    scores = {}
    for acronym in DIVISIONS:
        ids = onto.descendants(onto.lookup(acronym), include_self=True)
        scores[acronym] = dice(np.isin(truth, ids), np.isin(found, ids))
    # benchmark: 0.95 to 0.99; target Dice >= 0.85
    assert min(scores.values()) >= 0.90, scores
    assert dice(truth > 0, found > 0) >= 0.95

    # every region (subtree) larger than 1 mm³ at every level
    voxel_mm3 = (res / 1000) ** 3
    failing = {}
    for level in range(1, onto.max_depth + 1):
        t, f = onto.rollup(truth.ravel(), level), onto.rollup(found.ravel(), level)
        ids, n_true = np.unique(t[t > 0], return_counts=True)
        n_found = dict(zip(*np.unique(f[f > 0], return_counts=True)))
        n_both = dict(zip(*np.unique(t[(t == f) & (t > 0)], return_counts=True)))
        for rid, n in zip(ids, n_true):
            if n * voxel_mm3 > 1 and onto.depth(int(rid)) == level:
                d = 2 * n_both.get(rid, 0) / (n + n_found.get(rid, 0))
                if d < 0.88:
                    failing[onto.acronym(int(rid))] = round(d, 3)
    # target: Dice >= 0.85. Measured: lowest of 287 alv 0.896, ENTm3 0.901; without the
    # reference blur lotg 0.861, without the contrast matching as well alv 0.830, with
    # the unregularised B-spline 36 regions below 0.85.
    assert not failing, failing


@pytest.mark.slow
@pytest.mark.shared_data
def test_noisy_allen_reference_registers_to_itself(simulated):
    """5 % noise must not throw the affine off: every level samples enough voxels.

    With a fixed 5 % sample the 800 µm level drew ~100 voxels for a 32 x 32 joint
    histogram and the map was off by a median 0.58 voxel (4.2 with 64 bins).
    """
    from ketamap.wholebrain.register import (
        RegistrationParams,
        cells_to_atlas,
        register_to_reference,
    )

    atlas = simulated[0]
    ref = atlas.reference.astype(np.float32)
    noisy = ref + np.random.default_rng(0).normal(0, 0.05 * ref.max(), ref.shape).astype(np.float32)
    points = np.argwhere(atlas.annotation[::3, ::3, ::3] > 0) * 3.0
    for bins in (32, 64):
        reg = register_to_reference(
            noisy,
            atlas.reference,
            voxel_size_um=atlas.resolution_um,
            orientation=atlas.orientation,
            atlas_resolution_um=atlas.resolution_um,
            atlas_orientation=atlas.orientation,
            atlas_labels=atlas.annotation,
            params=RegistrationParams(deformable=False, histogram_bins=bins, n_threads=1),
        )
        err = np.linalg.norm(cells_to_atlas(reg, points) - points, axis=1)
        # measured: median 0.18 (32 bins), 0.23 (64 bins) atlas voxels
        assert np.median(err) <= 0.35, (bins, np.median(err))
