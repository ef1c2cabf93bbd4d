"""The command line: each subcommand runs, writes what it promises, and fails with one sentence."""

from __future__ import annotations

import pandas as pd
import pytest


def test_help_lists_every_stage(run_cli, capsys):
    assert run_cli("--help") == 0
    text = capsys.readouterr().out
    for cmd in (
        "demo",
        "simulate",
        "run",
        "detect",
        "register",
        "quantify",
        "stats",
        "report",
        "atlas",
        "validate",
    ):
        assert cmd in text


def test_atlas_info_phantom(run_cli, capsys):
    assert run_cli("atlas", "info", "phantom:100") == 0
    assert "(132, 80, 114)" in capsys.readouterr().out


def test_unknown_atlas_is_one_sentence(run_cli, capsys):
    assert run_cli("atlas", "info", "no_such_atlas_anywhere") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_missing_input_is_one_sentence(run_cli, capsys, tmp_path):
    code = run_cli("detect", tmp_path / "nope", "--voxel-size", 5, 2, 2, "--out", tmp_path / "out")
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.shared_data
def test_detect_on_the_real_crop(run_cli, capsys, tmp_path, shared_data):
    crop = shared_data / "cellfinder_crop"
    out = tmp_path / "cells"
    assert (
        run_cli(
            "detect",
            crop / "ch0",
            "--background",
            crop / "ch1",
            "--voxel-size",
            5,
            2,
            2,
            "--out",
            out,
        )
        == 0
    )
    cells = pd.read_csv(out / "cells.csv")
    assert {"z_vox", "y_vox", "x_vox", "z_um", "y_um", "x_um", "intensity"} <= set(cells.columns)
    assert len(cells) > 20
    assert (out / "cells.xml").read_text().count("<Marker>") == len(cells)


@pytest.mark.shared_data
def test_atlas_build_and_register_the_real_brain(run_cli, capsys, tmp_path, shared_data):
    from brainglobe_atlasapi import BrainGlobeAtlas

    allen = shared_data / "allen_ccf_2017"
    ref = shared_data / "brainreg_brain" / "brain_in_ccf_100um.tiff"
    atlases = tmp_path / "atlases"
    assert (
        run_cli(
            "atlas",
            "build",
            "--annotation",
            allen / "ABA_25um_2017_annotation.tif.lzma",
            "--structures",
            allen / "structure_tree_safe_2017.csv",
            "--hemispheres",
            allen / "ABA_25um_2017_hemispheres.tif.lzma",
            "--reference",
            ref,
            "--resolution",
            100,
            "--out",
            atlases,
        )
        == 0
    )
    folder = next(atlases.glob("allen_mouse_100um_v*"))
    bg = BrainGlobeAtlas("allen_mouse_100um", brainglobe_dir=atlases, check_latest=False)
    assert bg.annotation.shape == (132, 80, 114)
    assert bg.structures["VTA"]["id"] == 749

    out = tmp_path / "reg"
    assert (
        run_cli(
            "register",
            shared_data / "brainreg_brain" / "brain",
            "--voxel-size",
            50,
            40,
            40,
            "--orientation",
            "psl",
            "--atlas",
            folder,
            "--out",
            out,
        )
        == 0
    )
    import json

    qc = json.loads((out / "registration.json").read_text())["qc"]
    assert qc["correlation_after"] > qc["correlation_before"]
    assert not qc["flagged"], qc
    volumes = pd.read_csv(out / "volumes.csv").set_index("acronym")
    assert {"left_volume_mm3", "right_volume_mm3"} <= set(volumes.columns)
    assert (out / "qc.png").stat().st_size > 1000


def test_calcium_simulate_and_ensembles(run_cli, capsys, tmp_path):
    sim = tmp_path / "ca"
    assert run_cli("simulate", "calcium", "--out", sim, "--n-cells", 80) == 0
    assert (sim / "sessions.toml").is_file()
    assert (sim / "ground_truth" / "ensembles.csv").is_file()
    out = tmp_path / "out"
    assert run_cli("ensembles", sim / "sessions.toml", "--out", out) == 0
    ens = pd.read_csv(out / "ensembles.csv")
    assert {"session", "ensemble", "cell"} <= set(ens.columns)
    sessions = pd.read_csv(out / "sessions.csv")
    assert len(sessions) == 4


def test_convert_tiff_planes_to_ome_zarr(run_cli, tmp_path):
    import numpy as np
    import tifffile

    from ketamap.io.volumes import open_volume, read_voxel_size_um

    src = tmp_path / "planes"
    src.mkdir()
    data = np.random.default_rng(0).integers(0, 4000, (5, 20, 30)).astype(np.uint16)
    for i, plane in enumerate(data):
        tifffile.imwrite(src / f"z{i:04d}.tif", plane)
    dst = tmp_path / "brain.ome.zarr"
    assert run_cli("convert", src, "--voxel-size", 5, 2, 2, "--out", dst) == 0
    np.testing.assert_array_equal(open_volume(dst).compute(), data)
    assert read_voxel_size_um(dst) == (5.0, 2.0, 2.0)
