"""Read the TOML files users write (study manifests, sessions files), with one-sentence errors."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ketamap.errors import InputNotFoundError, ManifestError
from ketamap.params import did_you_mean

__all__ = ["read_toml", "check_keys", "data_path"]


def read_toml(path: str | Path, *, what: str) -> dict[str, Any]:
    """Parse a TOML file.

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
    InputNotFoundError
        If the file does not exist.
    ManifestError
        If it is not UTF-8 text or not valid TOML.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f'{what} "{path}" does not exist or is not a file.')
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError(f'{what} "{path}" is not UTF-8 text.') from e
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f'{what} "{path}" is not valid TOML: {e}.') from e


def check_keys(table: Mapping, allowed: Iterable[str], where: str) -> None:
    """Raise a ManifestError naming the closest valid key for any unknown key of ``table``."""
    allowed = tuple(allowed)
    for key in table:
        if key not in allowed:
            raise ManifestError(
                f'Unknown key "{key}" in {where}{did_you_mean(key, allowed)}; '
                f"allowed keys: {', '.join(allowed)}."
            )


def data_path(
    value: Any,
    root: Path,
    what: str,
    where: str,
    *,
    check_exists: bool = True,
    folder: str = "file",
) -> Path:
    """Resolve a path written in a TOML file, by the one rule of every manifest.

    Parameters
    ----------
    value : str
        The path as written: relative to the file's folder (and never leaving it),
        or absolute for data kept elsewhere.
    root : Path
        The file's folder.
    what, where : str
        The key and the table, for the messages (e.g. ``"signal"``, ``"subject m1"``).
    check_exists : bool
        Check that the path exists.
    folder : str
        What ``root`` is called in the messages (e.g. ``"study"``).

    Returns
    -------
    Path

    Raises
    ------
    ManifestError
        If the value is not a string or a relative path leaves ``root``.
    InputNotFoundError
        If the path does not exist (with ``check_exists``).
    """
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{what} of {where} must be a path string, got {value!r}.")
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = root / p
        if not p.resolve().is_relative_to(root.resolve()):
            raise ManifestError(
                f'{what} of {where} "{value}" points outside the {folder} folder; give data '
                "outside it as an absolute path."
            )
    if check_exists and not p.exists():
        raise InputNotFoundError(
            f'{what} of {where} does not exist: "{value}" (looked in {p.parent}).'
        )
    return p
