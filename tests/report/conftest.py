"""Fixtures shared by the report tests: one small census case (study, subjects, QC, tables)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ketamap.stats import compare_regions

GROUPS = (("saline", 0.0), ("ketamine_30", 30.0), ("ketamine_100", 100.0))


def census_cohort(n_regions=40, seed=0):
    rng = np.random.default_rng(seed)
    subjects = pd.DataFrame(
        [(f"{g}-{i}", g, d, "MF"[i % 2]) for g, d in GROUPS for i in range(4)],
        columns=["subject", "group", "dose_mg_per_kg", "sex"],
    )
    acr = ["VTA", "SNc", "ZI"] + [f"R{i}" for i in range(3, n_regions)]
    rows = []
    for s, g, _, _ in subjects.itertuples(index=False):
        fold = np.ones(n_regions)
        if g == "ketamine_100":
            fold[0] = 0.5
        counts = rng.poisson(rng.gamma(30, 100 * fold / 30))
        vol = np.full(n_regions, 0.5)
        rows.append(pd.DataFrame({
            "subject": s, "region_id": np.arange(n_regions, dtype=np.int64) + 70_000,
            "acronym": acr, "level": 1 + np.arange(n_regions) % 3, "count": counts,
            "volume_mm3": vol, "density_per_mm3": counts / vol,
        }))  # fmt: skip
    counts = pd.concat(rows, ignore_index=True)
    regions = compare_regions(counts, subjects, reference_group="saline")
    qc = pd.DataFrame({
        "subject": subjects["subject"], "n_cells": 1000, "registration_correlation": 0.9,
        "registration_flagged": [False] * 11 + [True],
        "registration_reasons": [""] * 11 + ["correlation <0.8 & low"],
        "extra_metric": 1.5,
    })  # fmt: skip
    study = {
        "name": "Ketamine <TH> census", "marker": "TH", "atlas": "allen_mouse_25um",
        "reference_group": "saline",
        "groups": [{"name": g, "dose_mg_per_kg": d, "schedule": "daily x10"} for g, d in GROUPS],
    }  # fmt: skip
    return study, subjects, qc, regions, counts


@pytest.fixture(scope="module")
def census_case():
    """``(study, subjects, qc, regions, counts)`` of a 12-mouse, 40-region census."""
    return census_cohort()
