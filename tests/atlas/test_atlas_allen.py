"""Allen CCFv3 2017 files: orientation, hemispheres, resampling, reference checks."""

from __future__ import annotations

import numpy as np
import pytest

from ketamap.atlas import load_allen, make_phantom
from ketamap.atlas.allen import read_volume
from ketamap.errors import InputError, ParameterError

pytestmark = pytest.mark.shared_data

ANN = "ABA_25um_2017_annotation.tif.lzma"
HEMI = "ABA_25um_2017_hemispheres.tif.lzma"
CSV = "structure_tree_safe_2017.csv"


@pytest.fixture(scope="module")
def allen_dir(request):
    return request.getfixturevalue("shared_data") / "allen_ccf_2017"


@pytest.fixture(scope="module")
def allen(allen_dir):
    """One list of the 25, 50 and 100 µm atlases (each file decompressed once per load)."""
    return {
        res: load_allen(
            allen_dir / ANN, allen_dir / CSV, hemispheres_path=allen_dir / HEMI, resolution_um=res
        )
        for res in (25, 50, 100)
    }


def _mask(atlas, acr):
    onto = atlas.ontology
    return np.isin(atlas.annotation, onto.descendants(onto.lookup(acr), include_self=True))


def test_shape_dtype_and_transposition(allen, allen_dir):
    a = allen[25]
    assert a.shape == (528, 320, 456) and a.orientation == "asr"
    assert a.annotation.dtype == np.uint32 and a.resolution_um == (25.0, 25.0, 25.0)
    raw = read_volume(allen_dir / ANN)
    assert raw.shape == (456, 528, 320)
    assert np.array_equal(a.annotation, raw.transpose(1, 2, 0))
    assert len(a.ontology) == 1327
    big = [i for i in np.unique(a.annotation[::4, ::4, ::4]) if i > 65535]
    assert big, "ids above 65535 must survive loading"
    assert allen[50].shape == (264, 160, 228) and allen[100].shape == (132, 80, 114)


def test_axes_are_anterior_superior_right(allen):
    a = allen[100]
    ap = {k: np.argwhere(_mask(a, k))[:, 0].mean() for k in ("MOB", "CP", "TH", "CB")}
    assert ap["MOB"] < ap["CP"] < ap["TH"] < ap["CB"]  # axis 0: anterior -> posterior
    dv = {k: np.argwhere(_mask(a, k))[:, 1].mean() for k in ("Isocortex", "HY")}
    assert dv["Isocortex"] < dv["HY"]  # axis 1: superior -> inferior


def test_hemispheres_follow_brainglobe(allen, allen_dir):
    for a in allen.values():
        n2 = a.shape[2]
        assert set(np.unique(a.hemispheres).tolist()) == {1, 2}
        # asr: axis 2 starts at the right (2); BrainGlobe's own rule for symmetric
        # atlases puts index >= round(n2 / 2) in the left hemisphere (1).
        assert (a.hemispheres[:, :, : round(n2 / 2)] == 2).all()
        assert (a.hemispheres[:, :, round(n2 / 2) :] == 1).all()
    raw = read_volume(allen_dir / HEMI).transpose(1, 2, 0)
    assert np.array_equal(raw == 255, allen[25].hemispheres == 2)  # 255 marks the right


def _volumes(atlas):
    """Volume (mm³, both sides) of every region with its descendants, by acronym."""
    leaf = atlas.region_volumes_mm3().groupby("id", as_index=False)["volume_mm3"].sum()
    per = leaf.merge(atlas.ontology.ancestor_pairs(), on="id")
    per = per.groupby("ancestor_id")["volume_mm3"].sum()
    return {atlas.ontology.acronym(i): v for i, v in per.items()}


@pytest.fixture(scope="module")
def volumes(allen):
    return {res: _volumes(a) for res, a in allen.items()}


def test_resampling_keeps_volumes(volumes):
    full = volumes[25]
    assert full["root"] == pytest.approx(506.05, rel=1e-3)
    for res in (50, 100):
        assert volumes[res]["root"] == pytest.approx(full["root"], rel=0.02)
        for acr in ("CP", "TH", "HY", "CB", "Isocortex", "MB"):
            assert volumes[res][acr] == pytest.approx(full[acr], rel=0.05), acr


def test_phantom_small_regions_match_real_volumes(volumes):
    real = volumes[25]
    phantom = _volumes(make_phantom(resolution_um=100))
    for acr in ("DMH", "MPN", "ARH", "PVH", "DR", "VTA", "SNc"):
        assert real[acr] / 2 <= phantom[acr] <= 2 * real[acr], (acr, phantom[acr], real[acr])


def test_reference_must_match(allen_dir, shared_data):
    ref = shared_data / "brainreg_brain" / "brain_in_ccf_100um.tiff"
    a = load_allen(allen_dir / ANN, allen_dir / CSV, reference_path=ref, resolution_um=100)
    assert a.reference.shape == a.shape == (132, 80, 114)
    assert a.reference.dtype in (np.uint16, np.float32)
    assert (a.hemispheres[:, :, :57] == 2).all()  # symmetric split without the file
    with pytest.raises(InputError, match=r"\(132, 80, 114\).*\(264, 160, 228\)"):
        load_allen(allen_dir / ANN, allen_dir / CSV, reference_path=ref, resolution_um=50)


def test_bad_resolution_and_missing_file(allen_dir, tmp_path):
    with pytest.raises(ParameterError, match="25, 50 or 100"):
        load_allen(allen_dir / ANN, allen_dir / CSV, resolution_um=30)
    with pytest.raises(Exception, match="does not exist"):
        load_allen(tmp_path / ANN, allen_dir / CSV)
