"""Expert-parallel MoE inference on torch.distributed, with expert duplication from moe_gps.

Importing ``runtime`` alone needs no torch; the modules below do.

* :mod:`runtime.moe_layer`  the expert-parallel MoE layer (all-to-all dispatch/combine)
  and its single-process reference
* :mod:`runtime.routing`    replica choice per (token, expert) pair and split sizes
* :mod:`runtime.apply`      applying a new placement while running (batched P2P moves)
* :mod:`runtime.launch`     ``torchrun -m runtime.launch --config run.yaml --duplication MODE``
* :mod:`runtime.record_hf`  recording router traces from a local HuggingFace MoE checkpoint
* :mod:`runtime.local`      running a function on N local gloo ranks (tests, benchmarks)
* :mod:`runtime.config`, :mod:`runtime.duplication`, :mod:`runtime.gain`, :mod:`runtime.background`
                            the run config, the re-plan schedule and its min_gain rule, async moves
* :mod:`runtime.replay`, :mod:`runtime.validate`
                            ``moe-gps validate``: runtime runs against the simulator (numpy only)

See docs/runtime.md.
"""
