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
tokenizer (one token stream, no BOS added), or a seeded Zipf generator. The trace says
``source: collected``; its provenance holds the checkpoint path, dtype and device.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
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
    """Token ids of a UTF-8 text file, tokenised with the checkpoint's tokenizer as one stream."""
    from transformers import AutoTokenizer
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{text_file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:
        raise UserError(f"{model_dir}: no usable tokenizer ({str(err).splitlines()[0][:200]}); use --input-trace "
                        "or the seeded generator instead of --text") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"{text_file}: no tokens")
    return np.asarray(ids, dtype=np.int64)


def input_token_ids(path: str) -> np.ndarray:
    """The token ids of ``--input-trace`` (:func:`runtime.inputs.trace_token_ids`); a trace without them is refused."""
    from runtime.inputs import trace_token_ids

    ids = trace_token_ids(path)
    if ids is None:
        raise UserError(f"{path}: the trace has no token ids (a counts trace, or no token_id column); give a tokens "
                        "trace with token ids, --text, or neither for the seeded generator")
    return ids


def record_trace(model: Any, out: str | Path, *, steps: int, batch: int, seq_len: int, input_trace: str | None = None,
                 token_stream: np.ndarray | None = None, seed: int = 0, device: str = "cpu",
                 model_name: str = "unknown", dataset: str | None = None, command: str = "",
                 checkpoint: str | Path | None = None) -> dict:
    """Run ``steps`` forward passes of ``model`` and write the router trace to ``out``.

    Token ids: ``token_stream`` (consecutive chunks; read from ``input_trace`` when that is given too),
    else ``input_trace``'s token_id column (:func:`input_token_ids`), else the seeded generator (see
    :mod:`runtime.inputs`). Ids at or above the vocabulary are taken modulo it, with a warning.
    ``checkpoint``: the folder the model was loaded from, for the provenance. Returns a summary dict.
    """
    import torch
    import transformers

    from moe_gps.trace import TraceMeta, TraceWriter
    from moe_gps.trace.data import StepRouting
    from runtime.config import InputSection
    from runtime.inputs import TokenSource

    vocab = int(model.config.get_text_config().vocab_size)
    source = TokenSource(InputSection(batch_size=batch, seq_len=seq_len, seed=seed), vocab, 1)
    if token_stream is None and input_trace:
        token_stream = input_token_ids(input_trace)
    warnings = []
    if token_stream is not None:
        ids = np.asarray(token_stream, dtype=np.int64)
        source.stream = ids % vocab
        what = f"token ids of {input_trace}" if input_trace else "tokenised text"
        source.description = f"{what} ({len(ids)} tokens)"
        over = int((ids >= vocab).sum())
        if over:
            warnings.append(f"{over} of the {len(ids)} input token ids are at or above the model's vocabulary of "
                            f"{vocab}: they are taken modulo {vocab}")
    need = steps * batch * seq_len
    have = None if source.stream is None else len(source.stream)
    if have and have < need:
        warnings.append(f"the input holds {have} tokens, fewer than the {need} of {steps} steps x {batch} x "
                        f"{seq_len}: they are cycled {need / have:.1f} times")
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
            "normalize_topk": rec.normalize, "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": str(torch.device(device)),
            "warnings": warnings}
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
    p.add_argument("-o", "--output", required=True, help="trace to write (.parquet, outside the checkpoint folder)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input-trace", help="take token ids from this trace's token_id column (a tokens trace with "
                                           "token ids)")
    src.add_argument("--text", help="tokenise this UTF-8 text file with the checkpoint's tokenizer, as one token "
                                    "stream (no BOS added)")
    p.add_argument("--steps", type=int, default=16, help="forward passes (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed (>= 0) of the seeded generator, used only without --text and --input-trace "
                        "(default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when PyTorch sees a CUDA device, else the CPU (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--dataset", help="dataset name for the trace metadata")


def check_output_spares_inputs(out: str, model: str, input_trace: str | None, text: str | None) -> None:
    """One line for an output trace that would overwrite an input: the --input-trace or --text file, a file
    of the checkpoint folder, or anything inside that folder."""
    from moe_gps.outputs import same_file

    for flag, path in (("--input-trace", input_trace), ("--text", text)):
        if path and same_file(path, out):
            raise UserError(f"-o {out}: the output would overwrite the {flag} file {path}")
    folder = Path(os.path.realpath(model))
    if not folder.is_dir():
        return
    if Path(os.path.realpath(out)).is_relative_to(folder):
        raise UserError(f"-o {out}: inside the checkpoint folder {model}; write the trace elsewhere")
    twin = next((f for f in folder.iterdir() if f.is_file() and same_file(f, out)), None) \
        if Path(out).exists() else None
    if twin is not None:                  # a hard link to a checkpoint file
        raise UserError(f"-o {out}: the same file as {twin} of the checkpoint folder; write the trace elsewhere")


def run_from_args(args: argparse.Namespace, command: str = "") -> dict:
    """Check the flags and input files, load the checkpoint and record (:func:`record_trace`): its summary."""
    try:
        import torch
    except ImportError:
        raise UserError("recording needs PyTorch and transformers: pip install 'moe-gps[collect]'") from None
    from moe_gps.outputs import check_trace_output
    check_trace_output(args.output)
    check_output_spares_inputs(args.output, args.model, args.input_trace, args.text)
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
    if args.text and not Path(args.text).exists():
        raise UserError(f"{args.text}: no such file")
    from runtime.hf import check_checkpoint_folder, load_hf_model
    from runtime.model import TORCH_DTYPES
    check_checkpoint_folder(args.model)
    stream = input_token_ids(args.input_trace) if args.input_trace else None
    if args.text:
        stream = text_token_stream(Path(args.model), Path(args.text))
    model = load_hf_model(args.model, TORCH_DTYPES[dtype_name])
    return record_trace(model, args.output, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                        input_trace=args.input_trace, token_stream=stream, seed=args.seed, device=device,
                        model_name=args.model_name or checkpoint_name(Path(args.model)),
                        dataset=args.dataset or (Path(args.text).name if args.text else None), command=command,
                        checkpoint=args.model)


def print_summary(s: dict, prog: str) -> None:
    """The warnings of :func:`record_trace`'s summary ``s`` on stderr (``PROG: warning: ...``, as the trace's
    provenance holds them), then the ``wrote ...`` line."""
    for w in s["warnings"]:
        print(f"{prog}: warning: {w}", file=sys.stderr)
    print(f"wrote {s['trace']}: {s['steps']} steps x {s['tokens_per_step']} tokens, {s['layers']} MoE layers, "
          f"{s['experts']} experts, top-{s['top_k']} ({s['router_output']})")


def checkpoint_name(path: Path) -> str:
    """A readable model name for a checkpoint folder: ORG/NAME for a Hugging Face cache snapshot
    (``models--ORG--NAME/snapshots/HASH``), else the folder's name."""
    p = path.resolve()
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name[len("models--"):].replace("--", "/")
    return p.name


def main(argv: list[str] | None = None) -> int:
    from moe_gps.argparsing import Parser
    p = Parser(prog="python -m runtime.record_hf", tag="runtime.record_hf",
               description="Record a router trace from a local HuggingFace MoE checkpoint. See docs/runtime.md.")
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
    print_summary(s, "runtime.record_hf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
