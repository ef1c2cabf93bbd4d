"""One mechanism for the three manifest kinds: every rule holds the same way for each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ketamap.errors import InputNotFoundError, KetamapError, ManifestError
from ketamap.manifest import (
    ManifestNotFoundError,
    SessionsFile,
    SpineSessions,
    Study,
    load_sessions,
    load_spine_sessions,
    load_study,
)


@dataclass(frozen=True)
class Kind:
    """A manifest kind: a good file, its data, and one edit per mistake."""

    name: str
    load: object
    returns: type
    text: str
    data: tuple  # data files the good text names, relative to its folder
    typo: tuple  # (old, new, key written, key meant)
    wrong_type: tuple  # (old, new, key)
    path_value: str  # a data path the text names, to point elsewhere

    def write(self, folder: Path, text: str | None = None) -> Path:
        for rel in self.data:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(b"")
        path = folder / "manifest.toml"
        path.write_text(self.text if text is None else text, encoding="utf-8")
        return path

    def edit(self, old: str, new: str) -> str:
        assert old in self.text, (self.name, old)
        return self.text.replace(old, new, 1)

    def paths(self, obj) -> list[Path]:
        """Every data path of a loaded object."""
        if isinstance(obj, Study):
            return [p for s in obj.subjects for p in (s.signal, s.background) if p is not None]
        if isinstance(obj, SessionsFile):
            return [s.data for s in obj.sessions]
        return [p for d in obj.dendrites for p in d.images.values()]


STUDY = Kind(
    name="study",
    load=load_study,
    returns=Study,
    text="""
[study]
name = "s"
marker = "TH"

[imaging]
voxel_size_um = [5.0, 2.0, 2.0]
orientation = "psl"

[[groups]]
name = "saline"
dose_mg_per_kg = 0

[[subjects]]
id = "m1"
group = "saline"
signal = "data/m1.tif"
""",
    data=("data/m1.tif",),
    typo=('marker = "TH"', 'markr = "TH"', "markr", "marker"),
    wrong_type=("dose_mg_per_kg = 0", 'dose_mg_per_kg = "zero"', "dose_mg_per_kg"),
    path_value="data/m1.tif",
)

ENSEMBLES = Kind(
    name="ensembles",
    load=load_sessions,
    returns=SessionsFile,
    text="""
[field_of_view]
name = "fov1"
frame_rate_hz = 10.0

[[sessions]]
label = "baseline"
time_h = 0.0
data = "data/a.npy"
""",
    data=("data/a.npy",),
    typo=("time_h = 0.0", "tme_h = 0.0", "tme_h", "time_h"),
    wrong_type=("time_h = 0.0", 'time_h = "noon"', "time_h"),
    path_value="data/a.npy",
)

SPINES = Kind(
    name="spines",
    load=load_spine_sessions,
    returns=SpineSessions,
    text="""
name = "cohort"
pixel_size_um = 0.15

[[sessions]]
label = "a"
time_h = 0.0

[[sessions]]
label = "b"
time_h = 24.0

