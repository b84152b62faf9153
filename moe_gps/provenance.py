"""Where a run's numbers come from: the code that computed them and the trace file they were
computed from, as output folders record them (and as ``recommend``'s cache keys use them)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from moe_gps import __version__

#: source folders and files whose code decides a simulation's numbers: the simulator, the predictors and
#: planners, the trace's loads and regrouping, the configs and their checks, and a sweep's runs
_CODE = ("sim", "moe_gps/predict", "moe_gps/placement", "moe_gps/trace", "moe_gps/config",
         "moe_gps/recommend/skew.py", "moe_gps/recommend/runner.py")
#: bytes read at a time when hashing a file
_CHUNK = 1 << 20


def code_digest() -> str:
    """SHA-256 (16 hex digits) of the source files of :data:`_CODE` (their folders' sub-folders included,
    each file by its path in the source tree)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in _CODE:
        p = root / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if f.exists():
                h.update(f.relative_to(root).as_posix().encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def file_sha256(path: str | Path) -> str | None:
    """SHA-256 of a file's bytes (what ``sha256sum`` prints), or None where ``path`` is not a file. A file
    unchanged since it was last hashed here (the same size and modification time) is not read again: a
    command that records its trace in several files hashes it once."""
    p = Path(path)
    if not p.is_file():
        return None
    st = p.stat()
    return _sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def provenance_comment(trace: str | None, **inputs: str | None) -> str:
    """A YAML comment line naming the moe-gps version, its code digest, the trace file's SHA-256 and that
    of every other input file given by name (e.g. ``requests_csv=path``; None: not used)."""
    def where(name: str, path: str) -> str:
        digest = file_sha256(path)
        return f"{name} {path}, sha256 {digest}" if digest else f"{name} {path} (not a file here: no checksum)"

    files = [where("trace", trace) if trace else "no trace file"]
    files += [where(name, path) for name, path in inputs.items() if path]
    return f"# moe-gps {__version__}, simulator code {code_digest()}; {'; '.join(files)}\n"
