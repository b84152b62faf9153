"""Config dataclasses: cluster, model, workload, strategy and the whole simulate config.

Every field carries its documentation, unit and allowed range in its ``metadata``
(see :func:`spec`); :mod:`moe_gps.config.loader` uses them to validate YAML and
``docs/configs.md`` documents the same fields (a test checks that none is missing).
Cross-field rules live in each class's ``check(where)``; they raise
:class:`~moe_gps.errors.UserError` with ``where`` (the file) and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_gps.errors import UserError


def spec(doc: str, *, default: Any = ..., unit: str = "", gt: float | None = None,
         ge: float | None = None, le: float | None = None, choices: tuple | None = None,
         factory: Any = None) -> Any:
    """A dataclass field with its documentation and range in ``metadata``."""
    meta = {"doc": doc, "unit": unit, "gt": gt, "ge": ge, "le": le, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if default is ...:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------- cluster

@dataclass
class GPUSpec:
    """One GPU: compute, memory and fixed overheads (roofline inputs)."""

    name: str = spec("GPU model, for the reader (e.g. A100-SXM4-80GB)")
    peak_tflops_bf16: float = spec("dense BF16/FP16 tensor-core peak", unit="TFLOP/s", gt=0)
    hbm_bandwidth_gb_s: float = spec("HBM bandwidth", unit="GB/s (1e9 B/s)", gt=0)
    hbm_capacity_gb: float = spec("HBM capacity", unit="GB (1e9 B)", gt=0)
    peak_tflops_fp8: float | None = spec(
        "dense FP8 tensor-core peak; used when the model's compute_dtype is fp8. Absent: the "
        "GPU has no FP8 units and fp8 models compute at the BF16 peak", unit="TFLOP/s", gt=0, default=None)
    compute_efficiency: float = spec(
        "fraction of the peak that GEMMs reach (1.0 = roofline bound; `moe-gps calibrate` measures it)",
        gt=0, le=1, default=1.0)
    memory_efficiency: float = spec("fraction of the HBM bandwidth that kernels reach", gt=0, le=1, default=1.0)
    kernel_overhead_us: float = spec(
        "fixed time added to every compute phase that has work (kernel launch and tail)",
        unit="us", ge=0, default=0.0)
    reserved_memory_gb: float = spec(
        "HBM kept for the runtime, activations and workspace; not available for weights or KV cache",
        unit="GB", ge=0, default=0.0)
    # Per-phase costs of the serving software, measured by `moe-gps calibrate` (docs/fidelity.md);
    # the defaults leave the roofline model above unchanged.
    attention_efficiency: float | None = spec(
        "fraction of the peak that the attention block (with the router) reaches; absent: compute_efficiency",
        gt=0, le=1, default=None)
    attention_overhead_us: float | None = spec(
        "fixed time of the attention phase (attention block and router) when it has tokens; absent: "
        "kernel_overhead_us", unit="us", ge=0, default=None)
    expert_overhead_us: float = spec(
        "fixed time per expert slot with tokens in the FFN (one GEMM group per expert; 0 for one grouped GEMM)",
        unit="us", ge=0, default=0.0)
    dispatch_overhead_us: float = spec(
        "fixed host time of every dispatch (and correction) on a GPU beyond its link time: counting, "
        "exchanging the layout, preparing the send buffer", unit="us", ge=0, default=0.0)
    combine_overhead_us: float = spec(
        "fixed host time of every combine on a GPU beyond its link time: restoring token order, weighted sum",
        unit="us", ge=0, default=0.0)
    combine_together_us: float = spec(
        "what a combine adds beyond combine_overhead_us when the GPUs' work before it is balanced, so that they "
        "reach it together and exchange at once (one that arrives clearly last finds the others waiting): "
        "combine_together_us x exp(-gap / collective_skew_us), gap = how much later the last GPU reaches the "
        "combine than the second-last (at any gap without collective_skew_us)", unit="us", ge=0, default=0.0)
    combine_return_row_us: float = spec(
        "host time per row a GPU sends back in a combine (the rows it computed for other GPUs), beyond the link "
        "time: a GPU that took a larger share of the tokens sends more of them back", unit="us", ge=0, default=0.0)
    permute_bandwidth_gb_s: float | None = spec(
        "bandwidth of token permutation (gathering or scattering hidden-state rows in another order): one pass "
        "reads and writes every row once; dispatch makes 1 pass over the GPU's sent rows, the FFN 2 over its "
        "received rows, the combine 2 over its home rows. Absent: permutation is not modelled (free)",
        unit="GB/s (1e9 B/s)", gt=0, default=None)
    replan_overhead_us: float = spec(
        "fixed host time of applying a new placement on a GPU (planning its weight moves, rebuilding the "
        "routing tables), once per re-plan, before the step's first layer", unit="us", ge=0, default=0.0)
    install_overhead_us: float | None = spec(
        "fixed host time of switching in a placement whose weights were copied in the background (copy policy "
        "async: rebuilding the routing tables; its copies within the GPU are charged apart), before the first "
        "layer of the step it switches at. Absent: replan_overhead_us", unit="us", ge=0, default=None)


@dataclass
class LinkSpec:
    """One fabric as seen by one GPU: bandwidth per direction and latency per message."""

    bandwidth_gb_s: float = spec("bandwidth per GPU per direction", unit="GB/s (1e9 B/s)", gt=0)
    latency_us: float = spec("latency of one message (per peer per transfer)", unit="us", ge=0)
    copy_bandwidth_gb_s: float | None = spec(
        "bandwidth of expert-weight copies (batched point-to-point sends) per GPU per direction; `moe-gps "
        "calibrate` measures it. Absent: bandwidth_gb_s", unit="GB/s (1e9 B/s)", gt=0, default=None)
    copy_latency_us: float | None = spec(
        "fixed time of one weight transfer (one expert of one layer to one GPU); absent: latency_us",
        unit="us", ge=0, default=None)


@dataclass
class ClusterConfig:
    """The machines: identical GPUs, ``gpus_per_node`` per node, two fabrics."""

    name: str = spec("cluster name, for the reader")
    num_gpus: int = spec("GPUs taking part in expert parallelism", ge=1)
    gpus_per_node: int = spec("GPUs per node (NVLink/PCIe domain); must divide num_gpus", ge=1)
    gpu: GPUSpec = spec("the GPU (all GPUs are the same)")
    intra_node: LinkSpec = spec("fabric between GPUs of one node (NVLink or PCIe)")
    inter_node: LinkSpec | None = spec(
        "fabric between nodes (InfiniBand/RoCE NIC per GPU); required when there is more than one node",
        default=None)
    description: str = spec("free text: where the numbers come from", default="")
    compute_units_per_node: float | None = spec(
        "processors that the GPUs (ranks) of a node share for compute: when more of them compute at once, they "
        "share these equally (processor sharing), e.g. 2 CPU cores under 4 ranks; `moe-gps calibrate` measures "
        "it. Absent: every GPU computes on its own", gt=0, default=None)
    collective_skew_us: float = spec(
        "time between the first and the last GPU (rank) leaving a collective: ranks that are descheduled or "
        "interrupted leave late, and the next collective waits for the latest; every dispatch, correction and "
        "combine adds it to the layer (`moe-gps calibrate` measures it: it matters when ranks share processors)",
        unit="us", ge=0, default=0.0)
    collective_skew_floor: float | None = spec(
        "share of collective_skew_us that a collective still costs when one rank arrives clearly last (the "
        "others' lateness is absorbed while they wait for it): the skew of a collective is collective_skew_us x "
        "(floor + (1 - floor) x exp(-gap / collective_skew_gap_us)), gap = how much later the last rank arrives "
        "than the second-last (`moe-gps calibrate` fits it from runs at several imbalances). Absent: 1 (the same "
        "skew at any gap)", ge=0, le=1, default=None)
    collective_skew_gap_us: float | None = spec(
        "the arrival gap over which the collective skew falls from collective_skew_us towards its floor (see "
        "collective_skew_floor). Absent: the skew does not depend on the gap", unit="us", gt=0, default=None)

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    def check(self, where: str) -> None:
        if self.num_gpus % self.gpus_per_node:
            raise UserError(f"{where}: gpus_per_node: {self.gpus_per_node} does not divide "
                            f"num_gpus={self.num_gpus}")
        if self.num_nodes > 1 and self.inter_node is None:
            raise UserError(f"{where}: inter_node: required, the cluster has {self.num_nodes} nodes "
                            f"({self.num_gpus} GPUs, {self.gpus_per_node} per node)")
        if self.gpu.reserved_memory_gb >= self.gpu.hbm_capacity_gb:
            raise UserError(f"{where}: gpu.reserved_memory_gb: {self.gpu.reserved_memory_gb:g} GB leaves nothing of "
                            f"the GPU's hbm_capacity_gb={self.gpu.hbm_capacity_gb:g} for weights and KV cache; it must "
                            "be below it")


# ---------------------------------------------------------------------------- model

@dataclass
class AttentionSpec:
    """The attention block of one layer (data-parallel: every GPU holds its weights)."""

    num_heads: int = spec("query heads", ge=1)
    num_kv_heads: int = spec("key/value heads (GQA); equal to num_heads for MHA", ge=1)
    head_dim: int = spec("dimension of one head (for MLA: the query/key head dim, nope + rope)", ge=1)
    params: int | None = spec(
        "weights of the attention block per layer; absent: hidden*head_dim*(2*num_heads + 2*num_kv_heads)",
        unit="parameters", ge=1, default=None)
    kv_bytes_per_token: int | None = spec(
        "KV-cache bytes per token per layer; absent: 2*num_kv_heads*head_dim*activation_bytes",
        unit="bytes", ge=1, default=None)


@dataclass
class ModelConfig:
    """An MoE model: the sizes the cost model needs (per MoE layer)."""

    name: str = spec("model name; a trace whose metadata `model` matches it or an alias uses this preset")
    num_layers: int = spec("MoE layers (dense layers are not simulated)", ge=1)
    num_experts: int = spec("routed experts per MoE layer", ge=1)
    top_k: int = spec("experts chosen per token", ge=1)
    hidden_size: int = spec("model (residual) dimension", ge=1)
    moe_intermediate_size: int = spec("FFN dimension of one routed expert", ge=1)
    attention: AttentionSpec = spec("the attention block")
    num_shared_experts: int = spec("always-active shared experts, computed on the token's own GPU", ge=0,
                                   default=0)
    shared_intermediate_size: int | None = spec(
        "FFN dimension of one shared expert; absent: moe_intermediate_size", ge=1, default=None)
    expert_matrices: int = spec("weight matrices per expert (3 for SwiGLU: gate, up, down)", ge=1, default=3)
    weight_bytes: float = spec("bytes per weight (2 = BF16, 1 = FP8)", unit="bytes", gt=0, default=2)
    dense_weight_bytes: float | None = spec(
        "bytes per weight of the attention and shared-expert weights where they are stored apart from the "
        "routed experts (e.g. BF16 attention beside 4-bit experts); absent: weight_bytes", unit="bytes", gt=0,
        default=None)
    activation_bytes: float = spec(
        "bytes per element of a hidden state sent in dispatch/combine and of the KV cache",
        unit="bytes", gt=0, default=2)
    compute_dtype: str = spec("tensor-core precision of the GEMMs", choices=("bf16", "fp8"), default="bf16")
    aliases: list[str] = spec("other names that identify this model in trace metadata", factory=list)
    source: str = spec("free text: where the numbers come from", default="")

    def check(self, where: str) -> None:
        if self.top_k > self.num_experts:
            raise UserError(f"{where}: top_k: {self.top_k} exceeds num_experts={self.num_experts}")
        if self.attention.num_heads % self.attention.num_kv_heads:
            raise UserError(f"{where}: attention.num_kv_heads: {self.attention.num_kv_heads} does not divide "
                            f"num_heads={self.attention.num_heads}")

    # Sizes derived from the fields (see docs/simulator.md).
    @property
    def expert_params(self) -> int:
        """Weights of one routed expert: expert_matrices * hidden * moe_intermediate."""
        return self.expert_matrices * self.hidden_size * self.moe_intermediate_size

    @property
    def expert_bytes(self) -> float:
        return self.expert_params * self.weight_bytes

    @property
    def dense_bytes(self) -> float:
        """Bytes per weight of the attention and shared-expert weights."""
        return self.dense_weight_bytes or self.weight_bytes

    @property
    def shared_params(self) -> int:
        inter = self.shared_intermediate_size or self.moe_intermediate_size
        return self.num_shared_experts * self.expert_matrices * self.hidden_size * inter

    @property
    def attention_params(self) -> int:
        a = self.attention
        if a.params is not None:
            return a.params
        return self.hidden_size * a.head_dim * (2 * a.num_heads + 2 * a.num_kv_heads)

    @property
    def kv_bytes_per_token(self) -> float:
        a = self.attention
        if a.kv_bytes_per_token is not None:
            return float(a.kv_bytes_per_token)
        return 2.0 * a.num_kv_heads * a.head_dim * self.activation_bytes

    @property
    def token_bytes(self) -> float:
        """Bytes of one token's hidden state in dispatch or combine."""
        return self.hidden_size * self.activation_bytes


