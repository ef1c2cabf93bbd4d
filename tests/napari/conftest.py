"""Fixtures of the napari plugin tests: simulated outputs, napari itself, a display, a viewer.

The readers, the writer and the proofreading logic need neither napari nor a
screen and always run. Tests that build napari layers need napari (``pip install
"ketamap[napari]"``); tests with a viewer also need a display with OpenGL: the
``DISPLAY`` of the session, or an Xvfb server this file starts when ``Xvfb`` is
installed (Debian's ``xvfb``). Without them those tests skip, unless
``KETAMAP_REQUIRE_NAPARI=1`` (set by CI), which turns the skip into a failure.
The screenshots are kept in ``build/test-artifacts/``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

VOXEL_UM = (60.0, 60.0, 60.0)
_SERVERS: list = []  # Xvfb servers that outlive the session fixture (see _x_display)


def _required() -> bool:
    return os.environ.get("KETAMAP_REQUIRE_NAPARI", "") not in ("", "0")


def missing(reason: str):
    """Skip with ``reason``, or fail when CI requires the napari tests to run."""
    if _required():
        pytest.fail(f"{reason} and KETAMAP_REQUIRE_NAPARI is set")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def napari_module():
    """napari itself, or a skip saying how to install it."""
    try:
        import napari.viewer  # noqa: F401 - a real napari, not this folder
    except ImportError:
        missing('napari is not installed (pip install "ketamap[napari]")')
    import napari

    return napari


@pytest.fixture(scope="session", autouse=True)
def _x_display():
    """Start an Xvfb server for the session when there is no display and Xvfb is installed.

    Autouse and session-wide, so that it runs before anything makes the Qt
    application (which reads ``DISPLAY`` once); tests without a viewer ignore it.
    """
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or not shutil.which("Xvfb"):
        yield None
        return
    from ketamap.napari._display import start_xvfb

    proc, display = start_xvfb(terminate_with_last_client=True)
    if proc is None:
        yield None
        return
    os.environ["DISPLAY"] = display
    yield os.environ["DISPLAY"]
    del os.environ["DISPLAY"]
    if _qt_application() is None:
        proc.terminate()
        proc.wait(timeout=10)
    else:
        # Qt is still connected (pytest-qt's application lives until the process exits):
        # killing the server now would make Qt exit with an error, so -terminate ends it
        # when its last client, this process, is gone; held here until then
        _SERVERS.append(proc)


def _qt_application():
    """The Qt application of this process, if one was made."""
    for binding in ("PyQt6", "PySide6", "PyQt5", "PySide2"):
        widgets = sys.modules.get(f"{binding}.QtWidgets")
        if widgets is not None and widgets.QApplication.instance() is not None:
            return widgets.QApplication.instance()
    return None


@pytest.fixture(scope="session")
def display():
    """The X display the viewer tests draw on, or a skip saying how to get one."""
    name = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if not name:
        missing("no display and no Xvfb to start one (apt-get install xvfb, or run under xvfb-run)")
    return name


@pytest.fixture
def viewer(napari_module, display, request):
    """A napari viewer (napari's ``make_napari_viewer``), shown on the display."""
    make = request.getfixturevalue("make_napari_viewer")
    v = make(show=True)
    v.window.resize(1500, 950)
    return v


def one_subject_study(root: Path, *, seed: int = 3) -> dict:
    """A study of one simulated brain, run through detect, register and quantify.

    The signal is a 3-level OME-Zarr pyramid (60, 120, 240 µm). Returns the paths
    and the true cells.
    """
    from ketamap.atlas import load_atlas
    from ketamap.io.volumes import write_ome_zarr
    from ketamap.manifest import Group, Imaging, Study, Subject, load_study, study_to_toml
    from ketamap.pipelines.census import run_subject
    from ketamap.simulate import BrainParams, simulate_brain

    atlas = load_atlas("phantom:100")
    brain = simulate_brain(
        atlas,
        fold_changes={},
        densities={},
        seed=seed,
        params=BrainParams(voxel_size_um=VOXEL_UM, orientation="psl"),
    )
    data = root / "data" / "s1"
    signal = write_ome_zarr(
        brain.signal, data / "signal.ome.zarr", voxel_size_um=VOXEL_UM, levels=3
    )
    background = write_ome_zarr(
        brain.background, data / "background.ome.zarr", voxel_size_um=VOXEL_UM
    )
    study = Study(
        name="napari-test",
        atlas="phantom:100",
        marker="TH",
        reference_group="saline",
        imaging=Imaging(VOXEL_UM, "psl", "TH", "autofluorescence"),
        groups=(Group("saline", 0.0),),
        subjects=(Subject("s1", "saline", signal, background, VOXEL_UM, "psl", {}),),
        root=root,
    )
    (root / "study.toml").write_text(study_to_toml(study))
    study = load_study(root / "study.toml")
    done = run_subject(study, study.subjects[0])
    assert done["quantify"] is True, done
    return {
        "root": root,
        "subject": root / "subjects" / "s1",
        "signal": signal,
        "truth": brain.cells,
        "study": study,
    }


@pytest.fixture(scope="session")
def subject_study(tmp_path_factory):
    """One simulated subject with every census stage's outputs (about 25 s)."""
    return one_subject_study(tmp_path_factory.mktemp("napari_study"))


@pytest.fixture(scope="session")
def spines_output(tmp_path_factory):
    """A ``ketamap spines`` output of one mouse, two dendrites."""
    from ketamap.pipelines import run_spines
    from ketamap.simulate.spines import simulate_spine_study

    root = tmp_path_factory.mktemp("napari_spines")
    toml = simulate_spine_study(root / "study", seed=5, n_mice=1, dendrites_per_mouse=2)
    run_spines(toml, root / "out")
    return root / "out"


@pytest.fixture(scope="session")
def ensembles_output(tmp_path_factory):
    """A ``ketamap ensembles`` output of a small simulated field of view (suite2p inputs)."""
    from ketamap.pipelines import run_ensembles
    from ketamap.simulate.calcium import simulate_calcium_study

    root = tmp_path_factory.mktemp("napari_ensembles")
    toml = simulate_calcium_study(
        root / "sim", seed=0, n_cells=60, n_ensembles=3, ensemble_size=8, duration_s=300.0
    )
    run_ensembles(toml, root / "out")
    return root / "out"
