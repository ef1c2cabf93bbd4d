"""Disk full, permission denied, unreadable or truncated planes: one sentence, no false output."""

from __future__ import annotations

import errno
import os

import numpy as np
import pandas as pd
import pytest
import tifffile

from ketamap.errors import OutputError
from ketamap.io.atomic import atomic_dir, disk_error, write_table

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def planes(folder, n=6, shape=(32, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        tifffile.imwrite(folder / f"plane_{i:03d}.tif", rng.integers(0, 100, shape, np.uint16))
    return folder


def no_partial_output(folder, name):
    """Neither the output nor any temporary of it is left."""
    left = [p.name for p in folder.rglob("*") if p.name == name or p.name.startswith(f".{name}.")]
    return not left


def said(capsys) -> tuple[str, str]:
    """stderr on one line, and without any space (rich wraps long paths)."""
    err = capsys.readouterr().err
    return " ".join(err.split()), "".join(err.split())


def convert(run_cli, src, out):
    return run_cli("convert", src, "--voxel-size", 5, 2, 2, "--out", out, "--levels", "2")


def test_disk_full_while_writing_zarr_chunks(tmp_path, run_cli, capsys, monkeypatch):
    import zarr.storage

    src = planes(tmp_path / "in")
    real = zarr.storage.DirectoryStore.__setitem__
    calls = {"n": 0}

    def full_after_two(self, key, value):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(zarr.storage.DirectoryStore, "__setitem__", full_after_two)
    out = tmp_path / "results" / "brain.ome.zarr"
    assert convert(run_cli, src, out) == 2
    err, packed = said(capsys)
    assert "No space left on device while writing" in err and "brain.ome.zarr" in packed, err
    assert ".part" not in err and "Traceback" not in err
    assert no_partial_output(tmp_path / "results", "brain.ome.zarr")


def test_disk_full_names_the_final_table_and_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "detect"
    with atomic_dir(out) as tmp:
        (tmp / "cells.csv").write_text("previous\n")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(OutputError, match=r"No space left on device while writing .*cells\.csv"):
        with atomic_dir(out) as tmp:
            write_table(pd.DataFrame({"a": [1]}), tmp / "cells.parquet")
    assert (out / "cells.csv").read_text() == "previous\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detect"]


def test_quota_and_read_only_file_system_are_mapped():
    assert "quota" in str(disk_error(OSError(errno.EDQUOT, "Disk quota exceeded"), "x"))
    assert "Read-only" in str(disk_error(OSError(errno.EROFS, "Read-only file system"), "x"))
    assert disk_error(OSError(errno.EIO, "I/O error"), "x") is None  # not a user's mistake


def test_permission_denied_on_the_output_folder(tmp_path, run_cli, capsys, monkeypatch):
    src = planes(tmp_path / "in")
    locked = tmp_path / "locked"
    locked.mkdir()
    if IS_ROOT:  # root ignores permission bits: refuse to create anything in `locked`
        import tempfile

        real = tempfile.mkdtemp

        def denied(*args, dir=None, **kwargs):
            if dir is not None and os.path.samefile(dir, locked):
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkdtemp", denied)
    else:
        locked.chmod(0o555)
    try:
        assert convert(run_cli, src, locked / "brain.ome.zarr") == 2
    finally:
        locked.chmod(0o755)
    err, packed = said(capsys)
    assert "Permission denied while writing" in err and "brain.ome.zarr" in packed, err
    assert list(locked.iterdir()) == []


def test_unreadable_plane(tmp_path, run_cli, capsys, monkeypatch):
    src = planes(tmp_path / "in")
    bad = src / "plane_003.tif"
    if IS_ROOT:  # root reads a chmod 000 file: make opening it fail as it would for a user
        real = tifffile.TiffFile.__init__

        def denied(self, file, *args, **kwargs):
            if os.fspath(file) == os.fspath(bad):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
            return real(self, file, *args, **kwargs)

        monkeypatch.setattr(tifffile.TiffFile, "__init__", denied)
    else:
        bad.chmod(0o000)
    try:
        assert convert(run_cli, src, tmp_path / "out.ome.zarr") == 2
    finally:
        bad.chmod(0o644)
    err, packed = said(capsys)
    assert err.startswith("error:") and "plane_003.tif" in packed and "Permission denied" in err
    assert no_partial_output(tmp_path, "out.ome.zarr")


def test_plane_truncated_after_opening(tmp_path, run_cli, capsys, monkeypatch):
    """A plane cut short between the header check and the read (e.g. a copy still running)."""
    import ketamap.io.volumes as volumes

    src = planes(tmp_path / "in", shape=(64, 64))
    bad = src / "plane_004.tif"
    real = volumes.open_volume

    def open_then_truncate(path, **kwargs):
        arr = real(path, **kwargs)
        bad.write_bytes(bad.read_bytes()[:300])
        return arr

    monkeypatch.setattr(volumes, "open_volume", open_then_truncate)
    assert convert(run_cli, src, tmp_path / "out.ome.zarr") == 2
    err, packed = said(capsys)
    assert err.startswith("error:") and "plane_004.tif" in packed and "Traceback" not in err, err
    assert no_partial_output(tmp_path, "out.ome.zarr")
