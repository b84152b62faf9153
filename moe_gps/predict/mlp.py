"""A small MLP token-to-expert predictor (needs torch; skipped with a message without it).

The MLP learns how to combine the evidence of the table predictors for a (token,
layer l) pair. Its input, all of what the trace offers:

* log P_l(e | the token's experts at layer l - 1), from the ``prev-layer`` tables (the
  layer's frequency at l = 0);
* log P_l(e | token id), from the ``token-id`` tables, when the trace has token ids;
* log P_l(e | position), from the ``position`` tables, when the trace has positions;
* a learned embedding of l [16].

logits = sum_s w_s * log P_s + Linear(in, hidden) -> ReLU -> Linear(hidden, E), with the
source weights w_s learned from 1/(number of sources); the top-k logits are the
prediction.
Training uses cross-fitting, so the network sees the tables as they behave on unseen
steps: features of the even training steps come from tables counted on the odd ones,
and vice versa (a single training step is split by token parity). Loss: soft-target
cross-entropy (target = the multi-hot true set / k); Adam; ``iterations`` batches of
``batch_size`` pairs drawn (seeded) from a subsample of at most ``max_train_rows``
(token, layer) pairs. Then the tables are
recounted on the whole training split. The weights stay fixed after fit; in online
mode the tables behind the features keep counting each routed step.
"""

from __future__ import annotations

import contextlib

import numpy as np

from moe_gps.errors import UserError
from moe_gps.predict.base import MissingFeature, PredictorCost, TokenPredictor
from moe_gps.predict.tokens import PositionTokens, PrevLayerTokens, TokenIdTokens
from moe_gps.trace.data import StepRouting, TokensTrace

EMB = 16
LOG_FLOOR = 1e-6


def torch_available() -> bool:
    """True when torch imports (this imports it)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _require_torch():
    try:
        import torch
    except ImportError:
        raise MissingFeature("predictor 'mlp' needs torch, which is not installed "
                             "(pip install torch; e.g. pip install 'moe-gps[runtime]')") from None
    return torch


@contextlib.contextmanager
def _one_thread(torch):
    """Run torch on one thread: this network is small, and with the cores shared, OpenMP
    workers spinning on a busy machine made training 3-10x slower. Restores the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _halves(trace: TokensTrace) -> tuple[TokensTrace, TokensTrace]:
    """Two disjoint parts for cross-fitting: even and odd steps (or token rows, for one step)."""
    S = trace.num_steps
    if S >= 2:
        return trace.select_steps(np.arange(0, S, 2)), trace.select_steps(np.arange(1, S, 2))
    n = trace.num_tokens
    parts = []
    for r in (0, 1):
        rows = np.arange(r, n, 2)
        opt = {f: (None if getattr(trace, f) is None else getattr(trace, f)[rows])
               for f in ("token_id", "seq", "pos", "rank")}
        parts.append(TokensTrace(trace.meta, trace.experts[rows], np.array([0, len(rows)], dtype=np.int64), None,
                                 **opt))
    return parts[0], parts[1]