# ---------------------------------------------------------------------------- workload

#: the longest prompt or context a workload may name (far beyond any model's context window)
MAX_SEQ_LEN = 100_000_000


@dataclass
class WorkloadConfig:
    """What is being served."""

    phase: str = spec("prefill (whole prompts) or decode (one new token per sequence)",
                      choices=("prefill", "decode"), default="prefill")
    seq_len: int = spec("prefill: prompt length; decode: context (KV) length", unit="tokens", ge=1,
                        le=MAX_SEQ_LEN, default=512)
    tokens_per_step: int | None = spec(
        "tokens per forward pass over all GPUs; absent: as in the trace. When set, the trace's tokens are "
        "regrouped into steps of tokens_per_step where that leaves at least 12 steps, else each step's expert "
        "loads are scaled by tokens_per_step / (the step's tokens in the trace)", unit="tokens", ge=1,
        default=None)


# ---------------------------------------------------------------------------- strategy

STRATEGY_KINDS = ("none", "static", "distribution", "token", "oracle")

#: when copied expert weights arrive and what they delay (docs/simulator.md, "How strategies re-plan and copy")
COPY_POLICIES = ("critical", "overlap", "async", "hidden")
#: copy_policy async: the share of a link background copies get, unless given (the simulator's default, and the
#: share the runtime's min_gain rule prices async moves at)
COPY_BANDWIDTH_SHARE = 0.5

