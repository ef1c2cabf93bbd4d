"""Malformed inputs: each gets one clear sentence, exit status 2, and nothing is written."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile


def planes(folder, n=4, shape=(16, 16), dtype=np.uint16):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        tifffile.imwrite(folder / f"plane_{i:03d}.tif", rng.integers(0, 100, shape).astype(dtype))
    return folder


def case_corrupt_tiff(tmp):
    f = planes(tmp / "in")
    (f / "plane_001.tif").write_bytes(b"not a tiff at all" * 10)
    return f


def case_truncated_tiff(tmp):
    f = planes(tmp / "in", shape=(64, 64))
    p = f / "plane_002.tif"
    p.write_bytes(p.read_bytes()[:200])
    return f


def case_planes_of_different_shapes(tmp):
    f = planes(tmp / "in")
    tifffile.imwrite(f / "plane_002.tif", np.zeros((16, 17), np.uint16))
    return f


def case_planes_of_different_dtypes(tmp):
    f = planes(tmp / "in")
    tifffile.imwrite(f / "plane_002.tif", np.zeros((16, 16), np.uint8))
    return f


def case_missing_plane(tmp):
    f = planes(tmp / "in", n=5)
    (f / "plane_002.tif").unlink()
    return f


def case_empty_folder(tmp):
    (tmp / "in").mkdir()
    return tmp / "in"


def case_folder_without_tiffs(tmp):
    (tmp / "in").mkdir()
    (tmp / "in" / "notes.txt").write_text("hello")
    return tmp / "in"


def case_missing_path(tmp):
    return tmp / "does_not_exist"


def case_unknown_format(tmp):
    p = tmp / "volume.xyz"
    p.write_text("??")
    return p


def case_garbage_npy(tmp):
    p = tmp / "volume.npy"
    p.write_bytes(b"\x93NUMPY garbage")
    return p


def case_four_dimensional(tmp):
    p = tmp / "volume.npy"
    np.save(p, np.zeros((2, 3, 4, 5), np.uint16))
    return p


def case_zero_size(tmp):
    p = tmp / "volume.npy"
    np.save(p, np.zeros((0, 8, 8), np.uint16))
    return p


def case_nan(tmp):
    p = tmp / "volume.npy"
    a = np.ones((8, 16, 16), np.float32)
    a[3, 4, 5] = np.nan
    np.save(p, a)
    return p


def case_inf(tmp):
    p = tmp / "volume.npy"
    a = np.ones((8, 16, 16), np.float32)
    a[1, 1, 1] = np.inf
    np.save(p, a)
    return p


def case_complex_dtype(tmp):
    p = tmp / "volume.npy"
    np.save(p, np.ones((4, 8, 8), np.complex64))
    return p


def case_corrupt_zarr(tmp):
    z = tmp / "volume.zarr"
    z.mkdir()
    (z / ".zattrs").write_text("{ not json")
    return z


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_volume_for_detect(name, tmp_path, run_cli, capsys):
    path = CASES[name](tmp_path)
    out = tmp_path / "out"
    code = run_cli("detect", path, "--voxel-size", 5, 2, 2, "--out", out)
    err = capsys.readouterr().err
    assert code == 2, (name, err)
    one = " ".join(err.split())
    assert one.startswith("error:") and "Traceback" not in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".out")]


@pytest.mark.parametrize("voxel", [(0, 2, 2), (-5, 2, 2), (5, float("nan"), 2), (5, 2, 1e9)])
def test_absurd_voxel_sizes(voxel, tmp_path, run_cli, capsys):
    path = planes(tmp_path / "in")
    code = run_cli("detect", path, "--voxel-size", *voxel, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:"), err
    assert not (tmp_path / "out").exists()


def test_voxel_size_in_millimetres_is_caught_before_any_allocation(tmp_path, run_cli, capsys):
    """0.005 mm given for 5 µm: detect and validate say so in one sentence, before compute."""
    import resource

    path = planes(tmp_path / "in")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = run_cli("detect", path, "--voxel-size", 0.005, 0.002, 0.002, "--out", tmp_path / "o")
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert code == 2 and "did you give millimetres? In µm that is (5, 2, 2)" in err, err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB
    assert not (tmp_path / "o").exists()
    study = tmp_path / "study"
    study.mkdir()
    tifffile.imwrite(study / "m1.tif", np.zeros((5, 16, 16), np.uint16), photometric="minisblack")
    (study / "study.toml").write_text(
        '[study]\nname = "s"\n[imaging]\nvoxel_size_um = [0.005, 0.002, 0.002]\n'
        'orientation = "psl"\n[[groups]]\nname = "a"\ndose_mg_per_kg = 0\n'
        '[[subjects]]\nid = "m1"\ngroup = "a"\nsignal = "m1.tif"\n'
    )
    assert run_cli("validate", study / "study.toml") == 2
    assert "did you give millimetres?" in " ".join(capsys.readouterr().err.split())


def test_mismatched_background(tmp_path, run_cli, capsys):
    sig = planes(tmp_path / "sig", shape=(16, 16))
    bg = planes(tmp_path / "bg", shape=(16, 20))
    code = run_cli(
        "detect", sig, "--background", bg, "--voxel-size", 5, 2, 2, "--out", tmp_path / "out"
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:"), err


def test_invalid_orientation_for_register(tmp_path, run_cli, capsys):
    path = planes(tmp_path / "in")
    code = run_cli(
        "register",
        path,
        "--voxel-size",
        50,
        40,
        40,
        "--orientation",
        "xyz",
        "--atlas",
        "phantom:100",
        "--out",
        tmp_path / "out",
    )
    err = capsys.readouterr().err
    assert code == 2 and "orientation" in err, err
    assert not (tmp_path / "out").exists()


def test_unicode_paths_work(tmp_path, run_cli, capsys):
    path = planes(tmp_path / "données μ-cerveau", n=6, shape=(32, 32))
    out = tmp_path / "résultats"
    assert run_cli("detect", path, "--voxel-size", 5, 2, 2, "--out", out) == 0
    assert (out / "cells.csv").exists()


def test_manifest_path_escaping_the_study_folder(tmp_path):
    from ketamap.errors import ManifestError
    from ketamap.manifest import load_study

    (tmp_path / "outside.tif").write_bytes(b"")
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.toml").write_text(
        '[study]\nname = "s"\n[imaging]\nvoxel_size_um = [5, 2, 2]\norientation = "psl"\n'
        '[[groups]]\nname = "a"\ndose_mg_per_kg = 0\n'
        '[[subjects]]\nid = "m1"\ngroup = "a"\nsignal = "../outside.tif"\n'
    )
    with pytest.raises(ManifestError, match="outside the study folder"):
        load_study(study / "study.toml")


def test_bad_classifier_file_fails_before_detection(tmp_path, run_cli, capsys):
    path = planes(tmp_path / "in")
    bad = tmp_path / "model.json"
    bad.write_text("{ not json")
    code = run_cli(
        "detect", path, "--voxel-size", 5, 2, 2, "--classifier", bad, "--out", tmp_path / "out"
    )
    err = capsys.readouterr().err
    assert code == 2 and "not JSON" in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- Imaris and NIfTI


def _ims(path, data, size=None):
    import h5py

    def chars(v):
        return np.array([c.encode() for c in str(v)], dtype="S1")

    with h5py.File(path, "w") as f:
        info = f.create_group("DataSetInfo/Image")
        for axis, n, i in zip("ZYX", size or data.shape, (2, 1, 0), strict=True):
            info.attrs[f"ImageSize{axis}"] = chars(n)
            info.attrs[f"ExtMin{i}"] = chars(0)
            info.attrs[f"ExtMax{i}"] = chars(n * 2)
        if data is not None:
            f.create_dataset("DataSet/ResolutionLevel 0/TimePoint 0/Channel 0/Data", data=data)
    return path


def _nii(path, data):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine=np.eye(4)), str(path))
    return path


def fmt_ims_not_hdf5(tmp):
    (tmp / "a.ims").write_bytes(b"\x89HDF garbage")
    return tmp / "a.ims"


def fmt_ims_without_channels(tmp):
    return _ims(tmp / "a.ims", None, size=(4, 8, 8))


def fmt_ims_size_beyond_data(tmp):
    return _ims(tmp / "a.ims", np.zeros((4, 8, 8), np.uint16), size=(4, 8, 80))


def fmt_nii_gz_corrupt(tmp):
    (tmp / "a.nii.gz").write_bytes(b"\x1f\x8b\x08 broken")
    return tmp / "a.nii.gz"


def fmt_nii_truncated(tmp):
    p = _nii(tmp / "a.nii", np.ones((32, 32, 8), np.uint16))
    p.write_bytes(p.read_bytes()[:1000])
    return p


def fmt_nii_time_series(tmp):
    return _nii(tmp / "a.nii", np.ones((8, 8, 4, 3), np.uint16))


def fmt_nii_nan(tmp):
    return _nii(tmp / "a.nii", np.full((16, 16, 8), np.nan, np.float32))


FORMAT_CASES = {n[4:]: fn for n, fn in globals().items() if n.startswith("fmt_")}


@pytest.mark.parametrize("name", sorted(FORMAT_CASES))
def test_bad_imaris_or_nifti_for_detect(name, tmp_path, run_cli, capsys):
    path = FORMAT_CASES[name](tmp_path)
    out = tmp_path / "out"
    code = run_cli("detect", path, "--voxel-size", 5, 2, 2, "--out", out)
    err = capsys.readouterr().err
    assert code == 2, (name, err)
    assert err.startswith("error:") and "Traceback" not in err, err
    assert not out.exists() and not [p for p in tmp_path.rglob(".out*")]


def _misuse_cases(tmp):
    """Command lines a newcomer gets wrong; each must be one sentence and exit 2."""
    vol = planes(tmp / "in")
    (tmp / "cells.csv").write_text("a,b\n1,2\n")
    (tmp / "notes.toml").write_text("this is not toml\n")
    vs = ("--voxel-size", 5, 2, 2)
    return {
        "soma diameter 0": ("detect", vol, *vs, "--soma-diameter", 0, "--out", tmp / "o"),
        "soma diameter NaN": ("detect", vol, *vs, "--soma-diameter", "nan", "--out", tmp / "o"),
        "classifier file missing": (
            "detect",
            vol,
            *vs,
            "--classifier",
            tmp / "no.json",
            "--out",
            tmp / "o",
        ),  # fmt: skip
        "train: non-cells nearer than the tolerance": (
            "detect",
            "train",
            vol,
            *vs,
            "--cells",
            tmp / "cells.csv",
            "--non-cells-beyond",
            5,
            "--out",
            tmp / "m.json",
        ),  # fmt: skip
        "quantify: not a registration folder": (
            "quantify",
            "--cells",
            tmp / "cells.csv",
            "--registration",
            tmp,
            "--atlas",
            "phantom:200",
            "--out",
            tmp / "q",
        ),  # fmt: skip
        "run: manifest missing": ("run", tmp / "nope.toml"),
        "run: manifest not TOML": ("run", tmp / "notes.toml"),
        "stats: manifest missing": ("stats", tmp / "nope.toml"),
        "convert: voxel size in mm": (
            "convert",
            vol,
            "--out",
            tmp / "c.ome.zarr",
            "--voxel-size",
            0.001,
            0.002,
            0.002,
        ),  # fmt: skip
        "register: unknown atlas": (
            "register",
            vol,
            *vs,
            "--orientation",
            "psl",
            "--atlas",
            "nope_atlas",
            "--out",
            tmp / "r",
        ),  # fmt: skip
        "atlas info: bad phantom resolution": ("atlas", "info", "phantom:-5"),
        "simulate: too few mice": (
            "simulate",
            "census",
            "--out",
            tmp / "s",
            "--n-per-group",
            0,
        ),  # fmt: skip
    }


MISUSE = [  # the keys of _misuse_cases
    "soma diameter 0", "soma diameter NaN", "classifier file missing",
    "train: non-cells nearer than the tolerance", "quantify: not a registration folder",
    "run: manifest missing", "run: manifest not TOML", "stats: manifest missing",
    "convert: voxel size in mm", "register: unknown atlas",
    "atlas info: bad phantom resolution", "simulate: too few mice",
]  # fmt: skip


@pytest.mark.parametrize("name", MISUSE)
def test_command_line_misuse_is_one_sentence(name, tmp_path, run_cli, capsys):
    args = _misuse_cases(tmp_path)[name]
    before = sorted(tmp_path.rglob("*"))
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
