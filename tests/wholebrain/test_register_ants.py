"""The antspyx engine (affine + SyN) of register_to_reference, on test_register's synthetic brains.

antspyx is an optional extra; the engine tests skip without it. The
conversion of ANTs' transform files into SimpleITK transforms is checked
against ANTs' own resampler, so a sign or axis-order slip cannot pass.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from test_register import ATLAS_RES_UM, atlas_reference, brain_cells, make_sample, make_truth
from test_register import mapping_error as _mapping_error

from ketamap.errors import ParameterError
from ketamap.wholebrain.register import (
    RegistrationParams,
    cells_to_atlas,
    load_registration,
    register_to_reference,
    save_registration,
    warp_labels_to_sample,
)

# ANTs reads its thread count once per process: every test here uses one thread.
PARAMS = RegistrationParams(engine="antspyx", n_threads=1)


def test_missing_antspyx_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "ants", None)  # makes `import ants` fail
    sample = np.ones((40, 40, 40), np.float32)
    with pytest.raises(ParameterError, match="antspyx") as info:
        register_to_reference(
            sample,
            sample,
            voxel_size_um=100,
            orientation="asr",
            atlas_resolution_um=100,
            params=PARAMS,
        )
    message = str(info.value)
    assert "\n" not in message and message.count(". ") == 0 and "ketamap[ants]" in message


def test_engine_is_validated():
    with pytest.raises(ParameterError, match="engine"):
        RegistrationParams(engine="elastix")


@pytest.fixture(scope="module")
def ants_case():
    pytest.importorskip("ants")
    reference, truth = atlas_reference(), make_truth()
    vs = (50.0, 40.0, 60.0)
    sample, _ = make_sample("psl", vs, truth, gradient=0.0)
    reg = register_to_reference(
        sample,
        reference,
        voxel_size_um=vs,
        orientation="psl",
        atlas_resolution_um=ATLAS_RES_UM,
        params=PARAMS,
    )
    return reg, sample, vs, reference, truth


def test_antspyx_recovers_cell_positions(ants_case):
    reg, sample, vs, _, truth = ants_case
    err = _mapping_error(reg, sample, "psl", vs, truth)
    # measured: median 0.52, p95 1.79 atlas voxels (SimpleITK: 0.33, 1.78)
    assert np.median(err) <= 1.0, np.median(err)
    assert np.percentile(err, 95) <= 2.0, np.percentile(err, 95)
    qc = reg.qc
    assert not qc["flagged"], qc
    assert qc["correlation_after"] > 0.99 and qc["dice_brain_mask"] > 0.95
    assert qc["fraction_folded"] == 0.0 and not qc["affine_mirrored"]
    assert 0.9 < min(qc["affine_scale"]) and max(qc["affine_scale"]) < 1.15


def test_antspyx_transform_matches_ants_resampler(ants_case, tmp_path):
    """Our SimpleITK composite == ANTs' own apply_transforms on coordinate ramps."""
    ants = pytest.importorskip("ants")
    import SimpleITK as sitk

    from ketamap.wholebrain.transforms import dense_atlas_vox, to_sitk

    reg, _, _, reference, _ = ants_case
    affine, warp = reg.sample_to_atlas.GetNthTransform(0), reg.sample_to_atlas.GetNthTransform(1)
    sitk.WriteTransform(affine, str(tmp_path / "affine.mat"))
    field = sitk.DisplacementFieldTransform(warp).GetDisplacementField()
    sitk.WriteImage(field, str(tmp_path / "warp.nii.gz"))
    shape = reg.prepared_shape_vox
    ours = dense_atlas_vox(reg.sample_to_atlas, shape, (ATLAS_RES_UM,) * 3, step=1)

    def as_ants(array):
        image = to_sitk(np.ascontiguousarray(array, dtype=np.float32), (ATLAS_RES_UM,) * 3)
        return ants.from_numpy(
            sitk.GetArrayFromImage(image).transpose(2, 1, 0).copy(), spacing=(ATLAS_RES_UM,) * 3
        )

    fixed = as_ants(np.zeros(shape))
    theirs = []
    for axis, n in enumerate(reference.shape):
        ramp = np.broadcast_to(
            np.arange(n, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)]),
            reference.shape,
        )
        warped = ants.apply_transforms(
            fixed,
            as_ants(ramp),
            [str(tmp_path / "warp.nii.gz"), str(tmp_path / "affine.mat")],
            interpolator="linear",
            defaultvalue=-1e4,
        )
        theirs.append(warped.numpy().transpose(2, 1, 0))
    theirs = np.stack(theirs)
    inside = np.all((theirs > 1) & (theirs < np.reshape(reference.shape, (3, 1, 1, 1)) - 2), axis=0)
    assert inside.mean() > 0.3
    assert np.abs(ours - theirs)[:, inside].max() < 1e-3
    # and the SyN part is not negligible, so the test could see a wrong warp
    affine_only = dense_atlas_vox(affine, shape, (ATLAS_RES_UM,) * 3, step=1)
    assert np.abs(ours - affine_only)[:, inside].max() > 0.5


