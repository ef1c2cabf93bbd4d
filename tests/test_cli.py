"""The command line: each subcommand runs, writes what it promises, and fails with one sentence."""

from __future__ import annotations

import pandas as pd
import pytest


def test_help_lists_every_stage(run_cli, capsys):
    """The command tree is exactly the expected one, in the app and on every help page."""
    import re

    import typer

    from ketamap.cli import app

    expected = {  # top-level commands; for a sub-group, the set of its commands
        "demo": None, "validate": None, "run": None, "detect": {"cells", "train"},
        "register": None, "quantify": None, "stats": None, "report": None, "convert": None,
        "atlas": {"build", "info"}, "simulate": {"census", "calcium", "spines"},
        "ensembles": None, "spines": None, "fibres": None,
    }  # fmt: skip

    def listed(text):
        """Names in the command panels of a help page (continuation lines are indented)."""
        names, in_commands = [], False
        for line in text.splitlines():
            if line.startswith("╭─"):  # a panel: Options, Arguments, or a group of commands
                in_commands = not re.match(r"╭─ (Options|Arguments) ─", line)
            elif in_commands and (m := re.match(r"│ ([a-z][a-z0-9_-]*)(\s|$)", line)):
                names.append(m.group(1))
        return sorted(names)

    root = typer.main.get_command(app)
    assert set(root.commands) == set(expected)
    for name, sub in expected.items():
        got = getattr(root.commands[name], "commands", None)
        assert (None if got is None else set(got)) == sub, name
    assert run_cli("--help") == 0
    assert listed(capsys.readouterr().out) == sorted(expected)
    for name, sub in expected.items():
        if sub:
            assert run_cli(name, "--help") == 0
            assert listed(capsys.readouterr().out) == sorted(sub), name


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


def test_detect_writes_the_tissue_mask_and_detection_qc(run_cli, capsys, tmp_path):
    """A bright block of tissue in a dark, flat void, three somata and a hot pixel in the void."""
    import json

    import numpy as np

    from ketamap.io.volumes import open_volume, read_voxel_size_um

    rng = np.random.default_rng(0)
    vol = rng.normal(100.0, 6.0, (30, 80, 80))
    vol[:, 15:65, 15:65] += rng.poisson(200.0, (30, 50, 50))
    zz, yy, xx = np.ogrid[:30, :80, :80]
    for z, y, x in [(10, 30, 30), (20, 40, 50), (15, 55, 25)]:
        vol += 800.0 * np.exp(-((zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2) / 2.0)
    vol[5, 5, 5] += 3000.0
    np.save(tmp_path / "signal.npy", vol.astype(np.uint16))
    out = tmp_path / "cells"
    code = run_cli("detect", tmp_path / "signal.npy", "--voxel-size", 10, 10, 10,
                   "--soma-diameter", 20, "--out", out)  # fmt: skip
    assert code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "3 cells; 1 candidate outside the tissue dropped (tissue 56.2 % of the volume)" in text
    qc = json.loads((out / "detection_qc.json").read_text())
    assert qc["n_outside_tissue"] == 1 and qc["tissue_fraction"] == pytest.approx(0.5625)
    assert qc["tissue_block_vox"] == [5, 5, 5] and qc["volume_shape_vox"] == [30, 80, 80]
    mask = np.asarray(open_volume(out / "tissue_mask.ome.zarr").compute())
    assert mask.shape == (6, 16, 16) and mask.dtype == np.uint8
    assert mask[:, 4:12, 4:12].all() and not mask[:, 0, 0].any()
    assert read_voxel_size_um(out / "tissue_mask.ome.zarr") == (50.0, 50.0, 50.0)
    assert len(pd.read_csv(out / "cells.csv")) == 3


def test_fibres_writes_mask_skeleton_and_length(run_cli, capsys, tmp_path):
    import json

    import tifffile

    from ketamap.io.volumes import open_volume
    from ketamap.simulate.fibres import region_slabs, simulate_fibres, true_length_table

    labels, hemi = region_slabs((40, 240, 240), (1, 2, 3))
    sim = simulate_fibres(labels, densities_mm_per_mm3={1: 600.0, 2: 300.0, 3: 100.0},
                          hemispheres=hemi, seed=2)  # fmt: skip
    tifffile.imwrite(tmp_path / "sig.tif", sim.signal)
    tifffile.imwrite(tmp_path / "bg.tif", sim.background)
    out = tmp_path / "out"
    args = ["fibres", tmp_path / "sig.tif", "--voxel-size", 4, 2, 2, "--out", out]
    assert run_cli(*args, "--background", tmp_path / "bg.tif") == 0
    mask = open_volume(out / "fibre_mask.ome.zarr")
    assert mask.shape == sim.signal.shape and mask.dtype == "uint8"
    assert open_volume(out / "skeleton.ome.zarr").shape == sim.signal.shape
    true_mm = true_length_table(sim.points, labels, None, sim.voxel_size_um)["length_um"].sum()
    found_mm = json.loads((out / "fibre_qc.json").read_text())["total_length_mm"]
    assert abs(found_mm / (true_mm / 1000) - 1) < 0.15  # the volume's faces included
    assert "mm of fibre" in capsys.readouterr().out
    # a registration without its atlas: one sentence, nothing written
    assert run_cli(*args[:-1], tmp_path / "out2", "--registration", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert not (tmp_path / "out2").exists()
