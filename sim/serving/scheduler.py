"""Continuous batching with chunked prefill, one scheduler per GPU, as vLLM and SGLang run it.

Attention is data-parallel: a request lives on one GPU (its *rank*) for its whole life, in
that GPU's KV cache, and the GPUs step together because every MoE layer is a collective
(a GPU with nothing to do runs an empty batch). Rules (docs/serving.md, "Scheduler"):

* a request is assigned on arrival to the GPU with the fewest requests waiting or running
  (the lowest index on a tie), and waits there in arrival order;
* each iteration, each GPU spends a budget of ``max_num_batched_tokens`` tokens: first on
  its running requests in admission order (1 token for a request that is decoding, the
  rest of its prompt, cut to what the budget has left, for one still in prefill), then on
  admitting waiting requests, first come first served, while it runs fewer than
  ``max_num_seqs`` and its KV cache can hold the request's prompt and all its output
  tokens (a whole number of blocks, reserved on admission and freed when it finishes: no
  preemption); an admitted request takes a prefill chunk of what the budget has left;
* a request's first output token comes out of the iteration that computes the last token
  of its prompt, each later iteration feeds back its last token and produces one more.

State is kept in numpy arrays over all requests, so that an iteration costs a few array
operations over the running requests, not a Python loop over them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from sim.serving.iteration import BatchShape
from sim.serving.requests import Requests


@dataclass
class Batch:
    """One iteration's work: entries ``ids`` (int64 [B], requests, GPU-major) taking ``alloc`` tokens
    each (int64 [B] > 0); ``prefill``: bool [B] the entry is a prefill chunk."""

    ids: np.ndarray
    alloc: np.ndarray
    prefill: np.ndarray
    rank: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.alloc.sum())


class Scheduler:
    """The schedulers of ``num_gpus`` GPUs over ``requests`` (module docstring).

    kv_tokens: KV-cache capacity of one GPU, tokens (a multiple of ``block_size``).
    Times per request, float [n] (NaN until known): ``admitted``, ``first`` (first token), ``finish``.
    """

    def __init__(self, requests: Requests, num_gpus: int, max_num_batched_tokens: int, max_num_seqs: int,
                 kv_tokens: int, block_size: int) -> None:
        n, G = len(requests), num_gpus
        self.req, self.G = requests, G
        self.budget, self.max_seqs, self.block = int(max_num_batched_tokens), int(max_num_seqs), int(block_size)
        self.prompt, self.output = requests.prompt, requests.output
        self.rank = np.full(n, -1, dtype=np.int64)
        self.prefilled = np.zeros(n, dtype=np.int64)
        self.generated = np.zeros(n, dtype=np.int64)
        self.reserved = -(-(self.prompt + self.output) // self.block) * self.block
        self.admitted = np.full(n, np.nan)
        self.first = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.waiting = [deque() for _ in range(G)]
        self.running = np.zeros(0, dtype=np.int64)          # admission order, all GPUs
        self.outstanding = np.zeros(G, dtype=np.int64)      # waiting + running per GPU
        self.kv_free = np.full(G, int(kv_tokens), dtype=np.int64)
        self.kv_tokens = int(kv_tokens)
        self.arrived = 0
        self.done = 0

    # -- events
    def arrive(self, k: int) -> None:
        """Request ``k`` arrives: it waits on the GPU with the fewest outstanding requests."""
        g = int(np.argmin(self.outstanding))
        self.rank[k] = g
        self.outstanding[g] += 1
        self.waiting[g].append(k)
        self.arrived += 1

    def has_work(self) -> bool:
        return len(self.running) > 0 or any(self.waiting)

    def waiting_count(self) -> int:
        return sum(len(w) for w in self.waiting)

    def form(self, now: float) -> Batch:
        """The next iteration's batch (admitting waiting requests at time ``now``)."""
        G, B = self.G, self.budget
        R = self.running
        rk = self.rank[R]
        order = np.argsort(rk, kind="stable")
        R, rk = R[order], rk[order]
        pre = self.prefilled[R] < self.prompt[R]
        need = np.where(pre, self.prompt[R] - self.prefilled[R], 1)
        before = np.cumsum(need) - need                                   # tokens asked before, all GPUs
        first_of = np.searchsorted(rk, np.arange(G))                        # each GPU's first entry
        base = np.concatenate([before, [0]])[first_of]                      # tokens asked before that GPU
        alloc = np.clip(B - (before - base[rk]), 0, need)
        used = np.bincount(rk, weights=alloc, minlength=G).astype(np.int64)
        seats = self.max_seqs - np.bincount(rk, minlength=G)
        new_ids, new_alloc, new_rank = [], [], []
        for g in range(G):
            w = self.waiting[g]
            while w and seats[g] > 0 and used[g] < B and self.kv_free[g] >= self.reserved[w[0]]:
                k = w.popleft()
                self.kv_free[g] -= self.reserved[k]
                self.admitted[k] = now
                seats[g] -= 1
                a = min(int(self.prompt[k]), B - int(used[g]))
                used[g] += a
                new_ids.append(k)
                new_alloc.append(a)
                new_rank.append(g)
        if new_ids:
            ids = np.array(new_ids, dtype=np.int64)
            self.running = np.concatenate([self.running, ids])
            R = np.concatenate([R, ids])
            alloc = np.concatenate([alloc, new_alloc])
            pre = np.concatenate([pre, np.ones(len(ids), dtype=bool)])
            rk = np.concatenate([rk, new_rank])
            order = np.argsort(rk, kind="stable")
            R, alloc, pre, rk = R[order], alloc[order], pre[order], rk[order]
        keep = alloc > 0
        return Batch(R[keep], alloc[keep].astype(np.int64), pre[keep], rk[keep])

    def shape(self, b: Batch) -> BatchShape:
        """What each GPU computes for batch ``b`` (docs/serving.md, "Attention of a mixed batch").

        prefill chunk of n tokens after p computed: context n p + n (n + 1) / 2, KV p + n;
        decode of a request with c tokens in its context (its prompt and the tokens generated so far):
        context c, KV c;  sampled: decodes and chunks that end a prompt.
        """
        G = self.G
        n = b.alloc.astype(np.float64)
        p = self.prefilled[b.ids].astype(np.float64)
        c = (self.prompt[b.ids] + self.generated[b.ids]).astype(np.float64)
        context = np.where(b.prefill, n * p + n * (n + 1) / 2, c)
        kv = np.where(b.prefill, p + n, c)
        sampled = (~b.prefill | (self.prefilled[b.ids] + b.alloc == self.prompt[b.ids])).astype(np.float64)
        per = lambda w: np.bincount(b.rank, weights=w, minlength=G)  # noqa: E731
        return BatchShape(per(n), per(context), per(kv), per(sampled))

    def complete(self, b: Batch, now: float) -> int:
        """Batch ``b`` ended at ``now``: advance its requests; returns how many finished."""
        ids = b.ids
        pre = b.prefill
        self.prefilled[ids[pre]] += b.alloc[pre]
        ended = ids[pre][self.prefilled[ids[pre]] == self.prompt[ids[pre]]]
        self.generated[ended] = 1
        self.first[ended] = now
        self.generated[ids[~pre]] += 1
        fin = ids[self.generated[ids] == self.output[ids]]
        if len(fin):
            self.finish[fin] = now
            np.add.at(self.kv_free, self.rank[fin], self.reserved[fin])
            np.add.at(self.outstanding, self.rank[fin], -1)
            self.running = self.running[~np.isin(self.running, fin)]
            self.done += len(fin)
        return len(fin)
