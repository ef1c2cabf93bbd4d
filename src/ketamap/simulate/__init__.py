"""Simulators with known ground truth: the demo's embedded default and the tests' yardstick."""

from ketamap.simulate.brain import BrainParams, SimulatedBrain, simulate_brain
from ketamap.simulate.cohort import simulate_census, true_effects
from ketamap.simulate.scenarios import SCENARIOS, GroupDesign, Scenario, get_scenario

__all__ = [
    "BrainParams",
    "SimulatedBrain",
    "simulate_brain",
    "simulate_census",
    "true_effects",
    "SCENARIOS",
    "GroupDesign",
    "Scenario",
    "get_scenario",
]
