"""Serving-level simulation: requests arrive, queue and batch, and every iteration runs the
simulator's MoE layers under a duplication strategy (docs/serving.md).

Entry point: :func:`sim.serving.run.serve`.
"""
