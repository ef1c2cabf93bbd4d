"""The one mechanism every manifest is read by: TOML, declared tables, one path rule.

A manifest kind declares each of its tables as a frozen dataclass (its schema)
and reads the parsed TOML with :func:`ketamap.params.from_mapping` and the
:class:`~ketamap.params.Source` that :func:`source` returns. Every kind thus gets
the same things: an unknown key names the nearest valid one, a wrong type names
the key, its table and the file, a missing required key is named, and every
path follows :func:`data_path`. Each mistake is one sentence, raised as
:class:`~ketamap.errors.ManifestError` (or :class:`~ketamap.errors.InputNotFoundError`
for data that are not there).
"""

from __future__ import annotations

import functools
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ketamap.errors import InputNotFoundError, ManifestError, ManifestNotFoundError
from ketamap.params import Source, check_keys

__all__ = ["ManifestNotFoundError", "read_toml", "data_path", "source", "unknown_keys"]


def read_toml(path: str | os.PathLike, *, what: str) -> dict[str, Any]:
    """Parse a manifest file.

    Parameters
    ----------
    path : path-like
        The file.
    what : str
        What the file is (e.g. ``"Study manifest"``), for the messages.

    Returns
    -------
    dict

    Raises
    ------
    ManifestNotFoundError
        If the file does not exist.
    ManifestError
        If it is not UTF-8 text or not valid TOML.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestNotFoundError(f'{what} "{path}" does not exist or is not a file.')
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError(f'{what} "{path}" is not UTF-8 text.') from e
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f'{what} "{path}" is not valid TOML: {e}.') from e


def data_path(value: str, what: str, *, root: Path, folder: str, check_exists: bool) -> Path:
    """Resolve a path written in a manifest, by the one rule of every manifest.

    A relative path is relative to the manifest's folder and may not leave it
    (``..`` that climbs out is refused; symbolic links inside the folder are
    followed wherever they point); data kept elsewhere are given as an absolute
    path. ``~`` is the user's home.

    Parameters
    ----------
    value : str
        The path as written.
    what : str
        The key and its place, for the messages (``'signal in subject "m1" of study.toml'``).
    root : Path
        The manifest's folder (absolute).
    folder : str
        What that folder is called in the messages (``"study"``).
    check_exists : bool
        Check that the path exists.

    Returns
    -------
    Path
        Absolute and normalised.

    Raises
    ------
    ManifestError
        If a relative path leaves the folder.
    InputNotFoundError
        If the path does not exist (with ``check_exists``).
    """
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = root / p
        if not Path(os.path.normpath(p)).is_relative_to(root):
            raise ManifestError(
                f'{what} points outside the {folder} folder ("{value}"); give data kept '
                "elsewhere as an absolute path."
            )
    p = Path(os.path.normpath(p))
    if check_exists and not p.exists():
        raise InputNotFoundError(f'{what} does not exist: "{value}" (looked in {p.parent}).')
    return p


def source(root: str | os.PathLike, *, folder: str, check_exists: bool = True) -> Source:
    """Return the :class:`~ketamap.params.Source` a manifest kind reads its tables with.

    Parameters
    ----------
    root : path-like
        The manifest's folder: relative paths are resolved against it.
    folder : str
        What that folder is called in the messages (``"study"``, ``"sessions file's"``).
    check_exists : bool
        Check up front that every data path exists.

    Returns
    -------
    Source
        Raising :class:`~ketamap.errors.ManifestError`, paths by :func:`data_path`.
    """
    path = functools.partial(
        data_path, root=Path(root).resolve(), folder=folder, check_exists=check_exists
    )
    return Source(error=ManifestError, path=path)


def unknown_keys(table: Mapping, allowed: Iterable[str], where: str) -> None:
    """Refuse a key of ``table`` that is not ``allowed``, naming the nearest valid one.

    For tables whose keys are names declared elsewhere in the file (the session
    labels that key a dendrite's images).

    Raises
    ------
    ManifestError
        ``Unknown key "K" in WHERE (did you mean "X"?); valid keys are: ...``.
    """
    check_keys(table, allowed, where=where, noun="key", error=ManifestError)
