"""Expert-parallel MoE inference on torch.distributed, with expert duplication from moe_gps.

Importing ``runtime`` alone needs no torch; the modules below do.

* :mod:`runtime.moe_layer`  the expert-parallel MoE layer (all-to-all dispatch/combine)
  and its single-process reference
* :mod:`runtime.routing`    replica choice per (token, expert) pair and split sizes
* :mod:`runtime.apply`      applying a new placement while running (batched P2P moves)
* :mod:`runtime.launch`     ``torchrun -m runtime.launch --config run.yaml --duplication MODE``
* :mod:`runtime.record_hf`  recording router traces from a local HuggingFace MoE checkpoint
* :mod:`runtime.local`      running a function on N local gloo ranks (tests, benchmarks)

See docs/runtime.md.
"""
