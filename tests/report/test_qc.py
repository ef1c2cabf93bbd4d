"""QC images of a registration: boundaries at a coarse hierarchy level, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest

from ketamap.atlas import make_phantom
from ketamap.report.qc import QC_BOUNDARY_LEVEL, coarse_labels, registration_overlay_png


@pytest.fixture(scope="module")
def atlas():
    return make_phantom(resolution_um=100)


def _boundary_pixels(png: bytes) -> int:
    """Pixels drawn in the overlay's boundary colour (pure red)."""
    import matplotlib.image as mpimg

    rgb = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    return int(((rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.2) & (rgb[..., 2] < 0.2)).sum())


def test_overlay_draws_coarse_boundaries_not_every_leaf(atlas):
    """The warped annotation has one label per leaf region; rolled up to the major
    divisions the overlay draws far fewer boundaries, and still draws some."""
    ann = atlas.annotation
    sample = atlas.reference if atlas.reference is not None else (ann > 0).astype(np.float32)
    onto = atlas.ontology
    coarse = coarse_labels(ann, onto)
    n_leaf, n_coarse = len(np.unique(ann)), len(np.unique(coarse))
    assert n_coarse < n_leaf / 2  # the premise: the rollup merges most leaves
    leaves = _boundary_pixels(registration_overlay_png(sample, ann, title="s1"))
    rolled = _boundary_pixels(registration_overlay_png(sample, ann, ontology=onto, title="s1"))
    assert 0 < rolled < 0.7 * leaves, (rolled, leaves)
    # the same as drawing the rolled-up labels directly: the roll-up is what is drawn
    direct = _boundary_pixels(registration_overlay_png(sample, coarse, title="s1"))
    assert abs(direct - rolled) <= 0.02 * rolled
    # a coarser level draws fewer boundaries still
    level2 = _boundary_pixels(
        registration_overlay_png(sample, ann, ontology=onto, level=2, title="s1")
    )
    assert level2 < rolled


def test_overlay_is_large_enough_to_read(atlas):
    import matplotlib.image as mpimg

    ann = atlas.annotation
    png = registration_overlay_png((ann > 0).astype(np.float32), ann, ontology=atlas.ontology)
    assert png.startswith(b"\x89PNG")
    assert mpimg.imread(io.BytesIO(png), format="png").shape[:2] == (500, 1500)


def test_overlay_rejects_mismatched_shapes_in_one_sentence(atlas):
    ann = atlas.annotation
    with pytest.raises(ValueError, match=r"must be 3-D images of the same shape\.$"):
        registration_overlay_png(np.zeros(ann.shape[:2]), ann[..., 0])
    with pytest.raises(ValueError, match="same shape"):
        registration_overlay_png(np.zeros(ann.shape), ann[:-1])


def test_coarse_labels_roll_up_and_absorb_white_matter(atlas):
    """Grey matter at the level asked; fibre tracts and ventricles take the label of the
    nearest other region, so no voxel inside the brain keeps a white-matter label."""
    onto, ann = atlas.ontology, atlas.annotation
    out = coarse_labels(ann, onto, level=QC_BOUNDARY_LEVEL)
    assert out.shape == ann.shape
    np.testing.assert_array_equal(out > 0, ann > 0)  # the brain outline is kept
    white = [d for a in ("fiber tracts", "VS")
             for d in onto.descendants(onto.lookup(a), include_self=True)]  # fmt: skip
    assert np.isin(ann, white).any() and not np.isin(out, white).any()
    grey = (ann > 0) & ~np.isin(ann, white)
    np.testing.assert_array_equal(out[grey], onto.rollup(ann, QC_BOUNDARY_LEVEL)[grey])
    assert max(onto.depth(int(r)) for r in np.unique(out[out > 0])) <= QC_BOUNDARY_LEVEL
    # nothing absorbed: the plain roll-up
    np.testing.assert_array_equal(
        coarse_labels(ann, onto, level=3, absorbed=()), onto.rollup(ann, 3)
    )
