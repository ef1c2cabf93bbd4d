"""Atomic outputs: a crash never leaves a half-written file that looks complete.

Every file or folder ketamap writes is first written under a temporary name
in the same folder, then renamed into place (an atomic operation on POSIX
file systems). On error the temporary is removed and the previous output, if
any, is left untouched.

Operating-system errors a user can act on (no space left on device, disk quota
exceeded, permission denied, read-only file system) are turned into one
:class:`~ketamap.errors.OutputError` sentence naming the output here, in one
place, by :func:`disk_error`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from ketamap.errors import KetamapError, OutputError

__all__ = ["atomic_path", "atomic_dir", "write_json", "write_table", "disk_error"]

_DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


def disk_error(error: OSError, path: str | os.PathLike | None = None) -> OutputError | None:
    """Turn an operating-system error a user can act on into one sentence.

    Parameters
    ----------
    error : OSError
        The error raised while writing.
    path : path-like, optional
        The output being written (by default the error's own file name).

    Returns
    -------
    OutputError or None
        ``OutputError("No space left on device while writing PATH; ...")`` for
        ENOSPC, EDQUOT, EACCES, EPERM and EROFS; None for other errors.

    Examples
    --------
    >>> import errno
    >>> str(disk_error(OSError(errno.ENOSPC, "No space left on device"), "out/cells.csv"))
    'No space left on device while writing out/cells.csv; free some space and run again.'
    """
    what = _DISK_ERRORS.get(error.errno)
    if what is None:
        return None
    where = _public(path if path is not None else (error.filename or "an output"))
    advice = {
        errno.ENOSPC: "free some space and run again",
        errno.EDQUOT: "free some space or raise the quota and run again",
        errno.EROFS: "choose a writable output folder",
    }.get(error.errno, "check the folder's permissions or choose another output folder")
    return OutputError(f"{what.capitalize()} while writing {where}; {advice}.")


def _public(path) -> str:
    """Name an output by its final path, not the temporary ``.name.XXXX.part`` it is built in."""
    parts = [
        p[1:].rsplit(".", 2)[0]
        if p.startswith(".") and p.count(".") >= 3 and p.endswith(".part")
        else p
        for p in Path(path).parts
    ]
    return str(Path(*parts))


@contextlib.contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except KetamapError:
        raise
    except OSError as e:
        mapped = disk_error(e, path)
        if mapped is None:
            raise
        raise mapped from e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``path`` when the block succeeds.

    Parameters
    ----------
    path : path-like
        Final destination. Its parent folder is created if needed.

    Yields
    ------
    Path
        A temporary path in the same folder; write the file there.
    """
    path = Path(path)
    with _disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            # mkstemp creates 0600 files: give the output the permissions of any new file
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that replaces the folder ``path`` when the block succeeds.

    Parameters
    ----------
    path : path-like
        Final folder. An existing folder of that name is replaced only after
        the new one is complete.

    Yields
    ------
    Path
        An empty temporary folder beside ``path``.
    """
    path = Path(path)
    with _disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700 folders
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def write_table(df: pd.DataFrame, path: str | os.PathLike, *, csv: bool = True) -> Path:
    """Write a table as Parquet (``path``) and, by default, a CSV copy beside it.

    Parameters
    ----------
    df : DataFrame
        The table; the index is not written.
    path : path-like
        Destination ending in ``.parquet``.
    csv : bool
        Also write ``path`` with the suffix ``.csv``.

    Returns
    -------
    Path
        The Parquet path.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    if csv:
        with atomic_path(path.with_suffix(".csv")) as tmp:
            df.to_csv(tmp, index=False)
    return path
