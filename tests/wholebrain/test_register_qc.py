"""Orientation codes and quality control: every code round-trips; bad input is flagged.

The round-trip tests check, for all 48 BrainGlobe orientation codes, that the
image path (``prepare_sample``) and the point path (``raw_to_prepared_vox``)
agree voxel for voxel, and that both agree with brainglobe-space's own point
mapping. The QC tests register simulated brains (phantom atlas, random pose
and deformation, light-sheet artefacts) declared with a wrong orientation code
or a voxel size off by 2x, and check that QC flags them while the correctly
declared brain passes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from brainglobe_space import AnatomicalSpace

from ketamap.errors import InputError
from ketamap.space import check_orientation
from ketamap.wholebrain.register import RegistrationParams, prepare_sample, register_to_reference
from ketamap.wholebrain.transforms import affine_summary, quality_control, raw_to_prepared_vox

PAIRS = ("ap", "si", "lr")
ALL_CODES = sorted(
    "".join(PAIRS[g][s] for g, s in zip(groups, signs, strict=True))
    for groups in itertools.permutations(range(3))
    for signs in itertools.product((0, 1), repeat=3)
)


def test_the_library_accepts_exactly_the_48_codes_and_reorients_each_differently():
    """Of the 216 three-letter strings over a/p/s/i/l/r, the library accepts exactly the 48
    codes (one letter from each pair), in either case, and refuses the others with one
    sentence; each accepted code reorients a raw cube by a different signed axis permutation,
    on the point path and on the image path alike."""
    accepted = []
    for letters in itertools.product("apsilr", repeat=3):
        code = "".join(letters)
        try:
            assert check_orientation(code.upper()) == code
        except InputError as e:
            assert str(e).endswith(".") and "\n" not in str(e)
        else:
            accepted.append(code)
    assert sorted(accepted) == ALL_CODES and len(ALL_CODES) == 48
    n = 4
    cube = np.arange(n**3, dtype=np.float32).reshape(n, n, n)
    corner_and_steps = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    maps, images = set(), set()
    for code in ALL_CODES:
        same = dict(voxel_size_um=25, orientation=code, atlas_orientation="asr")
        j = raw_to_prepared_vox(
            corner_and_steps, shape_vox=cube.shape, atlas_resolution_um=25, **same
        )
        steps = np.rint(j[1:] - j[0]).astype(int)
        np.testing.assert_allclose(j[1:] - j[0], steps, atol=1e-9)
        assert (np.abs(steps).sum(axis=0) == 1).all() and (np.abs(steps).sum(axis=1) == 1).all()
        maps.add((tuple(steps.ravel()), tuple(np.rint(j[0]).astype(int))))
        prepared = prepare_sample(cube, atlas_resolution_um=25, **same)
        assert sorted(prepared.ravel()) == sorted(cube.ravel())  # a pure reorientation
        images.add(prepared.tobytes())
    assert len(maps) == len(images) == 48
    for bad in ("aas", "xyz", "as", "asrl", "a s", 3, None):
        with pytest.raises(InputError):
            check_orientation(bad)
        with pytest.raises(InputError, match="orientation"):
            prepare_sample(
                cube, voxel_size_um=25, orientation=bad, atlas_orientation="asr",
                atlas_resolution_um=25,
            )  # fmt: skip


def _raw_shape(code: str, atlas_shape=(6, 7, 8)) -> tuple[int, int, int]:
    """Raw shape whose reoriented shape is ``atlas_shape`` in asr (distinct sizes per axis)."""
    group = {c: g for g, pair in enumerate(PAIRS) for c in pair}
    return tuple(atlas_shape[group[c]] for c in code)


@pytest.mark.parametrize("code", ALL_CODES)
def test_every_code_round_trips_voxel_for_voxel(code):
    """Same voxel size: the prepared image is a pure reorientation; points land on their value."""
    shape = _raw_shape(code)
    raw = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    prepared = prepare_sample(
        raw, voxel_size_um=25, orientation=code, atlas_orientation="asr", atlas_resolution_um=25
    )
    assert prepared.shape == (6, 7, 8)
    points = np.argwhere(np.ones(shape, bool)).astype(float)
    j = raw_to_prepared_vox(
        points,
        shape_vox=shape,
        voxel_size_um=25,
        orientation=code,
        atlas_orientation="asr",
        atlas_resolution_um=25,
    )
    np.testing.assert_allclose(j, np.rint(j), atol=1e-9)
    ji = np.rint(j).astype(int)
    np.testing.assert_array_equal(prepared[tuple(ji.T)], raw.ravel())
    # and the point path is brainglobe-space's, taken at voxel centres
    bg = AnatomicalSpace(code, shape=shape).map_points_to("asr", points + 0.5) - 0.5
    np.testing.assert_allclose(j, bg, atol=1e-9)


@pytest.mark.parametrize("code", ALL_CODES)
def test_every_code_round_trips_with_anisotropic_downsampling(code):
    """A bright block of one prepared voxel is found where its raw centre is mapped."""
    factors = np.array([2, 3, 4])  # per atlas axis: atlas resolution / raw voxel size
    group = {c: g for g, pair in enumerate(PAIRS) for c in pair}
    raw_factors = np.array([factors[group[c]] for c in code])
    res = 60.0
    vs = res / raw_factors
    prepared_shape = np.array([5, 6, 7])
    shape = tuple(int(prepared_shape[group[c]] * f) for c, f in zip(code, raw_factors, strict=True))
    raw = np.zeros(shape, np.float32)
    rng = np.random.default_rng(ALL_CODES.index(code))
    start = np.array(
        [rng.integers(1, shape[a] // raw_factors[a] - 1) * raw_factors[a] for a in range(3)]
    )
    raw[tuple(slice(s, s + f) for s, f in zip(start, raw_factors, strict=True))] = 1000.0
    prepared = prepare_sample(
        raw, voxel_size_um=vs, orientation=code, atlas_orientation="asr", atlas_resolution_um=res
    )
    assert prepared.shape == tuple(prepared_shape)
    peak = np.unravel_index(np.argmax(prepared), prepared.shape)
    centre = start + (raw_factors - 1) / 2.0
    j = raw_to_prepared_vox(
        centre[None],
        shape_vox=shape,
        voxel_size_um=vs,
        orientation=code,
        atlas_orientation="asr",
        atlas_resolution_um=res,
    )[0]
    np.testing.assert_allclose(j, peak, atol=1e-9)


def test_affine_summary_reads_scale_rotation_and_mirror():
    scaled = sitk.AffineTransform(3)
    scaled.SetMatrix([2.0, 0, 0, 0, 0.5, 0, 0, 0, 1.0])
    scales, angle, mirrored = affine_summary(scaled, (1000.0, 2000.0, 3000.0))
    np.testing.assert_allclose(scales, [2.0, 1.0, 0.5], atol=1e-9)
    assert angle == pytest.approx(0.0, abs=1e-6) and not mirrored
    turned = sitk.AffineTransform(3)
    turned.SetMatrix([0, -1.0, 0, 1.0, 0, 0, 0, 0, 1.0])  # 90 degrees about z
    assert affine_summary(turned, (0.0, 0.0, 0.0))[1] == pytest.approx(90.0, abs=1e-6)
    flipped = sitk.AffineTransform(3)
    flipped.SetMatrix([-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0])
    assert affine_summary(flipped, (0.0, 0.0, 0.0))[2]


def test_quality_control_flags_implausible_affine_even_when_images_match():
    """Perfectly matching images but a 2x affine scale: flagged, with a voxel-size hint."""
    z, y, x = np.mgrid[:40, :30, :36]
    image = np.exp(-(((z - 20) / 12.0) ** 2 + ((y - 15) / 9.0) ** 2 + ((x - 18) / 11.0) ** 2))
    image = image.astype(np.float32)
    brain = image > 0.3
    identity = sitk.AffineTransform(3)
    params = RegistrationParams()
    good = quality_control(
        image, brain, image, identity, identity, brain, (100.0,) * 3, params, affine=identity
    )
    assert not good["flagged"], good
    assert good["affine_scale"] == [1.0, 1.0, 1.0] and good["affine_rotation_deg"] == 0.0
    doubled = sitk.AffineTransform(3)
    doubled.SetMatrix([2.0, 0, 0, 0, 2.0, 0, 0, 0, 2.0])
    bad = quality_control(
        image, brain, image, identity, identity, brain, (100.0,) * 3, params, affine=doubled
    )
    assert bad["flagged"] and any("voxel size" in r for r in bad["reasons"]), bad


# --------------------------------------------------------------------------- simulated brains


@pytest.fixture(scope="module")
def simulated():
    from ketamap.atlas import make_phantom
    from ketamap.simulate import BrainParams, simulate_brain

    atlas = make_phantom(resolution_um=100.0)
    brain = simulate_brain(
        atlas,
        fold_changes={},
        densities={},
        default_density=1.0,
        params=BrainParams(voxel_size_um=(100.0, 80.0, 80.0), orientation="psl"),
        seed=3,
    )
    return atlas, brain


def _register(simulated, *, orientation="psl", scale=1.0):
    atlas, brain = simulated
    return register_to_reference(
        brain.background,
        atlas.reference,
        voxel_size_um=tuple(scale * v for v in brain.voxel_size_um),
        orientation=orientation,
        atlas_resolution_um=atlas.resolution_um,
        atlas_orientation=atlas.orientation,
        atlas_labels=atlas.annotation,
    )


def test_correct_declaration_is_not_flagged(simulated):
    qc = _register(simulated).qc
    assert not qc["flagged"], qc
    assert qc["correlation_after"] > 0.8 and qc["dice_brain_mask"] > 0.9
    assert max(qc["affine_scale"]) < 1.15 and min(qc["affine_scale"]) > 0.85
    assert qc["affine_rotation_deg"] < 20


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param("asl", id="a/p swapped"),
        pytest.param("pil", id="s/i swapped", marks=pytest.mark.slow),
        pytest.param("lsp", id="axes permuted", marks=pytest.mark.slow),
    ],
)
def test_wrong_orientation_code_is_flagged(simulated, wrong):
    qc = _register(simulated, orientation=wrong).qc
    assert qc["flagged"] and qc["reasons"], qc


@pytest.mark.parametrize(
    "scale",
    [
        pytest.param(2.0, id="voxel size 2x", marks=pytest.mark.slow),  # 8x more voxels: ~45 s
        pytest.param(0.5, id="voxel size half"),
    ],
)
def test_voxel_size_off_by_two_is_flagged(simulated, scale):
    qc = _register(simulated, scale=scale).qc
    assert qc["flagged"] and qc["reasons"], qc


def test_checkerboard_png():
    from ketamap.report.qc import registration_checkerboard_png

    rng = np.random.default_rng(0)
    a = rng.random((20, 16, 18)).astype(np.float32)
    png = registration_checkerboard_png(a, a + 1, title="s1")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    with pytest.raises(ValueError, match="same shape"):
        registration_checkerboard_png(a, a[:-1])


@pytest.mark.parametrize("code", ["aas", "xyz", "ps"])
def test_mapping_points_refuses_an_invalid_orientation_in_one_sentence(code):
    with pytest.raises(InputError, match="orientation"):
        raw_to_prepared_vox(np.zeros((1, 3)), shape_vox=(4, 5, 6), voxel_size_um=(10, 10, 10),
                            orientation=code, atlas_orientation="asr",
                            atlas_resolution_um=(25, 25, 25))  # fmt: skip