#: the bundles of modelling choices behind ``assumptions``: the simulate-config fields they set, and the
#: fields they set on every distribution and token strategy ("predicting"), on token strategies ("token")
#: and on the oracle
ASSUMPTION_BUNDLES: dict[str, dict[str, Any]] = {
    "realistic": {"copy_policy": "async", "ffn_weight_reads": True, "predictor_overlap": True,
                  "predicting": {}, "token": {"direct_routing": False}, "oracle": {}},
    "paper": {"copy_policy": "hidden", "ffn_weight_reads": False, "predictor_overlap": False,
              "predicting": {"replan_interval": 1, "window": 1, "min_gain": 0.0, "planner": "greedy"},
              "token": {"direct_routing": False}, "oracle": {"replan_interval": 1}},
}
ASSUMPTIONS = tuple(ASSUMPTION_BUNDLES)

#: vLLM's EPLB defaults (``--eplb-config``): the load window and the steps between re-plans
VLLM_WINDOW_SIZE, VLLM_STEP_INTERVAL = 1000, 3000
#: vLLM's --eplb-config keys -> (the StrategyConfig field each sets, its least value)
VLLM_EPLB_KEYS = {"window_size": ("window", 1), "step_interval": ("replan_interval", 1),
                  "num_redundant_experts": ("redundant_slots", 0)}
