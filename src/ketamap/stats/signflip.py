"""The exact sign-flip test of paired differences averaged per independent unit (cluster).

Used wherever a mixed model cannot be trusted with few units: spine turnover (per mouse,
or per dendrite with a single mouse) and ensembles compared across mice.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["cluster_sign_flip", "smallest_p"]

_EXACT_UP_TO = 13  # all 2^n sign patterns up to this many clusters, else random ones


def smallest_p(n: int) -> float:
    """Return the smallest two-sided p the exact test can give with ``n`` clusters.

    Examples
    --------
    >>> smallest_p(4), smallest_p(20)
    (0.125, 0.0)
    """
    return 2.0 / 2**n if 1 <= n <= _EXACT_UP_TO else 0.0


def cluster_sign_flip(
    df: pd.DataFrame,
    measure: str,
    intervals: list,
    *,
    cluster: str = "mouse",
    n_permutations: int = 9999,
    seed: int = 0,
) -> list[dict]:
    """Paired test of each interval against the first, by sign flips of cluster means.

    For each dendrite the difference of ``measure`` between the interval and the
    reference interval is taken; the differences are averaged per ``cluster`` (mouse,
    or dendrite), and the mean over clusters is the estimate. Under the null of no
    change each cluster's mean difference is symmetric about 0, so flipping signs gives
    its exact distribution (all 2^n flips when n <= 13, else ``n_permutations`` random
    ones); the p-value is two-sided. Valid with any within-cluster correlation, and
    with as few clusters as there are (with n clusters, p >= 2 / 2^n).

    Parameters
    ----------
    df : DataFrame
        ``dendrite``, ``interval``, ``measure`` and the ``cluster`` column.
    measure : str
    intervals : list
        Intervals in order; the first is the reference.
    cluster : str
        Column whose units are independent (``mouse``, or ``dendrite``).
    n_permutations : int
    seed : int

    Returns
    -------
    list of dict
        ``measure, interval, reference, estimate, se, p_value`` per later interval.

    Examples
    --------
    >>> df = pd.DataFrame({"dendrite": list("aabbcc"), "mouse": list("aabbcc"),
    ...                    "interval": ["i1", "i2"] * 3, "rate": [0.1, 0.3, 0.2, 0.4, 0.1, 0.2]})
    >>> r = cluster_sign_flip(df, "rate", ["i1", "i2"])[0]
    >>> round(r["estimate"], 3), r["p_value"]
    (0.167, 0.25)
    """
    wide = df.pivot_table(index=["dendrite"], columns="interval", values=measure, aggfunc="mean")
    owner = df.drop_duplicates("dendrite").set_index("dendrite", drop=False)[cluster]
    rows = []
    for interval in intervals[1:]:
        row = {"measure": measure, "interval": interval, "reference": intervals[0],
               "estimate": np.nan, "se": np.nan, "p_value": np.nan}  # fmt: skip
        if interval not in wide or intervals[0] not in wide:
            rows.append(row)
            continue
        diff = (wide[interval] - wide[intervals[0]]).dropna()
        means = diff.groupby(owner.reindex(diff.index)).mean().to_numpy(dtype=np.float64)
        n = len(means)
        if n >= 1:
            row["estimate"] = float(means.mean())
        if n >= 2:
            row["se"] = float(means.std(ddof=1) / np.sqrt(n))
            if n <= _EXACT_UP_TO:
                signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
            else:
                rng = np.random.default_rng(seed)
                signs = rng.choice([-1, 1], size=(n_permutations, n))
                signs = np.vstack([np.ones(n, dtype=np.int64), signs])
            null = np.abs(signs @ means) / n
            row["p_value"] = float(np.mean(null >= abs(means.mean()) - 1e-12))
        rows.append(row)
    return rows