class MLPTokens(TokenPredictor):
    """Small MLP over the table predictors' evidence (see the module docstring)."""

    name = "mlp"
    uses = ("P(expert | previous-layer experts), and P(expert | token id) and P(expert | position) when the "
            "trace has them (the table predictors' counts), and the layer; needs torch")
    cost_formula = ("per token: kE + (tables+2)E + 2(in*H + H*E) flops, 4(tables*E + in + E) B; "
                    "per step: the weights, 4*params B")

    def __init__(self, online: bool | None = None, hidden: int = 64, iterations: int = 300,
                 max_train_rows: int = 131072, batch_size: int = 1024, lr: float = 3e-3, seed: int = 0) -> None:
        super().__init__(online)
        for what, v in (("hidden", hidden), ("iterations", iterations), ("max_train_rows", max_train_rows),
                        ("batch_size", batch_size)):
            if int(v) != v or v < 1:
                raise UserError(f"mlp: {what} must be a positive integer, got {v}")
        if not lr > 0:
            raise UserError(f"mlp: lr must be > 0, got {lr}")
        self.hidden, self.iterations, self.max_train_rows = int(hidden), int(iterations), int(max_train_rows)
        self.batch_size, self.lr, self.seed = int(batch_size), float(lr), int(seed)
        _require_torch()

    def params(self) -> dict:
        return {"online": self.online, "hidden": self.hidden, "iterations": self.iterations,
                "max_train_rows": self.max_train_rows, "batch_size": self.batch_size, "lr": self.lr,
                "seed": self.seed}

    # ------------------------------------------------------------------ features

    def _sources(self, trace: TokensTrace) -> list[TokenPredictor]:
        """Fitted table predictors for the columns the trace has."""
        srcs: list[TokenPredictor] = [PrevLayerTokens(online=self.online)]
        if self.use_id:
            srcs.append(TokenIdTokens(online=self.online))
        if self.use_pos:
            srcs.append(PositionTokens(online=self.online))
        return [s.fit(trace) for s in srcs]

    def _features(self, sources, data, t: np.ndarray, layer: np.ndarray):
        torch = self._torch
        feats = [np.log(np.maximum(s.pair_probs(data, t, layer), LOG_FLOOR)) for s in sources]
        x = torch.from_numpy(np.concatenate(feats, axis=1).astype(np.float32))
        return x, torch.from_numpy(layer.astype(np.int64))

    def _build(self):
        torch = self._torch
        nn = torch.nn
        E, L, H = self.num_experts, self.num_layers, self.hidden
        n_src = 1 + int(self.use_id) + int(self.use_pos)
        in_dim = E * n_src + EMB

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layer_emb = nn.Embedding(L, EMB)
                self.mlp = nn.Sequential(nn.Linear(in_dim, H), nn.ReLU(), nn.Linear(H, E))
                # skip path: a weighted sum of the sources' log-probabilities, starting
                # at their mean (so training starts from the tables' combined ranking)
                self.mix = nn.Parameter(torch.full((n_src,), 1.0 / n_src))

            def forward(self, x, layer):
                skip = (x.view(len(x), n_src, E) * self.mix[None, :, None]).sum(dim=1)
                return skip + self.mlp(torch.cat([x, self.layer_emb(layer)], dim=1))

        self.in_dim = in_dim
        return Net()

    # ------------------------------------------------------------------ fit / predict

    def _fit(self, trace: TokensTrace) -> None:
        torch = self._torch = _require_torch()
        with _one_thread(torch):
            self._fit_net(trace)

    def _fit_net(self, trace: TokensTrace) -> None:
        torch = self._torch
        seed64 = self.seed % 2**64                    # torch takes 64 bits; the seed may be larger
        torch.manual_seed(seed64)
        rng = np.random.default_rng(self.seed)
        self.use_id = trace.token_id is not None
        self.use_pos = trace.pos is not None
        self.net = self._build()
        L, E, k = self.num_layers, self.num_experts, self.top_k
        xs, lays, ys = [], [], []
        a, b = _halves(trace)
        for fit_on, feat_for in ((b, a), (a, b)):
            srcs = self._sources(fit_on)
            if self.use_id:
                srcs[1].prepare(feat_for)  # rows for the ids of feat_for (their counts stay those of fit_on)
            total = feat_for.num_tokens * L
            take = min(total, max(1, self.max_train_rows // 2))
            pick = np.sort(rng.choice(total, size=take, replace=False))
            t, layer = pick // L, pick % L
            x, lay = self._features(srcs, feat_for, t, layer)
            y = torch.zeros((take, E), dtype=torch.float32)
            y.scatter_(1, torch.from_numpy(feat_for.experts[t, layer].astype(np.int64)), 1.0 / k)
            xs.append(x), lays.append(lay), ys.append(y)
        x, lay, target = torch.cat(xs), torch.cat(lays), torch.cat(ys)
        n = len(x)
        opt = _Adam(list(self.net.parameters()), self.lr)
        gen = torch.Generator().manual_seed(seed64)
        self.net.train()
        for _ in range(self.iterations):
            idx = torch.randint(n, (min(self.batch_size, n),), generator=gen)
            logits = self.net(x[idx], lay[idx])
            loss = -(target[idx] * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
            self.net.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
        self.net.eval()
        self.num_params = int(sum(p.numel() for p in self.net.parameters()))
        self._train = trace
        self.sources = self._sources(trace)

    def predict(self, step: StepRouting) -> np.ndarray:
        torch = self._torch
        for f, used in (("pos", self.use_pos), ("token_id", self.use_id)):
            if used and getattr(step, f) is None:
                raise MissingFeature(f"predictor 'mlp' was trained with the {f} column, which these steps lack")
        n = len(step.experts)
        L, k = self.num_layers, self.top_k
        out = np.empty((n, L, k), dtype=np.int16)
        rows_per_chunk = max(1, 65536 // L)
        with torch.no_grad(), _one_thread(torch):
            for lo in range(0, n, rows_per_chunk):
                hi = min(n, lo + rows_per_chunk)
                t = np.repeat(np.arange(lo, hi), L)
                layer = np.tile(np.arange(L), hi - lo)
                x, lay = self._features(self.sources, step, t, layer)
                top = torch.topk(self.net(x, lay), k, dim=1, sorted=True).indices
                out[lo:hi] = top.numpy().astype(np.int16).reshape(hi - lo, L, k)
        return out

    def _observe(self, step: StepRouting) -> None:
        for s in self.sources:
            s.observe(step)

    def rollout(self, trace: TokensTrace) -> np.ndarray:
        self._check_fitted()
        if self.use_id:
            self.sources[1].prepare(trace)
        return super().rollout(trace)

    def cost(self) -> PredictorCost:
        E, H, d, k = self.num_experts, self.hidden, self.in_dim, self.top_k
        tables = len(self.sources)
        return PredictorCost(flops_per_token=k * E + tables * E + 2.0 * (d * H + H * E) + 2 * E,
                             bytes_per_token=4.0 * (tables * E + d + E), fixed_bytes_per_step=4.0 * self.num_params,
                             state_bytes=4.0 * self.num_params + sum(s.cost().state_bytes for s in self.sources),
                             note=f"MLP {d}->{H}->{E}, {self.num_params} parameters (fp32), over {tables} "
                                  "probability tables")


class _Adam:
    """Adam (Kingma & Ba) in a few tensor ops; torch.optim's first import costs ~1.5 s."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        import torch
        self.torch, self.params, self.lr, self.betas, self.eps = torch, params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self) -> None:
        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        with self.torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                if p.grad is None:
                    continue
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(m / c1, (v / c2).sqrt_().add_(self.eps), value=-self.lr)
