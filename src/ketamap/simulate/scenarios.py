"""Study designs and region effects for the cohort simulator.

A scenario says which groups a study has (dose, schedule), how many mice are
in each, the baseline density of marker-positive cells per region and the
fold change each group applies to each region. Densities and effects are
given by Allen acronym and apply to the region and all its descendants; the
nearest listed ancestor of a label wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["GroupDesign", "Scenario", "SCENARIOS", "get_scenario"]


@dataclass(frozen=True)
class GroupDesign:
    """One simulated group: name, dose (mg/kg), schedule, days, effects."""

    name: str
    dose_mg_per_kg: float
    schedule: str = "daily"
    duration_days: int = 10
    description: str = ""
    #: fold change of the marker-positive cell count per acronym, relative to baseline
    fold_changes: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """A simulated study design.

    Attributes
    ----------
    name : str
        Scenario name (e.g. ``"ketamine-10day"``).
    groups : tuple of GroupDesign
        The first group is the reference (vehicle) group.
    densities_per_mm3 : mapping
        Baseline density of marker-positive somata per acronym (cells/mm³).
    default_density_per_mm3 : float
        Density of grey-matter regions with no listed ancestor.
    zero_density : tuple of str
        Acronyms (with their descendants) that hold no marker-positive cells
        (fibre tracts, ventricles).
    marker : str
        The marker simulated.
    """

    name: str
    groups: tuple[GroupDesign, ...]
    densities_per_mm3: Mapping[str, float]
    default_density_per_mm3: float = 3.0
    zero_density: tuple[str, ...] = ("fiber tracts", "VS")
    marker: str = "TH"
    description: str = ""

    @property
    def reference_group(self) -> str:
        """Name of the reference (first) group."""
        return self.groups[0].name


# Baseline TH+ densities. Real densities in VTA/SNc reach ~10^4 cells/mm³; the
# demo images whole brains at 40 µm voxels, where somata closer than ~2 voxels
# merge, so the densities below keep the real *ranking* (dense dopaminergic
# groups A8–A14 in midbrain and hypothalamus, sparse elsewhere) at a scale a
# 40 µm grid resolves. Pass your own table for other scales.
TH_DENSITIES_PER_MM3 = {
    "VTA": 200.0,
    "SNc": 250.0,
    "DR": 250.0,
    "PVH": 180.0,
    "ARH": 150.0,
    "DMH": 120.0,
    "MPN": 120.0,
    "ZI": 60.0,
    "VMH": 60.0,
    "SNr": 50.0,
    "LHA": 40.0,
    "HY": 15.0,
    "MB": 8.0,
    "OLF": 10.0,
    "CP": 2.0,
    "ACB": 2.0,
}

# Directions from Datta et al. 2023 (Cell Reports); magnitudes are illustrative
# (no magnitudes are public): 2.5-fold decreases (0.4x) and 2.0-2.2-fold increases,
# large enough for 4 mice per group to detect them in regions of 0.15 mm³.
KETAMINE_10DAY = Scenario(
    name="ketamine-10day",
    description=(
        "Male mice, ketamine 30 or 100 mg/kg or saline i.p. daily for 10 days; TH+ neurons fall in "
        "DR, DMH and MPN and rise in ZI and SNr at 30 mg/kg; at 100 mg/kg they fall in VTA and SNc "
        "and rise in the hypothalamus (PVH, ARH, VMH, LHA)."
    ),
    groups=(
        GroupDesign("saline", 0.0, "daily", 10, "saline i.p."),
        GroupDesign(
            "ket30",
            30.0,
            "daily",
            10,
            "ketamine 30 mg/kg i.p.",
            {"DR": 0.4, "DMH": 0.4, "MPN": 0.4, "ZI": 2.0, "SNr": 2.0},
        ),
        GroupDesign(
            "ket100",
            100.0,
            "daily",
            10,
            "ketamine 100 mg/kg i.p.",
            {"VTA": 0.4, "SNc": 0.4, "PVH": 2.2, "ARH": 2.0, "VMH": 2.2, "LHA": 2.2},
        ),
    ),
    densities_per_mm3=TH_DENSITIES_PER_MM3,
)

NULL_STUDY = Scenario(
    name="null",
    description="Saline vs ketamine 30 mg/kg with no effect anywhere (for calibration).",
    groups=(
        GroupDesign("saline", 0.0, "daily", 10, "saline i.p."),
        GroupDesign("ket30", 30.0, "daily", 10, "ketamine 30 mg/kg i.p."),
    ),
    densities_per_mm3=TH_DENSITIES_PER_MM3,
)

SCENARIOS = {s.name: s for s in (KETAMINE_10DAY, NULL_STUDY)}


def get_scenario(name: str) -> Scenario:
    """Return the built-in scenario called ``name``.

    Raises
    ------
    ParameterError
        If there is no such scenario (naming the closest one).
    """
    from ketamap.errors import ParameterError
    from ketamap.params import did_you_mean

    try:
        return SCENARIOS[name]
    except KeyError:
        raise ParameterError(
            f'Unknown scenario "{name}"{did_you_mean(name, SCENARIOS)}; '
            f"available: {', '.join(SCENARIOS)}."
        ) from None
