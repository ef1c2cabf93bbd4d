"""The plugin's readers, writer, sample data and manifest, on layer data (no viewer needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from ketamap.errors import InputError, KetamapError
from ketamap.io.labels import read_labels, write_labels
from ketamap.io.points import read_annotations, read_cellfinder_xml
from ketamap.napari.invivo import FATE_COLOURS, spine_fates
from ketamap.napari.readers import get_reader, prepared_to_raw_affine, read
from ketamap.napari.writers import write_points

MANIFEST = Path(__file__).resolve().parents[2] / "src" / "ketamap" / "napari" / "napari.yaml"


def _by_name(layers):
    return {kw["name"]: (data, kw, kind) for data, kw, kind in layers}


def _one_sentence(error) -> str:
    text = str(error)
    assert text.endswith(".") and "\n" not in text and "Traceback" not in text, text
    return text


# --------------------------------------------------------------------------- census subject


def test_subject_folder_opens_lazily_with_every_layer(subject_study):
    folder = subject_study["subject"]
    reader = get_reader(str(folder))
    assert reader is not None
    layers = _by_name(reader(str(folder)))
    assert list(layers) == [
        "s1 TH",
        "s1 autofluorescence",
        "s1 atlas regions",
        "s1 tissue mask",
        "s1 registration QC",
        "s1 checkerboard QC",
        "s1 cells",
    ]
    signal, kw, kind = layers["s1 TH"]
    # the pyramid, every level a lazy Dask array; the display range from the coarsest
    assert kind == "image" and kw["multiscale"] is True and len(signal) == 3
    assert all(isinstance(level, da.Array) for level in signal)
    assert [s.shape for s in signal][0] == tuple(layers["s1 TH"][0][0].shape)
    assert kw["scale"] == (60.0, 60.0, 60.0) and kw["contrast_limits"][1] > kw["contrast_limits"][0]
    assert layers["s1 autofluorescence"][1]["visible"] is False
    cells, kw, kind = layers["s1 cells"]
    table = pd.read_parquet(folder / "quantify" / "cells_atlas.parquet")
    assert kind == "points" and cells.shape == (len(table), 3)
    np.testing.assert_array_equal(cells, table[["z_vox", "y_vox", "x_vox"]].to_numpy())
    feats = kw["features"]
    assert {"snr", "contrast", "intensity", "region", "hemisphere"} <= set(feats.columns)
    assert set(feats["hemisphere"]) <= {"left", "right", ""}
    assert feats["region"].tolist() == table["acronym"].fillna("").tolist()
    meta = kw["metadata"]["ketamap"]
    assert meta["kind"] == "candidates" and meta["voxel_size_um"] == [60.0, 60.0, 60.0]
    assert meta["labels_path"] == str(subject_study["root"] / "proofread" / "s1" / "labels.csv")
    mask, kw, kind = layers["s1 tissue mask"]
    assert kind == "labels" and mask.dtype == np.uint8 and mask.any()
    assert kw["scale"][0] > 60.0 and kw["translate"][0] > 0  # one voxel per coarse block
    qc, kw, _ = layers["s1 registration QC"]
    assert qc.ndim == 3 and qc.shape[2] == 3 and kw["rgb"] is True
    # a stage folder opens its subject
    assert list(_by_name(read(folder / "detect"))) == list(layers)


def test_atlas_regions_overlay_the_counted_cells(subject_study):
    """Each cell sits on the warped atlas label of the region quantify counted it in."""
    layers = _by_name(read(subject_study["subject"]))
    labels, kw, _ = layers["s1 atlas regions"]
    feats = kw["features"].set_index("index")
    assert {"acronym", "name", "hemisphere", "region_id"} <= set(feats.columns)
    assert labels.dtype in (np.uint16, np.uint32) and set(np.unique(labels)) - {0} <= set(
        feats.index
    )
    from ketamap.atlas import load_atlas

    atlas = load_atlas("phantom:100")
    for _, row in feats.head(20).iterrows():
        assert row["acronym"] == atlas.ontology.acronym(int(row["region_id"]))
        assert row["name"] == atlas.ontology.name(int(row["region_id"]))
    cells = pd.read_parquet(subject_study["subject"] / "quantify" / "cells_atlas.parquet")
    cells = cells[cells["region_id"] > 0]
    world = np.c_[cells[["z_vox", "y_vox", "x_vox"]].to_numpy() * 60.0, np.ones(len(cells))]
    vox = np.rint((np.linalg.inv(kw["affine"]) @ world.T).T[:, :3]).astype(int)
    inside = np.all((vox >= 0) & (vox < labels.shape), axis=1)
    value = np.zeros(len(cells), dtype=int)
    value[inside] = labels[tuple(vox[inside].T)]
    region = feats["region_id"].reindex(value).to_numpy()
    side = feats["hemisphere"].reindex(value).to_numpy()
    agree = np.mean(region == cells["region_id"].to_numpy())
    same_side = np.mean(side == cells["hemisphere"].map({1: "left", 2: "right"}).to_numpy())
    assert agree >= 0.9 and same_side >= 0.95, (agree, same_side)
    # the same check with the affine's axes swapped fails: the test can tell
    swapped = kw["affine"][[2, 1, 0, 3]]
    vox = np.rint((np.linalg.inv(swapped) @ world.T).T[:, :3]).astype(int)
    inside = np.all((vox >= 0) & (vox < labels.shape), axis=1)
    value = np.zeros(len(cells), dtype=int)
    value[inside] = labels[tuple(vox[inside].T)]
    assert np.mean(feats["region_id"].reindex(value).to_numpy() == cells["region_id"]) < 0.5


@pytest.mark.parametrize("orientation", ["psl", "asr", "ipr", "lsa"])
def test_prepared_to_raw_affine_inverts_the_preparation(orientation):
    from ketamap.wholebrain.transforms import raw_to_prepared_vox

    reg = SimpleNamespace(
        sample_shape_vox=(40, 70, 55),
        sample_voxel_size_um=(5.0, 2.0, 3.0),
        sample_orientation=orientation,
        atlas_orientation="asr",
        atlas_resolution_um=(25.0, 25.0, 25.0),
    )
    raw = np.random.default_rng(0).uniform(0, 40, (50, 3))
    prepared = raw_to_prepared_vox(
        raw,
        shape_vox=reg.sample_shape_vox,
        voxel_size_um=reg.sample_voxel_size_um,
        orientation=orientation,
        atlas_orientation="asr",
        atlas_resolution_um=(25.0,) * 3,
    )
    back = (prepared_to_raw_affine(reg) @ np.c_[prepared, np.ones(50)].T).T[:, :3]
    np.testing.assert_allclose(back, raw, atol=1e-9)


def test_subject_without_a_manifest_still_shows_its_cells(subject_study, tmp_path):
    import shutil

    copy = tmp_path / "subjects" / "s1"
    shutil.copytree(subject_study["subject"], copy)
    layers = _by_name(read(copy))
    assert "s1 cells" in layers and "s1 TH" not in layers and "s1 atlas regions" not in layers
    assert layers["s1 cells"][1]["scale"] == (60.0, 60.0, 60.0)  # from registration.json
    assert layers["s1 cells"][1]["metadata"]["ketamap"]["labels_path"] == str(copy / "labels.csv")


# --------------------------------------------------------------------------- cells files


def test_cells_files_in_every_format(subject_study, tmp_path):
    detect = subject_study["subject"] / "detect"
    table = pd.read_parquet(detect / "cells.parquet")
    for name in ("cells.parquet", "cells.csv"):
        ((data, kw, kind),) = read(detect / name)
        assert kind == "points" and len(data) == len(table)
        assert kw["scale"] == pytest.approx((60.0, 60.0, 60.0))  # from the µm and voxel columns
        assert {"snr", "contrast", "intensity"} <= set(kw["features"].columns)
    ((data, kw, _),) = read(detect / "cells.xml")
    assert len(data) == len(table) and (kw["features"]["cell_type"] == 2).all()
    assert kw["scale"] == (1.0, 1.0, 1.0)  # cellfinder XML holds voxels only
    labels = table.head(4)[["z_vox", "y_vox", "x_vox"]].assign(
        label=["cell", "not_cell", "cell", "not_cell"]
    )
    write_labels(labels, tmp_path / "labels.csv")
    ((data, kw, _),) = read(tmp_path / "labels.csv")
    assert kw["features"]["label"].tolist() == labels["label"].tolist()
    green, red = kw["face_color"][0], kw["face_color"][1]
    assert green[1] > green[0] and red[0] > red[1]


def test_paths_that_are_not_ketamap_outputs_go_to_other_plugins(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "notes.xml").write_text("<notes><a/></notes>")
    (tmp_path / "image.tif").write_bytes(b"II*\x00")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    for path in ("plain", "table.csv", "notes.xml", "image.tif", "broken.parquet", "missing"):
        assert get_reader(str(tmp_path / path)) is None, path
    assert get_reader([str(tmp_path / "table.csv"), str(tmp_path / "plain")]) is None
    with pytest.raises(InputError, match="is not a ketamap output") as err:
        read(tmp_path / "plain")
    _one_sentence(err.value)


def test_recognised_but_broken_inputs_are_one_sentence(tmp_path):
    # a cells table without x_vox: recognised by its other voxel columns
    (tmp_path / "cells.csv").write_text("z_vox,y_vox,snr\n1,2,3\n")
    reader = get_reader(str(tmp_path / "cells.csv"))
    assert reader is not None
    with pytest.raises(InputError, match="x_vox") as err:
        reader(str(tmp_path / "cells.csv"))
    _one_sentence(err.value)
    # ketamap's own name, unreadable
    (tmp_path / "cells.parquet").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot be read"):
        get_reader(str(tmp_path / "cells.parquet"))(str(tmp_path / "cells.parquet"))
    # a labels file with a label that is not one
    (tmp_path / "labels.csv").write_text("z_vox,y_vox,x_vox,label\n1,2,3,perhaps\n")
    with pytest.raises(InputError, match="perhaps"):
        read(tmp_path / "labels.csv")
    # a subject folder whose cells table is corrupt
    subject = tmp_path / "study" / "subjects" / "m1" / "detect"
    subject.mkdir(parents=True)
    (subject / "cells.parquet").write_bytes(b"garbage")
    with pytest.raises(KetamapError, match="cannot be read") as err:
        get_reader(str(subject.parent))(str(subject.parent))
    _one_sentence(err.value)
    # a spines output without its centrelines, an ensembles output without its inputs
    spines = tmp_path / "spines"
    spines.mkdir()
    (spines / "summary.json").write_text(json.dumps({"spines_from": "automatic detection"}))
    pd.DataFrame(
        {"dendrite": ["d"], "session": ["a"], "spine_id": [0], "ref_y_px": [1.0], "ref_x_px": [1.0]}
    ).to_parquet(spines / "detections.parquet")
    with pytest.raises(InputError, match="centrelines.parquet") as err:
        get_reader(str(spines))(str(spines))
    _one_sentence(err.value)


# --------------------------------------------------------------------------- in vivo


def test_spines_output_by_dendrite_session_and_fate(spines_output):
    layers = _by_name(read(spines_output))
    det = pd.read_parquet(spines_output / "detections.parquet")
    summary = json.loads((spines_output / "summary.json").read_text())
    sessions = summary["sessions"]
    points, kw, kind = layers["spines by fate"]
    assert kind == "points" and points.shape[1] == 4
    feats = kw["features"]
    seen = feats[feats["fate"] != "lost"]
    # every detection of every session is there once, as stable or gained
    assert len(seen) == len(det.drop_duplicates(["dendrite", "session", "spine_id"]))
    first = seen[seen["session"] == sessions[0]]
    assert (first["fate"] == "stable").all()
    for (dend, k), g in feats.groupby(["dendrite", "session"]):
        j = sessions.index(k)
        if j == 0:
            continue
        now = set(det[(det.dendrite == dend) & (det.session == k)].spine_id)
        before = set(det[(det.dendrite == dend) & (det.session == sessions[j - 1])].spine_id)
        assert set(g.loc[g.fate == "lost", "spine_id"]) == before - now
        assert set(g.loc[g.fate == "gained", "spine_id"]) == now - before
    colours = {f: tuple(np.round(c, 3)) for f, c in zip(feats["fate"], kw["face_color"])}
    assert len(set(colours.values())) == len(set(feats["fate"])) == 3
    assert set(FATE_COLOURS) == set(feats["fate"])
    # the registered images: spines are brighter than the image around them
    images, _, kind = layers["spine images (registered)"]
    assert kind == "image" and images.shape[:2] == (2, len(sessions))
    idx = np.rint(points[feats["fate"].to_numpy() != "lost"]).astype(int)
    at_spines = images[tuple(idx.T)]
    assert np.median(at_spines) > 1.5 * np.median(images[images > 0])
    paths, kw, kind = layers["dendrite centrelines"]
    assert kind == "shapes" and len(paths) == 2 * len(sessions)


def test_spine_fates_small_case():
    det = pd.DataFrame(
        {
            "dendrite": "d",
            "session": ["a", "a", "b", "b", "c"],
            "spine_id": [1, 2, 2, 3, 3],
            "ref_y_px": [1.0, 5.0, 5.0, 9.0, 9.0],
            "ref_x_px": [1.0, 5.0, 5.0, 9.0, 9.0],
        }
    )
    got = spine_fates(det, ["a", "b", "c"])
    rows = got[["session", "spine_id", "fate"]].values.tolist()
    assert rows == [
        ["a", 1, "stable"],
        ["a", 2, "stable"],
        ["b", 2, "stable"],
        ["b", 3, "gained"],
        ["b", 1, "lost"],
        ["c", 3, "stable"],
        ["c", 2, "lost"],
    ]


def test_ensembles_output_rois_coloured_by_ensemble(ensembles_output):
    layers = _by_name(read(ensembles_output))
    assert list(layers) == ["mean images", "ensemble ROIs", "cells"]
    ens = pd.read_parquet(ensembles_output / "ensembles.parquet")
    cells = pd.read_parquet(ensembles_output / "cells.parquet")
    points, kw, _ = layers["cells"]
    feats = kw["features"]
    assert len(points) == len(cells)
    assert {"session", "cell", "ensemble", "event_rate_hz", "mean_coactivity"} <= set(feats)
    members = ens.sort_values("weight", ascending=False).drop_duplicates(["session", "cell"])
    merged = feats.merge(
        members[["session", "cell", "ensemble"]],
        on=["session", "cell"],
        how="left",
        suffixes=("", "_truth"),
    )
    assert (merged["ensemble"] == merged["ensemble_truth"].fillna(-1)).all()
    labels, kw, _ = layers["ensemble ROIs"]
    idx = np.rint(points).astype(int)
    at_centre = labels[tuple(idx.T)]
    member = feats["ensemble"].to_numpy() >= 0
    assert np.mean(at_centre[member] == feats["ensemble"].to_numpy()[member] + 1) >= 0.95
    assert np.mean(at_centre[~member] == 0) >= 0.95
    mean, _, _ = layers["mean images"]
    assert mean.shape == labels.shape and mean.std() > 0


def test_ensembles_output_without_its_inputs_is_one_sentence(ensembles_output, tmp_path):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(ensembles_output, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["sessions_file"] = str(tmp_path / "gone" / "sessions.toml")
    (copy / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match="holds no ROI positions") as err:
        get_reader(str(copy))(str(copy))
    _one_sentence(err.value)


# --------------------------------------------------------------------------- writer


def test_points_written_as_cellfinder_xml_and_labels_table(tmp_path):
    data = np.array([[1.0, 20.0, 30.0], [4.0, 50.0, 60.0], [7.0, 80.0, 90.0]])
    meta = {"features": pd.DataFrame({"label": ["cell", None, "not_cell"]})}
    (xml,) = write_points(str(tmp_path / "cells.xml"), data, meta)
    back = read_cellfinder_xml(xml).sort_values("z_vox", ignore_index=True)
    # the XML exports every cell: the unlabelled point stays a cell, the rejected one is type 1
    assert back["cell_type"].tolist() == [2, 2, 1]
    np.testing.assert_array_equal(back[["z_vox", "y_vox", "x_vox"]], data)
    (csv,) = write_points(str(tmp_path / "labels.csv"), data, meta)
    labels = read_labels(csv)
    assert labels["label"].tolist() == ["cell", "not_cell"]  # the skipped one is left out
    assert read_annotations(csv)["cell_type"].tolist() == [2, 1]  # ketamap detect train --points
    # a cells layer without labels: every point a cell
    (csv,) = write_points(str(tmp_path / "all.csv"), data, {})
    assert read_labels(csv)["label"].tolist() == ["cell"] * 3
    with pytest.raises(InputError, match="3-D points"):
        write_points(str(tmp_path / "flat.xml"), data[:, :2], {})
    with pytest.raises(InputError, match=r"\.xml"):
        write_points(str(tmp_path / "cells.txt"), data, {})


def test_spines_layer_written_as_annotations_for_a_rerun(spines_output, tmp_path):
    from ketamap.invivo.spines.annotations import import_annotations

    points, kw, _ = _by_name(read(spines_output))["spines by fate"]
    (path,) = write_points(str(tmp_path / "fixed.csv"), points, kw)
    back = import_annotations(path)
    det = pd.read_parquet(spines_output / "detections.parquet")
    assert len(back) == len(det.drop_duplicates(["dendrite", "session", "spine_id"]))
    assert set(back["session"]) == set(det["session"]) and back["spine_id"].notna().all()


# --------------------------------------------------------------------------- napari itself


def test_layer_data_builds_napari_layers(
    napari_module, subject_study, spines_output, ensembles_output
):
    from napari.layers import Layer

    for path in (
        subject_study["subject"],
        spines_output,
        ensembles_output,
        subject_study["subject"] / "detect" / "cells.xml",
    ):
        for data, kw, kind in read(path):
            layer = Layer.create(data, kw, kind)
            assert layer.name == kw["name"]
    atlas = next(d for d in read(subject_study["subject"]) if d[1]["name"].endswith("regions"))
    layer = Layer.create(*atlas)
    # what the status bar shows on hover: the features row napari finds for a label value
    for value in np.unique(atlas[0])[1:]:
        row = layer.features.iloc[layer._label_index[int(value)]]
        assert row["index"] == value and row["acronym"] and row["hemisphere"] in ("left", "right")


def test_manifest_is_valid_and_its_commands_import():
    npe2 = pytest.importorskip(
        "npe2", reason='npe2 is not installed (pip install "ketamap[napari]")'
    )
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "ketamap"
    manifest.validate_imports()
    ids = {c.id for c in manifest.contributions.commands}
    assert {r.command for r in manifest.contributions.readers} <= ids
    assert manifest.contributions.readers[0].accepts_directories
    assert {w.command for w in manifest.contributions.writers} <= ids


def test_sample_data_is_a_small_brain_to_proofread():
    from ketamap.napari.sample import simulated_brain
    from ketamap.wholebrain.classify import label_candidates

    start = time.perf_counter()
    layers = _by_name(simulated_brain())
    seconds = time.perf_counter() - start
    print(f"sample data in {seconds:.1f} s")
    assert {"simulated TH", "candidates", "true cells"} <= set(layers)
    cand, kw, _ = layers["candidates"]
    truth, _, _ = layers["true cells"]
    assert {"snr", "contrast", "intensity"} <= set(kw["features"].columns)
    cols = ["z_vox", "y_vox", "x_vox"]
    y = label_candidates(
        pd.DataFrame(cand, columns=cols),
        pd.DataFrame(truth, columns=cols),
        voxel_size_um=(60.0,) * 3,
        tolerance_um=90.0,
    )
    # the permissive first pass finds the cells and a share of non-cells to proofread
    assert 0.9 <= (y == 1).sum() / len(truth) and 0.03 <= (y != 1).mean() <= 0.6


def test_importing_the_plugin_loads_no_gui():
    code = (
        "import sys, ketamap.napari\n"
        "print(','.join(m for m in ('napari', 'qtpy', 'numpy', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_labels_go_where_the_manifest_names_them(tmp_path):
    from ketamap.manifest import Subject
    from ketamap.napari.readers import default_labels_path

    named = Subject("s1", "saline", tmp_path / "a.tif", None, (5.0, 2.0, 2.0), "psl",
                    proofread=tmp_path / "mine.csv")  # fmt: skip
    assert default_labels_path(tmp_path / "subjects" / "s1", None, named) == tmp_path / "mine.csv"
    plain = Subject("s1", "saline", tmp_path / "a.tif", None, (5.0, 2.0, 2.0), "psl")
    assert default_labels_path(tmp_path / "s1", None, plain) == tmp_path / "s1" / "labels.csv"
