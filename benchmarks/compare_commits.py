"""Time one `moe-gps` command in this tree and in another commit, alternating (not a test).

The machine is shared and noisy, so speed goals are ratios measured in one run: the
command runs ``--repeat`` times in each tree, one after the other, and the ratio of the
medians is reported. The other commit is checked out into a temporary git worktree and
run with its own code (``python -m moe_gps.cli.main`` from its root).

Usage:  python benchmarks/compare_commits.py REV [--repeat 5] -- simulate traces/mixtral_mmlu.parquet
Writes benchmarks/results/compare_commits.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import save  # noqa: E402


def timed(cwd: Path, args: list[str], out: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "moe_gps.cli.main", *args, "-o", str(out)], cwd=cwd,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{cwd}: moe-gps {' '.join(args)} failed:\n{done.stderr.strip()}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the commit to compare with (e.g. HEAD~1)")
    ap.add_argument("--repeat", type=int, default=5)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    args = argv[cut + 1:]
    if not args:
        raise SystemExit("give the moe-gps command after --, e.g. -- simulate traces/mixtral_mmlu.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref"
        subprocess.run(["git", "worktree", "add", "--detach", str(ref), a.rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            here, there = [], []
            for k in range(a.repeat):
                here.append(timed(ROOT, args, Path(tmp) / f"here{k}"))
                there.append(timed(ref, args, Path(tmp) / f"there{k}"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(ref)], cwd=ROOT, capture_output=True)
    med_here, med_there = statistics.median(here), statistics.median(there)
    print(f"moe-gps {' '.join(args)}: this tree {med_here:.2f} s, {a.rev} {med_there:.2f} s (medians of "
          f"{a.repeat}); ratio {med_here / med_there:.2f}")
    path = save("compare_commits", {"command": args, "rev": a.rev, "this_tree_s": here, "rev_s": there,
                                    "ratio_of_medians": med_here / med_there})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
