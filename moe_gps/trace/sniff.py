"""What a file that is not a Parquet trace probably is, and the import line that converts it.

Every command that reads a trace goes through :mod:`moe_gps.trace.reader`; when the file
is not Parquet, :func:`import_hint` looks at its first bytes and names the likely
``moe-gps trace import --from ...`` format, so the error says what to run instead.
"""

from __future__ import annotations

from pathlib import Path

_PEEK = 1 << 16


def likely_format(path: Path) -> tuple[str | None, str]:
    """(import format or None, what the file looks like) from its first bytes and name."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PEEK)
    except OSError:
        return None, "an unreadable file"
    suffix = path.suffix.lower()
    if head.startswith(b"PK\x03\x04") and suffix == ".npz":
        return "hf-router-logits", "a numpy .npz archive (router_logits?)"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        if b"logical_count" in head or b"records" in head or "expert_distribution" in path.name:
            return "sglang-dump", "a torch.save file (an SGLang expert-distribution dump)"
        return "hf-router-logits", "a torch.save file (router_logits?)"
    try:
        text = head.decode("utf-8", errors="strict" if len(head) < _PEEK else "ignore").lstrip()
    except UnicodeDecodeError:
        return None, "a binary file"
    if not text:
        return None, "an empty text file"
    if text[0] in "{[":
        if '"topk_ids"' in text:
            return "vllm-jsonl", "JSON lines of topk_ids (a patched vLLM's layer calls)"
        if '"meta_info"' in text:
            return "sglang-routed", "JSON of SGLang responses (meta_info)"
        if '"choices"' in text or '"routed_experts"' in text:
            return "vllm-routed", "JSON of vLLM responses (choices)"
        if '"expert_popularity"' in text:
            return "popularity-json", "JSON of expert popularity"
        return None, "JSON"
    first = text.splitlines()[0]
    if first.replace(" ", "").startswith("layer_id,token_id,expert_0"):
        return "gate-csv", "a CSV of gate scores"
    if "," in first:
        return None, "a CSV file"
    return None, "a text file"


def import_hint(path: Path) -> str:
    """``"it looks like X: convert it with `moe-gps trace import --from F FILE ... -o trace.parquet`"``."""
    fmt, what = likely_format(path)
    if fmt is None:
        return (f"it looks like {what}; convert router traces with `moe-gps trace import --from FORMAT {path} "
                "-o trace.parquet` (formats: moe-gps trace import --help)")
    if fmt == "gate-csv":               # one file per layer: the folder of a step's layer files is the source
        return (f"it looks like {what}, one layer's: convert the folder of a step's layer files with "
                f"`moe-gps trace import --from gate-csv {path.parent} ... -o trace.parquet`")
    return f"it looks like {what}: convert it with `moe-gps trace import --from {fmt} {path} ... -o trace.parquet`"
