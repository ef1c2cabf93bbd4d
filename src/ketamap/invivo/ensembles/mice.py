"""Sessions compared across mice: a linear mixed model with a random intercept per mouse.

Within one field of view, :func:`~ketamap.invivo.ensembles.session.compare_sessions` compares
sessions on matched cells and on blocks of time bins. Across several mice the unit
that replicates a session effect is the mouse: cells of one mouse share its
preparation, its ensembles and its day-to-day state, so treating every cell as an
independent sample would be pseudo-replication. :func:`compare_mice` fits

``measure ~ C(session)``, random intercept per mouse

(statsmodels ``MixedLM``, REML) on per-field means (default) or on per-cell values,
where a variance component for session within mouse carries the day-to-day variation
of each mouse that its cells share. Each session is compared with the first; the
Wald statistic is referred to a t distribution with containment degrees of freedom
(mouse-session cells minus mice minus the session effects), because with a handful
of mice the normal reference is too confident.

A p-value is never taken from a fit that did not converge (or failed): that measure is
then tested by the exact sign-flip test of the per-mouse mean differences
(:func:`ketamap.stats.signflip.cluster_sign_flip`), and the ``method`` column says so.
Null calibration: ``docs/ensembles.md`` (false-positive rate at alpha = 0.05).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from scipy import stats as sstats

from ketamap.errors import InputError, ParameterError
from ketamap.stats.signflip import cluster_sign_flip, smallest_p

__all__ = ["compare_mice"]

log = logging.getLogger(__name__)

COLUMNS = [
    "measure",
    "session",
    "reference",
    "unit",
    "estimate",
    "se",
    "ci_low",
    "ci_high",
    "df",
    "p_value",
    "method",
    "converged",
    "n_mice",
    "n_obs",
]
_UNITS = ("field", "cell")


def _check(cells: pd.DataFrame, measure: str, unit: str, sessions) -> list:
    if unit not in _UNITS:
        raise ParameterError(f'unit must be one of {", ".join(_UNITS)}, got "{unit}".')
    if not isinstance(cells, pd.DataFrame):
        raise InputError(f"cells must be a table (DataFrame), got {type(cells).__name__}.")
    missing = [c for c in ("mouse", "session", measure) if c not in cells.columns]
    if missing:
        raise InputError(
            f"the cells table lacks column(s) {', '.join(missing)} "
            f"(it has {', '.join(map(str, cells.columns))})."
        )
    if not pd.api.types.is_numeric_dtype(cells[measure]):
        raise InputError(f'column "{measure}" must be numeric, got {cells[measure].dtype}.')
    present = list(dict.fromkeys(cells["session"].astype(str)))
    if sessions is None:
        return present
    sessions = [str(s) for s in sessions]
    unknown = [s for s in sessions if s not in present]
    if unknown:
        raise InputError(
            f"session(s) {', '.join(unknown)} not in the cells table (it has {', '.join(present)})."
        )
    if len(set(sessions)) != len(sessions):
        raise InputError(f"sessions are listed twice: {', '.join(sessions)}.")
    return sessions


def _fallback(data: pd.DataFrame, measure: str, sessions: list, why: str, n_perm, seed):
    """Rows of the exact sign-flip test over mice, with a t interval of the mouse means."""
    data = data.assign(session=data["session"].astype(str))
    per_mouse = data.groupby(["mouse", "session"])[measure].mean().reset_index()
    table = per_mouse.rename(columns={"session": "interval"}).assign(dendrite=per_mouse["mouse"])
    flips = cluster_sign_flip(
        table, measure, sessions, cluster="mouse", n_permutations=n_perm, seed=seed
    )
    wide = per_mouse.pivot(index="mouse", columns="session", values=measure)
    rows = []
    for r in flips:
        d = (wide[r["interval"]] - wide[sessions[0]]).dropna()
        n = len(d)
        half = sstats.t.ppf(0.975, n - 1) * r["se"] if n >= 2 else np.nan
        text = f"{why}: exact sign-flip test over {n} mice (CI: t interval of the mouse means)"
        if (floor := smallest_p(n)) > 0.05:
            text += f"; with {n} mice no p below {floor:.3g} is possible"
        rows.append(
            {
                "session": r["interval"],
                "estimate": r["estimate"],
                "se": r["se"],
                "ci_low": r["estimate"] - half,
                "ci_high": r["estimate"] + half,
                "df": float(n - 1) if n >= 2 else np.nan,
                "p_value": r["p_value"],
                "method": text,
                "converged": False,
            }
        )
    return rows


def compare_mice(
    cells: pd.DataFrame,
    *,
    measure: str = "mean_coactivity",
    sessions: list | None = None,
    unit: str = "field",
    n_permutations: int = 9999,
    seed: int = 0,
) -> pd.DataFrame:
    """Compare every session with the first across mice, by a linear mixed model.

    Parameters
    ----------
    cells : DataFrame
        One row per cell and session: ``mouse``, ``session``, the ``measure`` column and
        optionally ``field_of_view`` (several fields of one mouse) and ``global_cell``.
    measure : str
        Column compared (e.g. ``mean_coactivity``, ``event_rate_hz``).
    sessions : list of str, optional
        Sessions in time order, the first being the reference; by default in their
        order of appearance. Sessions not listed are left out.
    unit : {"field", "cell"}
        ``"field"`` (default): the measure is averaged per field of view and session,
        and ``measure ~ C(session)`` is fitted with a random intercept per mouse (and,
        when a mouse has several fields, variance components for field and for session
        within mouse).
        ``"cell"``: every cell is a row; the model adds a variance component for
        session within mouse, the variation of a mouse from day to day that all its
        cells share (without it, the cells would count as independent replicates of
        the session effect).
    n_permutations : int
        Random sign flips of the fallback test when there are more than 13 mice (all
        2^n flips otherwise).
    seed : int
        Seed of those flips.

    Returns
    -------
    DataFrame
        One row per session after the first: ``measure, session, reference, unit,
        estimate`` (mean difference from the reference, in the measure's units),
        ``se, ci_low, ci_high`` (95 %), ``df, p_value, method`` (the model, or the
        fallback and why), ``converged, n_mice, n_obs``. Empty (these columns) with
        fewer than two mice or two sessions.

    Raises
    ------
    InputError
        If a column is missing or not numeric, or a listed session is not in the table.
    ParameterError
        If ``unit`` is not ``"field"`` or ``"cell"``.

    Notes
    -----
    The t reference uses containment degrees of freedom: the number of mouse-session
    cells with data, minus the number of mice, minus the number of session effects; for
    two sessions that is n_mice - 1, as in a paired t test of the mouse means.
    Statsmodels' own p-values use the normal distribution, which with five mice gives
    about twice the nominal false-positive rate.

    References
    ----------
    Aarts E, Verhage M, Veenvliet JV, Dolan CV, van der Sluis S (2014). A solution to
    dependency: using multilevel analysis to accommodate nested data. Nat Neurosci
    17:491-496. doi:10.1038/nn.3648

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> cells = pd.DataFrame({"mouse": np.repeat([f"m{i}" for i in range(6)], 40),
    ...                       "session": np.tile(np.repeat(["base", "later"], 20), 6)})
    >>> later = 0.2 * (cells["session"] == "later")
    >>> mouse = 0.1 * cells["mouse"].str[1:].astype(int)
    >>> cells["mean_coactivity"] = mouse + later + rng.normal(0, 0.05, len(cells))
    >>> r = compare_mice(cells).iloc[0]
    >>> r["session"], round(float(r["estimate"]), 1), bool(r["p_value"] < 0.001)
    ('later', 0.2, True)
    """
    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    sessions = _check(cells, measure, unit, sessions)
    data = cells.assign(session=cells["session"].astype(str), mouse=cells["mouse"].astype(str))
    data = data[data["session"].isin(sessions)].dropna(subset=[measure]).reset_index(drop=True)
    if "field_of_view" in data.columns:
        data = data.assign(field_of_view=data["field_of_view"].astype(str))
    else:
        data = data.assign(field_of_view=data["mouse"])
    # field = mouse + field name, so equal field names of two mice stay apart
    data = data.assign(field=data["mouse"] + "/" + data["field_of_view"])
    n_mice = data["mouse"].nunique()
    empty = pd.DataFrame(columns=COLUMNS)
    if n_mice < 2 or len(sessions) < 2:
        log.info("compare_mice: %d mice, %d sessions: nothing to compare", n_mice, len(sessions))
        return empty
    if unit == "field":
        data = data.groupby(["mouse", "field", "session"], as_index=False)[measure].mean()
    several_fields = bool((data.groupby("mouse")["field"].nunique() > 1).any())
    cat = pd.Categorical(data["session"], categories=sessions)
    data = data.assign(session_c=cat, session=cat)
    # one row per mouse and session (one field each, unit "field"): the residual is the
    # mouse's day-to-day variation. Otherwise several rows share a mouse and session (its
    # cells, or its fields), and a variance component for session within mouse carries
    # what they share; fields of one mouse get a component of their own.
    repeated = unit == "cell" or several_fields
    vc = {"session": "0 + C(session_c)"} if repeated else {}
    if several_fields:
        vc["field"] = "0 + C(field)"
    model = (
        "MixedLM: random intercept per mouse"
        + (" + session within mouse" if repeated else "")
        + (" + field within mouse" if several_fields else "")
    )
    vc = vc or None
    # containment df: the session effect is replicated by mice
    mouse_sessions = data[["mouse", "session"]].drop_duplicates().shape[0]
    df_t = float(max(1, mouse_sessions - n_mice - (len(sessions) - 1)))
    # fitted on a unit scale (a coactivity of 0.01 ± 0.003 puts the variances near the
    # optimiser's tolerance); estimates are scaled back
    scale = float(data[measure].std())
    scale = scale if np.isfinite(scale) and scale > 0 else 1.0
    data = data.assign(_y=data[measure] / scale)
    fit, why = None, ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # re_formula="1" explicitly: with a vc_formula statsmodels otherwise drops
            # the random intercept
            fit = smf.mixedlm(
                "_y ~ session_c", data, groups="mouse", re_formula="1", vc_formula=vc
            ).fit(reml=True)
        except (np.linalg.LinAlgError, ValueError) as e:
            why = f"MixedLM failed ({e})"
    # converged: the optimiser says so (statsmodels retries other optimisers after a
    # failed one and warns; what counts is the last), the fixed effects' standard
    # errors are finite and positive, and the Hessian is positive definite. A variance
    # estimated at 0 ("on the boundary") is a converged fit of a smaller model.
    bad_hessian = any(
        issubclass(w.category, ConvergenceWarning) and "Hessian" in str(w.message) for w in caught
    )
    converged = (
        fit is not None
        and bool(fit.converged)
        and not bad_hessian
        and bool(np.all(np.isfinite(fit.bse_fe)) and np.all(fit.bse_fe > 0))
    )
    base = {"measure": measure, "reference": sessions[0], "unit": unit, "n_mice": n_mice,
            "n_obs": len(data)}  # fmt: skip
    if not converged:
        why = why or (
            "MixedLM Hessian not positive definite" if bad_hessian else "MixedLM did not converge"
        )
        rows = _fallback(data, measure, sessions, why, n_permutations, seed)
        return pd.DataFrame([base | r for r in rows], columns=COLUMNS)
    rows = []
    crit = sstats.t.ppf(0.975, df_t)
    for s in sessions[1:]:
        name = f"session_c[T.{s}]"
        if name not in fit.fe_params.index:  # a session with no data
            rows.append(base | {"session": s, "method": f"{model}: no data", "converged": True})
            continue
        est, se = scale * float(fit.fe_params[name]), scale * float(fit.bse_fe[name])
        rows.append(
            base
            | {
                "session": s,
                "estimate": est,
                "se": se,
                "ci_low": est - crit * se,
                "ci_high": est + crit * se,
                "df": df_t,
                "p_value": float(2 * sstats.t.sf(abs(est / se), df_t)) if se > 0 else np.nan,
                "method": f"{model} (REML), Wald t with {df_t:g} df",
                "converged": True,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)
