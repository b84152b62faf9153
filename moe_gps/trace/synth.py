"""Seeded synthetic router traces with controllable, documented statistics.

A synthetic trace is labelled ``source: synthetic`` and records its generator and
every parameter in its metadata. Nothing here pretends to be collected.

Routing model. For token t at layer l of step s, the router logit of expert e is

    z[t, l, e] = pop[s, l, e]                                  (layer popularity, drifting)
               + token_affinity * pref[l, token_id[t], e]      (per-token predictability)
               + layer_affinity * [e == succ[l, top1[t, l-1]]] (cross-layer correlation)
               + g[t, l, e],   g ~ Gumbel(0, 1)                (everything else)

and the token goes to the top-k experts by z (highest first); gate weights are the
softmax of z over the chosen k. With the Gumbel term, top-k of z samples k experts
without replacement from softmax(z - g), so ``pop`` sets the load distribution.

* ``pop[s, l] = base[l] + w[s, l]``. ``base[l] ~ N(0, sigma_l^2)`` per expert, with
  ``sigma_l = popularity_sigma * exp(sigma_spread * n_l)``, n_l ~ N(0, 1): this sets the
  per-layer skew, and its spread across layers. ``w`` is a mean-reverting random walk,
  ``w[s] = drift_memory * w[s-1] + drift * N(0, 1)``: the step-to-step drift.
* ``pref[l, v] ~ N(0, 1)`` per expert for every vocabulary id v; token ids follow a
  Zipf law of exponent ``zipf_exponent`` over ``vocab_size`` ids. ``token_affinity = 0``
  makes routing independent of the token id.
* ``succ[l]`` is a random permutation from layer l-1's experts to layer l's experts;
  ``layer_affinity = 0`` makes layers independent.
* A step is ``tokens_per_step // seq_len`` prefill requests of ``seq_len`` tokens
  (seq, pos columns), so ``seq`` and ``pos`` describe real request structure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moe_gps.errors import UserError
from moe_gps.trace.data import TokensTrace
from moe_gps.trace.meta import TraceMeta


@dataclass(frozen=True)
class SynthProfile:
    """Parameters of the routing model (see the module docstring)."""

    name: str
    model: str
    dataset: str
    calibrated_to: str
    num_layers: int = 32
    num_experts: int = 8
    top_k: int = 2
    popularity_sigma: float = 0.3
    sigma_spread: float = 0.3
    drift: float = 0.05
    drift_memory: float = 0.9
    layer_affinity: float = 2.0
    token_affinity: float = 1.5
    vocab_size: int = 4096
    zipf_exponent: float = 1.1
    seq_len: int = 128


PROFILES: dict[str, SynthProfile] = {
    "mixtral-mmlu": SynthProfile(
        name="mixtral-mmlu", model="mixtral-8x7b", dataset="mmlu-like (synthetic)",
        calibrated_to=("per-layer skew of Mixtral 8x7B on MMLU: MoE-GPS paper skewness 1.39; fiddler "
                       "expert-popularity counts, mean per-layer max/mean 1.22-1.45, worst layer 1.4-2.0"),
        popularity_sigma=0.22, sigma_spread=0.22,
    ),
    "sst2": SynthProfile(
        name="sst2", model="mixtral-8x7b", dataset="sst2-like (synthetic)",
        calibrated_to="MoE-GPS paper: skewness 1.99 for Mixtral 8x7B on SST2",
        popularity_sigma=1.0, sigma_spread=0.15,
    ),
    "deepseek-v3": SynthProfile(
        name="deepseek-v3", model="deepseek-v3", dataset="synthetic (DeepSeek-V3 shape)",
        calibrated_to=("the shape of DeepSeek-V3 only (58 MoE layers, 256 routed experts, top-8); the load "
                       "spread is not calibrated to a published measurement"),
        num_layers=58, num_experts=256, top_k=8, popularity_sigma=0.3, sigma_spread=0.3, drift=0.05,
    ),
}


# Profile fields by the type of value they hold (the dataclass annotations, as names).
_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in dataclasses.fields(SynthProfile)}


def _fields_of(kind: str) -> list[str]:
    return [name for name, k in _FIELD_TYPES.items() if k == kind]


def get_profile(profile_name: str, **overrides) -> SynthProfile:
    """A named profile with some fields replaced (``name`` among them: the profile's own name in the
    metadata); unknown names or fields are UserErrors."""
    if profile_name not in PROFILES:
        raise UserError(f"unknown synthetic profile {profile_name!r} (choose from {', '.join(PROFILES)})")
    bad = sorted(set(overrides) - set(_FIELD_TYPES))
    if bad:
        raise UserError(f"unknown synthetic profile parameter(s) {', '.join(bad)} "
                        f"(parameters: {', '.join(_FIELD_TYPES)})")
    profile = dataclasses.replace(PROFILES[profile_name], **overrides)
    _check(profile)
    return profile


def parse_setting(item: str) -> tuple[str, str | int | float]:
    """One ``PARAM=VALUE`` of ``moe-gps trace synth --set``, typed as that profile field.

    Text fields (name, model, dataset, calibrated_to) keep VALUE as written, so
    ``model=3`` is the model name "3"; integer fields take an integer, the others a number.
    """
    key, sep, value = item.partition("=")
    if not sep:
        raise UserError(f"--set {item!r}: expected PARAM=VALUE")
    kind = _FIELD_TYPES.get(key)
    if kind is None or kind == "str":  # get_profile names an unknown parameter
        return key, value
    try:
        if kind == "int":
            return key, int(value)
        return key, float(value)
    except ValueError:
        want = "an integer" if kind == "int" else "a number"
        raise UserError(f"--set {item!r}: {key} must be {want}, got {value!r}") from None


def _check(p: SynthProfile) -> None:
    for f in _fields_of("str"):
        value = getattr(p, f)
        if not isinstance(value, str) or not value:
            raise UserError(f"synthetic profile: {f} must be a non-empty string, got {value!r}")
    for f in _fields_of("int"):
        value = getattr(p, f)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UserError(f"synthetic profile: {f} must be an integer, got {value!r}")
        if value < 1:
            raise UserError(f"synthetic profile: {f} must be >= 1, got {getattr(p, f)}")
    if p.top_k > p.num_experts:
        raise UserError(f"synthetic profile: top_k={p.top_k} exceeds num_experts={p.num_experts}")
    for f in _fields_of("float"):
        value = getattr(p, f)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value):
            raise UserError(f"synthetic profile: {f} must be a finite number, got {value!r}")
        if f != "drift_memory" and value < 0:
            raise UserError(f"synthetic profile: {f} must be >= 0, got {getattr(p, f)}")
    if not 0 <= p.drift_memory < 1:
        raise UserError(f"synthetic profile: drift_memory must be in [0, 1), got {p.drift_memory}")


def memory_needed(p: SynthProfile, num_steps: int, tokens_per_step: int, with_weights: bool = False) -> int:
    """Bytes :func:`synthesize` holds at its peak, roughly: the token-affinity table
    ``[layers, vocab, experts]`` (drawn as float64, kept as float32), the routing of every
    token, and one step's scores."""
    L, E, k, V = p.num_layers, p.num_experts, p.top_k, p.vocab_size
    N = num_steps * tokens_per_step
    return 12 * L * V * E + N * (L * k * (2 + 4 * with_weights) + 20) + 24 * tokens_per_step * E


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resolve(profile: str | SynthProfile, num_steps: int, tokens_per_step: int, overrides: dict) -> SynthProfile:
    """The profile to generate from (a name with ``overrides``, or a profile), checked with the sizes."""
    p = get_profile(profile, **overrides) if isinstance(profile, str) else profile
    _check(p)
    if num_steps < 1 or tokens_per_step < 1:
        raise UserError("synthetic trace: num_steps and tokens_per_step must be >= 1")
    return p


