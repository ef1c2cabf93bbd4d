"""Detection on the failure modes of real tissue, simulated with ground truth.

The void around the brain (camera offset, read noise, hot pixels), hot pixels and
one-plane streaks inside the tissue, stitched tiles with gain steps and a bright tissue
edge (``ketamap.simulate.crop``). Figures over larger volumes are in
``benchmarks/bench_detect_artefacts.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from ketamap.errors import InputError
from ketamap.simulate.crop import (
    CropParams,
    inner_mask,
    match_detections,
    score_detections,
    simulate_crop,
)
from ketamap.wholebrain import DetectionParams, detect_cells

VS = (5.0, 2.0, 2.0)
SHAPE = (40, 256, 256)


def _detect(crop, background=False, **kwargs):
    cells, qc = detect_cells(
        crop.signal,
        voxel_size_um=VS,
        background=crop.background if background else None,
        params=DetectionParams(**kwargs),
        return_qc=True,
    )
    return cells, cells[["z_vox", "y_vox", "x_vox"]].to_numpy(), qc


def _score(crop, xyz):
    truth = crop.cells[["z_vox", "y_vox", "x_vox"]].to_numpy()
    return score_detections(xyz, truth, crop.signal.shape, voxel_size_um=VS)


def _in_void(crop, xyz):
    idx = np.clip(np.rint(xyz).astype(int), 0, np.asarray(crop.signal.shape) - 1)
    return ~crop.tissue[tuple(idx.T)]


def _hits(points_vox, xyz, within_um=4.0):
    """How many points have a detection within ``within_um``."""
    if len(points_vox) == 0 or len(xyz) == 0:
        return 0
    d, _ = cKDTree(xyz * np.asarray(VS)).query(np.asarray(points_vox) * np.asarray(VS))
    return int((d < within_um).sum())


VOID = dict(tissue_fraction=0.5, camera_offset=12.0, read_noise=1.5)
# stitched tiles with 30 % gain CV, a bright tissue edge and a void; the autofluorescence
# bleeds fully into the signal channel, as on the real crops
SEAMS = CropParams(
    density_per_mm3=5000,
    bleed_through=1.0,
    tile_shape_vox=(128, 128),
    tile_gain_cv=0.3,
    edge_photons=1500.0,
    tissue_fraction=0.6,
)


@pytest.mark.parametrize("seed", [0, 1])
def test_no_candidates_in_the_void_with_hot_pixels(seed):
    """Real-like void (~12 counts, read noise 1.5) with hot pixels: nothing detected there."""
    crop = simulate_crop(
        SHAPE,
        params=CropParams(density_per_mm3=5000, hot_pixel_rate_per_voxel=1e-4, **VOID),
        seed=seed,
    )
    cells, xyz, qc = _detect(crop)
    assert (~crop.tissue).sum() > 1e6 and len(crop.hot_pixels) > 100
    assert _in_void(crop, xyz).sum() == 0
    assert _hits(crop.hot_pixels, xyz) <= 1  # a hot pixel may sit on a real soma
    score = _score(crop, xyz)
    assert score["recall"] >= 0.9 and score["precision"] >= 0.95, score
    # the mask finds the void: tissue is half the crop plus the one-block dilation
    assert 0.5 <= qc["tissue_fraction"] <= 0.75
    assert qc["tissue_void_level"] < 20 < qc["tissue_level"]


def test_each_defence_alone_is_needed_somewhere():
    """Without the spike test, hot pixels and streaks inside the tissue become cells."""
    crop = simulate_crop(
        SHAPE,
        params=CropParams(
            density_per_mm3=5000, hot_pixel_rate_per_voxel=1e-4, streak_rate_per_plane=2.0
        ),
        seed=0,
    )
    _, xyz, _ = _detect(crop)
    _, xyz_off, _ = _detect(crop, min_spike_extent=0.0)
    on, off = _score(crop, xyz), _score(crop, xyz_off)
    assert on["precision"] >= 0.98 and off["precision"] < 0.85, (on, off)
    assert on["recall"] >= off["recall"] - 0.01


def test_seams_and_bright_edge_with_background_channel():
    """Tiles with 30 % gain steps, a bright tissue edge and a void: precision >= 0.98."""
    params = SEAMS
    for seed in (0, 1):
        crop = simulate_crop(SHAPE, params=params, seed=seed)
        _, xyz, _ = _detect(crop, background=True)
        score = _score(crop, xyz)
        assert score["precision"] >= 0.98 and score["recall"] >= 0.9, (seed, score)


def test_step_test_removes_seam_candidates_signal_only():
    """Signal only: the maxima beside a tile seam fail the step test."""
    params = SEAMS
    crop = simulate_crop(SHAPE, params=params, seed=0)
    _, xyz, _ = _detect(crop)
    _, xyz_off, _ = _detect(crop, min_step_drop=0.0)
    on, off = _score(crop, xyz), _score(crop, xyz_off)
    assert on["fp"] < off["fp"] and on["tp"] >= off["tp"] - 1, (on, off)


# the benchmark's dark-tile scenario: tiles with 20 % gain CV, one unlabelled tile, a
# bright rim (300 photons, 20 µm deep) under the surface of a void, signal channel only
RIM = CropParams(
    tissue_fraction=0.6,
    tile_shape_vox=(128, 128),
    tile_gain_cv=0.2,
    dark_tile=True,
    edge_photons=300.0,
    edge_width_um=20.0,
)


def test_somata_on_the_bright_rim_are_not_split(monkeypatch):
    """Signal only, rim and dark tile: precision >= 0.98; a soma on the rim is one cell.

    The split decision weighs an object's half-maximum region; weighing everything above
    a fifth of its peak let the rim's plateau stretch somata into two (measured: 10-12
    false cells per crop, precision 0.976-0.979).
    """
    import ketamap.wholebrain.detect as detect_module

    tp = fp = 0
    for seed in (3500, 3502):
        crop = simulate_crop((40, 512, 512), params=RIM, seed=seed)
        score = _score(crop, _detect(crop)[1])
        tp, fp = tp + score["tp"], fp + score["fp"]
    assert tp / (tp + fp) >= 0.98 and fp <= 12, (tp, fp)
    monkeypatch.setattr(detect_module, "_MOMENT_FLOOR", 0.2)
    old = _score(crop, _detect(crop)[1])
    assert old["fp"] >= score["fp"] + 5, (old, score)


def test_all_dark_and_all_tissue_volumes():
    """An all-dark volume gives an empty table; a volume that is all tissue is all tissue."""
    dark = np.random.default_rng(0).normal(12, 1.5, (20, 64, 64)).round().astype(np.uint16)
    cells, qc = detect_cells(dark, voxel_size_um=VS, return_qc=True)
    assert len(cells) == 0
    crop = simulate_crop((20, 128, 128), params=CropParams(density_per_mm3=5000), seed=2)
    cells, qc = detect_cells(crop.signal, voxel_size_um=VS, return_qc=True)
    assert qc["tissue_fraction"] == 1.0 and qc["n_outside_tissue"] == 0 and len(cells) > 10


def test_background_of_another_shape_or_dtype_is_one_sentence():
    vol = np.zeros((10, 32, 32), np.uint16)
    with pytest.raises(InputError, match="same grid"):
        detect_cells(vol, voxel_size_um=VS, background=np.zeros((10, 32, 31), np.uint16))
    with pytest.raises(InputError, match="integers or floats"):
        detect_cells(vol, voxel_size_um=VS, background=np.zeros((10, 32, 32), bool))


def test_dense_clusters_touching_somata_are_split_and_deblended():
    """Somata 1-1.5 diameters apart in clusters of 3-8 under a 4 µm axial blur: most are
    found, and deblending finds dim somata beside bright ones that the first pass misses."""
    p = CropParams(
        voxel_size_um=VS,
        density_per_mm3=10_000.0,
        soma_diameter_um=(12.0, 12.0),
        psf_sigma_um=(4.0, 1.5, 1.5),
        cluster_fraction=0.5,
        cluster_size=(3, 8),
        cluster_spacing_diameters=(1.0, 1.5),
    )
    crop = simulate_crop((40, 384, 384), params=p, seed=2)
    truth = crop.cells[["z_vox", "y_vox", "x_vox"]].to_numpy()
    nn = crop.cells["nn_distance_um"].to_numpy() / 12.0
    close = inner_mask(truth, crop.signal.shape, voxel_size_um=VS) & (nn >= 1) & (nn <= 1.5)
    assert close.sum() > 400
    recall = {}
    for deblend in (False, True):
        _, xyz, _ = _detect(
            crop, soma_diameter_um=12.0, psf_sigma_um=(4.0, 1.5, 1.5), deblend=deblend
        )
        found, _ = match_detections(xyz, truth, voxel_size_um=VS)
        recall[deblend] = found[close].mean()
        assert _score(crop, xyz)["precision"] >= 0.97, deblend
    # measured 0.977 (0.944 when a residual soma had to lie outside the found somata's
    # suppression box, not their sphere: diagonal neighbours 12-18 µm away were lost)
    assert recall[True] >= 0.95, recall
    assert recall[True] >= recall[False] + 0.05, recall  # measured 0.902 without
