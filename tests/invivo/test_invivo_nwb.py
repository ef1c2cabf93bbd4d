import sys
from datetime import datetime, timezone

import numpy as np
import pytest

from ketamap.errors import InputError
from ketamap.io.traces.suite2p import read_recording


def _write_nwb(
    path, F, stat, *, fs=15.0, mean_img=None, neuropil=None, iscell=None, suite2p_layout=False
):
    pynwb = pytest.importorskip("pynwb")
    from pynwb.base import Images
    from pynwb.image import GrayscaleImage
    from pynwb.ophys import Fluorescence, ImageSegmentation, OpticalChannel

    nwb = pynwb.NWBFile(
        session_description="simulated session",
        identifier=path.stem,
        session_start_time=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )
    device = nwb.create_device(name="Microscope")
    channel = OpticalChannel(name="OpticalChannel", description="green", emission_lambda=510.0)
    plane = nwb.create_imaging_plane(
        name="ImagingPlane",
        optical_channel=channel,
        imaging_rate=fs,
        description="L2/3",
        device=device,
        excitation_lambda=920.0,
        indicator="GCaMP6s",
        location="PFC",
    )
    ophys = nwb.create_processing_module(name="ophys", description="processed")
    seg = ImageSegmentation()
    ophys.add(seg)
    ps = seg.create_plane_segmentation(
        name="PlaneSegmentation", description="ROIs", imaging_plane=plane
    )
    for st in stat:
        a, b = (st["ypix"], st["xpix"]) if suite2p_layout else (st["xpix"], st["ypix"])
        ps.add_roi(
            pixel_mask=[(int(u), int(v), float(w)) for u, v, w in zip(a, b, st["lam"], strict=True)]
        )
    if iscell is not None:
        ps.add_column("iscell", "cell label", np.asarray(iscell, float))
    region = ps.create_roi_table_region(region=list(range(len(stat))), description="all")
    fl = Fluorescence(name="Fluorescence")
    ophys.add(fl)
    fl.create_roi_response_series(name="plane0", data=F.T, rois=region, unit="lumens", rate=fs)
    if neuropil is not None:
        region2 = ps.create_roi_table_region(region=list(range(len(stat))), description="all")
        fn = Fluorescence(name="Neuropil")
        ophys.add(fn)
        fn.create_roi_response_series(
            name="plane0", data=neuropil.T, rois=region2, unit="lumens", rate=fs
        )
    if mean_img is not None:
        images = Images(name="Backgrounds_0" if suite2p_layout else "images")
        images.add_image(GrayscaleImage(name="meanImg", data=mean_img))
        ophys.add(images)
    with pynwb.NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path


def _disks(n, rng):
    yy, xx = np.mgrid[0:64, 0:48]
    stat = []
    for _ in range(n):
        cy, cx = rng.uniform(5, 58), rng.uniform(5, 42)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < 9
        stat.append({"ypix": yy[m], "xpix": xx[m], "lam": np.full(m.sum(), 1.0 / m.sum())})
    return stat


@pytest.mark.parametrize("suite2p_layout", [False, True])
def test_read_nwb_traces_footprints_and_rate(tmp_path, suite2p_layout):
    rng = np.random.default_rng(0)
    F = rng.normal(100, 1, (5, 120)).astype(np.float32)
    Fneu = rng.normal(40, 1, (5, 120)).astype(np.float32)
    stat = _disks(5, rng)
    mean = rng.normal(0, 1, (64, 48)).astype(np.float32)
    path = _write_nwb(
        tmp_path / "s.nwb",
        F,
        stat,
        fs=12.5,
        mean_img=mean,
        neuropil=Fneu,
        iscell=[1, 1, 0, 1, 1],
        suite2p_layout=suite2p_layout,
    )
    rec = read_recording(path)
    assert rec.frame_rate_hz == 12.5
    assert rec.cell_index.tolist() == [0, 1, 3, 4]
    np.testing.assert_allclose(rec.F, F[[0, 1, 3, 4]])
    np.testing.assert_allclose(rec.Fneu, Fneu[[0, 1, 3, 4]])
    np.testing.assert_allclose(rec.mean_image, mean)
    for got, want in zip(rec.footprints, [stat[i] for i in (0, 1, 3, 4)], strict=True):
        np.testing.assert_array_equal(got["ypix"], want["ypix"])
        np.testing.assert_array_equal(got["xpix"], want["xpix"])


