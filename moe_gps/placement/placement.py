"""The :class:`Placement`: which logical expert every physical slot of every GPU holds.

One object serves the simulator (it turns expert loads into GPU loads) and the runtime
(it says which weights each rank keeps and where tokens go). Terms, as in DeepSeek's
EPLB, vLLM and SGLang:

* a *logical expert* is an expert of the model (``0 .. num_experts - 1``);
* a *physical slot* holds the weights of one logical expert on one GPU; a layer has
  ``num_gpus * slots_per_gpu`` slots and slot ``s`` lives on GPU ``s // slots_per_gpu``;
* a *replica* is a slot that holds a given logical expert; every logical expert has at
  least one, hot experts may have several.

Arrays (``L`` layers, ``E`` logical experts, ``P`` slots, ``N`` GPUs):

* ``phy2log``       int64 [L, P]: logical expert held by each slot;
* ``log2phy``       int64 [L, E, max_replicas]: the slots of each expert, ascending,
  padded with -1;
* ``replica_count`` int64 [L, E];
* ``replica_share`` float64 [L, P]: the share of its logical expert's tokens that the
  slot takes; the shares of one expert's replicas sum to 1 (even split by default; a
  slot with share 0 holds a spare copy that takes no tokens).
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_gps.errors import UserError

SCHEMA_VERSION = 1
SHARE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Capacity:
    """Limits a placement must respect.

    max_slots_per_gpu:  physical slots one GPU may hold per layer (None: no limit)
    expert_bytes:       bytes of one expert's weights in one layer (used for memory and
                        for bytes moved; None: unknown, memory is not checked)
    max_expert_bytes_per_gpu: memory one GPU may spend on expert weights over all layers
                        (None: no limit); needs ``expert_bytes``
    """

    max_slots_per_gpu: int | None = None
    expert_bytes: int | None = None
    max_expert_bytes_per_gpu: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"max_slots_per_gpu": self.max_slots_per_gpu, "expert_bytes": self.expert_bytes,
                "max_expert_bytes_per_gpu": self.max_expert_bytes_per_gpu}


@dataclass(eq=False)
class Placement:
    """Expert placement for all MoE layers (see the module docstring for the arrays).

    ``allow_colocated`` says whether two replicas of one expert may sit on the same GPU
    (DeepSeek's EPLB can produce that; it wastes a slot but is not wrong).
    ``meta`` holds free-form provenance (algorithm options, source trace, ...).
    """

    phy2log: np.ndarray
    num_gpus: int
    num_experts: int
    replica_share: np.ndarray | None = None
    algorithm: str = "custom"
    allow_colocated: bool = False
    capacity: Capacity = field(default_factory=Capacity)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.phy2log = _as_int_matrix(self.phy2log, "phy2log")
        self.num_gpus = int(self.num_gpus)
        self.num_experts = int(self.num_experts)
        self.meta = _jsonable(self.meta)
        self.validate()

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def num_redundant(self) -> int:
        """Slots per layer beyond one per logical expert."""
        return self.num_slots - self.num_experts

    @property
    def gpu_of_slot(self) -> np.ndarray:
        """int64 [P]: the GPU each slot lives on."""
        return np.arange(self.num_slots) // self.slots_per_gpu

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`UserError` naming the first problem, if any."""
        L, P = self.phy2log.shape
        N, E = self.num_gpus, self.num_experts
        if N < 1:
            raise UserError(f"placement: num_gpus must be at least 1, got {N}")
        if E < 1:
            raise UserError(f"placement: num_experts must be at least 1, got {E}")
        if L < 1 or P < 1:
            raise UserError("placement: phy2log must be [layers, slots] with at least one of each, got shape "
                            f"{self.phy2log.shape}")
        if P % N:
            raise UserError(f"placement: {P} slots per layer do not divide evenly over {N} GPUs")
        bad = (self.phy2log < 0) | (self.phy2log >= E)
        if bad.any():
            l, s = np.argwhere(bad)[0]
            raise UserError(f"placement: layer {l}, slot {s} holds logical expert {self.phy2log[l, s]}, "
                            f"outside 0..{E - 1}")
        count = _replica_count(self.phy2log, E)
        missing = count == 0
        if missing.any():
            l, e = np.argwhere(missing)[0]
            raise UserError(f"placement: layer {l}: logical expert {e} has no replica "
                            f"(every expert needs at least one slot; {P} slots for {E} experts)")
        self.replica_count = count
        self._forget_derived()
        if not self.allow_colocated:
            self._check_colocated()
        self.replica_share = self._checked_shares(self.replica_share)
        self._check_capacity()

    def _forget_derived(self) -> None:
        """Drop the values worked out from the slots (:attr:`log2phy`, :attr:`_slot_index`): they are
        worked out again from the current slots when next asked for."""
        for name in ("log2phy", "_slot_index"):
            self.__dict__.pop(name, None)

    @functools.cached_property
    def log2phy(self) -> np.ndarray:
        """int64 [L, E, max_replicas]: the slots of each expert, ascending, padded with -1 (worked out on
        first use)."""
        return _log2phy(self.phy2log, self.num_experts, int(self.replica_count.max()))

    @functools.cached_property
    def _slot_index(self) -> np.ndarray:
        """int64 [L * P]: the flat index in an [L, E] array of each slot's expert (for :meth:`slot_loads`)."""
        L, P = self.phy2log.shape
        return (np.arange(L)[:, None] * self.num_experts + self.phy2log).ravel()

    def _check_colocated(self) -> None:
        S = self.slots_per_gpu
        if S == 1:
            return
        block = np.sort(self.phy2log.reshape(self.num_layers, self.num_gpus, S), axis=2)
        dup = block[:, :, 1:] == block[:, :, :-1]
        if dup.any():
            l, g, i = np.argwhere(dup)[0]
            e = block[l, g, i]
            slots = [int(s) for s in np.flatnonzero(self.phy2log[l, g * S:(g + 1) * S] == e) + g * S]
            raise UserError(f"placement: layer {l}: GPU {g} holds two replicas of expert {e} (slots "
                            f"{', '.join(map(str, slots))}); a plan may do that only with allow_colocated")

    def _checked_shares(self, share: np.ndarray | None) -> np.ndarray:
        L, P = self.phy2log.shape
        if share is None:
            rc = self.replica_count.ravel()[self._slot_index].reshape(L, P)
            return 1.0 / rc.astype(np.float64)
        share = np.asarray(share, dtype=np.float64)
        if share.shape != (L, P):
            raise UserError(f"placement: replica_share has shape {share.shape}, expected {(L, P)} like phy2log")
        if not np.isfinite(share).all() or (share < 0).any():
            l, s = np.argwhere(~np.isfinite(share) | (share < 0))[0]
            raise UserError(f"placement: layer {l}, slot {s}: replica share {share[l, s]} is not a finite "
                            "number >= 0")
        sums = expert_sums(share, self.phy2log, self.num_experts)
        off = np.abs(sums - 1.0) > SHARE_TOLERANCE
        if off.any():
            l, e = np.argwhere(off)[0]
            raise UserError(f"placement: layer {l}, expert {e}: the shares of its replicas sum to "
                            f"{sums[l, e]:.6g}, expected 1")
        # remove rounding noise so that the shares sum to 1 exactly (to float precision)
        return share / sums.ravel()[self._slot_index].reshape(L, P)

    def _check_capacity(self) -> None:
        cap, S = self.capacity, self.slots_per_gpu
        if cap.max_slots_per_gpu is not None and S > cap.max_slots_per_gpu:
            raise UserError(f"placement: {S} slots per GPU exceed the capacity of {cap.max_slots_per_gpu} "
                            "slots per GPU")
        if cap.max_expert_bytes_per_gpu is not None:
            if cap.expert_bytes is None:
                raise UserError("placement: a memory cap per GPU needs expert_bytes (bytes of one expert)")
            need = S * self.num_layers * cap.expert_bytes
            if need > cap.max_expert_bytes_per_gpu:
                raise UserError(f"placement: {S} slots x {self.num_layers} layers x {cap.expert_bytes} bytes = "
                                f"{need} bytes of expert weights per GPU exceed the cap of "
                                f"{cap.max_expert_bytes_per_gpu} bytes")

    def take_layers(self, index: np.ndarray) -> "Placement":
        """The layers at ``index`` (int [n], repeats allowed) as a placement of n layers, with the same
        slots and shares (checked already, so not normalised again: the same floats)."""
        out = copy.copy(self)
        out.phy2log, out.replica_share = self.phy2log[index], self.replica_share[index]
        out.replica_count = self.replica_count[index]
        out._forget_derived()
        out.meta = dict(self.meta)
        return out

    # ------------------------------------------------------------------ loads
    @property
    def shares_are_even(self) -> bool:
        rc = np.take_along_axis(self.replica_count, self.phy2log, axis=1)
        return bool(np.allclose(self.replica_share, 1.0 / rc, rtol=0, atol=1e-12))

    def slot_loads(self, counts: np.ndarray) -> np.ndarray:
        """Tokens each slot takes: counts [..., L, E] -> float64 [..., L, P]."""
        counts = np.asarray(counts)
        if counts.shape[-2:] != (self.num_layers, self.num_experts):
            raise UserError(f"placement: counts have shape {counts.shape}, expected [..., "
                            f"{self.num_layers}, {self.num_experts}] (layers, experts)")
        lead = counts.shape[:-2]
        flat = counts.astype(np.float64, copy=False).reshape(lead + (self.num_layers * self.num_experts,))
        return flat.take(self._slot_index, axis=-1).reshape(lead + self.phy2log.shape) * self.replica_share

    def gpu_loads(self, counts: np.ndarray) -> np.ndarray:
        """Tokens per GPU under the shares: counts [..., L, E] -> float64 [..., L, N]."""
        return gpu_sums(self.slot_loads(counts), self.slots_per_gpu)

    def experts_on_gpu(self) -> np.ndarray:
        """int64 [L, N, E]: how many replicas of each expert each GPU holds."""
        L, N, E = self.num_layers, self.num_gpus, self.num_experts
        key = (np.arange(L)[:, None] * N + self.gpu_of_slot[None, :]) * E + self.phy2log
        return np.bincount(key.ravel(), minlength=L * N * E).reshape(L, N, E)

    # --------------------------------------------------------------- file I/O
    def to_dict(self) -> dict[str, Any]:
        even = self.shares_are_even
        return {
            "moe_gps_placement": SCHEMA_VERSION,
            "algorithm": self.algorithm,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "num_gpus": self.num_gpus,
            "slots_per_gpu": self.slots_per_gpu,
            "num_redundant": self.num_redundant,
            "allow_colocated": self.allow_colocated,
            "shares": "even" if even else "uneven",
            "capacity": self.capacity.to_dict(),
            "meta": self.meta,
            "phy2log": self.phy2log.tolist(),
            "replica_share": None if even else self.replica_share.tolist(),
        }

    def __repr__(self) -> str:
        return (f"Placement(algorithm={self.algorithm!r}, layers={self.num_layers}, experts={self.num_experts}, "
                f"gpus={self.num_gpus}, slots_per_gpu={self.slots_per_gpu}, "
                f"shares={'even' if self.shares_are_even else 'uneven'})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return (self.num_gpus == other.num_gpus and self.num_experts == other.num_experts
                and self.phy2log.shape == other.phy2log.shape and np.array_equal(self.phy2log, other.phy2log)
                and np.allclose(self.replica_share, other.replica_share, rtol=0, atol=1e-9))


def balancedness(gpu_loads: np.ndarray) -> np.ndarray:
    """Mean GPU load / max GPU load over the last axis (1.0 = perfect; 1.0 when nothing is loaded).

    gpu_loads: [..., gpus] -> float64 [...]
    """
    g = np.asarray(gpu_loads, dtype=np.float64)
    mx = g.max(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(mx > 0, g.mean(axis=-1) / np.where(mx > 0, mx, 1.0), 1.0)
    return out


def vllm_balancedness(gpu_loads: np.ndarray) -> np.ndarray:
    """The balancedness vLLM's EPLB logs: sum over layers of the mean GPU load / sum over
    layers of the max GPU load (1.0 = perfect; 1.0 when nothing is loaded).

    Heavy layers weigh more than in the mean over layers of :func:`balancedness`.
    gpu_loads: [..., layers, gpus] -> float64 [...]
    """
    g = np.asarray(gpu_loads, dtype=np.float64)
    mean = g.mean(axis=-1).sum(axis=-1)
    mx = g.max(axis=-1).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mx > 0, mean / np.where(mx > 0, mx, 1.0), 1.0)


def gpu_sums(slot_values: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """Sums over each GPU's slots, added in slot order: [..., N * S] -> [..., N] (S = ``slots_per_gpu``).

    ``slot_values.reshape(..., N, S).sum(axis=-1)``, several times faster for a few slots per GPU
    (numpy reduces a short axis slowly; below 8 terms it too adds them in order, so the numbers
    are the same).
    """
    x = np.asarray(slot_values)
    blocks = x.reshape(x.shape[:-1] + (-1, slots_per_gpu))
    if x.dtype.kind != "f":
        return blocks.sum(axis=-1)
    return _by_slot_column(blocks, np.add)


def gpu_any(slot_flags: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """Whether any of each GPU's slots is set: bool [..., N * S] -> [..., N] (S = ``slots_per_gpu``).

    ``slot_flags.reshape(..., N, S).any(axis=-1)``, several times faster for a few slots per GPU.
    """
    x = np.asarray(slot_flags, dtype=bool)
    return _by_slot_column(x.reshape(x.shape[:-1] + (-1, slots_per_gpu)), np.logical_or)


def first_copies(blocks: np.ndarray) -> list[np.ndarray]:
    """For each slot column s of ``blocks`` int [..., N, S] (each GPU's S slots): bool [..., N], whether
    slot s holds the first copy of its expert on its GPU (no earlier slot of the GPU holds it)."""
    out = []
    for s in range(blocks.shape[-1]):
        col = blocks[..., s]
        first = np.ones(col.shape, dtype=bool)
        for t in range(s):
            first &= col != blocks[..., t]
        out.append(first)
    return out


def _by_slot_column(blocks: np.ndarray, op: np.ufunc) -> np.ndarray:
    """``op.reduce`` over the last axis of ``blocks`` [..., N, S]; with fewer than 8 slots one slot column
    at a time, in order (numpy's reduction over a short axis is several times slower)."""
    S = blocks.shape[-1]
    if S >= 8:
        return op.reduce(blocks, axis=-1)
    if S == 1:
        return blocks[..., 0].copy()
    out = op(blocks[..., 0], blocks[..., 1])
    for j in range(2, S):
        op(out, blocks[..., j], out=out)
    return out


def row_sums(values: np.ndarray) -> np.ndarray:
    """``values.sum(axis=-1)`` of floats [..., n] -> [...], several times faster for a few columns (the same
    numbers: :func:`gpu_sums` of one GPU)."""
    return _by_slot_column(np.asarray(values), np.add)


def row_max(values: np.ndarray) -> np.ndarray:
    """``values.max(axis=-1)``: [..., n] -> [...], several times faster for a few columns (the same numbers:
    a maximum does not round)."""
    return _by_slot_column(np.asarray(values), np.maximum)


def expert_sums(values: np.ndarray, phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """Sum per-slot values by logical expert: [L, P] -> float64 [L, E]."""
    L = phy2log.shape[0]
    key = np.arange(L)[:, None] * num_experts + phy2log
    return np.bincount(key.ravel(), weights=np.asarray(values, np.float64).ravel(),
                       minlength=L * num_experts).reshape(L, num_experts)


def _replica_count(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    L = phy2log.shape[0]
    ok = (phy2log >= 0) & (phy2log < num_experts)
    key = (np.arange(L)[:, None] * num_experts + np.where(ok, phy2log, 0))[ok]
    return np.bincount(key, minlength=L * num_experts).reshape(L, num_experts)


def _log2phy(phy2log: np.ndarray, num_experts: int, max_replicas: int) -> np.ndarray:
    """int64 [L, E, max_replicas]: slots of each expert in ascending order, -1 padded."""
    L, P = phy2log.shape
    order = np.argsort(phy2log, axis=1, kind="stable")          # slots grouped by expert, ascending
    experts = np.take_along_axis(phy2log, order, axis=1)
    first = np.zeros_like(experts, dtype=bool)
    first[:, 0] = True
    first[:, 1:] = experts[:, 1:] != experts[:, :-1]
    pos = np.arange(P)[None, :].repeat(L, 0)
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=1)
    rank = pos - start
    out = np.full((L, num_experts, max_replicas), -1, dtype=np.int64)
    out[np.arange(L)[:, None], experts, rank] = order
    return out


def _as_int_matrix(a: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except (ValueError, TypeError) as err:
        raise UserError(f"placement: {name} is not a rectangular array ({err})") from None
    if arr.ndim != 2:
        raise UserError(f"placement: {name} must be 2-D [layers, slots], got {arr.ndim}-D shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise UserError(f"placement: {name} must hold whole numbers (expert ids)")
    elif arr.dtype.kind not in "iub":
        raise UserError(f"placement: {name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _jsonable(obj: Any) -> Any:
    """Meta values as plain Python (numpy scalars and arrays turned into numbers and lists)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
