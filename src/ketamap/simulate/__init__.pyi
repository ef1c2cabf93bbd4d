"""Public names of ``ketamap.simulate``, imported lazily by ``__init__.py``."""

__all__ = [
    "FibreSimParams",
    "simulate_fibres",
    "plant_fibres",
    "BrainParams",
    "GroupDesign",
    "SCENARIOS",
    "Scenario",
    "SimulatedBrain",
    "get_scenario",
    "simulate_brain",
    "simulate_census",
    "true_effects",
]

from .brain import BrainParams, SimulatedBrain, simulate_brain
from .cohort import simulate_census, true_effects
from .fibres import FibreSimParams, plant_fibres, simulate_fibres
from .scenarios import SCENARIOS, GroupDesign, Scenario, get_scenario
