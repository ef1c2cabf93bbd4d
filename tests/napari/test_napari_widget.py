"""The plugin in a real viewer: open a subject, proofread with the keys, train, apply.

Needs napari and a display (see ``conftest.py``); the screenshot of the session
is kept as ``build/test-artifacts/napari_proofreading.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ketamap.io.labels import read_labels
from ketamap.napari.widget import camera

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
MANIFEST = Path(__file__).resolve().parents[2] / "src" / "ketamap" / "napari" / "napari.yaml"


@pytest.fixture(scope="session")
def plugin(napari_module):
    """The plugin registered with napari's plugin manager from its manifest (no install needed).

    Registered once for the session: napari keeps a plugin's commands after it is
    unregistered, so registering it again would clash.
    """
    import npe2

    pm = npe2.PluginManager.instance()
    if "ketamap" not in {m.name for m in pm.iter_manifests()}:
        pm.register(npe2.PluginManifest.from_file(MANIFEST))
    return pm


def _opened(viewer, path):
    viewer.open(str(path), plugin="ketamap")
    return viewer


def _press(qtbot, viewer, keys: str):
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    for key in keys:
        qtbot.keyClick(canvas, key)


def _widget(viewer, qtbot):
    """The widget docked and shown (napari's test viewer leaves a new dock hidden)."""
    dock, widget = viewer.window.add_plugin_dock_widget("ketamap", "Proofread cells")
    dock.show()
    qtbot.waitUntil(widget.isVisible, timeout=5000)
    return widget


def test_keys_label_candidates_and_each_label_is_saved(
    viewer, plugin, qtbot, subject_study, tmp_path
):
    _opened(viewer, subject_study["subject"])
    names = [layer.name for layer in viewer.layers]
    assert "s1 TH" in names and "s1 cells" in names and "s1 atlas regions" in names
    assert viewer.layers["s1 TH"].multiscale
    widget = _widget(viewer, qtbot)
    assert widget.layer_box.currentText() == "s1 cells"
    assert widget.labels_edit.text() == str(
        subject_study["root"] / "proofread" / "s1" / "labels.csv"
    )
    path = tmp_path / "labels.csv"
    widget.labels_edit.setText(str(path))
    widget.start()
    layer = viewer.layers["s1 cells"]
    pr = widget.proofreader
    first = pr.current
    # the view is centred on the candidate: its plane is shown and the camera is on it
    world = layer.data_to_world(layer.data[first])
    assert abs(viewer.dims.point[0] - world[0]) <= 30.0  # the plane holding it (60 µm voxels)
    np.testing.assert_allclose(camera(viewer).center[1:], world[1:])
    assert layer.selected_data == {first}

    expected = []
    for key, label in (("c", "cell"), ("x", "not_cell"), ("s", None), ("c", "cell")):
        row = pr.current
        _press(qtbot, viewer, key)
        if label is not None:
            expected.append((row, label))
        # after every key the file holds exactly the labels made so far
        on_disk = read_labels(path) if path.exists() else None
        assert (0 if on_disk is None else len(on_disk)) == len(expected)
    made = dict(expected)
    assert read_labels(path)["label"].tolist() == [made[r] for r in sorted(made)]
    assert layer.features.loc[expected[0][0], "label"] == "cell"
    colours = np.asarray(layer.face_color)
    assert colours[expected[0][0]][1] > colours[expected[0][0]][0]  # green: a cell
    assert colours[expected[1][0]][0] > colours[expected[1][0]][1]  # red: not a cell
    assert "Precision 0.667" in widget.precision.text()
    assert "Not a random sample" in widget.precision.text()
    # b goes back; a second widget session on the same file resumes
    _press(qtbot, viewer, "b")
    assert pr.current == expected[-1][0]
    widget.start()
    assert widget.proofreader.estimate()["n_labelled"] == 3

    # the screenshot of a proofreading session, kept as a test artefact
    viewer.layers["s1 atlas regions"].visible = True
    camera(viewer).zoom = 3.0 * camera(viewer).zoom
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = viewer.screenshot(str(ARTIFACTS / "napari_proofreading.png"), canvas_only=False)
    assert shot.shape[0] >= 500 and shot.shape[1] >= 800 and shot[..., :3].std() > 10


def test_train_and_apply_from_the_widget(viewer, plugin, qtbot, subject_study, tmp_path):
    _opened(viewer, subject_study["subject"])
    widget = _widget(viewer, qtbot)
    widget.labels_edit.setText(str(tmp_path / "labels.csv"))
    widget.order_box.setCurrentIndex(1)  # random sample
    widget.start()
    widget.train()
    assert "needs both cells and non-cells" in widget.classifier.text()  # no labels yet
    _press(qtbot, viewer, "cxcxcxcxcxcx")
    assert "Not a random sample" not in widget.precision.text()
    from qtpy.QtCore import Qt

    qtbot.mouseClick(widget.train_button, Qt.MouseButton.LeftButton)
    model = tmp_path / "labels.classifier.json"
    assert model.is_file() and "Trained on 6 cells and 6 non-cells" in widget.classifier.text()
    widget.apply()
    layer = viewer.layers["s1 cells"]
    assert "cell_probability" in layer.features
    kept = viewer.layers["s1 cells (classified)"]
    p = layer.features["cell_probability"].to_numpy()
    assert len(kept.data) == int((p >= 0.5).sum())
    assert f"keeps {len(kept.data)} of {len(layer.data)}" in widget.classifier.text()


def test_atlas_hover_names_region_and_hemisphere(viewer, plugin, subject_study):
    _opened(viewer, subject_study["subject"])
    layer = viewer.layers["s1 atlas regions"]
    value = int(np.max(layer.data))
    voxel = np.argwhere(layer.data == value)[len(np.argwhere(layer.data == value)) // 2]
    world = layer.data_to_world(voxel)
    viewer.dims.set_point(0, world[0])
    status = layer.get_status(tuple(world), world=True)
    text = status["coordinates"] if isinstance(status, dict) else str(status)
    row = layer.features.set_index("index").loc[value]
    assert f"acronym: {row['acronym']}" in text and f"hemisphere: {row['hemisphere']}" in text


def test_bad_input_is_one_sentence_in_the_widget(viewer, plugin, qtbot, tmp_path):
    widget = _widget(viewer, qtbot)
    widget.start()  # no cells layer
    assert widget.status.text() == "Open a cells layer first (a census subject or a cells file)."
    viewer.add_points(np.zeros((3, 2)), name="flat")  # 2-D points are not candidates
    assert widget.layer_box.count() == 0
    viewer.add_points(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), name="cells")
    assert widget.layer_box.currentText() == "cells"
    widget.labels_edit.setText("")
    widget.start()
    assert widget.status.text() == "Choose where the labels file goes."
    bad = tmp_path / "labels.csv"
    bad.write_text("z_vox,y_vox,x_vox,label\n1,2,3,yes\n")
    widget.labels_edit.setText(str(bad))
    widget.start()
    assert "row 1 has the label 'yes'" in widget.status.text() and widget.proofreader is None
    assert bad.read_text() == "z_vox,y_vox,x_vox,label\n1,2,3,yes\n"  # the file is left alone


def test_saving_from_napari_and_closing_the_widget(viewer, plugin, qtbot, subject_study, tmp_path):
    from ketamap.io.points import read_cellfinder_xml

    _opened(viewer, subject_study["subject"])
    widget = _widget(viewer, qtbot)
    widget.labels_edit.setText(str(tmp_path / "labels.csv"))
    widget.start()
    _press(qtbot, viewer, "cx")
    layer = viewer.layers["s1 cells"]
    # File › Save Selected Layers with the ketamap writer
    viewer.layers.selection = {layer}
    viewer.layers.save(str(tmp_path / "cells.xml"), selected=True, plugin="ketamap")
    viewer.layers.save(str(tmp_path / "labels_copy.csv"), selected=True, plugin="ketamap")
    xml = read_cellfinder_xml(tmp_path / "cells.xml")
    assert len(xml) == len(layer.data) and (xml["cell_type"] == 1).sum() == 1
    assert read_labels(tmp_path / "labels_copy.csv").equals(read_labels(tmp_path / "labels.csv"))
    # a closed widget gives the keys back: s is the layer's select mode again
    viewer.window.remove_dock_widget(widget)
    qtbot.waitUntil(lambda: not widget.isVisible(), timeout=5000)
    _press(qtbot, viewer, "s")
    assert str(layer.mode) == "select"
    assert len(read_labels(tmp_path / "labels.csv")) == 2
