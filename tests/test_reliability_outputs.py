"""Output paths of every command: checked before any work, one line and exit 2 when they cannot be
written, never a special file replaced, nothing half-written, one run per output folder."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_gps import atomic
from moe_gps.atomic import write_text_atomic
from moe_gps.cli.main import main
from moe_gps.errors import UserError
from moe_gps.outputs import LOCK_NAME, locked_output_dir
from moe_gps.trace import write_trace
from moe_gps.trace.synth import synthesize

from conftest import one_line

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
CLI = [sys.executable, "-m", "moe_gps.cli.main"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a small trace (t.parquet), a popularity JSON, a regular file and a folder."""
    d = tmp_path_factory.mktemp("outputs")
    write_trace(d / "t.parquet", synthesize("mixtral-mmlu", num_steps=8, tokens_per_step=64, seed=0))
    (d / "pop.json").write_text('{"expert_popularity": [[3, 1, 1, 1, 0, 0, 0, 2]]}')
    (d / "afile").write_text("not a folder\n")
    (d / "adir").mkdir()
    return d


def temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name == LOCK_NAME]


FILE_COMMANDS = {
    "trace synth": ["trace", "synth", "--steps", "2", "--tokens", "8", "-o", "{out}"],
    "trace import": ["trace", "import", "--from", "popularity-json", "pop.json", "--top-k", "2", "-o", "{out}"],
    "plan": ["plan", "t.parquet", "--gpus", "4", "-o", "{out}"],
    "plan --sglang": ["plan", "t.parquet", "--gpus", "4", "-o", "p.yaml", "--sglang", "{out}"],
}
DIR_COMMANDS = {
    "simulate": ["simulate", "t.parquet", "--no-plots", "-o", "{out}"],
    "predict evaluate": ["predict", "evaluate", "t.parquet", "--predictors", "ema", "--out", "{out}"],
    "recommend": ["recommend", "t.parquet", "-o", "{out}"],
}
if importlib.util.find_spec("torch") is not None:       # the commands that run the runtime need it
    FILE_COMMANDS["calibrate"] = ["calibrate", "-o", "{out}"]
    DIR_COMMANDS["validate"] = ["validate", "t.parquet", "--config", "run.yaml", "-o", "{out}"]


def _args(template: list[str], out: str) -> list[str]:
    return [a.replace("{out}", out) for a in template]


@pytest.mark.parametrize("name", list(FILE_COMMANDS))
def test_output_file_that_is_a_folder_is_one_line(work, capsys, monkeypatch, name):
    monkeypatch.chdir(work)
    err = one_line(capsys, main(_args(FILE_COMMANDS[name], "adir")))
    assert "adir: is a folder; give the file to write" in err
    assert list((work / "adir").iterdir()) == []


@pytest.mark.parametrize("name", list(FILE_COMMANDS) + list(DIR_COMMANDS))
def test_output_under_a_regular_file_is_one_line(work, capsys, monkeypatch, name):
    monkeypatch.chdir(work)
    template = FILE_COMMANDS.get(name) or DIR_COMMANDS[name]
    err = one_line(capsys, main(_args(template, "afile/sub/x")))
    assert "afile/sub/x: afile is a file, not a folder" in err
    assert (work / "afile").read_text() == "not a folder\n"


@pytest.mark.parametrize("name", list(DIR_COMMANDS))
def test_output_folder_that_is_a_file_is_one_line(work, capsys, monkeypatch, name):
    monkeypatch.chdir(work)
    err = one_line(capsys, main(_args(DIR_COMMANDS[name], "afile")))
    assert "afile: exists and is a file, not a folder" in err