[[dendrites]]
name = "d1"
mouse = "m1"
images = { a = "data/a.tif", b = "data/b.tif" }
""",
    data=("data/a.tif", "data/b.tif"),
    typo=('mouse = "m1"', 'mose = "m1"', "mose", "mouse"),
    wrong_type=("pixel_size_um = 0.15", 'pixel_size_um = "fine"', "pixel_size_um"),
    path_value="data/b.tif",
)

KINDS = [STUDY, ENSEMBLES, SPINES]
kinds = pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])


def one_sentence(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert message.endswith("."), message


@kinds
def test_good_file_gives_the_typed_object(kind, tmp_path):
    obj = kind.load(kind.write(tmp_path))
    assert isinstance(obj, kind.returns)
    expected = sorted((tmp_path / rel).resolve() for rel in kind.data)
    got = kind.paths(obj)
    assert all(isinstance(p, Path) and p.is_absolute() for p in got)
    assert sorted(got) == expected


@kinds
def test_unknown_key_names_the_nearest_valid_one(kind, tmp_path):
    old, new, wrote, meant = kind.typo
    path = kind.write(tmp_path, kind.edit(old, new))
    with pytest.raises(ManifestError) as e:
        kind.load(path)
    message = str(e.value)
    assert f'Unknown key "{wrote}"' in message
    assert f'(did you mean "{meant}"?)' in message
    assert str(path) in message
    one_sentence(message)


@kinds
def test_wrong_type_names_key_and_file(kind, tmp_path):
    old, new, key = kind.wrong_type
    path = kind.write(tmp_path, kind.edit(old, new))
    with pytest.raises(ManifestError) as e:
        kind.load(path)
    message = str(e.value)
    assert message.startswith(f"{key} in ")
    assert str(path) in message
    assert "must be a number" in message
    one_sentence(message)


@kinds
def test_path_leaving_the_folder_is_refused(kind, tmp_path):
    folder = tmp_path / "inner"
    folder.mkdir()
    (tmp_path / "outside.tif").write_bytes(b"")  # exists: refused for where it is, not absence
    path = kind.write(folder, kind.edit(f'"{kind.path_value}"', '"data/../../outside.tif"'))
    with pytest.raises(ManifestError) as e:
        kind.load(path)
    message = str(e.value)
    assert "points outside the" in message and "folder" in message
    assert "../../outside.tif" in message and str(path) in message
    one_sentence(message)
    # inside the folder, ".." that stays inside is fine
    ok = kind.write(folder, kind.edit(f'"{kind.path_value}"', f'"data/../{kind.path_value}"'))
    assert isinstance(kind.load(ok), kind.returns)


@kinds
def test_absolute_path_outside_is_allowed(kind, tmp_path):
    """docs/manifest.md: data kept elsewhere are given as an absolute path."""
    folder = tmp_path / "inner"
    folder.mkdir()
    outside = tmp_path / "elsewhere" / "image.tif"
    outside.parent.mkdir()
    outside.write_bytes(b"")
    path = kind.write(folder, kind.edit(f'"{kind.path_value}"', f'"{outside.as_posix()}"'))
    assert outside in kind.paths(kind.load(path))


@kinds
def test_missing_data_file_is_one_sentence_naming_it(kind, tmp_path):
    path = kind.write(tmp_path, kind.edit(f'"{kind.path_value}"', '"data/nope.tif"'))
    with pytest.raises(InputNotFoundError) as e:
        kind.load(path)
    message = str(e.value)
    assert isinstance(e.value, KetamapError)
    assert 'does not exist: "data/nope.tif"' in message
    assert str(path) in message
    one_sentence(message)


@kinds
def test_path_must_be_a_string(kind, tmp_path):
    path = kind.write(tmp_path, kind.edit(f'"{kind.path_value}"', "3"))
    with pytest.raises(ManifestError, match="must be a path string, got 3"):
        kind.load(path)


@kinds
def test_missing_manifest_is_both_a_manifest_and_a_missing_input_error(kind, tmp_path):
    with pytest.raises(ManifestNotFoundError) as e:
        kind.load(tmp_path / "none.toml")
    assert isinstance(e.value, ManifestError) and isinstance(e.value, InputNotFoundError)
    assert "does not exist" in str(e.value)


@kinds
def test_invalid_toml_is_one_sentence(kind, tmp_path):
    path = kind.write(tmp_path, kind.text + "\n[[broken\n")
    with pytest.raises(ManifestError, match="not valid TOML") as e:
        kind.load(path)
    one_sentence(str(e.value))


@kinds
def test_infinite_number_is_refused(kind, tmp_path):
    old, _, key = kind.wrong_type
    path = kind.write(tmp_path, kind.edit(old, f"{key} = inf"))
    with pytest.raises(ManifestError, match=f"{key} in .* must be"):
        kind.load(path)


def test_stage_parameters_keep_their_own_wording():
    """The manifest mode of from_mapping leaves the stage-parameter sentences as they were."""
    from ketamap.errors import ParameterError
    from ketamap.invivo.spines.params import SpineParams
    from ketamap.params import from_mapping

    with pytest.raises(ParameterError, match='Unknown parameter "match_tolerance"'):
        from_mapping(SpineParams, {"match_tolerance": 1.0}, where="[params]")
    with pytest.raises(ParameterError, match=r"SpineParams\.match_tolerance_um must be"):
        from_mapping(SpineParams, {"match_tolerance_um": "x"}, where="[params]")
