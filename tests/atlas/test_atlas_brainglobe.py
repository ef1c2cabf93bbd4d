"""BrainGlobe folders: write, open with brainglobe-atlasapi, read back; load_atlas dispatch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ketamap.atlas import load_atlas, load_brainglobe, make_phantom, write_brainglobe
from ketamap.atlas.core import Atlas
from ketamap.errors import AtlasNotFoundError, ParameterError

BIG = 484682512  # scwm, a real Allen id above 65535, labelled in the phantom


@pytest.fixture(scope="module")
def phantom() -> Atlas:
    return make_phantom(resolution_um=200)


@pytest.fixture
def written(phantom, tmp_path):
    return tmp_path, write_brainglobe(phantom, tmp_path, version="1.2")


def test_folder_layout_and_metadata(written, phantom):
    out, folder = written
    assert folder == out / "ketamap_phantom_200um_v1.2"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "annotation.tiff",
        "hemispheres.tiff",
        "meshes",
        "metadata.json",
        "reference.tiff",
        "structures.json",
    ]
    meta = json.loads((folder / "metadata.json").read_text())
    for key in (
        "name",
        "citation",
        "atlas_link",
        "species",
        "symmetric",
        "resolution",
        "orientation",
        "version",
        "shape",
        "trasform_to_bg",
        "additional_references",
    ):
        assert key in meta, key
    assert meta["shape"] == list(phantom.shape) and meta["orientation"] == "asr"
    assert not list(out.glob(".*part"))  # nothing half-written left behind


def test_opens_with_brainglobe_atlasapi(written, phantom):
    from brainglobe_atlasapi import BrainGlobeAtlas
    from brainglobe_atlasapi.core import Atlas as CoreAtlas

    out, folder = written
    for bg in (
        BrainGlobeAtlas(phantom.name, brainglobe_dir=out, check_latest=False),
        CoreAtlas(folder),
    ):
        assert bg.shape == phantom.shape
        assert bg.resolution == (200.0, 200.0, 200.0)
        assert np.array_equal(bg.annotation, phantom.annotation)
        assert bg.annotation.dtype == np.uint32 and BIG in np.unique(bg.annotation)
        assert bg.structures[BIG]["acronym"] == "scwm"
        assert np.array_equal(bg.hemispheres, phantom.hemispheres)
        assert bg.reference.dtype == np.uint16 and bg.reference.shape == phantom.shape
        onto = phantom.ontology
        for acr in ("VTA", "scwm", "PVH"):
            expect = [onto.acronym(i) for i in onto.ancestors(onto.lookup(acr))]
            assert bg.get_structure_ancestors(acr) == expect


def test_round_trip_is_identical(written, phantom):
    out, folder = written
    for back in (
        load_brainglobe(folder),
        load_brainglobe("ketamap_phantom_200um", brainglobe_dir=out),
    ):
        assert back.name == phantom.name
        assert np.array_equal(back.annotation, phantom.annotation)
        assert np.array_equal(back.hemispheres, phantom.hemispheres)
        assert back.ontology == phantom.ontology
        assert back.resolution_um == phantom.resolution_um and back.orientation == "asr"
        corr = np.corrcoef(back.reference.ravel(), phantom.reference.ravel())[0, 1]
        assert corr > 0.999


def test_synthetic_reference_when_missing(phantom, tmp_path):
    bare = Atlas(
        name="bare_mouse_200um",
        annotation=phantom.annotation,
        hemispheres=phantom.hemispheres,
        resolution_um=phantom.resolution_um,
        orientation="asr",
        ontology=phantom.ontology,
    )
    folder = write_brainglobe(bare, tmp_path)
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["ketamap_reference"].startswith("synthetic")
    back = load_brainglobe(folder)
    assert ((back.reference > 0) == (phantom.annotation > 0)).all()
    assert back.synthetic_reference  # known as such when loaded again
    assert not load_brainglobe(write_brainglobe(phantom, tmp_path / "t")).synthetic_reference


def test_atlas_info_says_a_reference_is_synthetic(phantom, tmp_path, run_cli, capsys):
    bare = Atlas(name="bare_mouse_200um", annotation=phantom.annotation,
                 hemispheres=phantom.hemispheres, resolution_um=phantom.resolution_um,
                 orientation="asr", ontology=phantom.ontology)  # fmt: skip
    folder = write_brainglobe(bare, tmp_path)
    assert run_cli("atlas", "info", folder) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "reference synthetic (made from the annotation, not an image" in text


def test_other_orientation_is_mapped_to_asr(phantom, tmp_path):
    # the same brain stored "psl": axes 0 and 2 reversed
    flipped = Atlas(
        name="flip_mouse_200um",
        annotation=phantom.annotation[::-1, :, ::-1],
        hemispheres=phantom.hemispheres[::-1, :, ::-1],
        resolution_um=phantom.resolution_um,
        orientation="psl",
        ontology=phantom.ontology,
        reference=phantom.reference[::-1, :, ::-1],
    )
    back = load_brainglobe(write_brainglobe(flipped, tmp_path))
    assert np.array_equal(back.annotation, phantom.annotation)
    assert np.array_equal(back.hemispheres, phantom.hemispheres)


def test_bad_version(phantom, tmp_path):
    with pytest.raises(ParameterError, match="version"):
        write_brainglobe(phantom, tmp_path, version="one")


def test_load_atlas_dispatch(written, phantom, monkeypatch, tmp_path_factory):
    out, folder = written
    assert load_atlas("phantom:200").shape == phantom.shape
    assert load_atlas("phantom", resolution_um=200).shape == phantom.shape
    with pytest.raises(ParameterError, match="asks for 200"):
        load_atlas("phantom:200", resolution_um=100)
    assert np.array_equal(load_atlas(folder).annotation, phantom.annotation)
    with pytest.raises(ParameterError, match="not resampled"):
        load_atlas(folder, resolution_um=25)
    # installed under ~/.brainglobe (HOME is isolated by the conftest fixture)
    home_dir = tmp_path_factory.getbasetemp() / "bghome"
    monkeypatch.setenv("HOME", str(home_dir))
    monkeypatch.delenv("BRAINGLOBE_CONFIG_DIR", raising=False)
    shutil.copytree(folder, home_dir / ".brainglobe" / folder.name)
    assert load_atlas("ketamap_phantom_200um").name == phantom.name


def test_unknown_spec_is_one_clear_sentence(tmp_path):
    with pytest.raises(AtlasNotFoundError) as err:
        load_atlas("allen_mouse_7um")
    msg = str(err.value)
    assert "allen_mouse_7um" in msg and "phantom" in msg and "metadata.json" in msg
    assert "structure_tree_safe_2017.csv" in msg and ".brainglobe" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")
    with pytest.raises(AtlasNotFoundError, match="not installed"):
        load_brainglobe("nothing_here", brainglobe_dir=tmp_path)


@pytest.mark.shared_data
def test_load_atlas_allen_folder(shared_data):
    atlas = load_atlas(shared_data / "allen_ccf_2017", resolution_um=100)
    assert atlas.shape == (132, 80, 114) and atlas.name == "allen_mouse_100um"
    assert set(np.unique(atlas.hemispheres).tolist()) == {1, 2}


# ------------------------------------------------- the folder "atlas build --out DIR" wrote into


def _one_sentence(message: str) -> bool:
    return message.count(". ") == 0 and message.count("? ") == 0 and message[-1] in ".?"


def test_the_out_folder_and_the_reported_folder_both_load(written, phantom, run_cli, capsys):
    out, folder = written  # write_brainglobe(phantom, out) is what "atlas build" calls
    for spec in (out, folder, str(out) + "/"):
        back = load_atlas(spec)
        assert back.name == phantom.name
        assert np.array_equal(back.annotation, phantom.annotation)
        assert np.array_equal(back.hemispheres, phantom.hemispheres)
        assert back.ontology == phantom.ontology
    assert load_brainglobe(out).ontology == phantom.ontology
    # a path is never taken for an atlas name (this glob used to raise NotImplementedError)
    assert load_brainglobe(out, brainglobe_dir=out / "elsewhere").name == phantom.name
    assert run_cli("atlas", "info", out) == 0
    assert capsys.readouterr().out.startswith(f"{phantom.name}: shape {phantom.shape}")


def test_a_folder_one_level_off_names_the_folder_to_pass(written, phantom, tmp_path):
    out, folder = written
    for inner in (folder / "meshes", folder / "annotation.tiff"):
        with pytest.raises(AtlasNotFoundError) as err:
            load_atlas(inner)
        msg = str(err.value)
        assert f"inside the BrainGlobe atlas folder {folder}; pass {folder}" in msg, msg
        assert _one_sentence(msg), msg
    # the atlas name without its version, as a path
    with pytest.raises(AtlasNotFoundError) as err:
        load_atlas(out / "ketamap_phantom_200um")
    assert str(err.value).endswith(f"does not exist; did you mean {folder}?")
    empty = tmp_path / "sub" / "empty"
    empty.mkdir(parents=True)
    with pytest.raises(AtlasNotFoundError, match="not a BrainGlobe atlas folder"):
        load_brainglobe(empty)
    # two atlases in one folder: the one of the requested resolution, else both named
    other = write_brainglobe(make_phantom(resolution_um=400), out)
    with pytest.raises(AtlasNotFoundError) as err:
        load_atlas(out)
    msg = str(err.value)
    assert msg == (
        f'Atlas "{out}" is a folder that holds 2 atlases, not one; did you mean {folder} or '
        f"{other}?"
    )
    assert _one_sentence(msg)
    assert load_atlas(out, resolution_um=400).shape == make_phantom(resolution_um=400).shape
    assert load_atlas(out, resolution_um=200).name == phantom.name


@pytest.mark.shared_data
def test_atlas_build_then_the_reported_folder_as_atlas(shared_data, tmp_path, run_cli, capsys):
    from ketamap.atlas import load_allen

    src = shared_data / "allen_ccf_2017"
    out = tmp_path / "atlases"
    args = ["--annotation", src / "ABA_25um_2017_annotation.tif.lzma",
            "--structures", src / "structure_tree_safe_2017.csv",
            "--hemispheres", src / "ABA_25um_2017_hemispheres.tif.lzma"]  # fmt: skip
    assert run_cli("atlas", "build", *args, "--resolution", 100, "--out", out) == 0
    printed = capsys.readouterr().out.split()
    reported = Path(printed[printed.index("wrote") + 1])
    assert reported == out / "allen_mouse_100um_v1.0"
    expect = load_allen(src / "ABA_25um_2017_annotation.tif.lzma",
                        src / "structure_tree_safe_2017.csv",
                        hemispheres_path=src / "ABA_25um_2017_hemispheres.tif.lzma",
                        resolution_um=100)  # fmt: skip
    for spec in (reported, out):
        back = load_atlas(spec)
        assert back.name == "allen_mouse_100um" and back.resolution_um == (100.0,) * 3
        assert np.array_equal(back.annotation, expect.annotation)
        assert np.array_equal(back.hemispheres, expect.hemispheres)
        assert back.ontology == expect.ontology
        assert run_cli("atlas", "info", spec) == 0
        assert "allen_mouse_100um: shape (132, 80, 114)" in capsys.readouterr().out