def test_fifo_is_never_replaced(work, capsys, monkeypatch):
    """A FIFO (or a device, as /dev/full) at -o is refused by the command and by the atomic writer
    itself, also through a symbolic link; it stays what it was."""
    monkeypatch.chdir(work)
    os.mkfifo("fifo")
    os.symlink("fifo", "link-to-fifo")
    for target in ("fifo", "link-to-fifo"):
        err = one_line(capsys, main(["plan", "t.parquet", "--gpus", "4", "-o", target]))
        assert f"-o {target}: is a FIFO, not a regular file; refusing to replace it" in err
        err = one_line(capsys, main(["trace", "synth", "--steps", "2", "--tokens", "8", "-o", target]))
        assert "is a FIFO" in err
    with pytest.raises(UserError, match="is a FIFO"):
        write_text_atomic("fifo", "x")
    assert stat.S_ISFIFO(os.stat("fifo").st_mode) and os.path.islink("link-to-fifo")
    assert temporary_files(work) == []


def test_symbolic_link_output_replaces_the_file_it_names(work, monkeypatch):
    monkeypatch.chdir(work)
    (work / "real.yaml").write_text("old\n")
    os.symlink("real.yaml", "link.yaml")
    assert main(["plan", "t.parquet", "--gpus", "4", "-o", "link.yaml"]) == 0
    assert os.path.islink("link.yaml") and "phy2log" in (work / "real.yaml").read_text()


