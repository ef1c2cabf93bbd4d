"""Spine turnover measures from a presence table (pure functions).

Conventions (written out in ``docs/spines.md``): for an interval from session
``a`` to session ``b`` on one dendrite, with ``N_a`` spines present in ``a``,

* formation rate = spines present in ``b`` but not in ``a`` / ``N_a``
* elimination rate = spines present in ``a`` but not in ``b`` / ``N_a``
* turnover ratio = (formed + eliminated) / (``N_a`` + ``N_b``)
* survival fraction = spines of the first session still present in ``b`` /
  spines of the first session

as fractions (×100 gives the percentages of Holtmaat et al. 2005 and
Moda-Sava et al. 2019).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ketamap.stats.signflip import cluster_sign_flip, smallest_p

__all__ = [
    "presence_matrix",
    "interval_rates",
    "pooled_rates",
    "return_to_lost_sites",
    "mixed_model",
    "cluster_sign_flip",
]


def presence_matrix(spines: pd.DataFrame, session_labels: list[str]) -> pd.DataFrame:
    """Spine × session presence table.

    Parameters
    ----------
    spines : DataFrame
        One row per spine and session where it was seen: ``dendrite, session,
        spine_id`` (optionally ``s_um, side``).
    session_labels : list of str
        Sessions in time order; they become boolean columns.

    Returns
    -------
    DataFrame
        ``dendrite, spine_id, [side, s_um,] <session>...`` one row per spine,
        sorted by dendrite and position.
    """
    keys = ["dendrite", "spine_id"]
    if spines.empty:
        return pd.DataFrame(
            {
                **{k: pd.Series(dtype=object) for k in keys},
                **{s: pd.Series(dtype=bool) for s in session_labels},
            }
        )
    wide = spines.assign(_p=True).pivot_table(
        index=keys, columns="session", values="_p", aggfunc="any", fill_value=False
    )
    wide = wide.reindex(columns=session_labels, fill_value=False).astype(bool)
    agg = {c: f for c, f in (("side", "first"), ("s_um", "mean")) if c in spines}
    if agg:
        wide = spines.groupby(keys).agg(agg).join(wide)
    wide = wide.reset_index()
    wide.columns.name = None
    order = keys[:1] + (["s_um"] if "s_um" in wide else []) + keys[1:]
    return wide.sort_values(order).reset_index(drop=True)


def interval_rates(
    presence: pd.DataFrame,
    session_labels: list[str],
    *,
    lengths_um: dict | None = None,
) -> pd.DataFrame:
    """Compute formation, elimination, turnover and survival per dendrite and interval.

    Parameters
    ----------
    presence : DataFrame
        From :func:`presence_matrix`.
    session_labels : list of str
        Sessions in time order.
    lengths_um : dict, optional
        Dendrite -> length (µm) over which spines were counted, for densities.

    Returns
    -------
    DataFrame
        ``dendrite, interval, session_a, session_b, n_a, n_b, formed,
        eliminated, formation_rate, elimination_rate, turnover_ratio,
        survival_fraction, density_a_per_10um, density_b_per_10um``. The
        interval is named ``"<a>-><b>"``; rates are fractions (NaN when
        ``n_a`` is 0).
    """
    rows = []
    first = session_labels[0]
    for dend, g in presence.groupby("dendrite", sort=True):
        length = (lengths_um or {}).get(dend, np.nan)
        n_first = int(g[first].sum())
        for a, b in zip(session_labels[:-1], session_labels[1:], strict=True):
            pa, pb = g[a].to_numpy(bool), g[b].to_numpy(bool)
            n_a, n_b = int(pa.sum()), int(pb.sum())
            formed, elim = int((pb & ~pa).sum()), int((pa & ~pb).sum())
            surv = int((g[first].to_numpy(bool) & pb).sum())
            rows.append(
                {
                    "dendrite": dend,
                    "interval": f"{a}->{b}",
                    "session_a": a,
                    "session_b": b,
                    "n_a": n_a,
                    "n_b": n_b,
                    "formed": formed,
                    "eliminated": elim,
                    "formation_rate": formed / n_a if n_a else np.nan,
                    "elimination_rate": elim / n_a if n_a else np.nan,
                    "turnover_ratio": (formed + elim) / (n_a + n_b) if n_a + n_b else np.nan,
                    "survival_fraction": surv / n_first if n_first else np.nan,
                    "density_a_per_10um": 10 * n_a / length,
                    "density_b_per_10um": 10 * n_b / length,
                }
            )
    cols = [
        "dendrite",
        "interval",
        "session_a",
        "session_b",
        "n_a",
        "n_b",
        "formed",
        "eliminated",
        "formation_rate",
        "elimination_rate",
        "turnover_ratio",
        "survival_fraction",
        "density_a_per_10um",
        "density_b_per_10um",
    ]
    return pd.DataFrame(rows, columns=cols)


def pooled_rates(rates: pd.DataFrame) -> pd.DataFrame:
    """Rates per interval pooled over dendrites (sums of counts, then ratios).

    Parameters
    ----------
    rates : DataFrame
        From :func:`interval_rates`.

    Returns
    -------
    DataFrame
        ``interval, session_a, session_b, n_dendrites, n_a, n_b, formed,
        eliminated, formation_rate, elimination_rate, turnover_ratio``.
    """
    g = rates.groupby(["interval", "session_a", "session_b"], sort=False)
    out = g[["n_a", "n_b", "formed", "eliminated"]].sum().reset_index()
    out.insert(3, "n_dendrites", g.size().to_numpy())
    na = out["n_a"].where(out["n_a"] > 0)
    out["formation_rate"] = out["formed"] / na
    out["elimination_rate"] = out["eliminated"] / na
    out["turnover_ratio"] = (out["formed"] + out["eliminated"]) / (out["n_a"] + out["n_b"])
    return out


def return_to_lost_sites(
    presence: pd.DataFrame,
    session_labels: list[str],
    *,
    new_session: str,
    stretch_um: dict,
    distance_um: float = 1.5,
    exclusion_um: float = 1.0,
    same_side: bool = False,
    n_permutations: int = 10000,
    seed: int = 0,
) -> pd.DataFrame:
    """Share of new spines formed within ``distance_um`` of an earlier lost site, vs chance.

    A *lost site* is the position of a spine eliminated in any interval that
    ends at or before the session preceding ``new_session``. *New spines* are
    those present in ``new_session`` but not in the session before it. The
    null distribution places the same number of new spines on each dendrite
    uniformly at random along the stretch analysed that carries spines (from
    the first to the last spine seen in any session), on a random side, but only
    on *available* sites: not within ``exclusion_um`` of a spine present (on
    the same side) in the session before ``new_session`` — a spine cannot form
    on top of a persisting one, and one that appears where a spine has just
    been eliminated is tracked as that spine, not counted as new; lost sites
    are available by construction.

    Parameters
    ----------
    presence : DataFrame
        From :func:`presence_matrix`, with ``s_um`` and ``side``.
    session_labels : list of str
        Sessions in time order.
    new_session : str
        The session whose new spines are tested (e.g. ``"ketamine-24h"``).
    stretch_um : dict
        Dendrite -> (start, end) arc lengths in µm of the analysed stretch.
    distance_um : float
        Distance along the dendrite that counts as "at a lost site".
    exclusion_um : float
        Half-width of the stretch around a spine of the session before where the null
        places no spine.
    same_side : bool
        Count only lost sites on the same side of the shaft.
    n_permutations : int
        Draws of the null.
    seed : int
        Seed of the null draws.

    Returns
    -------
    DataFrame
        One row per dendrite and a last row ``dendrite="all"`` (pooled):
        ``n_new, n_lost_sites, n_near, share_near, null_share_mean,
        enrichment, p_value`` (one-sided, ``(1 + #null >= observed) /
        (1 + n_permutations)``).
    """
    k = session_labels.index(new_session)
    if k == 0:
        raise ValueError("new_session must not be the first session.")
    prev = session_labels[k - 1]
    rng = np.random.default_rng(seed)
    rows, null_total, obs_total = [], np.zeros(n_permutations, np.int64), 0
    n_new_total = 0
    step = 0.02
    for dend, g in presence.groupby("dendrite", sort=True):
        lost_mask = np.zeros(len(g), bool)
        for a, b in zip(session_labels[: k - 1], session_labels[1:k], strict=True):
            lost_mask |= g[a].to_numpy(bool) & ~g[b].to_numpy(bool)
        lost = g[lost_mask]
        new = g[g[new_session].to_numpy(bool) & ~g[prev].to_numpy(bool)]
        # a new spine cannot appear where a spine of the session before was (it would be
        # tracked as that spine), whether that spine persists or is eliminated now
        old = g[g[prev].to_numpy(bool)]
        # only the stretch that carries spines (first to last spine seen in any session):
        # spine-free ends would be available to the null and never near a lost site
        start, end = stretch_um[dend]
        start, end = max(start, float(g["s_um"].min())), min(end, float(g["s_um"].max()))

        def near(s, side, lost=lost):
            if lost.empty:
                return np.zeros(len(s), bool)
            d = np.abs(np.asarray(s)[:, None] - lost["s_um"].to_numpy()[None])
            if same_side:
                d = np.where(np.asarray(side)[:, None] == lost["side"].to_numpy()[None], d, np.inf)
            return (d <= distance_um).any(axis=1)

        obs = int(near(new["s_um"].to_numpy(), new["side"].to_numpy()).sum())
        grid = np.arange(start, end, step)
        q_sides = []
        for side in (-1, 1):
            occ = old.loc[old["side"] == side, "s_um"].to_numpy()
            free = (
                np.abs(grid[:, None] - occ[None]).min(axis=1) > exclusion_um
                if len(occ)
                else np.ones(len(grid), bool)
            )
            nr = near(grid, np.full(len(grid), side))
            q_sides.append((free.sum(), (free & nr).sum()))
        n_free = q_sides[0][0] + q_sides[1][0]
        q = (q_sides[0][1] + q_sides[1][1]) / n_free if n_free else 0.0
        n_new = len(new)
        null = rng.binomial(n_new, q, size=n_permutations)
        null_total += null
        obs_total += obs
        n_new_total += n_new
        rows.append(_rts_row(dend, n_new, len(lost), obs, null))
    rows.append(
        _rts_row("all", n_new_total, sum(r["n_lost_sites"] for r in rows), obs_total, null_total)
    )
    return pd.DataFrame(rows)


def _rts_row(dend, n_new, n_lost, obs, null) -> dict:
    share = obs / n_new if n_new else np.nan
    null_share = null.mean() / n_new if n_new else np.nan
    return {
        "dendrite": dend,
        "n_new": int(n_new),
        "n_lost_sites": int(n_lost),
        "n_near": int(obs),
        "share_near": share,
        "null_share_mean": null_share,
        "enrichment": share / null_share if n_new and null_share > 0 else np.nan,
        "p_value": (1 + int((null >= obs).sum())) / (1 + len(null)) if n_new else np.nan,
    }


def mixed_model(
    rates: pd.DataFrame, mice: dict, *, measures=("formation_rate", "elimination_rate")
) -> pd.DataFrame:
    """Compare intervals with a linear mixed model (dendrite within mouse).

    ``rate ~ C(interval)`` with a random intercept per mouse and a variance
    component for dendrite within mouse (statsmodels ``MixedLM``). With a
    single mouse the model keeps a random intercept per dendrite only; with a
    single dendrite no model is fitted. The first interval is the reference.

    A p-value is never taken from a fit that did not converge (or failed): the rows of
    that measure come instead from :func:`cluster_sign_flip` (per-mouse mean paired
    differences, their signs permuted; dendrites with a single mouse), and ``model``
    says so.

    Parameters
    ----------
    rates : DataFrame
        From :func:`interval_rates`.
    mice : dict
        Dendrite -> mouse.
    measures : sequence of str
        Columns of ``rates`` to model.

    Returns
    -------
    DataFrame
        ``measure, interval, reference, estimate, se, p_value, model,
        converged, n_dendrites, n_mice`` (one row per non-reference interval).
    """
    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    cols = [
        "measure",
        "interval",
        "reference",
        "estimate",
        "se",
        "p_value",
        "model",
        "converged",
        "n_dendrites",
        "n_mice",
    ]
    df = rates.assign(mouse=rates["dendrite"].map(mice))
    intervals = list(dict.fromkeys(df["interval"]))
    n_d, n_m = df["dendrite"].nunique(), df["mouse"].nunique()
    rows = []
    if n_d < 2 or len(intervals) < 2:
        return pd.DataFrame(columns=cols)
    df = df.assign(interval_c=pd.Categorical(df["interval"], categories=intervals))
    for measure in measures:
        d = df.dropna(subset=[measure])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if n_m >= 2:
                    model = "MixedLM: mouse intercept + dendrite-within-mouse variance"
                    fit = smf.mixedlm(
                        f"{measure} ~ interval_c",
                        d,
                        groups="mouse",
                        # re_formula="1" keeps the mouse intercept: with a vc_formula
                        # and no re_formula, statsmodels fits no group intercept
                        re_formula="1",
                        vc_formula={"dendrite": "0 + C(dendrite)"},
                    ).fit(reml=True)
                else:
                    model = "MixedLM: dendrite intercept (single mouse)"
                    fit = smf.mixedlm(f"{measure} ~ interval_c", d, groups="dendrite").fit()
            except (np.linalg.LinAlgError, ValueError) as e:
                fit, why = None, f"MixedLM failed ({e})"
        converged = (
            fit is not None
            and bool(fit.converged)
            and not any(issubclass(w.category, ConvergenceWarning) for w in caught)
            and bool(np.all(np.isfinite(fit.bse_fe)))
        )
        if not converged:
            why = why if fit is None else "MixedLM did not converge"
            cluster, units = ("mouse", "mice") if n_m >= 2 else ("dendrite", "dendrites")
            flip = cluster_sign_flip(d, measure, intervals, cluster=cluster)
            n_units = n_m if n_m >= 2 else n_d
            text = f"{why}: sign-flip test over {units}"
            floor = smallest_p(n_units)
            if floor > 0.05:
                text += f" (with {n_units} {units} no p below {floor:.3g} is possible)"
            rows += [
                r | {"model": text, "converged": False, "n_dendrites": n_d, "n_mice": n_m}
                for r in flip
            ]
            continue
        for name in fit.fe_params.index:
            if not name.startswith("interval_c[T."):
                continue
            rows.append(
                {
                    "measure": measure,
                    "interval": name[len("interval_c[T.") : -1],
                    "reference": intervals[0],
                    "estimate": float(fit.fe_params[name]),
                    "se": float(fit.bse_fe[name]),
                    "p_value": float(fit.pvalues[name]),
                    "model": model,
                    "converged": converged,
                    "n_dendrites": n_d,
                    "n_mice": n_m,
                }
            )
    return pd.DataFrame(rows, columns=cols)
