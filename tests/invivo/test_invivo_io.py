import numpy as np
import pytest

from ketamap.errors import InputError, InputNotFoundError, KetamapError, ManifestError
from ketamap.io.traces.suite2p import find_plane_folder, read_array, read_recording, read_suite2p
from ketamap.manifest import load_sessions


def _plane(folder, n=4, t=50, layout="v0.14", iscell=None):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(folder / "F.npy", rng.normal(100, 1, (n, t)).astype(np.float32))
    np.save(folder / "Fneu.npy", rng.normal(50, 1, (n, t)).astype(np.float32))
    lab = np.ones(n) if iscell is None else np.asarray(iscell, float)
    np.save(folder / "iscell.npy", np.column_stack([lab, np.full(n, 0.9)]))
    stat = [{"ypix": np.array([1]), "xpix": np.array([1]), "lam": np.array([1.0])}] * n
    np.save(folder / "stat.npy", np.array(stat, dtype=object), allow_pickle=True)
    if layout == "v0.14":
        np.save(folder / "ops.npy", {"fs": 30.0, "nframes": t}, allow_pickle=True)
    else:  # v1 splits ops into db and settings
        np.save(folder / "settings.npy", {"fs": 12.5, "tau": 1.0}, allow_pickle=True)
        np.save(folder / "db.npy", {"data_path": ["x"], "nplanes": 1}, allow_pickle=True)
    return folder


def test_read_suite2p_v014_keeps_cells_and_reads_rate(tmp_path):
    _plane(tmp_path / "rec" / "suite2p" / "plane0", iscell=[1, 0, 1, 1])
    rec = read_suite2p(tmp_path / "rec")
    assert rec.F.shape == (3, 50) and rec.Fneu.shape == (3, 50)
    assert rec.cell_index.tolist() == [0, 2, 3]
    assert rec.frame_rate_hz == 30.0


def test_read_suite2p_v1_layout(tmp_path):
    plane = _plane(tmp_path / "plane0", layout="v1")
    assert read_suite2p(plane).frame_rate_hz == 12.5


def test_suite2p_errors_are_one_sentence(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        find_plane_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="no suite2p output"):
        read_suite2p(tmp_path / "empty")
    plane = _plane(tmp_path / "p" / "plane0")
    np.save(plane / "Fneu.npy", np.zeros((4, 49), np.float32))
    with pytest.raises(InputError, match="shape"):
        read_suite2p(plane)
    _plane(tmp_path / "two" / "plane0")
    _plane(tmp_path / "two" / "plane1")
    with pytest.raises(InputError, match="2 suite2p planes"):
        read_suite2p(tmp_path / "two")


def test_plain_arrays_npy_and_csv(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", a)
    np.savetxt(tmp_path / "a.csv", a, delimiter=",")
    np.save(tmp_path / "n.npy", a * 0)
    for name in ("a.npy", "a.csv"):
        rec = read_recording(tmp_path / name)
        np.testing.assert_array_equal(rec.F, a)
        assert rec.frame_rate_hz is None
    assert read_array(tmp_path / "a.npy", neuropil=tmp_path / "n.npy").Fneu.shape == (3, 4)
    (tmp_path / "bad.csv").write_text("1,2\nx,y\n")
    with pytest.raises(InputError, match="numeric CSV"):
        read_array(tmp_path / "bad.csv")
    (tmp_path / "a.txt").write_text("1")
    with pytest.raises(InputError, match=".npy or .csv"):
        read_array(tmp_path / "a.txt")
    np.save(tmp_path / "v.npy", np.zeros(5))
    with pytest.raises(InputError, match="2-D"):
        read_array(tmp_path / "v.npy")


GOOD = """
[field_of_view]
name = "fov1"
frame_rate_hz = 10.0

[[sessions]]
label = "baseline"
time_h = 0
data = "a.npy"

[[sessions]]
label = "stress"
time_h = 168.0
data = "a.npy"
frame_rate_hz = 20.0
"""


def test_load_sessions_good(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3)))
    (tmp_path / "s.toml").write_text(GOOD)
    sf = load_sessions(tmp_path / "s.toml")
    assert [s.label for s in sf.sessions] == ["baseline", "stress"]
    assert [s.frame_rate_hz for s in sf.sessions] == [10.0, 20.0]
    assert sf.sessions[0].data == (tmp_path / "a.npy").resolve()
    # written out of order, or with names that sort otherwise: time decides
    swapped = GOOD.replace('label = "baseline"\ntime_h = 0', 'label = "zz-base"\ntime_h = 0')
    head, first, second = swapped.split("[[sessions]]")
    (tmp_path / "t.toml").write_text(head + "[[sessions]]" + second + "[[sessions]]" + first)
    assert [s.label for s in load_sessions(tmp_path / "t.toml").sessions] == ["zz-base", "stress"]


@pytest.mark.parametrize(
    "text, words",
    [
        (GOOD.replace("time_h = 0\n", "tme_h = 0\n"), 'did you mean "time_h"'),
        (GOOD.replace('label = "stress"', 'label = "baseline"'), "appears twice"),
        (GOOD.replace("frame_rate_hz = 20.0", "frame_rate_hz = -1"), "greater than 0"),
        (GOOD.replace('data = "a.npy"\nframe', "data = 3\nframe"), "path string"),
        (GOOD.replace('data = "a.npy"\nframe', 'data = "../a.npy"\nframe'), "points outside"),
        ("[[sessions]]\nlabel = 'x'\ntime_h = 0\n", 'missing the required key "data"'),
        ("[field_of_view]\nname = 'x'\n", "at least one"),
        ("[[sessions]\n", "not valid TOML"),
        (
            GOOD.replace("frame_rate_hz = 10.0\n", "").replace("frame_rate_hz = 20.0\n", ""),
            "records no frame rate",
        ),
    ],
)
def test_bad_sessions_file_one_sentence(tmp_path, text, words):
    np.save(tmp_path / "a.npy", np.zeros((2, 3)))
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(ManifestError, match=words) as e:
        load_sessions(tmp_path / "s.toml")
    assert isinstance(e.value, KetamapError)
    assert "\n" not in str(e.value)


def test_missing_sessions_file(tmp_path):
    with pytest.raises(InputNotFoundError):
        load_sessions(tmp_path / "none.toml")
