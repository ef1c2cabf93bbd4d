"""End to end on a small simulated study: outputs, provenance, resume, atomicity, accuracy."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from ketamap.atlas import load_atlas
from ketamap.io.volumes import open_volume, read_voxel_size_um
from ketamap.pipelines.census import run_study
from ketamap.simulate import BrainParams, simulate_census
from ketamap.simulate.evaluate import evaluate_census

PARAMS = BrainParams(voxel_size_um=(60.0, 60.0, 60.0), orientation="psl")


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    manifest = simulate_census(
        root, atlas="phantom:100", scenario="ketamine-10day", n_per_group=2, params=PARAMS, seed=3
    )
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
        "DR",
        "DMH",
        "MPN",
        "ZI",
        "SNr",
    }
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
    pd.testing.assert_frame_equal(
        pd.read_csv(copy / "stats" / "regions.csv"), pd.read_csv(root / "stats" / "regions.csv")
    )


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


def test_one_report_page_whose_figure_links_resolve(ran_study, tmp_path):
    """The report is written once, at the study root (the path ``run`` prints); the
    figure files its captions link to exist under report/figures; a deleted page is
    rebuilt by the next run, and a run with nothing to do rebuilds nothing."""
    import re

    from ketamap.manifest import load_study
    from ketamap.pipelines.census import run_report

    root, _, _ = ran_study
    pages = sorted(p.relative_to(root) for p in root.rglob("*.html"))
    assert [str(p) for p in pages] == ["report.html"]
    html = (root / "report.html").read_text()
    links = re.findall(r'href="([^"#][^"]*)"', html)
    files = [link for link in links if not link.startswith("data:")]
    assert len(files) >= 6 and {f.rsplit(".", 1)[1] for f in files} == {"png", "svg"}
    for link in files:
        assert link.startswith("report/figures/") and (root / link).is_file(), link
    assert html.count('class="zoom"') >= 6 + len(files) // 2  # QC images and figures
    assert "Atlas boundaries are drawn at depth 4 of the region hierarchy" in html
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    study = load_study(copy / "study.toml")
    assert run_report(study) is False
    (copy / "report.html").unlink()
    assert run_report(study) is True
    assert (copy / "report.html").stat().st_size > 10_000
    assert not (copy / "report" / "report.html").exists()
    assert run_report(study) is False


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
    assert (
        run(
            "quantify",
            "--cells",
            subject / "detect" / "cells.parquet",
            "--registration",
            subject / "register",
            "--atlas",
            "phantom:100",
            "--out",
            out,
        )
        == 0
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "regions.csv"), pd.read_csv(subject / "quantify" / "regions.csv")
    )
    assert run("stats", manifest) == 0
    assert run("report", manifest) == 0
    assert "report.html" in capsys.readouterr().out


def test_quantify_refuses_cells_of_another_image(ran_study, tmp_path, run_cli, capsys):
    """Cells that do not fit the registered image's shape or voxel size: one sentence."""
    root, _, _ = ran_study
    subject = root / "subjects" / "ket30-01"
    cells = pd.read_parquet(subject / "detect" / "cells.parquet")
    args = ("--registration", subject / "register", "--atlas", "phantom:100")
    # detected in an image three times larger
    bigger = cells.assign(**{c: cells[c] * 3 for c in ("z_vox", "y_vox", "x_vox")})
    bigger.drop(columns=["z_um", "y_um", "x_um"]).to_csv(tmp_path / "big.csv", index=False)
    assert run_cli("quantify", "--cells", tmp_path / "big.csv", *args, "--out", tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "lie outside the registered image" in err and "Traceback" not in err
    # detected at another voxel size (the µm columns say 30 µm, the image has 60)
    other = cells.assign(**{c: cells[c] / 2 for c in ("z_um", "y_um", "x_um")})
    other.to_csv(tmp_path / "other.csv", index=False)
    out = tmp_path / "b"
    assert run_cli("quantify", "--cells", tmp_path / "other.csv", *args, "--out", out) == 2
    assert "voxel size of 30 µm along z" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not out.exists()


def test_flagged_subjects_stop_unless_allowed(ran_study, tmp_path, run_cli, capsys):
    """A flagged subject is not counted: the others finish, the run exits 2 naming it; with
    --allow-flagged it is counted and the report marks it."""
    root, _, _ = ran_study
    work = tmp_path / "study"
    shutil.copytree(root, work)
    manifest = work / "study.toml"
    text = manifest.read_text()
    assert "[detection]\n" in text
    # every brain "near-empty": the detection QC flags all six
    manifest.write_text(text.replace("[detection]\n", "[detection]\nqc_min_cells = 1000000\n"))
    shutil.rmtree(work / "report")
    assert run_cli("run", manifest) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "6 of 6 subjects stopped before counting" in err, err
    assert "detection flagged:" in err and "--allow-flagged" in err and "Traceback" not in err
    assert not (work / "report").exists()
    assert run_cli("run", manifest, "--allow-flagged") == 0
    captured = capsys.readouterr()
    assert "counted although detection flagged" in " ".join(captured.err.split())
    # progress: counts, and which stages ran (detect and register were up to date)
    assert "saline-01: quantify\n" in captured.err and "[8/8] report" in captured.err
    assert f"report: {work / 'report.html'}" in " ".join(captured.out.split())
    html = (work / "report.html").read_text()
    assert "6 of 6 mice flagged" in html


DETECTION_QC_KEYS = ("n_candidates", "n_outside_tissue", "n_below_tissue_floor",
                     "tissue_fraction", "tissue_void_level", "tissue_level", "tissue_noise_sd",
                     "tissue_floor", "chunks_without_tissue")  # fmt: skip


def _qc_html(report) -> str:
    """The per-mouse QC table of a report.html."""
    html = report.read_text()
    start = html.index('<table id="qc-table">')
    return html[start : html.index("</table>", start)]


def test_detect_writes_the_tissue_mask_and_its_qc(ran_study):
    from ketamap.io.volumes import open_volume, read_voxel_size_um

    root, _, _ = ran_study
    for sid in ("saline-01", "ket100-02"):
        det = root / "subjects" / sid / "detect"
        qc = json.loads((det / "detection_qc.json").read_text())
        result = json.loads((det / "provenance.json").read_text())["result"]
        for key in DETECTION_QC_KEYS:
            assert key in qc and result[key] == qc[key], key
        assert "tissue" not in qc and "tissue" not in result
        # the simulated brain sits in 300 µm of empty space: part of the volume is void
        assert 0.2 < qc["tissue_fraction"] < 0.95, qc
        assert qc["n_candidates"] >= result["n_cells"] + qc["n_outside_tissue"]
        mask = np.asarray(open_volume(det / "tissue_mask.ome.zarr").compute())
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert list(mask.shape) == qc["tissue_grid_shape"]
        assert mask.mean() > 0.1
        block = np.asarray(qc["tissue_block_vox"]) * np.asarray(PARAMS.voxel_size_um)
        assert read_voxel_size_um(det / "tissue_mask.ome.zarr") == pytest.approx(tuple(block))


def test_tissue_mask_agrees_with_the_registered_atlas_brain(ran_study):
    root, _, _ = ran_study
    values = {}
    for sid in sorted(p.name for p in (root / "subjects").iterdir()):
        quant = root / "subjects" / sid / "quantify"
        summary = json.loads((quant / "summary.json").read_text())
        result = json.loads((quant / "provenance.json").read_text())["result"]
        dice = summary["tissue_atlas_dice"]
        assert isinstance(dice, float) and result["tissue_atlas_dice"] == dice
        values[sid] = dice
    assert all(0.0 <= d <= 1.0 for d in values.values()), values
    assert min(values.values()) > 0.8, values


def test_report_qc_table_shows_the_tissue_columns(ran_study):
    from ketamap.manifest import load_study
    from ketamap.pipelines.census import _qc_table

    root, manifest, _ = ran_study
    qc = _qc_table(load_study(manifest))
    new = ["n_outside_tissue", "n_below_tissue_floor", "tissue_fraction", "tissue_atlas_dice"]
    assert set(new) <= set(qc.columns)
    assert qc[new].notna().all().all()
    table = _qc_html(root / "report.html")
    for key, label in [("n_outside_tissue", "cells dropped outside tissue"),
                       ("n_below_tissue_floor", "cells dropped below tissue noise floor"),
                       ("tissue_fraction", "tissue fraction of volume"),
                       ("tissue_atlas_dice", "tissue vs atlas brain Dice")]:  # fmt: skip
        assert f'<th title="{key}">{label}</th>' in table


def test_study_folders_without_the_tissue_qc_still_report(ran_study, tmp_path):
    """Folders from before the tissue mask: no QC keys, no mask; the report shows dashes."""
    from ketamap.manifest import load_study
    from ketamap.pipelines.census import _qc_table, run_report

    root, _, _ = ran_study
    copy = tmp_path / "old"
    shutil.copytree(root, copy)
    for det in (copy / "subjects").glob("*/detect"):
        prov = json.loads((det / "provenance.json").read_text())
        prov["result"] = {k: prov["result"][k] for k in ("n_cells", "shape")}
        (det / "provenance.json").write_text(json.dumps(prov))
        shutil.rmtree(det / "tissue_mask.ome.zarr")
        (det / "detection_qc.json").unlink()
    # quantify again without a mask: the Dice is null
    run_study(copy / "study.toml", stages=["quantify"], force=True)
    summary = json.loads((copy / "subjects" / "saline-01" / "quantify" / "summary.json")
                         .read_text())  # fmt: skip
    assert summary["tissue_atlas_dice"] is None
    for summ in (copy / "subjects").glob("*/quantify/summary.json"):
        summ.write_text(json.dumps({k: v for k, v in json.loads(summ.read_text()).items()
                                    if k != "tissue_atlas_dice"}))  # fmt: skip
    study = load_study(copy / "study.toml")
    qc = _qc_table(study)
    assert qc[["n_outside_tissue", "tissue_fraction", "tissue_atlas_dice"]].isna().all().all()
    run_report(study, force=True)
    table = _qc_html(copy / "report.html")
    assert "<td>\u2014</td>" in table


def test_white_matter_and_ventricles_are_not_tested(ran_study):
    """By default the fibre tracts and the ventricles (whole subtrees) get no density test."""
    from ketamap.atlas import load_atlas

    root, _, summary = ran_study
    onto = load_atlas("phantom:100").ontology
    skipped = {
        r
        for a in ("fiber tracts", "VS")
        for r in onto.descendants(onto.lookup(a), include_self=True)
    }
    assert len(skipped) > 2
    regions = pd.read_csv(root / "stats" / "regions.csv")
    assert not regions["region_id"].isin(skipped).any()
    counts = pd.read_csv(root / "subjects" / "saline-01" / "quantify" / "regions.csv")
    assert counts["region_id"].isin(skipped).any()  # still counted, only not tested
    prov = json.loads((root / "stats" / "provenance.json").read_text())
    assert prov["result"]["n_untested_regions"] == len(skipped)


def test_tests_the_design_cannot_support_are_said_plainly(ran_study):
    """Two mice per group: 6 relabellings, so no voxel FWE p below 0.33; a network needs 3
    mice per group. Neither is run; the report says so instead of showing empty results."""
    root, _, _ = ran_study
    prov = json.loads((root / "stats" / "provenance.json").read_text())["result"]
    contrasts = prov["voxels"]["contrasts"]
    assert contrasts and all("only 6 relabellings, so no FWE p below 0.33" in c["skipped"]
                             for c in contrasts)  # fmt: skip
    assert "3 mice per group" in prov["network"]["skipped"]
    assert not list((root / "stats" / "voxel_maps").glob("p_fwe_*"))
    assert list((root / "stats" / "voxel_maps").glob("log2_fold_change_*.ome.zarr"))
    html = " ".join((root / "report.html").read_text().split())
    assert "Tests the design cannot support" in html and "only 6 relabellings" in html


def test_classifier_named_in_the_manifest_is_the_second_pass(ran_study, tmp_path, run_cli):
    """[study] classifier = "model.json": the detect stage applies it, records how many
    candidates it rejected, and the stages downstream of detection run again."""
    from ketamap.wholebrain.classify import save_classifier, train_classifier

    root, _, _ = ran_study
    work = tmp_path / "study"
    shutil.copytree(root, work)
    first = pd.read_parquet(work / "subjects" / "saline-01" / "detect" / "cells.parquet")
    labels = (first["snr"] > first["snr"].median()).astype(np.int64).to_numpy()
    save_classifier(train_classifier(first, labels), work / "model.json")
    manifest = work / "study.toml"
    text = manifest.read_text().replace("[study]\n", '[study]\nclassifier = "model.json"\n', 1)
    manifest.write_text(text)
    assert run_cli("run", manifest) == 0
    log = (work / "logs" / "ketamap.log").read_text()  # every stage's log, kept with the study
    assert "stats: done in" in log and "INFO" in log
    det = work / "subjects" / "saline-01" / "detect"
    cells = pd.read_parquet(det / "cells.parquet")
    assert "cell_probability" in cells and 0 < len(cells) < len(first)
    result = json.loads((det / "provenance.json").read_text())["result"]
    assert result["n_rejected_by_classifier"] == len(first) - len(cells)
    quant = work / "subjects" / "saline-01" / "quantify"
    summary = json.loads((quant / "summary.json").read_text())
    assert summary["n_cells"] == len(cells)  # the corrected cells are the ones counted


def test_fibres_stage_runs_only_when_asked_and_only_itself(ran_study, tmp_path):
    """[fibres] in the manifest adds the fibres stage; nothing upstream is recomputed."""
    import json

    root, _, summary = ran_study
    assert all("fibres" not in r for r in summary.subjects)  # no [fibres]: no stage
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    manifest = copy / "study.toml"
    # strict thresholds: on this 60 µm cell channel, seeds at 5 noise SDs grown down to
    # 1.5 call 44 % of the brain fibre and take 7 x longer; these call 1.4 %
    manifest.write_text(
        manifest.read_text() + "\n[fibres]\nthreshold_snr = 12.0\nhysteresis_snr = 8.0\n"
    )
    again = run_study(manifest, stages=("detect", "register", "quantify", "fibres"))
    annotation = load_atlas("phantom:100").annotation
    for r in again.subjects:
        assert r["fibres"] is True
        assert not any(r[k] for k in ("detect", "register", "quantify"))
        out = copy / "subjects" / r["subject"] / "fibres"
        assert (out / "fibre_mask.ome.zarr").is_dir() and (out / "skeleton.ome.zarr").is_dir()
        table = pd.read_parquet(out / "fibre_regions.parquet")
        assert {"region_id", "level", "length_density_mm_per_mm3", "voxel_fraction"} <= set(table)
        qc = json.loads((out / "fibre_qc.json").read_text())
        assert qc["total_length_mm"] >= 0
        # the skeleton's length mapped into atlas space: what lands in the atlas volume
        atlas_map = open_volume(out / "fibre_density_atlas.ome.zarr").compute()
        assert atlas_map.shape == (132, 80, 114) and read_voxel_size_um(
            out / "fibre_density_atlas.ome.zarr"
        ) == (100.0, 100.0, 100.0)
        held_mm = float(atlas_map.astype(np.float64).sum()) * 0.1**3
        assert held_mm == pytest.approx(qc["atlas_length_mm"], rel=1e-4)
        # about 1 % of this field of view's skeleton lies beyond the atlas box (measured)
        assert 0.97 * qc["total_length_mm"] <= qc["atlas_length_mm"] <= qc["total_length_mm"]
        # in the brain, the map holds what the region table measured in the sample; the
        # two differ at the brain's boundary, where a skeleton voxel's rounded atlas point
        # and the labels warped onto the sample grid can fall on different sides
        # (measured: 0.02-1.4 % over the six mice)
        in_brain_mm = float(atlas_map[annotation > 0].astype(np.float64).sum()) * 0.1**3
        root_mm = table.loc[table["acronym"] == "root", "length_um"].iloc[0] / 1000
        assert in_brain_mm == pytest.approx(root_mm, rel=0.02)
    # the study stages compare fibre densities and report them
    full = run_study(manifest)
    assert full.stats_ran and full.report_ran and not any(r["fibres"] for r in full.subjects)
    fibres = pd.read_csv(copy / "stats" / "fibres.csv")
    assert set(fibres["measure"]) == {"length_density_mm_per_mm3", "voxel_fraction"}
    assert {"ket30_vs_saline", "ket100_vs_saline", "dose_trend"} <= set(fibres["contrast"])
    assert fibres["p"].between(0, 1).all()
    # ... and map them voxel-wise beside the cells, with the cells' test
    maps = copy / "stats" / "fibre_voxel_maps"
    for name in ("mask", "mean_density_saline", "mean_density_ket100",
                 "log2_fold_change_ket100_vs_saline"):  # fmt: skip
        assert (maps / f"{name}.ome.zarr").is_dir() and (maps / f"{name}.nii.gz").is_file()
    assert (copy / "stats" / "fibre_voxel_clusters.parquet").is_file()
    prov = json.loads((copy / "stats" / "provenance.json").read_text())["result"]
    # two mice per group: 6 relabellings, no FWE p below 1/3, said as for the cells
    assert all("relabellings" in c["skipped"] for c in prov["fibre_voxels"]["contrasts"])
    page = (copy / "report.html").read_text()
    assert "Fibres: fibre length density" in page
    assert "fibre length density in atlas space" in page
    assert "Fibre voxel tests the design cannot support" in page
    # a changed fibre parameter reruns the fibres stage alone, then the study stages
    manifest.write_text(
        manifest.read_text().replace("threshold_snr = 12.0", "threshold_snr = 13.0")
    )
    third = run_study(manifest)
    assert all(r["fibres"] is True and not r["quantify"] for r in third.subjects)
    assert third.stats_ran


def test_proofread_labels_correct_the_counts_and_rerun_only_downstream(ran_study, tmp_path):
    """A subject's proofread labels drop its not-cells; quantify, stats and report rerun."""
    import json

    from ketamap.io.labels import write_labels

    root, _, _ = ran_study
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    sid = "ket30-01"
    cells = pd.read_parquet(copy / "subjects" / sid / "detect" / "cells.parquet")
    labels = cells[["z_vox", "y_vox", "x_vox"]].iloc[:10].copy()
    labels["label"] = ["not_cell"] * 4 + ["cell"] * 6
    write_labels(labels, copy / "labels.csv")
    manifest = copy / "study.toml"
    text = manifest.read_text()
    at = text.index(f'id = "{sid}"')
    manifest.write_text(text[:at] + 'proofread = "labels.csv"\n' + text[at:])
    before = pd.read_csv(copy / "subjects" / sid / "quantify" / "regions.csv")
    summary = run_study(manifest)
    ran = {r["subject"]: [k for k in ("detect", "register", "quantify") if r[k]]
           for r in summary.subjects}  # fmt: skip
    assert ran.pop(sid) == ["quantify"] and not any(ran.values())
    assert summary.stats_ran and summary.report_ran
    after = pd.read_csv(copy / "subjects" / sid / "quantify" / "regions.csv")
    root_before = before.loc[before["acronym"] == "root", "count"].sum()
    root_after = after.loc[after["acronym"] == "root", "count"].sum()
    found = json.loads((copy / "subjects" / sid / "quantify" / "summary.json").read_text())
    assert found["n_proofread"] == 10 and found["n_rejected_by_proofreading"] == 4
    assert found["proofread_precision"] == 0.6
    assert found["n_cells"] == len(cells) - 4
    assert root_before - root_after == 4  # the four not-cells lay inside the brain
    prov = json.loads((copy / "subjects" / sid / "quantify" / "provenance.json").read_text())
    assert "proofread" in prov["inputs"]
    assert "candidates proofread" in (copy / "report.html").read_text()
    # labels for candidates that no longer exist: one sentence, the labels file untouched
    moved = labels.assign(z_vox=labels["z_vox"] + 50.0)
    write_labels(moved, copy / "labels.csv")
    kept = (copy / "labels.csv").read_bytes()
    from ketamap.errors import InputError

    with pytest.raises(InputError, match="match no detected candidate"):
        run_study(manifest)
    assert (copy / "labels.csv").read_bytes() == kept


def test_fibre_demo_measures_each_mouse_once(tmp_path):
    """The demo's fibre part: per-mouse crops (resumable), then the group comparison."""
    from ketamap.demo import run_fibre_demo

    subjects = pd.DataFrame({"subject": ["s1", "s2", "k1", "k2"],
                             "group": ["saline", "saline", "ket100", "ket100"],
                             "dose_mg_per_kg": [0, 0, 100, 100]})  # fmt: skip
    found = run_fibre_demo(tmp_path, subjects, seed=1)
    assert {p["acronym"] for p in found["planted"]} == {"PL", "CP", "SSp"}
    assert all(p["right_direction"] for p in found["planted"] if p["acronym"] != "PL")
    # in the crops' interiors, as the accuracy benchmark (measured: median 0.035, max 0.076)
    assert found["length_error"]["median"] < 0.06 and found["length_error"]["max"] <= 0.10
    stamp = (tmp_path / "subjects" / "s1" / "provenance.json").stat().st_mtime_ns
    run_fibre_demo(tmp_path, subjects, seed=1)
    assert (tmp_path / "subjects" / "s1" / "provenance.json").stat().st_mtime_ns == stamp