def base_popularity(p: SynthProfile, rng: np.random.Generator) -> np.ndarray:
    """``base`` logits [layers, experts]: N(0, sigma_l^2) per expert, sigma_l = popularity_sigma *
    exp(sigma_spread * N(0, 1)) per layer (the first draws of a seed, for the tokens and counts kinds alike)."""
    with np.errstate(over="ignore", invalid="ignore"):
        spread = np.exp(p.sigma_spread * rng.standard_normal(p.num_layers))
        sigma = p.popularity_sigma * spread if p.popularity_sigma else np.zeros(p.num_layers)
        base = sigma[:, None] * rng.standard_normal((p.num_layers, p.num_experts))
    check_logits(base, p, "the popularity logits of a layer", ("popularity_sigma", "sigma_spread"))
    return base


def check_logits(logits: np.ndarray, p: SynthProfile, what: str, names: tuple[str, ...]) -> None:
    """A UserError naming the profile parameters ``names`` when ``logits`` are not all finite numbers (the
    parameters are too large for floating point: a generated trace would hold NaN)."""
    if not np.isfinite(logits).all():
        settings = ", ".join(f"{n}={getattr(p, n):g}" for n in names)
        raise UserError(f"synthetic profile: {what} overflow floating point with {settings}; use smaller values")


