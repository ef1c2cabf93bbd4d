"""End to end on a small simulated study: outputs, provenance, resume, atomicity, accuracy."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from ketamap.pipeline import run_study
from ketamap.simulate import BrainParams, simulate_census
from ketamap.simulate.evaluate import evaluate_census

PARAMS = BrainParams(voxel_size_um=(60.0, 60.0, 60.0), orientation="psl")


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    manifest = simulate_census(root, atlas="phantom:100", scenario="ketamine-10day",
                               n_per_group=2, params=PARAMS, seed=3)
    return root, manifest


@pytest.fixture(scope="module")
def ran_study(small_study):
    root, manifest = small_study
    summary = run_study(manifest)
    return root, manifest, summary


def test_simulated_study_folder(small_study):
    root, manifest = small_study
    assert manifest == root / "study.toml"
    effects = pd.read_csv(root / "ground_truth" / "effects.csv")
    assert {"acronym", "contrast", "true_fold_change", "planted"} <= set(effects.columns)
    planted = effects[effects["planted"]]
    assert set(planted["contrast"]) == {"ket30_vs_saline", "ket100_vs_saline"}
    assert set(planted.loc[planted["contrast"] == "ket30_vs_saline", "acronym"]) == {
        "DR", "DMH", "MPN", "ZI", "SNr"}
    for sid in ("saline-01", "ket30-02", "ket100-01"):
        assert (root / "data" / sid / "signal.zarr").is_dir()
        assert (root / "ground_truth" / "cells" / f"{sid}.parquet").is_file()


def test_every_stage_writes_its_outputs_with_provenance(ran_study):
    root, _, summary = ran_study
    assert all(r["detect"] and r["register"] and r["quantify"] for r in summary.subjects)
    for sid in ("saline-01", "ket100-02"):
        expected = {
            "detect": ["cells.parquet", "cells.csv", "cells.xml"],
            "register": ["registration.json", "volumes.csv", "qc.png", "qc_checkerboard.png"],
            "quantify": ["regions.csv", "cells_atlas.parquet", "summary.json"],
        }
        for stage, files in expected.items():
            folder = root / "subjects" / sid / stage
            for f in files:
                assert (folder / f).is_file(), (stage, f)
            prov = json.loads((folder / "provenance.json").read_text())
            assert prov["stage"] == stage and "versions" in prov and prov["key"]
    regions = pd.read_csv(root / "stats" / "regions.csv")
    assert {"acronym", "level", "contrast", "log2_fold_change", "p", "q"} <= set(regions.columns)
    assert (root / "report.html").stat().st_size > 10_000
    assert not list(root.rglob("*.part")), "no temporary files left behind"


def test_rerun_skips_everything_and_changes_nothing(ran_study):
    root, manifest, _ = ran_study
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = run_study(manifest)
    assert not any(v is True for r in again.subjects for v in r.values())
    assert not again.stats_ran and not again.report_ran
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert after == before


def test_interrupted_stage_leaves_no_output_and_resumes(ran_study, tmp_path, monkeypatch):
    root, _, _ = ran_study
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    manifest = copy / "study.toml"
    victim = copy / "subjects" / "ket30-01" / "quantify"
    reference = pd.read_csv(victim / "regions.csv")
    shutil.rmtree(victim)
    shutil.rmtree(copy / "stats")

    import ketamap.wholebrain.quantify as q

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(q, "count_regions", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_study(manifest, stages=["quantify"])
    assert not victim.exists(), "a crashed stage must not leave an output folder"
    assert not list(victim.parent.glob(".quantify*")), "temporary folder removed"
    monkeypatch.undo()
    run_study(manifest)
    pd.testing.assert_frame_equal(pd.read_csv(victim / "regions.csv"), reference)
    pd.testing.assert_frame_equal(pd.read_csv(copy / "stats" / "regions.csv"),
                                  pd.read_csv(root / "stats" / "regions.csv"))


def test_changed_parameter_reruns_downstream_only(ran_study, tmp_path):
    root, _, _ = ran_study
    copy = tmp_path / "copy2"
    shutil.copytree(root, copy)
    manifest = copy / "study.toml"
    assert "[stats]" not in manifest.read_text()
    manifest.write_text(manifest.read_text() + "\n[stats]\nalpha = 0.01\n")
    again = run_study(manifest)
    assert not any(v is True for r in again.subjects for v in r.values())
    assert again.stats_ran and again.report_ran


def test_accuracy_against_ground_truth(ran_study):
    root, _, _ = ran_study
    ev = evaluate_census(root)
    assert ev["detection"]["recall_mean"] >= 0.85, ev["detection"]
    assert ev["detection"]["precision_mean"] >= 0.85, ev["detection"]
    assert ev["registration"]["median_error_atlas_vox"] <= 2.0, ev["registration"]
    assert ev["registration"]["fraction_true_region"] >= 0.85, ev["registration"]


def test_cli_single_stages_on_the_study(ran_study, tmp_path, run_cli, capsys):
    """validate, quantify, stats and report from the command line."""
    root, manifest, _ = ran_study
    run = run_cli

    assert run("validate", manifest) == 0
    assert "3 groups, 6 subjects" in capsys.readouterr().out
    subject = root / "subjects" / "ket30-01"
    out = tmp_path / "q"
    assert run("quantify", "--cells", subject / "detect" / "cells.parquet",
               "--registration", subject / "register", "--atlas", "phantom:100",
               "--out", out) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "regions.csv"),
                                  pd.read_csv(subject / "quantify" / "regions.csv"))
    assert run("stats", manifest) == 0
    assert run("report", manifest) == 0
    assert "report.html" in capsys.readouterr().out
