"""The phantom atlas: real Allen regions, symmetric, plausible, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from ketamap.atlas import PHANTOM_REGIONS, Atlas, make_phantom
from ketamap.errors import AtlasError, ParameterError

# Real Allen CCFv3 ids and parents (structure_tree_safe_2017.csv).
REQUIRED = {
    "VTA": (749, "MBmot"),
    "SNc": (374, "MBsta"),
    "SNr": (381, "MBmot"),
    "ZI": (797, "LZ"),
    "DMH": (830, "PVR"),
    "MPN": (515, "MEZ"),
    "DR": (872, "RAmb"),
    "PVH": (38, "PVZ"),
    "ARH": (223, "PVZ"),
    "VMH": (693, "MEZ"),
    "LHA": (194, "LZ"),
    "CP": (672, "STRd"),
    "ACB": (56, "STRv"),
    "PL": (972, "Isocortex"),
    "ILA": (44, "Isocortex"),
    "ACA": (31, "Isocortex"),
    "ORB": (714, "Isocortex"),
    "MOs": (993, "MO"),
    "SSp": (322, "SS"),
    "VIS": (669, "Isocortex"),
    "AUD": (247, "Isocortex"),
    "HIP": (1080, "HPF"),
    "TH": (549, "IB"),
}
# Real CCFv3 2017 volumes, both hemispheres, mm³ (25 µm annotation).
REAL_SMALL_MM3 = {"DMH": 0.376, "MPN": 0.404, "ARH": 0.285, "PVH": 0.187, "DR": 0.154}


@pytest.fixture(scope="module")
def ph100() -> Atlas:
    return make_phantom(resolution_um=100)


@pytest.fixture(scope="module")
def ph50() -> Atlas:
    return make_phantom(resolution_um=50)


def _volumes(atlas):
    """Volume (both sides) of every region including its descendants, by acronym."""
    leaf = atlas.region_volumes_mm3().groupby("id", as_index=False)["volume_mm3"].sum()
    pairs = atlas.ontology.ancestor_pairs()
    per = leaf.merge(pairs, on="id").groupby("ancestor_id")["volume_mm3"].sum()
    return {atlas.ontology.acronym(i): v for i, v in per.items()}


def test_shape_orientation_dtypes(ph100, ph50):
    assert ph50.shape == (264, 160, 228)
    assert ph100.shape == (132, 80, 114)
    assert ph100.orientation == "asr" and ph100.resolution_um == (100.0, 100.0, 100.0)
    assert ph100.annotation.dtype == np.uint32
    assert ph100.hemispheres.dtype == np.uint8
    assert ph100.reference.dtype == np.float32 and ph100.reference.shape == ph100.shape


def test_required_regions_have_real_ids_and_parents(ph100):
    onto = ph100.ontology
    present = set(np.unique(ph100.annotation).tolist())
    for acr, (rid, parent) in REQUIRED.items():
        assert onto.lookup(acr) == rid, acr
        assert onto.acronym(onto.parent(rid)) == parent, acr
        assert onto.ancestors(rid)[0] == 997
        assert present & set(onto.descendants(rid, include_self=True)), f"{acr} has no voxel"
    assert set(REQUIRED) <= set(PHANTOM_REGIONS)
    labelled = {onto.acronym(i) for i in present if i}
    assert labelled == set(PHANTOM_REGIONS)
    # every labelled region is a leaf of the phantom ontology
    assert all(not onto.children(onto.lookup(a)) for a in labelled)
    assert onto.lookup("scwm") > 65535  # big ids flow through the phantom too


def test_hemispheres_are_symmetric_and_follow_asr(ph50):
    ann, hemi = ph50.annotation, ph50.hemispheres
    assert np.array_equal(ann, ann[:, :, ::-1])
    assert np.array_equal(ph50.reference, ph50.reference[:, :, ::-1])
    n2 = ph50.shape[2]
    assert (hemi[:, :, : n2 // 2] == 2).all()  # axis 2 starts at the right
    assert (hemi[:, :, n2 // 2 :] == 1).all()
    vol = ph50.region_volumes_mm3()
    sides = vol.pivot_table(index="id", columns="hemisphere", values="volume_mm3")
    np.testing.assert_allclose(sides[1], sides[2])


def test_anatomy_is_in_place(ph100):
    onto = ph100.ontology
    centroid = {}
    for acr in ("MOB", "CBX", "Isocortex", "HY", "CP", "TH", "MB", "HIP", "VTA", "PVH"):
        mask = np.isin(ph100.annotation, onto.descendants(onto.lookup(acr), include_self=True))
        centroid[acr] = np.argwhere(mask).mean(axis=0) * 100.0  # µm, (ap, dv, lr)
    ap = {k: v[0] for k, v in centroid.items()}
    dv = {k: v[1] for k, v in centroid.items()}
    assert ap["MOB"] < ap["CP"] < ap["TH"] < ap["MB"] < ap["CBX"]
    assert ap["HY"] < ap["VTA"]
    assert dv["Isocortex"] < dv["CP"] < dv["HY"]
    assert dv["HIP"] < dv["TH"] and ap["HIP"] > ap["CP"]
    assert abs(centroid["PVH"][2] - 5700) < 200  # on the midline


def test_volumes_are_plausible(ph50):
    vol = _volumes(ph50)
    for acr, real in REAL_SMALL_MM3.items():
        assert real / 2 <= vol[acr] <= real * 2, (acr, vol[acr], real)
    assert 400 < vol["root"] < 620  # real CCF brain: 506 mm³
    assert 15 < vol["CP"] < 40 and 100 < vol["Isocortex"] < 200
    labelled = set(np.unique(ph50.annotation).tolist()) - {0}
    assert labelled <= set(ph50.ontology.leaves())


def test_deterministic_given_seed(ph100):
    again = make_phantom(resolution_um=100, seed=0)
    assert np.array_equal(again.annotation, ph100.annotation)
    assert np.array_equal(again.reference, ph100.reference)
    other = make_phantom(resolution_um=100, seed=1)
    changed = (other.annotation != ph100.annotation).mean()
    assert 0 < changed < 0.25  # same anatomy, different boundary noise


def test_reference_has_tissue_contrast_and_texture(ph100):
    ref, ann, onto = ph100.reference, ph100.annotation, ph100.ontology

    def mean_of(acr):
        return ref[np.isin(ann, onto.descendants(onto.lookup(acr), include_self=True))].mean()

    assert ref[ann == 0].mean() < 0.2 * ref[ann > 0].mean()
    assert mean_of("VS") < mean_of("fiber tracts") < mean_of("Isocortex")
    assert mean_of("CBX") > mean_of("STR") + 0.1
    # not piecewise constant: intensities vary inside a single big region
    inside = ref[ann == onto.lookup("CP")]
    assert inside.std() > 0.01 * inside.mean()
    assert len(np.unique(inside)) > 100


def test_bad_parameters():
    with pytest.raises(ParameterError, match="between 20 and 400"):
        make_phantom(resolution_um=5)
    with pytest.raises(ParameterError, match="seed"):
        make_phantom(resolution_um=100, seed=-1)


def test_labels_at_and_volumes(ph100):
    onto = ph100.ontology
    idx = np.argwhere(ph100.annotation == onto.lookup("VTA"))[0]
    pts = np.array([idx + 0.3, [-1, 0, 0], [np.nan, 1, 1], [131.4, 79.4, 113.4]], dtype=float)
    labels, hemi = ph100.labels_at(pts)
    assert labels.dtype == np.uint32 and hemi.dtype == np.uint8
    assert labels[0] == 749 and hemi[0] in (1, 2)
    assert labels[1] == 0 and hemi[1] == 0 and labels[2] == 0 and hemi[2] == 0
    assert hemi[3] == 1
    empty = ph100.labels_at(np.zeros((0, 3)))
    assert empty[0].shape == (0,) and empty[0].dtype == np.uint32
    vol = ph100.region_volumes_mm3()
    assert list(vol.columns[:4]) == ["id", "acronym", "hemisphere", "volume_mm3"]
    assert vol.volume_mm3.sum() == pytest.approx((ph100.annotation > 0).sum() * 1e-3)


def test_atlas_validation(ph100):
    kw = dict(
        name="x",
        hemispheres=ph100.hemispheres,
        resolution_um=(100, 100, 100),
        orientation="asr",
        ontology=ph100.ontology,
    )
    with pytest.raises(AtlasError, match="integer labels"):
        Atlas(annotation=ph100.annotation.astype(float), **kw)
    with pytest.raises(AtlasError, match="hemispheres shape"):
        Atlas(annotation=ph100.annotation[:-1], **kw)
    with pytest.raises(AtlasError, match="orientation"):
        Atlas(annotation=ph100.annotation, **{**kw, "orientation": "aar"})
    with pytest.raises(AtlasError, match="positive"):
        Atlas(annotation=ph100.annotation, **{**kw, "resolution_um": (0, 1, 1)})
    with pytest.raises(AtlasError, match="float32 or uint16"):
        Atlas(annotation=ph100.annotation, reference=ph100.reference.astype(float), **kw)
    ok = Atlas(annotation=ph100.annotation.astype(np.int64), **kw)
    assert ok.annotation.dtype == np.uint32
    bad = ph100.annotation.copy()
    bad[0, 0, 0] = 3
    with pytest.raises(AtlasError, match="not in the ontology"):
        Atlas(annotation=bad, **kw).region_volumes_mm3()
