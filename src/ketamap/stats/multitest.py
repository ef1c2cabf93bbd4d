"""Multiple-testing adjustments: Benjamini-Hochberg (FDR) and Holm (FWER), NaN-aware.

One place for both: the census's region tables and networks use the false discovery
rate, the ensembles' session comparisons the family-wise error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

from ketamap.errors import InputError

__all__ = ["benjamini_hochberg", "holm"]


def _adjusted(p: ArrayLike, adjust: Callable, name: str) -> np.ndarray:
    """Apply ``adjust`` to the non-NaN p-values of ``p`` (any shape); NaN stays NaN."""
    arr = np.asarray(p, dtype=float)
    flat = arr.ravel()
    out = np.full(flat.shape, np.nan)
    ok = ~np.isnan(flat)
    values = flat[ok]
    if np.any((values < 0) | (values > 1)):
        raise InputError(f"P-values passed to {name} must lie in [0, 1].")
    if values.size:
        out[ok] = adjust(values)
    return out.reshape(arr.shape)


def benjamini_hochberg(p: ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), ignoring NaN.

    Parameters
    ----------
    p : array_like of float
        P-values in [0, 1], any shape; NaN entries are left out of the family
        and stay NaN.

    Returns
    -------
    ndarray of float64
        Same shape as ``p``.

    Raises
    ------
    InputError
        If a p-value lies outside [0, 1].

    References
    ----------
    Benjamini Y, Hochberg Y (1995). J R Stat Soc B 57:289-300.
    doi:10.1111/j.2517-6161.1995.tb02031.x

    Examples
    --------
    >>> benjamini_hochberg([0.01, 0.04, np.nan, 0.03]).round(3)
    array([0.03, 0.04,  nan, 0.04])
    """

    def adjust(values: np.ndarray) -> np.ndarray:
        m = values.size
        order = np.argsort(values, kind="stable")
        scaled = values[order] * m / np.arange(1, m + 1)
        q = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
        res = np.empty(m)
        res[order] = q
        return res

    return _adjusted(p, adjust, "benjamini_hochberg")


def holm(p: ArrayLike) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error), ignoring NaN.

    Parameters
    ----------
    p : array_like of float
        P-values in [0, 1], any shape; NaN entries are left out of the family
        and stay NaN.

    Returns
    -------
    ndarray of float64
        Same shape as ``p``.

    Raises
    ------
    InputError
        If a p-value lies outside [0, 1].

    References
    ----------
    Holm S (1979). Scand J Stat 6:65-70.

    Examples
    --------
    >>> holm([0.01, 0.04, np.nan, 0.03]).round(3)
    array([0.03, 0.06,  nan, 0.06])
    """

    def adjust(values: np.ndarray) -> np.ndarray:
        m = values.size
        order = np.argsort(values, kind="stable")
        adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * values[order]))
        res = np.empty(m)
        res[order] = adj
        return res

    return _adjusted(p, adjust, "holm")
