"""The proofreading widget: step through candidates, say cell or not, train the second pass.

Open it from *Plugins › ketamap › Proofread cells*. Choose the cells layer (a
census subject's ``cells`` layer, or any 3-D points layer with voxel
coordinates) and the labels file, choose the order — the lowest confidence
first, or a seeded random sample whose labels estimate the precision without
bias — and press *Start*. The view centres on each candidate in turn:

======  =========================================
key     action
======  =========================================
``c``   a cell
``x``   not a cell
``s``   skip (no label written)
``b``   back to the previous candidate
======  =========================================

The keys work while the widget is shown (closing or hiding it gives them back).
Every label rewrites the labels file at once (atomically), so closing napari or
a crash loses nothing, and *Start* on the same file resumes. The widget shows
the precision estimated from the labels with its Wilson 95 % interval; *Train*
fits the second-pass classifier of ``ketamap detect train`` on the labelled
candidates and saves it (JSON) beside the labels file; *Apply* scores every
candidate with it, adds ``cell_probability`` to the layer's features and adds
the kept candidates as a new layer.

Qt and napari are imported when the widget is made, not when this module is, so
the package imports (and its tests collect) without them.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.errors import InputError, KetamapError, require
from ketamap.napari._layers import LABEL_RGBA, VOX

__all__ = [
    "proofreading_widget",
    "KEYS",
    "camera",
    "centre_on",
    "layer_cells",
]

log = logging.getLogger(__name__)

#: The widget's keys: label, key.
KEYS = {"cell": "c", "not_cell": "x", "skip": "s", "back": "b"}
ORDER_CHOICES = (
    ("lowest", "lowest confidence first"),
    ("random", "random sample (unbiased precision)"),
)


def layer_cells(layer) -> pd.DataFrame:
    """Return a points layer as a cells table: ``z_vox, y_vox, x_vox`` and its features.

    Raises
    ------
    InputError
        If the points are not 3-D.
    """
    data = np.asarray(layer.data, dtype=float)
    if data.ndim != 2 or data.shape[1] != 3:
        raise InputError(
            f"Layer {layer.name!r} holds {data.shape[-1]}-D points; proofreading needs 3-D "
            "cells (z, y, x voxels)."
        )
    table = pd.DataFrame(data, columns=VOX)
    feats = getattr(layer, "features", None)
    if feats is not None and len(feats) == len(table):
        extra = pd.DataFrame(feats).reset_index(drop=True)
        table = pd.concat([table, extra.drop(columns=VOX, errors="ignore")], axis=1)
    return table


def centre_on(viewer, world) -> None:
    """Centre the view on a world point: sliders of the hidden axes, camera on the shown ones."""
    world = np.asarray(world, dtype=float)
    ndim = viewer.dims.ndim
    if len(world) < ndim:  # a layer of fewer dimensions than the viewer: keep the leading sliders
        world = np.concatenate([np.asarray(viewer.dims.point[: ndim - len(world)]), world])
    world = world[-ndim:]
    for axis in viewer.dims.not_displayed:
        viewer.dims.set_point(axis, float(world[axis]))
    camera(viewer).center = tuple(float(world[a]) for a in viewer.dims.displayed)


def camera(viewer):
    """Return the viewer's camera: ``viewer.scene.camera`` (napari 0.9), else ``viewer.camera``."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _model_path(labels_path: Path) -> Path:
    return labels_path.with_name(f"{labels_path.stem}.classifier.json")


def proofreading_widget(napari_viewer):
    """Make the proofreading widget for a viewer (as the plugin's menu entry does).

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer

    Returns
    -------
    ProofreadingWidget
        A ``QWidget``; dock it with ``viewer.window.add_dock_widget``.
    """
    return __getattr__("ProofreadingWidget")(napari_viewer)


def __getattr__(name: str):
    """``ProofreadingWidget``, the Qt class, made on first access (napari and Qt needed)."""
    if name != "ProofreadingWidget":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require("napari", needed_for="The proofreading widget", install="ketamap[napari]")
    require(
        "qtpy",
        needed_for="The proofreading widget",
        install="ketamap[napari]",
        what="a Qt binding (qtpy with PyQt or PySide)",
    )
    return _widget_class()


def _release_keys(bound: list) -> None:
    """Give every key bound by a session back what it did before (``bound`` is emptied)."""
    for target, key, before in reversed(bound):
        try:
            target.bind_key(key, before, overwrite=True)
        except (KeyError, ValueError, TypeError, RuntimeError):  # the layer or viewer is gone
            pass
    bound.clear()


