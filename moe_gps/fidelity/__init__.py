"""Fidelity: calibrate the simulator on a real machine and check it against the runtime.

* :mod:`moe_gps.fidelity.calibrate`: ``moe-gps calibrate`` (measure N ranks in the runtime's
  setting, write a cluster file): :func:`~moe_gps.fidelity.calibrate.calibrate`,
  :func:`~moe_gps.fidelity.calibrate.fit_cluster`;
* :mod:`moe_gps.fidelity.validate`: ``moe-gps validate`` (runtime runs, replayed placements,
  simulation, comparison): :func:`~moe_gps.fidelity.validate.validate`;
* :mod:`moe_gps.fidelity.measured`, :mod:`~moe_gps.fidelity.compare`,
  :mod:`~moe_gps.fidelity.replay`, :mod:`~moe_gps.fidelity.report`: the pieces;
  :mod:`~moe_gps.fidelity.fit` and :mod:`~moe_gps.fidelity.quiet`: statistics and how busy
  the machine was.

Nothing here imports torch: the measuring ranks run :mod:`runtime.fidelity_bench` and
:mod:`runtime.launch` under ``torchrun`` in their own processes. docs/fidelity.md has the
formulas and the measured accuracy.
"""
