"""Parameters of the spines stage, one frozen class for the core, the stage and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from ketamap.params import bounds, validate

__all__ = ["SpineParams"]


@dataclass(frozen=True)
class SpineParams:
    """Parameters of the spines stage (units in the names)."""

    max_rotation_deg: float = field(
        default=8.0, metadata=bounds(ge=0, le=45, doc="largest rotation searched")
    )
    shaft_sigma_um: float = field(default=0.4, metadata=bounds(gt=0, doc="ridge filter scale"))
    min_distance_um: float = field(
        default=0.8, metadata=bounds(ge=0, doc="nearest spine head to the centreline")
    )
    max_distance_um: float = field(
        default=3.5, metadata=bounds(gt=0, doc="farthest spine head from the centreline")
    )
    end_margin_um: float = field(
        default=1.0, metadata=bounds(ge=0, doc="unanalysed stretch at each end")
    )
    spot_sigma_um: float = field(default=0.25, metadata=bounds(gt=0, doc="head-matched smoothing"))
    threshold_sd: float = field(
        default=6.0, metadata=bounds(gt=0, doc="detection threshold (spine seen in one session)")
    )
    confirm_threshold_sd: float = field(
        default=3.5, metadata=bounds(gt=0, doc="faint spines seen in an adjacent session")
    )
    min_separation_um: float = field(
        default=0.45, metadata=bounds(gt=0, doc="closest two spine heads may be")
    )
    min_shaft_ratio: float = field(
        default=0.08, metadata=bounds(ge=0, doc="smallest head amplitude / shaft contrast")
    )
    merge_um: float = field(
        default=1.0, metadata=bounds(ge=0, doc="closer maxima with no dip between are one spine")
    )
    saddle_ratio: float = field(
        default=0.75, metadata=bounds(gt=0, le=1, doc="dip that separates two maxima")
    )
    neck_saddle_ratio: float = field(
        default=0.5, metadata=bounds(ge=0, le=1, doc="ridge that joins a neck to its head")
    )
    match_tolerance_um: float = field(
        default=1.0, metadata=bounds(gt=0, doc="tracking tolerance along the dendrite")
    )
    return_distance_um: float = field(
        default=1.5, metadata=bounds(gt=0, doc="'at a lost site' distance")
    )
    return_exclusion_um: float = field(
        default=1.0, metadata=bounds(ge=0, doc="null: no new spine this close to an old one")
    )
    return_same_side: bool = field(default=False, metadata=bounds(doc="lost sites on same side"))
    new_spines_session: str = field(
        default="", metadata=bounds(doc="session whose new spines are tested; '' = last")
    )
    n_permutations: int = field(default=10000, metadata=bounds(ge=99, doc="null draws"))
    seed: int = field(default=0, metadata=bounds(ge=0, doc="seed of the null"))

    def __post_init__(self):
        validate(self)
        if self.max_distance_um <= self.min_distance_um:
            from ketamap.errors import ParameterError

            raise ParameterError(
                f"SpineParams.max_distance_um ({self.max_distance_um}) must exceed "
                f"min_distance_um ({self.min_distance_um})."
            )
