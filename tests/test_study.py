"""The study manifest: a valid example loads; each mistake is one clear sentence."""

from __future__ import annotations

from pathlib import Path

import pytest

from ketamap.errors import ManifestError
from ketamap.manifest import load_study, parse_study, study_to_toml
from ketamap.space import check_orientation

GOOD = """
[study]
name = "ketamine-10day"
atlas = "phantom"
marker = "TH"
reference_group = "saline"

[imaging]
voxel_size_um = [25.0, 25.0, 25.0]
orientation = "psl"
signal_channel = "TH"
background_channel = "autofluorescence"

[[groups]]
name = "saline"
dose_mg_per_kg = 0
schedule = "daily"
duration_days = 10

[[groups]]
name = "ket30"
dose_mg_per_kg = 30
schedule = "daily"
duration_days = 10

[[subjects]]
id = "m1"
group = "saline"
signal = "data/m1.tif"
sex = "M"

[[subjects]]
id = "m2"
group = "ket30"
signal = "data/m2.tif"
background = "data/m2_bg.tif"
sex = "F"
batch = 2
covariates = { age_weeks = 10 }
"""


@pytest.fixture
def study_dir(tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("m1.tif", "m2.tif", "m2_bg.tif"):
        (tmp_path / "data" / name).write_bytes(b"")
    return tmp_path


def write(study_dir: Path, text: str) -> Path:
    p = study_dir / "study.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_good_manifest_loads(study_dir):
    study = load_study(write(study_dir, GOOD))
    assert study.name == "ketamine-10day"
    assert [g.name for g in study.groups] == ["saline", "ket30"]
    assert study.groups[1].dose_mg_per_kg == 30.0
    assert study.subjects[0].signal == (study_dir / "data" / "m1.tif").resolve()
    assert study.subjects[0].background is None
    assert study.subjects[1].covariates == {"sex": "F", "batch": 2, "age_weeks": 10}
    assert study.subjects[0].voxel_size_um == (25.0, 25.0, 25.0)
    assert study.subjects[0].orientation == "psl"
    table = study.subjects_table()
    assert list(table["dose_mg_per_kg"]) == [0.0, 30.0]
    assert study.covariates == ("sex",)


def test_key_regions_default_and_override(study_dir):
    from ketamap.manifest import DEFAULT_KEY_REGIONS

    assert load_study(write(study_dir, GOOD)).key_regions == DEFAULT_KEY_REGIONS
    text = GOOD.replace('marker = "TH"', 'marker = "TH"\nkey_regions = ["CA1", "VTA"]')
    study = load_study(write(study_dir, text))
    assert study.key_regions == ("CA1", "VTA")
    assert load_study(write(study_dir, study_to_toml(study))) == study


def test_round_trip_through_toml(study_dir):
    study = load_study(write(study_dir, GOOD))
    again = load_study(write(study_dir, study_to_toml(study)))
    assert again == study


# (mistake, replacement in GOOD or full text, words the message must contain)
MISTAKES = [
    (
        "unknown group",
        ('group = "ket30"', 'group = "ket3O"'),
        ['unknown group "ket3O"', 'did you mean "ket30"'],
    ),
    ("duplicate subject", ('id = "m2"', 'id = "m1"'), ['"m1" appears twice']),
    (
        "missing path",
        ('signal = "data/m2.tif"', 'signal = "data/nope.tif"'),
        ["does not exist", "nope.tif"],
    ),
    (
        "invalid orientation",
        ('orientation = "psl"', 'orientation = "pps"'),
        ["not a valid orientation code"],
    ),
    (
        "non-positive voxel size",
        ("[25.0, 25.0, 25.0]", "[25.0, 0, 25.0]"),
        ["voxel_size_um", "positive"],
    ),
    (
        "group without subjects",
        ('group = "ket30"\nsignal', 'group = "saline"\nsignal'),
        ['Group "ket30" has no subjects'],
    ),
    (
        "wrong type",
        ("dose_mg_per_kg = 30", 'dose_mg_per_kg = "thirty"'),
        ["dose_mg_per_kg", "must be a number"],
    ),
    (
        "unknown key",
        ('marker = "TH"', 'markr = "TH"'),
        ['Unknown key "markr"', 'did you mean "marker"'],
    ),
    (
        "unknown top-level table",
        ("[imaging]", "[imagng]"),
        ['Unknown key "imagng"', 'did you mean "imaging"'],
    ),
    (
        "bad reference group",
        ('reference_group = "saline"', 'reference_group = "salin"'),
        ['did you mean "saline"'],
    ),
    ("voxel size wrong length", ("[25.0, 25.0, 25.0]", "[25.0, 25.0]"), ["three numbers"]),
    (
        "key regions not a list",
        ('marker = "TH"', 'marker = "TH"\nkey_regions = "VTA"'),
        ["key_regions", "must be a list"],
    ),
    (
        "key region not a string",
        ('marker = "TH"', 'marker = "TH"\nkey_regions = ["VTA", 5]'),
        ["key_regions", "must be a string"],
    ),
    ("negative dose", ("dose_mg_per_kg = 30", "dose_mg_per_kg = -30"), ["at least 0"]),
    (
        "bad schedule",
        (
            'schedule = "daily"\nduration_days = 10\n\n[[subjects]]',
            'schedule = "dayly"\nduration_days = 10\n\n[[subjects]]',
        ),
        ['did you mean "daily"'],
    ),
    ("invalid TOML", ("[study]", "[study"), ["not valid TOML"]),
    (
        "unknown stage parameter",
        (None, "\n[detection]\nsoma_diamter_um = 12\n"),
        ['did you mean "soma_diameter_um"'],
    ),
]


def _apply(fix):
    old, new = fix
    if old is None:
        return GOOD + new
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


@pytest.mark.parametrize("name,fix,words", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_manifest_mistake_is_one_sentence_and_nonzero_exit(
    study_dir, name, fix, words, run_cli, capsys
):
    manifest = write(study_dir, _apply(fix))
    before = sorted(p.relative_to(study_dir) for p in study_dir.rglob("*"))
    assert run_cli("run", manifest) == 2
    captured = capsys.readouterr()
    message = " ".join(captured.err.split())
    assert "Traceback" not in captured.err
    assert message.startswith("error:")
    for w in words:
        assert w in message, (w, message)
    assert message.count("\n") == 0
    after = sorted(p.relative_to(study_dir) for p in study_dir.rglob("*"))
    assert after == before, "a failed manifest must write nothing"


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_study(tmp_path / "nope.toml")


def test_check_paths_can_be_skipped(tmp_path):
    import tomllib

    study = parse_study(tomllib.loads(GOOD), root=tmp_path, check_paths=False)
    assert len(study.subjects) == 2


@pytest.mark.parametrize("code", ["asr", "psl", "IPL", "lsa", "rai"])
def test_valid_orientations(code):
    assert check_orientation(code) == code.lower()


@pytest.mark.parametrize("code", ["pps", "abc", "as", "asrr", 3, "aaa"])
def test_invalid_orientations(code):
    from ketamap.errors import InputError

    with pytest.raises(InputError):
        check_orientation(code)


def test_all_48_codes_accepted_as_brainglobe_does():
    import itertools

    from brainglobe_space import AnatomicalSpace

    codes = []
    for perm in itertools.permutations([("a", "p"), ("s", "i"), ("l", "r")]):
        for letters in itertools.product(*perm):
            codes.append("".join(letters))
    assert len(codes) == 48
    for c in codes:
        assert check_orientation(c) == c
        AnatomicalSpace(c)  # brainglobe-space agrees


@pytest.fixture
def imaged_dir(tmp_path):
    """The GOOD study with real (small) images: m1 signal, m2 signal and background."""
    import numpy as np
    import tifffile

    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for name in ("m1.tif", "m2.tif", "m2_bg.tif"):
        vol = rng.integers(0, 1000, (6, 20, 24)).astype(np.uint16)
        tifffile.imwrite(tmp_path / "data" / name, vol, photometric="minisblack")
    return tmp_path


def _validate_error(run_cli, capsys, manifest) -> str:
    assert run_cli("validate", manifest) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


def test_validate_loads_the_atlas_and_opens_every_image(imaged_dir, run_cli, capsys):
    import numpy as np
    import tifffile

    manifest = write(imaged_dir, GOOD.replace('atlas = "phantom"', 'atlas = "phantom:200"'))
    assert run_cli("validate", manifest) == 0
    assert "atlas phantom:200 ((66, 40, 57) at 200 µm)" in " ".join(capsys.readouterr().out.split())
    # two mice given one image
    manifest = write(imaged_dir, GOOD.replace('signal = "data/m2.tif"', 'signal = "data/m1.tif"'))
    assert 'Subjects "m1" and "m2" share the image' in _validate_error(run_cli, capsys, manifest)
    # a background that is a copy of the signal
    data = imaged_dir / "data"
    (data / "copy.tif").write_bytes((data / "m2.tif").read_bytes())
    manifest = write(imaged_dir, GOOD.replace('"data/m2_bg.tif"', '"data/copy.tif"'))
    assert "hold the same image" in _validate_error(run_cli, capsys, manifest)
    # a background of another shape
    tifffile.imwrite(data / "small.tif", np.zeros((6, 20, 20), np.uint16), photometric="minisblack")
    manifest = write(imaged_dir, GOOD.replace('"data/m2_bg.tif"', '"data/small.tif"'))
    assert "has shape (6, 20, 20) but the signal has (6, 20, 24)" in _validate_error(
        run_cli, capsys, manifest
    )
    # the folder that "atlas build --out DIR" wrote into is accepted as the atlas
    from ketamap.atlas import make_phantom, write_brainglobe

    folder = write_brainglobe(make_phantom(resolution_um=200), imaged_dir / "atlases")
    manifest = write(imaged_dir, GOOD.replace('atlas = "phantom"', 'atlas = "atlases"'))
    assert run_cli("validate", manifest) == 0
    assert "atlas atlases ((66, 40, 57) at 200 µm)" in " ".join(capsys.readouterr().out.split())
    # a folder inside the atlas is not: the message names the folder to pass
    inner = f'atlas = "atlases/{folder.name}/meshes"'
    manifest = write(imaged_dir, GOOD.replace('atlas = "phantom"', inner))
    message = _validate_error(run_cli, capsys, manifest)
    assert f"pass {folder}" in message and ".brainglobe" not in message
