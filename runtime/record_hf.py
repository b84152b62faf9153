"""Record a router trace from a local HuggingFace transformers MoE checkpoint (one process).

    python -m runtime.record_hf --model /path/to/checkpoint -o trace.parquet \\
        [--input-trace traces/mixtral_mmlu.parquet | --text corpus.txt] [--steps 16 --batch 4 --seq-len 128]

A forward hook on every MoE block's router (``gate``) captures its output during
ordinary forward passes; no ``torch.distributed`` is involved.

* transformers v5 routers return ``(router_logits, top_k_weights, top_k_index)``: the
  trace stores exactly the experts and gate weights the model used (``top_k_index``
  is sorted by weight, highest first, as the format wants).
* transformers v4 routers are linear layers returning logits only: the logits are
  converted with :func:`moe_gps.trace.importers.hf_router_logits.routing_from_router_logits`
  (softmax, top-k, renormalised when the config's ``norm_topk_prob`` says so, always for
  Mixtral), the same function ``moe-gps trace import --from hf-router-logits`` uses.

One step = one forward pass of ``batch`` sequences of ``seq_len`` tokens; token ids
come from a trace's ``token_id`` column, a text file tokenised with the checkpoint's
tokenizer, or a seeded Zipf generator. The trace says ``source: collected``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Any

import numpy as np

from moe_gps.errors import UserError


class RouterRecorder:
    """Forward hooks on the routers of a transformers MoE model.

    After each forward, :meth:`take` returns ``experts`` int16 [T, L, k] and ``weights``
    float32 [T, L, k] for the T = batch * seq_len tokens (row-major), L MoE layers.
    """

    def __init__(self, model: Any) -> None:
        from runtime.hf import find_moe_blocks, moe_settings

        self.blocks = find_moe_blocks(model)
        if not self.blocks:
            raise UserError("the model has no sparse MoE block (a module with 'gate' and 'experts')")
        self.num_experts, self.top_k, self.normalize = moe_settings(model.config)
        self.layer_names = [name for name, _ in self.blocks]
        self._out: list[Any] = [None] * len(self.blocks)
        self.router_output = "unknown"
        self._handles = [block.gate.register_forward_hook(self._hook(i)) for i, (_, block) in enumerate(self.blocks)]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            self._out[i] = output
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        from moe_gps.trace.importers.hf_router_logits import routing_from_router_logits

        if any(o is None for o in self._out):
            missing = [self.layer_names[i] for i, o in enumerate(self._out) if o is None]
            raise RuntimeError(f"routers of {', '.join(missing)} did not run in the forward pass")
        outs, self._out = self._out, [None] * len(self.blocks)
        if isinstance(outs[0], (tuple, list)) and len(outs[0]) >= 3:
            self.router_output = "router returned (logits, top-k weights, top-k indices): recorded as the model used them"
            experts = np.stack([o[2].detach().reshape(-1, o[2].shape[-1]).cpu().numpy() for o in outs], axis=1)
            weights = np.stack([o[1].detach().float().reshape(-1, o[1].shape[-1]).cpu().numpy() for o in outs], axis=1)
            return experts.astype(np.int16), weights.astype(np.float32)
        self.router_output = "router returned logits: converted with routing_from_router_logits"
        logits = [o[0] if isinstance(o, (tuple, list)) else o for o in outs]
        return routing_from_router_logits(logits, self.top_k, self.normalize, where="router logits")


def text_token_stream(model_dir: Path, text_file: Path) -> np.ndarray:
    """Token ids of a text file, tokenised with the checkpoint's tokenizer."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:
        raise UserError(f"{model_dir}: no usable tokenizer ({str(err).splitlines()[0][:200]}); use --input-trace "
                        "or the seeded generator instead of --text") from None
    ids = tok(text_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"{text_file}: no tokens")
    return np.asarray(ids, dtype=np.int64)


