"""The geometry of a volume: the checks of orientation codes and voxel sizes every module uses.

A code has three letters, one per array axis (z, y, x), each naming where that
axis *starts*: ``a``/``p`` (anterior/posterior), ``s``/``i``
(superior/inferior), ``l``/``r`` (left/right), each pair used once — the 48
codes of brainglobe-space (e.g. ``"asr"`` for the Allen atlas, ``"psl"``).
Reorientation itself always goes through :mod:`brainglobe_space`.
"""

from __future__ import annotations

import math
from typing import Any

from ketamap.errors import InputError

__all__ = ["check_orientation", "check_voxel_size", "MAX_VOXEL_UM"]

_AXIS_PAIRS = ({"a", "p"}, {"s", "i"}, {"l", "r"})

#: Largest voxel size accepted on any axis (µm): beyond 1 mm a mouse brain spans a few voxels.
MAX_VOXEL_UM = 1000.0
#: Smallest (µm): whole-brain light-sheet and serial two-photon voxels are 0.5 µm or more; a
#: smaller number is almost always a size given in millimetres (0.005 for 5 µm).
MIN_VOXEL_UM = 0.5


def check_orientation(code: Any, *, where: str = "orientation") -> str:
    """Check a BrainGlobe orientation code and return it in lower case.

    Parameters
    ----------
    code : str
        The code to check.
    where : str
        What the code is (e.g. ``"orientation in [imaging]"``), for the message.

    Returns
    -------
    str
        The code in lower case.

    Raises
    ------
    InputError
        If the code is not one of the 48 valid codes.

    Examples
    --------
    >>> check_orientation("PSL")
    'psl'
    """
    if not isinstance(code, str) or len(code) != 3:
        raise InputError(
            f'{where} must be a 3-letter orientation code such as "asr" or "psl", got {code!r}.'
        )
    low = code.lower()
    used = [next((i for i, pair in enumerate(_AXIS_PAIRS) if ch in pair), None) for ch in low]
    if None in used or len(set(used)) != 3:
        raise InputError(
            f"{where} {code!r} is not a valid orientation code: use one letter from each of "
            'a/p, s/i and l/r, such as "asr" or "psl".'
        )
    return low


def check_voxel_size(value: Any, *, where: str = "voxel_size_um") -> tuple[float, float, float]:
    """Return a voxel size as three positive, finite floats (z, y, x) in µm, or raise.

    Parameters
    ----------
    value : float or sequence of 3 floats
        A single number means isotropic voxels.
    where : str
        What the value is, for the message.

    Returns
    -------
    tuple of 3 float

    Raises
    ------
    InputError
        If the value is not one or three finite numbers from ``MIN_VOXEL_UM`` (0.5 µm) to
        ``MAX_VOXEL_UM`` (1 mm); below, the message asks whether millimetres were given.

    Examples
    --------
    >>> check_voxel_size([5, 2, 2])
    (5.0, 2.0, 2.0)
    """
    values = value if isinstance(value, (list, tuple)) else [value] * 3
    try:
        out = tuple(float(v) for v in values)
        ok = len(out) == 3 and not any(isinstance(v, bool) for v in values)
    except (TypeError, ValueError):
        ok = False
    if not ok or not all(math.isfinite(v) and 0 < v <= MAX_VOXEL_UM for v in out):
        raise InputError(
            f"{where} must be one or three positive numbers of at most {MAX_VOXEL_UM:g} µm "
            f"(z, y, x), got {value!r}."
        )
    if min(out) < MIN_VOXEL_UM:
        shown = ", ".join(f"{v:g}" for v in out)
        in_um = ", ".join(f"{v * 1000:g}" for v in out)
        raise InputError(
            f"{where} is ({shown}) µm, below {MIN_VOXEL_UM:g} µm: did you give millimetres? "
            f"In µm that is ({in_um})."
        )
    return out