@contextlib.contextmanager
def unwritable_folder(path: Path):
    """A folder this process cannot create files in: read-only mode, or immutable for root."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)],
                                                        capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: no folder is unwritable")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_unwritable_folder_is_one_line_before_any_work(work, tmp_path, capsys):
    with unwritable_folder(tmp_path / "ro") as ro:
        for args in (["trace", "synth", "--steps", "2", "--tokens", "8", "-o", str(ro / "t.parquet")],
                     ["simulate", str(work / "t.parquet"), "-o", str(ro / "sim")],
                     ["plan", str(work / "t.parquet"), "--gpus", "4", "-o", str(ro / "p.yaml")]):
            err = one_line(capsys, main(args))
            assert f"cannot write in {ro}/ (permission denied)" in err
        assert list(ro.iterdir()) == []


def _limited_file_size():
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # write() then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_write_that_fails_half_way_is_one_line_and_leaves_nothing(tmp_path):
    """A real failure of the file system during the write (EFBIG: a 64 KiB file-size limit), in a child
    process: one line naming the file, exit 2, no temporary file, no output."""
    out = tmp_path / "t.parquet"
    proc = subprocess.run(CLI + ["trace", "synth", "--steps", "64", "--tokens", "512", "-o", str(out)],
                          capture_output=True, text=True, env=ENV, preexec_fn=_limited_file_size, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"moe-gps: error: {out}: cannot write (File too large)"
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_the_write_is_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC when the file is flushed to disk: one line naming the output, the old file kept."""
    out = tmp_path / "p.yaml"
    out.write_text("old\n")
    trace = tmp_path / "t.parquet"
    write_trace(trace, synthesize("mixtral-mmlu", num_steps=4, tokens_per_step=32, seed=0))

    def full(path, folder=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "fsync_path", full)
    err = one_line(capsys, main(["plan", str(trace), "--gpus", "4", "-o", str(out)]))
    assert err == f"moe-gps: error: {out}: cannot write (No space left on device)"
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml", "t.parquet"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root to mount a tmpfs")
def test_disk_full_on_a_real_small_file_system(tmp_path):
    """A 256 KiB tmpfs in a private mount namespace: the trace does not fit (ENOSPC)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=256k tmpfs {disk} || exit 77; "
              f"{sys.executable} -m moe_gps.cli.main trace synth --steps 64 --tokens 512 -o {disk}/t.parquet; "
              f"echo rc=$?; ls -A {disk}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=ENV,
                          timeout=120)
    if proc.returncode == 77:
        pytest.skip("cannot mount a tmpfs here")
    assert proc.stderr.strip() == f"moe-gps: error: {disk}/t.parquet: cannot write (No space left on device)"
    assert proc.stdout.strip() == "rc=2"            # and `ls -A` printed nothing: no temporary file left


def test_atomic_write_syncs_file_then_renames_then_syncs_folder(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", Path(b))), real_replace(a, b))[1])
    write_text_atomic(tmp_path / "x.txt", "hello")
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    assert calls[0][1].name.startswith(".x.txt.") and calls[2][1] == tmp_path
    assert (tmp_path / "x.txt").read_text() == "hello"


def test_huge_flags_are_one_line_naming_them(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "big.parquet")
    err = one_line(capsys, main(["trace", "synth", "--steps", str(10**12), "-o", out]))
    assert "--steps 1000000000000 --tokens-per-step 512: the trace needs about" in err and "of memory" in err
    err = one_line(capsys, main(["trace", "synth", "--steps", "4", "--set", "num_experts=4000000", "-o", out]))
    assert "--set num_experts=4000000: the trace needs about" in err
    # an allocation that fails anyway (the estimate is rough): the same one line, naming the flags
    import moe_gps.trace.synth as synth_mod

    def no_memory(*a, **k):
        raise MemoryError("Unable to allocate 39.1 GiB for an array with shape (32, 4096, 40000)")

    monkeypatch.setattr(synth_mod, "synthesize", no_memory)
    err = one_line(capsys, main(["trace", "synth", "--steps", "4", "--set", "num_experts=64", "-o", out]))
    assert err.startswith("moe-gps: error: --steps 4 --tokens-per-step 512 --set num_experts=64: out of memory (Unable")
    assert list(tmp_path.iterdir()) == []


def test_second_run_into_a_locked_folder_fails_at_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with locked_output_dir(out):
        assert (out / LOCK_NAME).read_text().startswith(f"pid {os.getpid()}, started ")
        with pytest.raises(UserError, match=rf"another run is writing to this folder \(pid {os.getpid()}"):
            with locked_output_dir(out):
                pass
    assert list(out.iterdir()) == []                       # the lock file goes with the run
    with locked_output_dir(tmp_path / "never-written"):
        pass
    assert not (tmp_path / "never-written").exists()       # a folder the run made and left empty goes too
    with locked_output_dir(tmp_path / "a" / "b" / "c"):    # and the folders above it that it made
        pass
    assert not (tmp_path / "a").exists()
    (tmp_path / "a" / "keep").mkdir(parents=True)
    with locked_output_dir(tmp_path / "a" / "b" / "c"):
        pass
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["keep"]      # never one that was there before


def _holder_line(folder: Path) -> str:
    try:
        return (folder / LOCK_NAME).read_text()
    except OSError:
        return ""


def test_two_concurrent_simulate_runs_into_one_folder(work, tmp_path):
    """The first run holds the folder (stopped with SIGSTOP while it holds it, so the timing is
    certain); the second is refused at once naming the first, and the first finishes alone."""
    out = tmp_path / "sim"
    first = subprocess.Popen(CLI + ["simulate", str(work / "t.parquet"), "--no-plots", "--strategies", "none",
                                    "eplb", "--tokens-per-step", "1000", "-o", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while not _holder_line(out) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)
        assert (out / LOCK_NAME).exists(), first.communicate()
        t0 = time.monotonic()
        second = subprocess.run(CLI + ["simulate", str(work / "t.parquet"), "--no-plots", "--tokens-per-step",
                                       "2000", "-o", str(out)], capture_output=True, text=True, env=ENV, timeout=60)
        took = time.monotonic() - t0
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"another run is writing to this folder (pid {first.pid}, started " in second.stderr
    assert "simulate" in second.stderr and took < 30
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert "tokens_per_step: 1000" in (out / "config.yaml").read_text()
    assert temporary_files(out) == []


def test_reliability_doc_names_tests_that_exist():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(test_\w+)`", doc))
    defined = set()
    for f in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", f.read_text(), re.M))
    assert len(named) > 40 and named <= defined, sorted(named - defined)
