"""Fidelity: calibrate the simulator on a real machine, and compare it with measured runs.

* :mod:`moe_gps.fidelity.calibrate`: ``moe-gps calibrate`` (measure N ranks in the runtime's
  setting, write a cluster file): :func:`~moe_gps.fidelity.calibrate.calibrate`,
  :func:`~moe_gps.fidelity.calibrate.fit_cluster`;
* :mod:`moe_gps.fidelity.measured`, :mod:`~moe_gps.fidelity.compare`,
  :mod:`~moe_gps.fidelity.report`, :mod:`~moe_gps.fidelity.model`: what a run measured, predicted
  against measured, the report, the simulator's description of the runtime's model;
  :mod:`~moe_gps.fidelity.fit` and :mod:`~moe_gps.fidelity.quiet`: statistics and how busy the
  machine was.

``moe-gps validate`` (runtime runs, their placements replayed, simulation, comparison) sits
above, with the runtime whose schedule it replays: :mod:`runtime.validate`, :mod:`runtime.replay`.

Nothing here imports torch or the runtime: the measuring ranks run :mod:`runtime.fidelity_bench`
under ``torchrun`` in their own processes. docs/fidelity.md has the formulas and the measured
accuracy.
"""
