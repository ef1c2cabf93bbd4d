"""Errors that ketamap raises for problems a user can act on.

Every error a user can cause (a bad manifest, a missing file, an impossible
voxel size, an atlas that is not installed) is a subclass of
:class:`KetamapError` and carries one sentence saying what is wrong and where.
The command line prints that sentence without a traceback and exits non-zero.
The builtin base classes (``ValueError``, ``FileNotFoundError`` ...) are kept
so that library callers can catch what they already know.
"""

from __future__ import annotations

import importlib

__all__ = [
    "require",
    "KetamapError",
    "ManifestError",
    "ManifestNotFoundError",
    "ParameterError",
    "InputError",
    "InputNotFoundError",
    "OutputError",
    "AtlasError",
    "AtlasNotFoundError",
    "RegistrationError",
    "StatsError",
]


class KetamapError(Exception):
    """Root of every error ketamap raises on purpose."""


class ManifestError(KetamapError, ValueError):
    """The study manifest is invalid (wrong key, type, value or reference)."""


class ParameterError(KetamapError, ValueError):
    """A stage parameter is unknown, of the wrong type or out of range."""


class InputError(KetamapError, ValueError):
    """Input data exist but cannot be used (shape, dtype, content)."""


class InputNotFoundError(KetamapError, FileNotFoundError):
    """An input file or folder does not exist."""


class ManifestNotFoundError(ManifestError, InputNotFoundError):
    """The manifest file itself does not exist (both a manifest and a missing-input error)."""


class OutputError(KetamapError, OSError):
    """An output cannot be written (no space left, permission denied, read-only disk)."""


class AtlasError(KetamapError, ValueError):
    """An atlas is malformed, or a region is not in its ontology."""


class AtlasNotFoundError(KetamapError, FileNotFoundError):
    """An atlas is neither installed locally nor a readable folder."""


class RegistrationError(KetamapError, RuntimeError):
    """Registration could not run, or failed its quality control."""


class QCError(KetamapError, RuntimeError):
    """A subject failed quality control (detection or registration) and was stopped."""


class StatsError(KetamapError, ValueError):
    """The statistical design cannot be fitted (e.g. a single group)."""


def require(
    module: str,
    *,
    needed_for: str,
    install: str,
    what: str | None = None,
    error: type[KetamapError] = ParameterError,
    otherwise: str = "",
):
    """Import an optional dependency, or raise one sentence that says how to get it.

    Parameters
    ----------
    module : str
        The module to import (e.g. ``"pynwb"``, ``"oasis.oasis_methods"``).
    needed_for : str
        What needs it, the start of the sentence (e.g. ``"Reading NWB files"``).
    install : str
        What to ``pip install`` (e.g. ``"ketamap[nwb]"``).
    what : str, optional
        The package as the user knows it (default: "the <module> package").
    error : type
        The error raised: :class:`ParameterError` when a setting asked for it,
        :class:`InputError` when a file format needs it.
    otherwise : str
        The alternative, appended to the sentence (e.g. ``' or set engine = "simpleitk"'``).

    Returns
    -------
    module

    Examples
    --------
    >>> require("math", needed_for="Counting", install="math").__name__
    'math'
    >>> try:
    ...     require("no_such_module", needed_for="Reading X files", install="ketamap[x]")
    ... except ParameterError as e:
    ...     print(e)
    Reading X files needs the no_such_module package; install it with pip install "ketamap[x]".
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = what or f"the {module.split('.')[0]} package"
        raise error(
            f'{needed_for} needs {what}; install it with pip install "{install}"{otherwise}.'
        ) from e
