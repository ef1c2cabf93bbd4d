"""Voxel maps of weighted points (fibre length) through the cells' maps and FWE test."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ketamap.atlas import make_phantom
from ketamap.errors import InputError
from ketamap.io.volumes import open_volume
from ketamap.stats.voxel_maps import map_points, write_voxel_maps
from ketamap.stats.voxels import VoxelParams


@pytest.fixture(scope="module")
def atlas():
    return make_phantom(resolution_um=200)


def _fibre_map(atlas, rng, *, planted: float) -> np.ndarray:
    """A length density on the atlas grid (mm/mm³): 300 in the brain, ``planted`` x in a block."""
    inside = atlas.annotation > 0
    d = np.where(inside, rng.gamma(20.0, 300.0 / 20.0, atlas.shape), 0.0)
    block = (slice(25, 37), slice(12, 22), slice(14, 26))
    d[block] *= np.where(inside[block], planted, 1.0)
    return d.astype(np.float32)


def test_fibre_length_maps_reuse_the_cells_maps_and_test(atlas, tmp_path):
    rng = np.random.default_rng(0)
    groups = ["saline"] * 4 + ["ket"] * 4
    maps = [_fibre_map(atlas, rng, planted=2.0 if g == "ket" else 1.0) for g in groups]
    points = [map_points(m, atlas.annotation, atlas.resolution_um) for m in maps]
    # each voxel's length (mm) is its density times its volume
    voxel_mm3 = 0.2**3
    assert points[0]["length_mm"].sum() == pytest.approx(maps[0].sum() * voxel_mm3, rel=1e-5)
    assert (points[0]["region_id"] > 0).all()
    params = VoxelParams(resolution_um=400.0, radius_um=300.0, n_permutations=100)
    found = write_voxel_maps(points, groups, "saline", atlas, params, tmp_path,
                             weight="length_mm", prefix="fibre_")  # fmt: skip
    folder = tmp_path / "fibre_voxel_maps"
    assert not (tmp_path / "voxel_maps").exists()  # the cells' maps are not touched
    for name in ("mask", "mean_density_saline", "mean_density_ket", "t_ket_vs_saline",
                 "p_fwe_ket_vs_saline", "log2_fold_change_ket_vs_saline"):  # fmt: skip
        assert (folder / f"{name}.ome.zarr").is_dir() and (folder / f"{name}.nii.gz").is_file()
    # the smoothed mean is the length density, in mm/mm³, deep in the brain
    mean = np.asarray(open_volume(folder / "mean_density_saline.ome.zarr").compute())
    assert np.median(mean[14:18, 8:12, 10:18]) == pytest.approx(300.0, rel=0.1)
    # the doubled block is found, with the cells' test
    (contrast,) = found["contrasts"]
    assert contrast["exact"] and contrast["n_permutations"] == 70
    clusters = pd.read_parquet(tmp_path / "fibre_voxel_clusters.parquet")
    called = clusters[clusters["p_fwe"] < 0.05]
    assert len(called) and set(called["sign"]) == {"increase"}
    peak = called.iloc[0][["peak_z_vox", "peak_y_vox", "peak_x_vox"]].to_numpy(int) * 2
    assert 23 <= peak[0] <= 38 and 10 <= peak[1] <= 23 and 12 <= peak[2] <= 27
    json.dumps(found)  # recorded in provenance as it is
    # the report reads them with the cells' reader: mean maps per group, t maps, clusters
    from ketamap.report.census import _voxel_sections
    from ketamap.report.figures import figure_bytes

    figures, tables = _voxel_sections(tmp_path, "fibre_", orientation=atlas.orientation,
                                      alpha=0.05, caption="t", title="clusters",
                                      means_caption="means")  # fmt: skip
    assert [f[0] for f in figures] == ["fibre_voxel_means", "fibre_voxel_t_maps"]
    assert len(figures[0][1].axes) >= 2 * 5  # a row of slices per group
    assert figure_bytes(figures[0][1]).startswith(b"\x89PNG")
    assert tables[0]["title"] == "clusters" and len(tables[0]["frame"]) == len(called)


def test_map_points_reads_a_few_planes_at_a_time_and_checks_the_grid(atlas):
    import dask.array as da

    d = np.zeros(atlas.shape, np.float32)
    d[10, 20, 30] = 500.0
    d[50, 5, 7] = 100.0
    lazy = da.from_array(d, chunks=(7, 40, 57))
    table = map_points(lazy, atlas.annotation, atlas.resolution_um)
    assert table[["atlas_z_vox", "atlas_y_vox", "atlas_x_vox"]].to_numpy().tolist() == [
        [10, 20, 30],
        [50, 5, 7],
    ]
    assert table["length_mm"].tolist() == pytest.approx([500 * 0.008, 100 * 0.008])
    assert table["region_id"].tolist() == [int(atlas.annotation[10, 20, 30]),
                                           int(atlas.annotation[50, 5, 7])]  # fmt: skip
    with pytest.raises(InputError, match="another atlas"):
        map_points(d[:-1], atlas.annotation, atlas.resolution_um)


def test_a_peak_at_the_brain_surface_is_named_after_the_region_filling_its_block():
    """A map voxel half brain whose centre atlas voxel lies outside the brain (label 0)."""
    from ketamap.stats.voxel_maps import _block_regions

    annotation = np.zeros((2, 2, 4), np.int64)
    annotation[0, :, :2] = 7  # the first block (factor 2): one plane of region 7 ...
    annotation[0, 0, 0] = 9  # ... and one voxel of region 9; the second block is void
    assert annotation[1, 1, 1] == 0  # the atlas voxel at the first block's centre
    peaks = np.array([[0, 0, 0], [0, 0, 1]])
    assert _block_regions(annotation, peaks, (2, 2, 2)).tolist() == [7, 0]
