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
    from ketamap.wholebrain.register import RegistrationParams, register_to_atlas

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
        default_density=20.0,
        params=BrainParams(voxel_size_um=(50.0, 40.0, 40.0), orientation="psl"),
        seed=11,
    )
    reg = register_to_atlas(
        brain.background,
        atlas.reference,
        voxel_size_um=brain.voxel_size_um,
        orientation=brain.orientation,
        atlas_resolution_um=atlas.resolution_um,
        atlas_orientation=atlas.orientation,
        atlas_mask=atlas.annotation > 0,
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
    # benchmark (2 threads): median 0.23, p95 0.47 atlas voxels (target: median <= 1.5);
    # the bound below catches a return of the B-spline drift (0.65 with 20 iterations)
    assert np.median(err) <= 0.45, np.median(err)
    onto = atlas.ontology
    found_ids = np.asarray(atlas.labels_at(found)[0], dtype=np.int64)
    true_ids = cells["region_id"].to_numpy(np.int64)
    pct = {}
    for level in range(1, 8):
        t, f = onto.rollup(true_ids, level), onto.rollup(found_ids, level)
        pct[level] = 100 * np.mean(t == f)
    # benchmark: 98.6 98.5 98.3 98.1 97.4 97.0 96.6 at levels 1-7 (the 95 % target is
    # met down to level 6 on all simulated brains, level 7 on three of four)
    assert min(pct[level] for level in range(1, 8)) >= 95.0, pct


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
    # benchmark: 0.87 (P) to 0.96 (Isocortex); target Dice >= 0.85
    assert min(scores.values()) >= 0.85, scores
    assert dice(truth > 0, found > 0) >= 0.95


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
        register_to_atlas,
    )

    atlas = simulated[0]
    ref = atlas.reference.astype(np.float32)
    noisy = ref + np.random.default_rng(0).normal(0, 0.05 * ref.max(), ref.shape).astype(np.float32)
    points = np.argwhere(atlas.annotation[::3, ::3, ::3] > 0) * 3.0
    for bins in (32, 64):
        reg = register_to_atlas(
            noisy,
            atlas.reference,
            voxel_size_um=atlas.resolution_um,
            orientation=atlas.orientation,
            atlas_resolution_um=atlas.resolution_um,
            atlas_orientation=atlas.orientation,
            atlas_mask=atlas.annotation > 0,
            params=RegistrationParams(deformable=False, histogram_bins=bins, n_threads=1),
        )
        err = np.linalg.norm(cells_to_atlas(reg, points) - points, axis=1)
        # measured: median 0.18 (32 bins), 0.23 (64 bins) atlas voxels
        assert np.median(err) <= 0.35, (bins, np.median(err))
