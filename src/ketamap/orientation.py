"""BrainGlobe orientation codes: the one check every module uses.

A code has three letters, one per array axis (z, y, x), each naming where that
axis *starts*: ``a``/``p`` (anterior/posterior), ``s``/``i``
(superior/inferior), ``l``/``r`` (left/right), each pair used once — the 48
codes of brainglobe-space (e.g. ``"asr"`` for the Allen atlas, ``"psl"``).
Reorientation itself always goes through :mod:`brainglobe_space`.
"""

from __future__ import annotations

from typing import Any

from ketamap.errors import InputError

__all__ = ["check_orientation"]

_AXIS_PAIRS = ({"a", "p"}, {"s", "i"}, {"l", "r"})


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
            'a/p, s/i and l/r (e.g. "asr" or "psl").'
        )
    return low