def synth_meta(kind: str, p: SynthProfile, seed: int, num_steps: int, tokens_per_step: int,
               generator: str) -> TraceMeta:
    """The metadata of a synthetic trace: source synthetic, every generator parameter in the provenance."""
    return TraceMeta(
        kind=kind, num_layers=p.num_layers, num_experts=p.num_experts, top_k=p.top_k, model=p.model,
        dataset=p.dataset, source="synthetic",
        provenance={
            "tool": "moe-gps trace synth", "generator": generator,
            "profile": dataclasses.asdict(p), "seed": seed, "num_steps": num_steps,
            "tokens_per_step": tokens_per_step,
            "note": "SYNTHETIC routing from a seeded model (profile.calibrated_to says what it matches); "
                    "not collected from a model",
        },
    )


def synthesize(profile: str | SynthProfile = "mixtral-mmlu", num_steps: int = 64,
               tokens_per_step: int = 512, seed: int = 0, with_weights: bool = False, progress: bool = False,
               **overrides) -> TokensTrace:
    """Generate a tokens trace [num_steps x tokens_per_step tokens] from a profile.

    Deterministic for a given (profile, sizes, seed). ``overrides`` replace profile fields.
    ``progress``: a progress bar of the steps on stderr.
    """
    import sys

    from tqdm import tqdm

    p = resolve(profile, num_steps, tokens_per_step, overrides)
    meta = synth_meta("tokens", p, seed, num_steps, tokens_per_step, "moe_gps.trace.synth")  # checked before drawing
    rng = np.random.default_rng(seed)
    L, E, k, V = p.num_layers, p.num_experts, p.top_k, p.vocab_size
    base = base_popularity(p, rng)
    pref = rng.standard_normal((L, V, E)).astype(np.float32)
    succ = np.stack([rng.permutation(E) for _ in range(L)])
    zipf = 1.0 / np.arange(1, V + 1) ** p.zipf_exponent
    zipf /= zipf.sum()
    vocab_perm = rng.permutation(V)  # so that frequent ids are not simply 0, 1, 2, ...

    T = tokens_per_step
    N = num_steps * T
    experts = np.empty((N, L, k), dtype=np.int16)
    weights = np.empty((N, L, k), dtype=np.float32) if with_weights else None
    token_id = vocab_perm[rng.choice(V, size=N, p=zipf)].astype(np.int32)
    pos = (np.arange(T) % p.seq_len).astype(np.int32)
    seq_in_step = np.arange(T) // p.seq_len
    seqs_per_step = int(seq_in_step[-1]) + 1
    walk = np.zeros((L, E))
    bar = tqdm(total=num_steps, desc="synth", unit="step", leave=False, disable=not progress, file=sys.stderr)
    try:
        for s in range(num_steps):
            with np.errstate(over="ignore", invalid="ignore"):
                walk = p.drift_memory * walk + p.drift * rng.standard_normal((L, E))
                pop = base + walk
            check_logits(pop, p, "the popularity logits (base + drift)", ("popularity_sigma", "drift"))
            rows = slice(s * T, (s + 1) * T)
            ids = token_id[rows]
            prev_top1 = None
            for l_ in range(L):
                with np.errstate(over="ignore", invalid="ignore"):
                    z = pop[l_][None, :] + p.token_affinity * pref[l_, ids] + rng.gumbel(size=(T, E))
                    if prev_top1 is not None and p.layer_affinity:
                        z[np.arange(T), succ[l_, prev_top1]] += p.layer_affinity
                check_logits(z, p, "the router logits", ("popularity_sigma", "token_affinity", "layer_affinity"))
                top = np.argpartition(-z, k - 1, axis=1)[:, :k] if k < E else np.tile(np.arange(E), (T, 1))
                zt = np.take_along_axis(z, top, axis=1)
                order = np.argsort(-zt, axis=1)
                top = np.take_along_axis(top, order, axis=1)
                experts[rows, l_] = top
                if weights is not None:
                    zt = np.take_along_axis(zt, order, axis=1)
                    w = np.exp(zt - zt[:, :1])
                    weights[rows, l_] = w / w.sum(axis=1, keepdims=True)
                prev_top1 = top[:, 0]
            bar.update()
    finally:
        bar.close()
    seq = (np.repeat(np.arange(num_steps), T) * seqs_per_step + np.tile(seq_in_step, num_steps)).astype(np.int32)
    offsets = np.arange(num_steps + 1, dtype=np.int64) * T
    return TokensTrace(meta, experts, offsets, weights, token_id=token_id, seq=seq,
                       pos=np.tile(pos, num_steps))
