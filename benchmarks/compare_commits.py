"""Time one `moe-gps` command in this tree and in another commit, alternating (not a test).

The machine is shared and noisy, so speed goals are ratios measured in one run: the
command runs ``--repeat`` (>= 1) times in each tree, one after the other, the tree timed
first alternating from pair to pair (this tree first in the first pair), and the ratio of
the medians is reported. The other commit is checked out into a temporary git worktree and
run with its own code (``python -m moe_gps.cli.main`` from its root).

Usage:  python benchmarks/compare_commits.py REV [--repeat 5] -- simulate traces/mixtral_mmlu.parquet
A missing command, a bad --repeat or a REV git cannot resolve is one error line, exit 2.
Writes benchmarks/results/compare_commits.json, with the commit REV resolved to and this
tree's commit (and whether it had uncommitted changes).
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

from benchmarks._common import git_commit, load_average, positive_int, save  # noqa: E402


def timed(cwd: Path, args: list[str], out: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "moe_gps.cli.main", *args, "-o", str(out)], cwd=cwd,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{cwd}: moe-gps {' '.join(args)} failed:\n{done.stderr.strip()}")
    return wall


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 usage="%(prog)s [-h] [--repeat N] REV -- COMMAND ...",
                                 epilog="COMMAND ...: the moe-gps command to time, after --, e.g. "
                                        "-- simulate traces/mixtral_mmlu.parquet (-o is added)")
    ap.add_argument("rev", help="the commit to compare with (e.g. HEAD~1)")
    ap.add_argument("--repeat", type=positive_int, default=5, metavar="N",
                    help="runs in each tree (>= 1; default 5)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    args = argv[cut + 1:]
    if not args:
        ap.error("give the moe-gps command after --, e.g. -- simulate traces/mixtral_mmlu.parquet")
    load_at_start = load_average()
    resolved = git("rev-parse", "--verify", "--quiet", f"{a.rev}^{{commit}}")
    if resolved.returncode != 0:
        ap.error(f"argument REV: git cannot resolve {a.rev!r} to a commit")
    rev_commit = resolved.stdout.strip()
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref"
        added = git("worktree", "add", "--detach", str(ref), rev_commit)
        if added.returncode != 0:
            raise SystemExit(f"git worktree add {rev_commit} failed:\n{added.stderr.strip()}")
        try:
            here, there, first = [], [], []
            for k in range(a.repeat):
                pair = [("here", ROOT, here), ("there", ref, there)]
                if k % 2:                      # alternate which tree runs first
                    pair.reverse()
                first.append("this tree" if pair[0][0] == "here" else a.rev)
                for name, cwd, times in pair:
                    times.append(timed(cwd, args, Path(tmp) / f"{name}{k}"))
        finally:
            git("worktree", "remove", "--force", str(ref))
    med_here, med_there = statistics.median(here), statistics.median(there)
    print(f"moe-gps {' '.join(args)}: this tree {med_here:.2f} s, {a.rev} ({rev_commit[:12]}) {med_there:.2f} s "
          f"(medians of {a.repeat}, order alternating); ratio {med_here / med_there:.2f}")
    path = save("compare_commits", {"command": args, "rev": a.rev, "rev_commit": rev_commit,
                                    "this_tree_commit": git_commit(), "this_tree_uncommitted_changes": dirty,
                                    "timed_first": first, "this_tree_s": here, "rev_s": there,
                                    "ratio_of_medians": med_here / med_there},
                load_average_at_start=load_at_start)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