def test_nwb_errors_are_one_sentence(tmp_path):
    rng = np.random.default_rng(1)
    path = _write_nwb(
        tmp_path / "s.nwb", rng.normal(size=(2, 30)).astype(np.float32), _disks(2, rng)
    )
    with pytest.raises(InputError, match="no RoiResponseSeries named 'dff'.*Fluorescence/plane0"):
        read_recording(path, series="dff")
    (tmp_path / "bad.nwb").write_text("not hdf5")
    with pytest.raises(InputError, match="could not be read as an NWB file"):
        read_recording(tmp_path / "bad.nwb")


def test_nwb_without_pynwb_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "s.nwb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pynwb", None)
    with pytest.raises(InputError, match=r'pip install "ketamap\[nwb\]"'):
        read_recording(tmp_path / "s.nwb")


def test_sessions_of_nwb_files_run_end_to_end(tmp_path):
    pytest.importorskip("pynwb")
    import pandas as pd

    from ketamap.pipelines import run_ensembles
    from ketamap.simulate.calcium import simulate_calcium_study

    sim = tmp_path / "sim"
    simulate_calcium_study(sim, scenario="null", seed=4, n_cells=60, duration_s=40.0)
    lines = ["[field_of_view]", 'name = "nwb"']
    for i, label in enumerate(("baseline", "later")):
        plane = sim / label / "suite2p" / "plane0"
        ops = np.load(plane / "ops.npy", allow_pickle=True).item()
        _write_nwb(
            tmp_path / f"{label}.nwb",
            np.load(plane / "F.npy"),
            list(np.load(plane / "stat.npy", allow_pickle=True)),
            fs=ops["fs"],
            mean_img=ops["meanImg"],
            neuropil=np.load(plane / "Fneu.npy"),
            suite2p_layout=True,
        )
        lines += [
            "[[sessions]]",
            f'label = "{label}"',
            f"time_h = {24 * i}",
            f'data = "{label}.nwb"',
        ]
    (tmp_path / "s.toml").write_text("\n".join(lines) + "\n")
    result = run_ensembles(tmp_path / "s.toml", tmp_path / "out")
    assert result["cell_matching"] == "footprints"
    found = pd.read_csv(tmp_path / "out" / "cell_map.csv")
    truth = pd.read_csv(sim / "ground_truth" / "cell_map.csv")
    merged = found.merge(truth, on=["session", "cell"], suffixes=("", "_true"))
    pairs = merged.pivot(index="global_cell", columns="session", values="global_cell_true")
    both = pairs.dropna()
    assert len(both) >= 50 and (both["baseline"] == both["later"]).mean() >= 0.95
    assert pd.read_csv(tmp_path / "out" / "sessions.csv").frame_rate_hz.tolist() == [15.0, 15.0]


def test_sessions_file_naming_nwb_without_pynwb(tmp_path, monkeypatch):
    from ketamap.pipelines import run_ensembles

    (tmp_path / "a.nwb").write_bytes(b"")
    (tmp_path / "s.toml").write_text('[[sessions]]\nlabel = "a"\ntime_h = 0\ndata = "a.nwb"\n')
    monkeypatch.setitem(sys.modules, "pynwb", None)
    with pytest.raises(InputError, match=r'pip install "ketamap\[nwb\]"'):
        run_ensembles(tmp_path / "s.toml", tmp_path / "out")
