"""Read the TOML files users write (study manifests, sessions files), with one-sentence errors."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ketamap.errors import InputNotFoundError, ManifestError
from ketamap.params import did_you_mean

__all__ = ["read_toml", "check_keys"]


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
