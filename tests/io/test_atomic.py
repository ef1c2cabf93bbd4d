import os

import pytest

from ketamap.io.atomic import atomic_dir, atomic_path, write_json


def test_outputs_have_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        f = write_json({"a": 1}, tmp_path / "x.json")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(mask)
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_failure_keeps_the_previous_output_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        (d / "result.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "result.txt").write_text("half")
            raise RuntimeError("crash")
    assert (target / "result.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "f.txt") as p:
            p.write_text("half")
            raise RuntimeError("crash")
    assert not (tmp_path / "f.txt").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]