def test_antspyx_save_load_and_labels(ants_case, tmp_path):
    reg, sample, _, reference, _ = ants_case
    again = load_registration(save_registration(reg, tmp_path / "reg"))
    cells = brain_cells(sample, 200)
    np.testing.assert_array_equal(cells_to_atlas(again, cells), cells_to_atlas(reg, cells))
    assert again.params.engine == "antspyx"
    labels = (reference > np.percentile(reference, 70)).astype(np.uint32) * 70000
    warped = warp_labels_to_sample(again, labels)
    assert warped.dtype == np.uint32 and set(np.unique(warped)) == {0, 70000}


def test_antspyx_one_thread_is_bit_reproducible(ants_case):
    _, _, _, reference, truth = ants_case
    vs = (100.0, 100.0, 100.0)
    sample, _ = make_sample("asr", vs, truth, seed=7)
    kwargs = dict(
        voxel_size_um=vs,
        orientation="asr",
        atlas_resolution_um=ATLAS_RES_UM,
        params=RegistrationParams(engine="antspyx", n_threads=1, syn_iterations=(20, 10, 0)),
    )
    a = register_to_reference(sample, reference, **kwargs)
    b = register_to_reference(sample, reference, **kwargs)
    cells = brain_cells(sample, 500)
    np.testing.assert_array_equal(cells_to_atlas(a, cells), cells_to_atlas(b, cells))


def test_antspyx_qc_flags_wrong_orientation(ants_case):
    _, _, _, reference, truth = ants_case
    vs = (100.0, 100.0, 100.0)
    sample, _ = make_sample("psl", vs, truth)
    # The sample is 'psl' but is declared 'ipl': axes 0 and 1 are swapped.
    reg = register_to_reference(
        sample,
        reference,
        voxel_size_um=vs,
        orientation="ipl",
        atlas_resolution_um=ATLAS_RES_UM,
        params=PARAMS,
    )
    assert reg.qc["flagged"], reg.qc


def test_cli_engine_option(run_cli, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ants", None)
    sample = tmp_path / "brain.tif"
    import tifffile

    tifffile.imwrite(sample, np.random.default_rng(0).integers(0, 1000, (40, 40, 40), np.uint16))
    common = [
        "register",
        sample,
        "--voxel-size",
        100,
        100,
        100,
        "--orientation",
        "asr",
        "--atlas",
        "phantom",
        "--out",
        tmp_path / "reg",
    ]
    assert run_cli(*common, "--engine", "antspyx") == 2
    assert 'pip install "ketamap[ants]"' in " ".join(capsys.readouterr().err.split())
    assert run_cli(*common, "--engine", "elastix") == 2
    assert "engine" in capsys.readouterr().err
    assert not (tmp_path / "reg").exists()
