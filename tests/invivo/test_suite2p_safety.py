"""Reading suite2p folders never runs code from their pickles, and real layouts still read.

suite2p stores ``stat.npy``, ``ops.npy`` and v1's ``settings.npy``, ``db.npy``,
``reg_outputs.npy`` and ``detect_outputs.npy`` as pickled object arrays. The
fixtures below write them the way each era did: suite2p 0.x under NumPy < 1.17
(pickle protocol 2, ``numpy.core`` names, bytes via ``_codecs.encode``), 0.14
under NumPy 1.2x (protocol 3, ``numpy.core``), and v1 under NumPy 2 (protocol 4,
``numpy._core``).
"""

import collections
import datetime
import os
import pickle
import pickletools
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pytest
from numpy.lib import format as npy_format

from ketamap.errors import InputError
from ketamap.io.traces.suite2p import load_npy_safe, read_suite2p
from ketamap.simulate.calcium import simulate_calcium_study

N_ROI, N_FRAMES, LY, LX = 5, 40, 24, 32


class _Payload:
    """An object whose unpickling calls ``func(*args)``: what a crafted suite2p file carries."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _globals(data: bytes) -> set[str]:
    """Return the ``module name`` globals a (protocol <= 3) pickle names."""
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def _write_pickled(path: Path, obj, *, protocol: int = 4, numpy1: bool = False) -> bytes:
    """Write ``obj`` as an object .npy file, pickled with ``protocol``; return the pickle.

    ``numpy1`` renames ``numpy._core`` to ``numpy.core`` in the pickle, as NumPy 1.x
    wrote it (only for protocols <= 3, where a global is a text line).
    """
    arr = obj if isinstance(obj, np.ndarray) else np.asanyarray(obj)
    assert arr.dtype == object
    data = pickle.dumps(arr, protocol=protocol)
    if numpy1:
        assert protocol <= 3
        data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert "numpy.core.multiarray _reconstruct" in _globals(data)
        assert not any(g.startswith("numpy._core") for g in _globals(data))
    with open(path, "wb") as fh:
        npy_format.write_array_header_1_0(fh, npy_format.header_data_from_array_1_0(arr))
        fh.write(data)
    return data


def _stat(rng) -> list[dict]:
    """suite2p ``stat``: one dict per ROI with the keys and types suite2p writes."""
    stat = []
    for i in range(N_ROI):
        ypix = np.repeat(np.arange(3, 7) + 4 * i % (LY - 8), 4).astype(np.int32)
        xpix = np.tile(np.arange(5, 9) + 5 * i % (LX - 10), 4).astype(np.int32)
        stat.append(
            {
                "ypix": ypix,
                "xpix": xpix,
                "lam": rng.random(ypix.size).astype(np.float32),
                "med": [int(np.median(ypix)), int(np.median(xpix))],
                "npix": int(ypix.size),
                "footprint": np.float64(1.2),
                "compact": np.float64(1.05),
                "skew": np.float32(0.8),
                "radius": 2.1,
                "overlap": np.zeros(ypix.size, bool),
                "neuropil_mask": np.arange(10, dtype=np.int64),
                "soma_crop": np.ones(ypix.size, bool),
                "iplane": 0,
                "inmerge": 0,
            }
        )
    return stat


def _arrays(plane: Path, rng) -> None:
    plane.mkdir(parents=True)
    np.save(plane / "F.npy", rng.normal(100, 1, (N_ROI, N_FRAMES)).astype(np.float32))
    np.save(plane / "Fneu.npy", rng.normal(50, 1, (N_ROI, N_FRAMES)).astype(np.float32))
    np.save(plane / "iscell.npy", np.column_stack([[1, 1, 0, 1, 1], np.full(N_ROI, 0.9)]))


def _ops_common(rng) -> dict:
    return {
        "nframes": N_FRAMES,
        "Ly": LY,
        "Lx": LX,
        "tau": 1.0,
        "neucoeff": 0.7,
        "nplanes": 1,
        "diameter": 12,
        "block_size": [128, 128],
        "outer_neuropil_radius": np.inf,
        "baseline": "maximin",
        "xrange": np.array([0, LX]),
        "yrange": np.array([0, LY]),
        "refImg": rng.integers(0, 500, (LY, LX)).astype(np.int16),
        "yoff": np.zeros(N_FRAMES, np.int32),
        "xoff": np.zeros(N_FRAMES, np.int32),
        "corrXY": rng.random(N_FRAMES).astype(np.float32),
        "badframes": np.zeros(N_FRAMES, bool),
        "save_path": "/data/m1/suite2p/plane0",
        "data_path": ["/data/m1"],
        "filelist": ["/data/m1/file_00001.tif"],
        "first_tiffs": np.array([True]),
        "frames_per_file": np.array([N_FRAMES], np.int32),
        "Vmap": [np.zeros((4, 4), np.float32)],
        "timing": {"registration": 1.5, "detection": 3.25},
        "bidi_corrected": False,
        "nan": None,
    }


def _plane_0x(plane: Path, rng):
    """suite2p 0.x (2019): NumPy < 1.17 wrote pickle protocol 2 with ``numpy.core`` names."""
    _arrays(plane, rng)
    stat = _stat(rng)
    ops = {**_ops_common(rng), "fs": 15.0, "meanImg": rng.random((LY, LX)), "tag": b"raw"}
    data = _write_pickled(plane / "ops.npy", ops, protocol=2, numpy1=True)
    assert "_codecs encode" in _globals(data)  # bytes (array data) as protocol 2 writes them
    _write_pickled(plane / "stat.npy", np.array(stat, dtype=object), protocol=2, numpy1=True)
    return stat, ops["meanImg"], 15.0, ops


def _plane_014(plane: Path, rng):
    """suite2p 0.14 under NumPy 1.2x: protocol 3, ``numpy.core`` names, a tz-aware date."""
    _arrays(plane, rng)
    stat = _stat(rng)
    cet = datetime.timezone(datetime.timedelta(hours=1), "CET")
    ops = {
        **_ops_common(rng),
        "suite2p_version": "0.14.6",
        "fs": np.float64(30.0),
        "meanImg": rng.random((LY, LX)).astype(np.float32),
        "meanImgE": rng.random((LY, LX)),
        "max_proj": rng.random((LY - 4, LX - 4)).astype(np.float32),
        "date_proc": datetime.datetime(2023, 5, 4, 13, 2, 1, 5, tzinfo=cet),
        "chan2_thres": 0.65,
        "roidetect": True,
        "spikedetect": 1,
        "complex_check": 1 + 0j,
        "sets": {1, 2},
    }
    data = _write_pickled(plane / "ops.npy", ops, protocol=3, numpy1=True)
    assert {"datetime datetime", "datetime timezone"} <= _globals(data)
    _write_pickled(plane / "stat.npy", np.array(stat, dtype=object), protocol=3, numpy1=True)
    return stat, ops["meanImg"], 30.0, ops


def _plane_v1(plane: Path, rng):
    """suite2p v1 under NumPy 2: ``ops`` split into four dictionaries, written by ``np.save``."""
    _arrays(plane, rng)
    stat = _stat(rng)
    settings = {
        "torch_device": "cuda",
        "tau": 1.0,
        "fs": 12.5,
        "diameter": [12.0, 12.0],
        "run": {"do_registration": 1, "do_detection": True},
        "registration": {"nonrigid": True, "block_size": (128, 128), "maxregshift": 0.1},
        "detection": {"algorithm": "sparsery", "threshold_scaling": 1.0},
        "date_proc": datetime.datetime.now().astimezone(),
    }
    db = {
        "data_path": [PurePosixPath("/data/m1"), PureWindowsPath(r"D:\m1\raw")],
        "save_path0": "/data/m1",
        "nplanes": 1,
        "nchannels": 1,
        "input_format": "tif",
    }
    mean = rng.random((LY, LX)).astype(np.float32)
    reg = {"refImg": mean.astype(np.int16), "meanImg": mean, "yoff": np.zeros(N_FRAMES, np.int32)}
    det = {"meanImgE": rng.random((LY, LX)), "Vcorr": rng.random((LY, LX)), "max_proj": mean}
    np.save(plane / "settings.npy", settings, allow_pickle=True)
    np.save(plane / "db.npy", db, allow_pickle=True)
    np.save(plane / "reg_outputs.npy", reg, allow_pickle=True)
    np.save(plane / "detect_outputs.npy", det, allow_pickle=True)
    np.save(plane / "stat.npy", np.array(stat, dtype=object), allow_pickle=True)
    return stat, mean, 12.5, None


@pytest.mark.parametrize("layout", [_plane_0x, _plane_014, _plane_v1])
def test_real_suite2p_layouts_read_through_the_safe_loader(tmp_path, layout):
    plane = tmp_path / "rec" / "suite2p" / "plane0"
    stat, mean, fs, _ = layout(plane, np.random.default_rng(1))
    rec = read_suite2p(tmp_path / "rec")
    assert rec.frame_rate_hz == fs
    assert rec.cell_index.tolist() == [0, 1, 3, 4]
    np.testing.assert_array_equal(rec.F, np.load(plane / "F.npy")[[0, 1, 3, 4]])
    np.testing.assert_allclose(rec.mean_image, mean.astype(np.float32))
    assert len(rec.footprints) == 4
    for got, want in zip(rec.footprints, [stat[i] for i in (0, 1, 3, 4)], strict=True):
        assert got.keys() == want.keys()
        for key in ("ypix", "xpix", "lam", "overlap"):
            np.testing.assert_array_equal(got[key], want[key])
            assert got[key].dtype == want[key].dtype
        assert got["med"] == want["med"] and got["npix"] == want["npix"]
        assert type(got["footprint"]) is np.float64 and got["footprint"] == want["footprint"]


def test_safe_loader_rebuilds_every_value_of_a_0x_and_014_ops(tmp_path):
    for layout in (_plane_0x, _plane_014):
        plane = tmp_path / layout.__name__
        ref = layout(plane, np.random.default_rng(2))[3]
        ops = load_npy_safe(plane / "ops.npy").item()
        assert ops.keys() == ref.keys()
        for key, value in ref.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(ops[key], value)
                assert ops[key].dtype == value.dtype
            elif isinstance(value, list) and value and isinstance(value[0], np.ndarray):
                np.testing.assert_array_equal(ops[key][0], value[0])
            else:
                assert ops[key] == value and type(ops[key]) is type(value), key


def test_pickled_paths_come_back_as_text(tmp_path):
    plane = tmp_path / "plane0"
    _plane_v1(plane, np.random.default_rng(3))
    db = load_npy_safe(plane / "db.npy").item()
    assert db["data_path"] == ["/data/m1", r"D:\m1\raw"]


def test_simulated_suite2p_folders_read_as_numpy_reads_them(tmp_path):
    toml = simulate_calcium_study(
        tmp_path / "sim",
        scenario="stress-ketamine",
        seed=0,
        n_cells=30,
        n_ensembles=2,
        ensemble_size=5,
        duration_s=20.0,
    )
    planes = sorted(toml.parent.glob("*/suite2p/plane0"))
    assert len(planes) >= 2
    for plane in planes:
        rec = read_suite2p(plane)
        stat = np.load(plane / "stat.npy", allow_pickle=True)  # trusted: written by the test
        ops = np.load(plane / "ops.npy", allow_pickle=True).item()
        assert rec.frame_rate_hz == ops["fs"]
        np.testing.assert_array_equal(rec.mean_image, ops["meanImg"])
        assert len(rec.footprints) == len(stat)
        for got, want in zip(rec.footprints, stat, strict=True):
            np.testing.assert_array_equal(got["lam"], want["lam"])
            assert got["med"] == want["med"]


def _touch(marker: Path):
    """Payloads that create ``marker``: a shell command and a plain file write."""
    return [
        _Payload(os.system, f"touch '{marker}'"),
        _Payload(Path.write_text, marker, "pwned"),
    ]


def _one_sentence(message: str) -> None:
    assert "\n" not in message
    assert message.endswith(".") and message.count(". ") == 0


@pytest.mark.parametrize("which", [0, 1])
def test_malicious_stat_npy_is_refused_and_runs_nothing(tmp_path, which):
    plane = tmp_path / "plane0"
    _plane_014(plane, np.random.default_rng(4))
    marker = tmp_path / "pwned"
    payload = _touch(marker)[which]
    stat = np.array([{"ypix": np.arange(3), "xpix": payload}] * N_ROI, dtype=object)
    np.save(plane / "stat.npy", stat, allow_pickle=True)
    with pytest.raises(InputError) as e:
        read_suite2p(plane)
    refused = f"{payload.func.__module__}.{payload.func.__qualname__}"
    assert str(plane / "stat.npy") in str(e.value) and refused in str(e.value)
    _one_sentence(str(e.value))
    assert not marker.exists()
    # the file is live: numpy's own loader with pickles allowed runs the payload
    np.load(plane / "stat.npy", allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize(
    "name", ["ops.npy", "settings.npy", "db.npy", "reg_outputs.npy", "detect_outputs.npy"]
)
def test_malicious_ops_and_v1_dictionaries_are_refused(tmp_path, name):
    plane = tmp_path / "plane0"
    _plane_v1(plane, np.random.default_rng(5))
    marker = tmp_path / "pwned"
    ops = {"fs": 30.0, "meanImg": np.zeros((LY, LX)), "nested": {"x": _touch(marker)[0]}}
    np.save(plane / name, ops, allow_pickle=True)
    with pytest.raises(InputError, match="refuses to load") as e:
        read_suite2p(plane)
    assert str(plane / name) in str(e.value) and f"{os.system.__module__}.system" in str(e.value)
    _one_sentence(str(e.value))
    assert not marker.exists()


def test_any_global_outside_the_whitelist_is_refused(tmp_path):
    # a harmless class is refused too: the loader allows, it does not block-list
    path = tmp_path / "ops.npy"
    np.save(path, {"fs": 30.0, "od": collections.OrderedDict(a=1)}, allow_pickle=True)
    with pytest.raises(InputError, match=r"collections\.OrderedDict"):
        load_npy_safe(path)
    # a crafted global name with a line break still gives one line
    crafted = b"\x80\x04\x8c\x02os\x94\x8c\x07sys\ntem\x94\x93\x94."
    with open(path, "wb") as fh:
        npy_format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": ()})
        fh.write(crafted)
    with pytest.raises(InputError, match=r"os\.sys\?tem") as e:
        load_npy_safe(path)
    _one_sentence(str(e.value))


def test_object_arrays_where_numbers_belong_are_refused(tmp_path):
    plane = tmp_path / "plane0"
    _plane_v1(plane, np.random.default_rng(6))
    marker = tmp_path / "pwned"
    np.save(plane / "F.npy", np.array(_touch(marker), dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="F.npy could not be read"):
        read_suite2p(plane)
    assert not marker.exists()


def test_safe_loader_reads_numeric_files_and_rejects_broken_ones(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(load_npy_safe(tmp_path / "a.npy"), a)
    with open(tmp_path / "v2.npy", "wb") as fh:  # format 2.0 header
        npy_format.write_array(fh, a, version=(2, 0))
    np.testing.assert_array_equal(load_npy_safe(tmp_path / "v2.npy"), a)
    with open(tmp_path / "v2o.npy", "wb") as fh:
        npy_format.write_array(fh, np.array([{"fs": 3.0}]), version=(2, 0))
    assert load_npy_safe(tmp_path / "v2o.npy")[0] == {"fs": 3.0}
    data = (tmp_path / "v2o.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-5])
    (tmp_path / "text.npy").write_text("not an array")
    for name in ("cut.npy", "text.npy"):
        with pytest.raises(InputError, match="could not be read as a .npy file") as e:
            load_npy_safe(tmp_path / name)
        _one_sentence(str(e.value))
    # a pickle that is not an array (numpy never writes one) is refused as well
    with open(tmp_path / "dict.npy", "wb") as fh:
        npy_format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump({"fs": 3.0}, fh, protocol=4)
    with pytest.raises(InputError, match="not an array"):
        load_npy_safe(tmp_path / "dict.npy")
