"""The SimPy discrete-event model of expert-parallel MoE inference.

>>> from sim import simulate
>>> result = simulate(trace, config)          # config: moe_gps.config.SimulateConfig
>>> result.get("none").step_latency           # seconds per simulated step

Modules: :mod:`sim.cost` (phase costs), :mod:`sim.loads` (token loads from a trace),
:mod:`sim.strategies` (duplication strategies), :mod:`sim.work` (phase durations per
GPU), :mod:`sim.engine` (the SimPy model), :mod:`sim.run` (:func:`simulate`),
:mod:`sim.report` and :mod:`sim.plots` (tables, files, figures). Formulas:
docs/simulator.md.
"""

from sim.run import PHASES, SimResult, StrategyResult, simulate

__all__ = ["PHASES", "SimResult", "StrategyResult", "simulate"]