def record_trace(model: Any, out: str | Path, *, steps: int, batch: int, seq_len: int, input_trace: str | None = None,
                 token_stream: np.ndarray | None = None, seed: int = 0, device: str = "cpu",
                 model_name: str = "unknown", dataset: str | None = None, command: str = "") -> dict:
    """Run ``steps`` forward passes of ``model`` and write the router trace to ``out``.

    Token ids: ``token_stream`` (consecutive chunks), else ``input_trace``'s token_id
    column, else the seeded generator (see :mod:`runtime.inputs`). Returns a summary dict.
    """
    import torch
    import transformers

    from moe_gps.trace import TraceMeta, TraceWriter
    from moe_gps.trace.data import StepRouting
    from runtime.config import InputSection
    from runtime.inputs import TokenSource

    vocab = int(model.config.get_text_config().vocab_size)
    source = TokenSource(InputSection(trace=input_trace, batch_size=batch, seq_len=seq_len, seed=seed), vocab, 1)
    if token_stream is not None:
        source.stream = np.asarray(token_stream, dtype=np.int64) % vocab
        source.description = f"tokenised text ({len(token_stream)} tokens)"
    need = steps * batch * seq_len
    have = None if source.stream is None else len(source.stream)
    warnings = ([f"the input holds {have} tokens, fewer than the {need} of {steps} steps x {batch} x {seq_len}: "
                 f"they are cycled {need / have:.1f} times"] if have and have < need else [])
    longest = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if isinstance(longest, int) and seq_len > longest:
        warnings.append(f"--seq-len {seq_len} is longer than the model's max_position_embeddings ({longest}): "
                        "positions beyond it are outside what the model was trained on")
    rec = RouterRecorder(model)
    L, E, k = len(rec.blocks), rec.num_experts, rec.top_k
    prov = {"tool": "moe-gps record" if command.startswith("moe-gps record") else "runtime.record_hf",
            "command": command, "model": model_name,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "transformers": transformers.__version__, "torch": torch.__version__, "input": source.description,
            "batch": batch, "seq_len": seq_len, "moe_layers": rec.layer_names,
            "num_hidden_layers": int(model.config.get_text_config().num_hidden_layers),
            "normalize_topk": rec.normalize, "warnings": warnings}
    model.eval()
    dev = torch.device(device)
    model.to(dev)

    def run_step(step: int) -> StepRouting:
        b = source.batch(step, 0)
        with torch.inference_mode():
            model(input_ids=torch.as_tensor(b.token_id, device=dev), use_cache=False)
        experts, weights = rec.take()
        ids, seq, pos = b.flat()
        return StepRouting(step, experts, weights, token_id=ids, seq=seq, pos=pos)

    try:
        first = run_step(0)                       # tells which router output the model gives
        prov["router_output"] = rec.router_output
        meta = TraceMeta("tokens", L, E, k, model=model_name, dataset=dataset or source.description.split(" (")[0],
                         source="collected", provenance=prov)
        with TraceWriter(out, meta, with_weights=True, optional=("token_id", "seq", "pos")) as writer:
            writer.write_step(first)
            for step in _progress(range(1, steps)):
                writer.write_step(run_step(step))
    finally:
        rec.remove()
    return {"trace": str(out), "steps": steps, "tokens_per_step": batch * seq_len, "layers": L, "experts": E,
            "top_k": k, "router_output": rec.router_output, "warnings": warnings}


def _progress(it):
    try:
        from tqdm import tqdm
        return tqdm(it, desc="record", unit="step", file=sys.stderr, disable=not sys.stderr.isatty())
    except ImportError:
        return it


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HuggingFace checkpoint folder of a Mixtral, Qwen2-MoE, "
                                                  "Qwen3-MoE or OLMoE model (their softmax routers)")
    p.add_argument("--model-name", help="model name for the trace metadata (default: the checkpoint's folder, or "
                                        "ORG/NAME for a Hugging Face cache snapshot)")
    p.add_argument("-o", "--output", required=True, help="trace to write (.parquet)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input-trace", help="take token ids from this trace's token_id column")
    src.add_argument("--text", help="tokenise this text file with the checkpoint's tokenizer")
    p.add_argument("--steps", type=int, default=16, help="forward passes (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed (>= 0) of the generator when no input is given (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--dataset", help="dataset name for the trace metadata")


def run_from_args(args: argparse.Namespace, command: str = "") -> dict:
    try:
        import torch
    except ImportError:
        raise UserError("recording needs PyTorch and transformers: pip install 'moe-gps[collect]'") from None
    from moe_gps.outputs import check_output_file
    check_output_file(args.output)
    for name in ("steps", "batch", "seq_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device visible to this PyTorch build")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    # what can be checked before a checkpoint of many GB loads
    if args.input_trace and not Path(args.input_trace).exists():
        raise UserError(f"{args.input_trace}: no such trace")
    stream = text_token_stream(Path(args.model), Path(args.text)) if args.text else None
    from runtime.hf import load_hf_model
    from runtime.model import TORCH_DTYPES
    model = load_hf_model(args.model, TORCH_DTYPES[dtype_name])
    return record_trace(model, args.output, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                        input_trace=args.input_trace, token_stream=stream, seed=args.seed, device=device,
                        model_name=args.model_name or checkpoint_name(Path(args.model)),
                        dataset=args.dataset or (Path(args.text).name if args.text else None), command=command)


def checkpoint_name(path: Path) -> str:
    """A readable model name for a checkpoint folder: ORG/NAME for a Hugging Face cache snapshot
    (``models--ORG--NAME/snapshots/HASH``), else the folder's name."""
    p = path.resolve()
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name[len("models--"):].replace("--", "/")
    return p.name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.record_hf",
                                description="Record a router trace from a local HuggingFace MoE checkpoint.")
    add_arguments(p)
    args = p.parse_args(argv)
    from moe_gps import signals
    from moe_gps.errors import report
    try:
        with signals.handled():
            s = run_from_args(args, command=" ".join(["runtime.record_hf"] + (argv if argv is not None
                                                                               else sys.argv[1:])))
    except (UserError, KeyboardInterrupt, OSError, MemoryError) as err:
        failed = report(err, "runtime.record_hf")
        if failed is None:
            raise
        return failed
    for w in s["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {s['trace']}: {s['steps']} steps x {s['tokens_per_step']} tokens, {s['layers']} MoE layers, "
          f"{s['experts']} experts, top-{s['top_k']} ({s['router_output']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
