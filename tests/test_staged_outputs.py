"""A run's files move into its output folder together: a run cut short (an error, a full disk, a signal)
leaves the folder as the earlier run left it, never new tables beside old ones."""

from __future__ import annotations

import pytest

from moe_gps.cli.main import main
from moe_gps.outputs import MANIFEST, STAGE_PREFIX, staged_outputs
from moe_gps.trace import write_trace
from moe_gps.trace.synth import synthesize


def test_files_move_in_together_and_an_error_changes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.csv").write_text("old a\n")
    (out / "old.png").write_text("old figure\n")
    (out / "mine.txt").write_text("the user's\n")
    (out / MANIFEST).write_text("a.csv\nold.png\n")          # an earlier run wrote those two
    with pytest.raises(RuntimeError):
        with staged_outputs(out, ("old.png",)) as stage:
            (stage.path / "a.csv").write_text("new a\n")
            raise RuntimeError("cut short")
    assert (out / "a.csv").read_text() == "old a\n" and (out / "old.png").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(STAGE_PREFIX)]
    with staged_outputs(out, ("old.png", "plots/x.png")) as stage:
        (stage.path / "a.csv").write_text("new a\n")
        (stage.path / "plots").mkdir()
        (stage.path / "plots" / "y.png").write_text("new figure\n")
        written = [stage.path / "a.csv", stage.path / "plots" / "y.png"]
    assert stage.final(written) == [out / "a.csv", out / "plots" / "y.png"]
    assert (out / "a.csv").read_text() == "new a\n" and (out / "plots" / "y.png").read_text() == "new figure\n"
    # the earlier run's optional file this run did not make goes; files the command never writes stay
    assert stage.removed == [out / "old.png"] and not (out / "old.png").exists()
    assert (out / "mine.txt").read_text() == "the user's\n"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "a.csv", "mine.txt", "plots"]
    assert (out / MANIFEST).read_text() == "a.csv\nplots/y.png\n"


def test_a_simulate_cut_short_while_writing_leaves_the_earlier_results_whole(tmp_path, monkeypatch, capsys):
    import sim.report

    path = tmp_path / "t.parquet"
    write_trace(path, synthesize("sst2", num_steps=12, tokens_per_step=256, seed=3, num_layers=4))
    model = tmp_path / "m.yaml"
    model.write_text("name: m4\nnum_layers: 4\nnum_experts: 8\ntop_k: 2\nhidden_size: 4096\n"
                     "moe_intermediate_size: 14336\nattention: {num_heads: 32, num_kv_heads: 8, head_dim: 128}\n")
    out = tmp_path / "out"
    argv = ["simulate", str(path), "--model", str(model), "--strategies", "none,eplb", "--train-steps", "4",
            "--no-plots", "-o", str(out)]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sim.report, "write_parquet_atomic", full_disk)   # after summary.csv and steps.csv
    assert main(argv + ["--train-steps", "5"]) == 2                        # other numbers: a mix would show
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(STAGE_PREFIX)]


def test_a_name_taken_by_a_folder_or_a_file_is_one_line_before_anything_moves(tmp_path):
    from moe_gps.errors import UserError

    out = tmp_path / "out"
    (out / "summary.csv").mkdir(parents=True)                 # a folder where a file goes
    (out / "a.csv").write_text("old\n")
    with pytest.raises(UserError, match=r"summary.csv: a folder where this run writes the file summary.csv"):
        with staged_outputs(out) as stage:
            (stage.path / "a.csv").write_text("new\n")
            (stage.path / "summary.csv").write_text("new\n")
    assert (out / "a.csv").read_text() == "old\n"             # nothing moved
    (out / "summary.csv").rmdir()
    (out / "plots").write_text("a file\n")                    # a file where a folder goes
    with pytest.raises(UserError, match=r"plots: a file where this run writes the folder plots/"):
        with staged_outputs(out) as stage:
            (stage.path / "plots").mkdir()
            (stage.path / "plots" / "x.png").write_text("png\n")
    assert not [p for p in out.iterdir() if p.name.startswith(STAGE_PREFIX)]


def test_what_writes_into_the_staging_folder_is_stopped_before_it_is_removed_and_leftovers_go(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    left = out / (STAGE_PREFIX + "killed")                    # what a run killed outright leaves
    (left / "plots").mkdir(parents=True)
    order = []
    with pytest.raises(KeyboardInterrupt):
        with staged_outputs(out, stop=lambda: order.append(stage.path.exists())) as stage:
            assert not left.exists()
            raise KeyboardInterrupt
    assert order == [True]                                    # stopped while the folder still existed
    assert list(out.iterdir()) == []


def _write_later(folder):
    """What the plot process does: a while later, a file in the folder (its parents made as needed)."""
    import time

    time.sleep(0.5)
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    (folder / "plots" / "late.png").write_text("png\n")
    return [folder / "plots" / "late.png"]


def test_the_plot_process_is_stopped_before_the_staging_folder_is_removed(tmp_path, monkeypatch):
    """The plots are drawn by another process into the staging folder (simulate and serve pass its stop):
    a failure while the tables are written stops it first, so it cannot write the folder back."""
    import time

    import moe_gps.workers
    from moe_gps.workers import Warm

    # forked as in a command (earlier tests may have left an idle thread, e.g. a progress bar's monitor)
    monkeypatch.setattr(moe_gps.workers.threading, "active_count", lambda: 1)
    out = tmp_path / "out"
    out.mkdir()
    with Warm() as drawer:
        assert drawer.proc is not None                        # a process of its own, as in the commands
        with pytest.raises(OSError):
            with staged_outputs(out, stop=drawer.stop) as stage:
                drawer.submit(_write_later, stage.path)
                raise OSError(28, "No space left on device")
        time.sleep(1.0)                                       # long after the late file would have come
    assert list(out.iterdir()) == []


def test_the_moves_are_flushed_to_disk(tmp_path, monkeypatch):
    """After the renames, each folder that took files is synced, as the atomic writers sync theirs."""
    import moe_gps.outputs as outputs

    out = tmp_path / "out"
    out.mkdir()
    synced = []
    monkeypatch.setattr(outputs, "fsync_path", lambda p, folder=False: synced.append((p, folder, p.exists())))
    with staged_outputs(out) as stage:
        (stage.path / "plots").mkdir()
        (stage.path / "plots" / "x.png").write_text("png\n")
        (stage.path / "a.csv").write_text("a\n")
    assert sorted(synced) == [(out, True, True), (out / "plots", True, True)]
    assert (out / "a.csv").exists() and (out / "plots" / "x.png").exists()


def test_an_error_writing_a_staged_file_names_the_file_in_the_output_folder(tmp_path):
    """A full disk while writing summary.csv aside says out/summary.csv, not the hidden staging folder."""
    import errno

    from moe_gps.errors import UserError

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError) as user:
        with staged_outputs(out) as stage:
            raise UserError(f"{stage.path / 'summary.csv'}: cannot write (No space left on device)")
    assert str(user.value) == f"{out / 'summary.csv'}: cannot write (No space left on device)"
    with pytest.raises(OSError) as system:
        with staged_outputs(out) as stage:
            raise OSError(errno.ENOSPC, "No space left on device", str(stage.path / "plots" / "a.png"))
    assert system.value.filename == str(out / "plots" / "a.png")
    assert STAGE_PREFIX not in str(system.value)