#: re-plan cadence of the predicting kinds (distribution, token, oracle) when not given
PREDICTING_INTERVAL = 16


@dataclass
class ReplanPolicy:
    """How often a strategy may re-plan, over what history, and whether a re-plan is worth its copies.

    interval: steps between re-plan checks;  window: steps of loads (or predictions) a plan is made
    from;  min_gain: re-plan only when the predicted saving over the next ``interval`` steps exceeds
    ``min_gain`` x the predicted cost of the copies (0: always re-plan at a check);
    notes: how defaults were chosen for this trace.
    """

    interval: int
    window: int
    min_gain: float
    notes: list[str]


def redundant_slots(num_gpus: int, num_experts: int, per_gpu: int) -> int:
    """Redundant slots over all GPUs for ``per_gpu`` extra slots per GPU beyond the ceil(E / G) every GPU
    needs: R = G (ceil(E / G) + per_gpu) - E, always a valid budget (E + R divides over G). per_gpu 0:
    only the spares that make the experts divide; 1: the default of a duplicating strategy."""
    return num_gpus * (-(-num_experts // num_gpus) + per_gpu) - num_experts


@dataclass
class StrategyConfig:
    """One way of placing experts, compared with the others on the same trace."""

    kind: str = spec(
        "none: no duplication; static: EPLB-style plan from the loads of a window of past steps, re-planned "
        "every replan_interval steps; distribution: plan from a distribution-only predictor; token: plan from "
        "a token-to-expert predictor; oracle: plan from the true loads (knows every step in advance)",
        choices=STRATEGY_KINDS)
    name: str | None = spec("label in tables and files; absent: derived from kind and predictor",
                            default=None)
    predictor: str | None = spec("predictor name (distribution and token kinds only)", default=None)
    predictor_options: dict[str, Any] = spec(
        "keyword arguments for the predictor (e.g. accuracy and overhead of the synthetic predictor)",
        factory=dict)
    planner: str | None = spec(
        "placement algorithm of moe_gps.placement that places the replicas (eplb, greedy, waterfill, "
        "timeaware, ...); absent: eplb for kind static (DeepSeek's EPLB, as vLLM and SGLang re-plan), "
        "timeaware for the predicting kinds and the oracle (a replica only where its weight read and copy "
        "pay for themselves), none for kind none", default=None)
    planner_options: dict[str, Any] = spec(
        "keyword arguments for the planner (e.g. num_nodes and num_groups for hierarchical eplb)", factory=dict)
    redundant_slots: int | None = spec(
        "extra physical expert slots per layer over all GPUs; absent: one per GPU (for kind none: only the "
        "spares that make the experts divide evenly). num_experts + redundant_slots must be a multiple of "
        "num_gpus", ge=0, default=None)
    replan_interval: int | None = spec(
        "steps between re-plan checks; absent: vLLM's step_interval (3000) for static, scaled to the trace "
        f"when it is shorter, and {PREDICTING_INTERVAL} for the predicting kinds and the oracle", unit="steps",
        ge=1, default=None)
    window: int | None = spec(
        "steps of history a plan is made from: static sums the true loads of the last `window` steps, the "
        "predicting kinds average their last `window` predictions (and load, before serving, the plan of the "
        "true loads of the last `window` steps); absent: vLLM's window_size (1000) for static, at most the "
        "profiling steps, replan_interval for the predicting kinds and 1 for the oracle", unit="steps", ge=1,
        default=None)
    min_gain: float | None = spec(
        "hysteresis: at a check, re-plan only if the predicted saving over the next replan_interval steps "
        "exceeds min_gain x the predicted cost of the copies, both from the cost model; 0: always re-plan "
        "at a check. Absent: 0 for static (as vLLM), 1 otherwise", ge=0, default=None)
    eplb_config: dict[str, Any] | None = spec(
        "kind static: vLLM's --eplb-config, with its names: window_size (-> window), step_interval (-> "
        "replan_interval), num_redundant_experts (-> redundant_slots); log_balancedness is accepted and has no "
        "effect here. A key may not be given twice (here and as the field it sets)", default=None)
    direct_routing: bool | None = spec(
        "token kind: correctly predicted tokens go straight to the replica the plan reserved for them in "
        "the dispatch, mispredicted ones are sent again in a correction all-to-all (true); or every token is "
        "dispatched after the gate (false: post-gate dispatch). Absent: false (both assumption bundles)",
        default=None)

    @property
    def deployable(self) -> bool:
        """A strategy a deployment can run: not the oracle, not a predictor that reads the true routing
        (the ``oracle`` predictors and the what-ifs ``synthetic`` and ``curve``)."""
        return self.kind != "oracle" and self.predictor not in ("oracle", "synthetic", "curve")

    def fold_eplb_config(self, where: str) -> None:
        """Move ``eplb_config`` (vLLM's names) into the fields it stands for; UserError on a bad key or value."""
        if self.kind != "static":
            raise UserError(f"{where}: eplb_config: only for kind static (EPLB)")
        for key, value in self.eplb_config.items():
            if key == "log_balancedness":
                continue
            field_name, low = VLLM_EPLB_KEYS.get(key, (None, 0))
            if field_name is None:
                raise UserError(f"{where}: eplb_config: unknown key {key!r} (vLLM's --eplb-config keys here: "
                                f"{', '.join(VLLM_EPLB_KEYS)}, log_balancedness)")
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{where}: eplb_config: {key} must be an integer >= {low}, got {value!r}")
            if getattr(self, field_name) is not None and getattr(self, field_name) != value:
                raise UserError(f"{where}: eplb_config: {key} and {field_name} both given")
            setattr(self, field_name, value)
        self.eplb_config = None

    def resolved_name(self) -> str:
        if self.name:
            return self.name
        if self.kind == "static":
            return "eplb" if self.resolved_planner() == "eplb" else f"static:{self.planner}"
        if self.kind in ("distribution", "token"):
            return f"{'dist' if self.kind == 'distribution' else 'token'}:{self.predictor}"
        return self.kind

    def resolved_planner(self) -> str:
        if self.planner is not None:
            return self.planner
        return {"none": "none", "static": "eplb"}.get(self.kind, "timeaware")

    def resolved_redundant(self, num_gpus: int, num_experts: int) -> int:
        """Slots beyond one per expert. Kind none: only the spare slots that make the
        experts divide evenly over the GPUs (they hold idle copies); the others, by default, one
        slot per GPU more than that (:func:`redundant_slots`)."""
        if self.redundant_slots is not None:
            return self.redundant_slots
        return redundant_slots(num_gpus, num_experts, 0 if self.kind == "none" else 1)

    def resolved_policy(self, history_steps: int) -> ReplanPolicy:
        """The re-plan policy, defaults made explicit. ``history_steps``: steps seen before the first
        simulated one (the profiling window a static plan can look at when serving starts)."""
        notes: list[str] = []
        if self.kind == "static":
            window = self.window
            if window is None:
                window = min(VLLM_WINDOW_SIZE, max(1, history_steps))
                if window < VLLM_WINDOW_SIZE:
                    scaled = f"window_size={VLLM_WINDOW_SIZE}" + (
                        f" and step_interval={VLLM_STEP_INTERVAL}" if self.replan_interval is None else "")
                    notes.append(f"{self.resolved_name()}: vLLM's EPLB {scaled} scaled to the trace's "
                                 f"{history_steps} profiling steps")
            interval = self.replan_interval
            if interval is None:            # vLLM's step_interval; scaled with the window only where that was
                interval = VLLM_STEP_INTERVAL if self.window is not None else \
                    min(VLLM_STEP_INTERVAL, window * VLLM_STEP_INTERVAL // VLLM_WINDOW_SIZE)
            min_gain = 0.0 if self.min_gain is None else self.min_gain
        else:
            interval = PREDICTING_INTERVAL if self.replan_interval is None else self.replan_interval
            window = (1 if self.kind == "oracle" else interval) if self.window is None else self.window
            min_gain = 1.0 if self.min_gain is None else self.min_gain
        return ReplanPolicy(interval, window, float(min_gain), notes)

    def check(self, where: str) -> None:
        needs_predictor = self.kind in ("distribution", "token")
        if needs_predictor and not self.predictor:
            raise UserError(f"{where}: predictor: required for kind {self.kind}")
        if not needs_predictor and self.predictor:
            raise UserError(f"{where}: predictor: kind {self.kind} uses no predictor (got {self.predictor!r})")
        if self.predictor_options and not needs_predictor:
            raise UserError(f"{where}: predictor_options: kind {self.kind} uses no predictor")
        if self.kind == "none":
            for key in ("replan_interval", "window", "min_gain"):
                if getattr(self, key) is not None:
                    raise UserError(f"{where}: {key}: kind none never re-plans")
        if self.kind == "none" and (self.planner not in (None, "none") or self.planner_options):
            raise UserError(f"{where}: planner: kind none uses no planner")
        if self.eplb_config is not None:
            self.fold_eplb_config(where)
        if self.kind != "token" and self.direct_routing is not None:
            raise UserError(f"{where}: direct_routing: only meaningful for kind token")


# ---------------------------------------------------------------------------- all together

@dataclass
class SimulateConfig:
    """Everything ``moe-gps simulate`` ran with; written to the output folder as config.yaml."""

    cluster: ClusterConfig = spec("the cluster (a preset's content or a file's)")
    model: ModelConfig = spec("the model")
    workload: WorkloadConfig = spec("the workload", factory=WorkloadConfig)
    strategies: list[StrategyConfig] = spec("strategies to compare, in table order", factory=list)
    seed: int = spec("seed for predictors and planners; the same seed gives the same results", ge=0,
                     default=0)
    train_steps: int | None = spec(
        "first steps of the trace used to fit predictors and as the static plan's profiling window; "
        "they are not simulated. Absent: a quarter of the steps (at least 1)", unit="steps", ge=1,
        default=None)
    trace: str | None = spec("the trace file simulated (recorded for the reader)", default=None)
    assumptions: str = spec(
        "a named bundle of modelling choices (docs/simulator.md, \"The paper's claims, side by side\"): "
        "realistic (what deployments do: copies in the background, re-plans only when they pay, every replica "
        "reads its weights, predictors off the critical path) or paper (the MoE-GPS paper's model: copies hidden, "
        "predicting strategies and the oracle re-planned every batch, by its greedy planner, expert FFN time in "
        "proportion to its tokens, every "
        "predictor before the layer's attention). Each field it sets can still be given on its own",
        choices=ASSUMPTIONS, default="realistic")
    copy_policy: str | None = spec(
        "when copied expert weights arrive and what they delay, for every strategy: critical (the layer waits "
        "for its copies), overlap (copies run during the layer's predictor and attention and share the links "
        "with the dispatch), async (copies run in the background across layers and steps at "
        "copy_bandwidth_share of the link, slowing the dispatch and combine they meet; a new placement takes "
        "effect once its copies have landed, as vLLM's EPLB with use_async), hidden (copies cost nothing). "
        "Absent: from the assumptions (realistic: async; paper: hidden)", choices=COPY_POLICIES, default=None)
    ffn_weight_reads: bool | None = spec(
        "an expert replica reads its whole weights once per layer in which it has tokens (true), or the expert "
        "FFN takes time in proportion to its tokens only (false). Absent: from the assumptions (realistic: "
        "true; paper: false)", default=None)
    predictor_overlap: bool | None = spec(
        "predictors off the critical path: distribution-only predictors run on the host between steps (no GPU "
        "time) and token-to-expert predictors beside the layer's attention (the longer of the two counts) "
        "(true), or every predictor on the GPU before the layer's attention (false). Absent: from the "
        "assumptions (realistic: true; paper: false)", default=None)
    copy_bandwidth_share: float = spec(
        "copy_policy async: the share of a GPU's link bandwidth that background copies get while they run "
        "(two transfers sharing NVLink or a NIC get about half each)", gt=0, le=0.95,
        default=COPY_BANDWIDTH_SHARE)

    def with_assumptions(self) -> "SimulateConfig":
        """A copy with every field that the assumptions bundle sets and that was not given filled in from
        it (ASSUMPTION_BUNDLES): a field given explicitly wins over the bundle."""
        import dataclasses

        bundle = ASSUMPTION_BUNDLES[self.assumptions]
        top = {k: bundle[k] for k in ("copy_policy", "ffn_weight_reads", "predictor_overlap")
               if getattr(self, k) is None}
        strategies = []
        for st in self.strategies:
            fill: dict[str, Any] = {}
            if st.kind in ("distribution", "token"):
                fill.update(bundle["predicting"])
            if st.kind == "token":
                fill.update(bundle["token"])
            if st.kind == "oracle":
                fill.update(bundle["oracle"])
            strategies.append(dataclasses.replace(st, **{k: v for k, v in fill.items() if getattr(st, k) is None}))
        return dataclasses.replace(self, strategies=strategies, **top)

    def resolved_train_steps(self, num_steps: int) -> int:
        if self.train_steps is not None:
            return self.train_steps
        return max(1, num_steps // 4)
