"""Errors that ketamap raises for problems a user can act on.

Every error a user can cause (a bad manifest, a missing file, an impossible
voxel size, an atlas that is not installed) is a subclass of
:class:`KetamapError` and carries one sentence saying what is wrong and where.
The command line prints that sentence without a traceback and exits non-zero.
The builtin base classes (``ValueError``, ``FileNotFoundError`` ...) are kept
so that library callers can catch what they already know.
"""

from __future__ import annotations

__all__ = [
    "KetamapError",
    "ManifestError",
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