@functools.lru_cache(maxsize=1)
def _widget_class():
    """Build the widget's Qt class on first use (Qt is imported here)."""
    from qtpy.QtWidgets import (
        QComboBox,
        QFileDialog,
        QFormLayout,
        QGridLayout,
        QHBoxLayout,
        QLabel,
        QLineEdit,
        QPushButton,
        QSpinBox,
        QVBoxLayout,
        QWidget,
    )

    from ketamap.napari.proofread import Proofreader, train_from_labels

    class ProofreadingWidget(QWidget):
        """Proofread candidates in the viewer; see :mod:`ketamap.napari.widget`."""

        def __init__(self, napari_viewer):
            super().__init__()
            self.viewer = napari_viewer
            self.proofreader: Proofreader | None = None
            self.layer = None
            self.model = None
            self.model_path: Path | None = None
            self._bound = []

            self.layer_box = QComboBox()
            self.labels_edit = QLineEdit()
            self.labels_edit.setPlaceholderText("labels.csv")
            browse = QPushButton("…")
            browse.setMaximumWidth(32)
            browse.clicked.connect(self._browse)
            path_row = QHBoxLayout()
            path_row.addWidget(self.labels_edit)
            path_row.addWidget(browse)
            self.order_box = QComboBox()
            for key, text in ORDER_CHOICES:
                self.order_box.addItem(text, key)
            self.seed_box = QSpinBox()
            self.seed_box.setRange(0, 2**31 - 1)
            self.start_button = QPushButton("Start")
            self.start_button.clicked.connect(self.start)

            form = QFormLayout()
            form.addRow("cells layer", self.layer_box)
            form.addRow("labels file", path_row)
            form.addRow("order", self.order_box)
            form.addRow("seed", self.seed_box)

            self.status = QLabel("Choose a cells layer and press Start.")
            self.status.setWordWrap(True)
            self.precision = QLabel("")
            self.precision.setWordWrap(True)
            grid = QGridLayout()
            self.buttons = {}
            for i, (action, text) in enumerate(
                (("cell", "Cell"), ("not_cell", "Not a cell"), ("skip", "Skip"), ("back", "Back"))
            ):
                b = QPushButton(f"{text} [{KEYS[action]}]")
                b.clicked.connect(functools.partial(self._act, action))
                b.setEnabled(False)
                grid.addWidget(b, i // 2, i % 2)
                self.buttons[action] = b
            self.train_button = QPushButton("Train classifier")
            self.train_button.clicked.connect(self.train)
            self.apply_button = QPushButton("Apply classifier")
            self.apply_button.clicked.connect(self.apply)
            self.train_button.setEnabled(False)
            self.apply_button.setEnabled(False)
            self.classifier = QLabel("")
            self.classifier.setWordWrap(True)

            layout = QVBoxLayout(self)
            layout.addLayout(form)
            layout.addWidget(self.start_button)
            layout.addWidget(self.status)
            layout.addLayout(grid)
            layout.addWidget(self.precision)
            row = QHBoxLayout()
            row.addWidget(self.train_button)
            row.addWidget(self.apply_button)
            layout.addLayout(row)
            layout.addWidget(self.classifier)
            layout.addStretch(1)

            # a closed dock deletes the widget without a closeEvent: give the keys back then
            bound = self._bound
            self.destroyed.connect(lambda *_: _release_keys(bound))
            self.layer_box.currentIndexChanged.connect(self._layer_chosen)
            for event in ("inserted", "removed", "reordered"):
                getattr(self.viewer.layers.events, event).connect(self._refresh_layers)
            self._refresh_layers()

        # ------------------------------------------------------------ layers

        def _points_layers(self):
            from napari.layers import Points

            return [ly for ly in self.viewer.layers if isinstance(ly, Points) and ly.ndim == 3]

        def _refresh_layers(self, event=None):
            current = self.layer_box.currentText()
            names = [ly.name for ly in self._points_layers()]
            self.layer_box.blockSignals(True)
            self.layer_box.clear()
            self.layer_box.addItems(names)
            preferred = [
                n
                for n in names
                if (self.viewer.layers[n].metadata.get("ketamap") or {}).get("kind") == "candidates"
            ]
            pick = current if current in names else (preferred[0] if preferred else None)
            if pick is not None:
                self.layer_box.setCurrentText(pick)
            self.layer_box.blockSignals(False)
            self._layer_chosen()

        def _layer_chosen(self, index=None):
            name = self.layer_box.currentText()
            if not name or name not in self.viewer.layers:
                return
            meta = self.viewer.layers[name].metadata.get("ketamap") or {}
            path = meta.get("labels_path")
            if path is None and meta.get("cells_file"):
                path = str(Path(meta["cells_file"]).with_name("labels.csv"))
            if path and not self.labels_edit.text():
                self.labels_edit.setText(path)

        def _browse(self):
            path, _ = QFileDialog.getSaveFileName(
                self, "Labels file", self.labels_edit.text() or "labels.csv", "CSV (*.csv)"
            )
            if path:
                self.labels_edit.setText(path)

        # ------------------------------------------------------------ session

        def _fail(self, error: Exception, where: QLabel | None = None) -> None:
            from napari.utils.notifications import show_warning

            (where or self.status).setText(str(error))
            show_warning(str(error))

        def start(self) -> None:
            """Start (or resume) proofreading the chosen layer into the labels file."""
            try:
                name = self.layer_box.currentText()
                if not name:
                    raise InputError("Open a cells layer first (a census subject or a cells file).")
                text = self.labels_edit.text().strip()
                if not text:
                    raise InputError("Choose where the labels file goes.")
                self.layer = self.viewer.layers[name]
                cells = layer_cells(self.layer)
                self.proofreader = Proofreader(
                    cells,
                    Path(text),
                    order=self.order_box.currentData(),
                    seed=self.seed_box.value(),
                )
            except KetamapError as e:
                self._stop()
                self._fail(e)
                return
            self.model_path = _model_path(self.proofreader.path)
            self._colour_all()
            self._bind_keys()
            for b in self.buttons.values():
                b.setEnabled(True)
            self.train_button.setEnabled(True)
            self.apply_button.setEnabled(self.model is not None)
            orphans = len(self.proofreader.orphans)
            if orphans:
                self.classifier.setText(
                    f"{orphans} label(s) in {self.proofreader.path.name} match no candidate of "
                    "this layer (re-detected?); they are kept in the file."
                )
            self.show_current()

        def _stop(self) -> None:
            """End the session: keys given back, buttons off (the labels file stays)."""
            self._unbind_keys()
            self.proofreader = None
            for b in self.buttons.values():
                b.setEnabled(False)
            self.train_button.setEnabled(False)

        def _bind_keys(self) -> None:
            self._unbind_keys()
            actions = {
                KEYS["cell"]: functools.partial(self._act, "cell"),
                KEYS["not_cell"]: functools.partial(self._act, "not_cell"),
                KEYS["skip"]: functools.partial(self._act, "skip"),
                KEYS["back"]: functools.partial(self._act, "back"),
            }
            # on the viewer, and on the layer itself, whose own keys (s: select) come first
            for target in (self.viewer, self.layer):
                for key, action in actions.items():

                    def handler(_, action=action):
                        action()

                    before = target.bind_key(key, handler, overwrite=True)
                    self._bound.append((target, key, before))

        def _unbind_keys(self) -> None:
            _release_keys(self._bound)

        def _act(self, action: str, *args) -> None:
            pr = self.proofreader
            if pr is None:
                return
            try:
                if action in ("cell", "not_cell"):
                    if pr.current is None:
                        return
                    row = pr.current
                    pr.label(action)
                    self._colour(row)
                elif action == "skip":
                    pr.skip()
                else:
                    pr.back()
            except KetamapError as e:
                self._fail(e)
                return
            self.show_current()

        def _colour(self, row: int) -> None:
            colours = np.array(self.layer.face_color, dtype=float)
            colours[row] = LABEL_RGBA[self.proofreader.labels[row]]
            self.layer.face_color = colours
            if "label" not in self.layer.features:
                self.layer.features["label"] = pd.Series(
                    [None] * len(self.layer.data), dtype=object
                )
            self.layer.features.loc[row, "label"] = self.proofreader.labels[row]

        def _colour_all(self) -> None:
            pr = self.proofreader
            colours = np.array(self.layer.face_color, dtype=float)
            for row, value in enumerate(pr.labels):
                if value is not None:
                    colours[row] = LABEL_RGBA[value]
            self.layer.face_color = colours
            feats = self.layer.features.copy()
            feats["label"] = pd.Series(pr.labels, dtype=object).to_numpy()
            self.layer.features = feats

        def show_current(self) -> None:
            """Centre the view on the current candidate and show the counts and the precision."""
            pr = self.proofreader
            n = len(pr.cells)
            n_labelled = int(sum(v is not None for v in pr.labels))
            row = pr.current
            if row is None:
                self.status.setText(
                    f"All {n} candidates visited; {n_labelled} labelled in {pr.path.name}."
                )
            else:
                world = self.layer.data_to_world(self.layer.data[row])
                centre_on(self.viewer, world)
                self.layer.selected_data = {row}
                shown = [
                    f"{c} {pr.cells.at[row, c]:.3g}"
                    for c in ("snr", "contrast", "cell_probability")
                    if c in pr.cells and pd.notna(pr.cells.at[row, c])
                ]
                if "region" in pr.cells and pr.cells.at[row, "region"]:
                    shown.append(f"in {pr.cells.at[row, 'region']}")
                self.status.setText(
                    f"Candidate {pr.position + 1} of {n} ({', '.join(shown) or 'no features'}); "
                    f"{n_labelled} labelled. Cell [c], not a cell [x], skip [s], back [b]."
                )
            est = pr.estimate()
            if est["n_labelled"]:
                bias = (
                    ""
                    if pr.order_name == "random"
                    else (" Not a random sample: this is not the detector's precision.")
                )
                self.precision.setText(
                    f"Precision {est['precision']:.3f} (95 % CI {est['low']:.3f}–"
                    f"{est['high']:.3f}) from {est['n_cell']} cells and {est['n_not_cell']} "
                    f"non-cells.{bias}"
                )
            else:
                self.precision.setText("No labels yet.")

        # ------------------------------------------------------------ classifier

        def train(self) -> None:
            """Train the second-pass classifier on the labels and save it beside them."""
            from ketamap.io.atomic import atomic_path
            from ketamap.wholebrain.classify import save_classifier

            pr = self.proofreader
            if pr is None:
                return
            try:
                result = train_from_labels(pr.cells, pr.table())
                with atomic_path(self.model_path) as tmp:
                    save_classifier(result.model, tmp)
            except KetamapError as e:
                self._fail(e, self.classifier)
                return
            self.model = result.model
            self.apply_button.setEnabled(True)
            cv = result.cross_validation
            score = (
                f"{cv['n_folds']}-fold cross-validated accuracy {cv['accuracy']:.3f} (cells kept "
                f"{cv['cell_recall']:.3f}, non-cells removed {cv['non_cell_rejection']:.3f})"
                if cv["n_folds"]
                else "too few labels to cross-validate"
            )
            self.classifier.setText(
                f"Trained on {cv['n_cells']} cells and {cv['n_non_cells']} non-cells; {score}; "
                f"saved to {self.model_path}."
            )

        def apply(self) -> None:
            """Score every candidate with the classifier; add the kept ones as a new layer."""
            from ketamap.wholebrain.classify import classify_cells

            if self.model is None or self.layer is None:
                return
            try:
                cells = layer_cells(self.layer)
                p = self.model.probability(cells)
                kept = classify_cells(cells, self.model)
            except KetamapError as e:
                self._fail(e, self.classifier)
                return
            feats = self.layer.features.copy()
            feats["cell_probability"] = p
            self.layer.features = feats
            keep = p >= self.model.threshold
            name = f"{self.layer.name} (classified)"
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            self.viewer.add_points(
                np.asarray(self.layer.data)[keep],
                name=name,
                scale=self.layer.scale,
                size=self.layer.size[keep] if len(self.layer.size) else 3,
                symbol="disc",
                face_color="#55a868",
                border_width=0,
                features=feats[keep].reset_index(drop=True),
                metadata={
                    "ketamap": dict(self.layer.metadata.get("ketamap") or {})
                    | {"kind": "classified", "classifier": str(self.model_path)}
                },
            )
            self.classifier.setText(
                f"The classifier keeps {len(kept)} of {len(cells)} candidates "
                f"(probability >= {self.model.threshold:g}); model {self.model_path}."
            )

        # the keys work while the widget is shown: closing its dock (which napari does by
        # taking the widget out of the window) or hiding it gives them back
        def hideEvent(self, event):  # noqa: N802 - Qt's name
            self._unbind_keys()
            super().hideEvent(event)

        def showEvent(self, event):  # noqa: N802 - Qt's name
            super().showEvent(event)
            if self.proofreader is not None and not self._bound:
                self._bind_keys()

        def closeEvent(self, event):  # noqa: N802 - Qt's name
            self._unbind_keys()
            super().closeEvent(event)

    return ProofreadingWidget
