"""The time of one serving iteration, and what the KV cache of a GPU holds.

An iteration is one forward pass of every GPU over the tokens its scheduler put in the
batch (docs/serving.md, "Iteration time"):

    T = max_g (embeddings + dense layers)_g + MoE layers + max_g (LM head)_g + overhead

The MoE layers are the simulator's own: the strategy decides (re-plan, copies, re-split)
as in ``moe-gps simulate`` and the event model runs the layers (:class:`MoELayers`); the
attention block of each GPU follows its batch's real mix of prefill chunks and decodes
(:func:`sim.cost.attention_block_time`). The other parts are rooflines of the same
hardware, written out below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moe_gps.config.loader import memory_use
from moe_gps.config.schema import ClusterConfig, ModelConfig, WorkloadConfig
from moe_gps.config.serving import IterationParts, SchedulerConfig
from moe_gps.errors import UserError
from sim.cost import Hardware, attention_block_compute, attention_block_time, expert_slot_time, roofline
from sim.engine import EventModel
from sim.loads import StepLoads
from sim.strategies import SimContext, Strategy

#: vocabulary, dense layers before the MoE layers, their FFN dimension, for the bundled model presets
#: (the models' Hugging Face config.json: vocab_size, first_k_dense_replace, intermediate_size)
KNOWN_PARTS = {"mixtral-8x7b": (32000, 0, None), "qwen3-30b-a3b": (151936, 0, None),
               "deepseek-v3": (129280, 3, 18432)}
#: bytes per logit (the LM head writes float32 logits)
LOGIT_BYTES = 4.0


def _preset_name(model: ModelConfig) -> str:
    """The bundled preset ``model`` is (by its name or an alias, e.g. a config.json's
    ``deepseek-ai/DeepSeek-V3``, with the preset's layers, experts and top-k), else its own name."""
    from moe_gps.config.loader import infer_model

    for name in (model.name, *model.aliases):
        preset = infer_model(name, model.num_layers, model.num_experts, model.top_k)
        if preset is not None:
            return preset.name
    return model.name


def resolve_parts(parts: IterationParts, model: ModelConfig) -> IterationParts:
    """``parts`` with vocab_size, dense_layers and dense_intermediate_size made explicit."""
    vocab, dense, inter = KNOWN_PARTS.get(_preset_name(model), (None, 0, None))
    parts = dataclasses.replace(parts, vocab_size=parts.vocab_size or vocab,
                                dense_layers=dense if parts.dense_layers is None else parts.dense_layers,
                                dense_intermediate_size=parts.dense_intermediate_size or inter)
    if parts.vocab_size is None:
        raise UserError(f"model {model.name}: its vocabulary size is not known; give --vocab-size N "
                        "(vocab_size in the model's config.json)")
    if parts.dense_layers and parts.dense_intermediate_size is None:
        raise UserError(f"model {model.name}: iteration.dense_intermediate_size: required with "
                        f"{parts.dense_layers} dense layers")
    return parts


def kv_capacity(cluster: ClusterConfig, model: ModelConfig, parts: IterationParts, sched: SchedulerConfig,
                slots_per_gpu: int) -> int:
    """Tokens of KV cache one GPU holds (a whole number of blocks), with ``slots_per_gpu`` expert slots.

    KV bytes = kv_cache_gb, or HBM - reserved - weights, where weights = slots x L x expert bytes
    + L (P_attn + P_shared) w_d + D (P_attn + m h f_dense) w_d + (1 or 2) V h w_d (w_d: the dense weights'
    bytes);  per token: (L + D) k_b.
    """
    L, D = model.num_layers, parts.dense_layers
    per_token = (L + D) * model.kv_bytes_per_token
    mem = memory_use(cluster, model, WorkloadConfig(), slots_per_gpu, 0.0)
    dense = D * (model.attention_params + model.expert_matrices * model.hidden_size
                 * (parts.dense_intermediate_size or 0)) * model.dense_bytes
    vocab = (1 if parts.tied_embeddings else 2) * parts.vocab_size * model.hidden_size * model.dense_bytes
    weights = mem.expert_weights + mem.dense_weights + dense + vocab
    free = mem.available - weights
    room = (f"cluster {cluster.name}: {mem.available / 1e9:.1f} GB available, {weights / 1e9:.1f} GB of weights of "
            f"model {model.name} with {slots_per_gpu} expert slots per GPU")
    if sched.kv_cache_gb is not None:
        kv = sched.kv_cache_gb * 1e9
        if kv > free:
            raise UserError(f"scheduler.kv_cache_gb (--kv-cache-gb) {sched.kv_cache_gb:g} GB does not fit one GPU of "
                            f"{room}: at most {max(free, 0.0) / 1e9:.1f} GB are left for the KV cache")
    else:
        kv = free
        if kv < per_token * sched.block_size:
            raise UserError(f"no room for a KV cache on {room}")
    blocks = int(kv // (per_token * sched.block_size))
    return blocks * sched.block_size


@dataclass
class BatchShape:
    """What each GPU computes in one iteration, float [G] each.

    tokens: tokens in the batch;  context: keys their queries attend to, summed;  kv: KV-cache entries
    read or written;  sampled: tokens whose next token is sampled (LM head rows)
    """

    tokens: np.ndarray
    context: np.ndarray
    kv: np.ndarray
    sampled: np.ndarray


class DenseParts:
    """The parts of an iteration outside the MoE layers (module docstring), per GPU, in seconds."""

    def __init__(self, model: ModelConfig, parts: IterationParts, hw: Hardware) -> None:
        self.model, self.parts, self.hw = model, parts, hw
        self.dense_model = (dataclasses.replace(model, moe_intermediate_size=parts.dense_intermediate_size,
                                                weight_bytes=model.dense_bytes)
                            if parts.dense_layers else None)

    def attention(self, b: BatchShape) -> np.ndarray:
        """float [G]: the attention block of one layer on each GPU."""
        return attention_block_time(b.tokens, b.context, b.kv, self.model, self.hw)

    def attention_compute(self, b: BatchShape) -> np.ndarray:
        """float [G]: the compute part of :meth:`attention` (for a predictor run beside it)."""
        return attention_block_compute(b.tokens, b.context, self.model, self.hw)

    def before(self, b: BatchShape, attention: np.ndarray) -> np.ndarray:
        """float [G]: embeddings + the dense layers (attention + dense FFN each) before the MoE layers.

        embeddings: 2 n h a bytes (gather and write);  dense FFN: a routed expert's roofline with
        f_dense in place of the expert's FFN dimension;  each + one kernel overhead when n > 0
        """
        m, hw, n = self.model, self.hw, b.tokens
        busy = np.where(n > 0, hw.overhead, 0.0)
        t = roofline(0.0, 2.0 * n * m.token_bytes, hw) + busy
        if self.dense_model is not None:
            ffn = expert_slot_time(n, self.dense_model, hw) + busy
            t = t + self.parts.dense_layers * (attention + ffn)
        return t

    def after(self, b: BatchShape) -> np.ndarray:
        """float [G]: the LM head over the sampled tokens s: FLOPs 2 s h V, bytes V h w_d + s h a + 4 s V,
        + one kernel overhead when s > 0."""
        m, hw, s, V = self.model, self.hw, b.sampled, self.parts.vocab_size
        flops = 2.0 * s * m.hidden_size * V
        bytes_ = V * m.hidden_size * m.dense_bytes + s * m.token_bytes + LOGIT_BYTES * s * V
        return np.where(s > 0, roofline(flops, bytes_, hw) + hw.overhead, 0.0)


class MoELayers:
    """One strategy's MoE layers over the iterations: its decisions and its event model.

    An iteration without copies (none made at it, none in flight, no placement applied) is the closed
    form, which the event model equals in that case (tests/test_sim_engine.py): the event model's clock
    moves on by it without events; the others run the event model. The clock also covers the time
    spent outside the MoE layers (:meth:`outside`), so that it reads the same absolute times whichever
    way an iteration was computed (simultaneous events of background copies then fall in the same
    order). ``fast=False`` runs the event model for every iteration.
    """

    def __init__(self, strategy: Strategy, ctx: SimContext, fast: bool = True) -> None:
        self.strategy, self.ctx, self.fast = strategy, ctx, fast
        self.engine = EventModel(ctx.num_gpus, ctx.copy_policy, ctx.bandwidth_share)
        self.copy_bytes = 0.0
        self.event_iterations = 0

    def run(self, i: int, loads: StepLoads, attention: np.ndarray, attention_compute: np.ndarray) -> float:
        """Seconds of the MoE layers of an iteration: test step ``i`` (the one its first token is from),
        true routing ``loads``, attention float [G] seconds per layer and its compute part."""
        pending = self.engine.job_pending()
        d = self.strategy.step(i, loads, pending)
        work = d.work(loads, self.ctx, attention, attention_compute)
        self.copy_bytes += float(work.copy_bytes.sum())
        quiet = not pending and d.background is None and not len(work.copies) and not work.replan_host
        if self.fast and quiet:
            marks = self.engine.closed_form_step(work)
        else:
            self.event_iterations += 1
            marks = self.engine.run_step(work, d.background)
        return float(marks[-1, -1] - marks[0, 0])

    def outside(self, seconds: float) -> None:
        """``seconds`` pass outside the MoE layers (other parts of an iteration, or an idle server):
        background copies in flight keep running."""
        if seconds > 0:
            self.engine.env.run(until=self.engine.now + seconds)
