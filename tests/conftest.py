"""Shared fixtures.

``real_traces`` is the folder of third-party router traces in ``../shared/traces/real``
(relative to the project root); tests that need it skip when it is absent, as it is in a
user's fresh clone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_TRACES = ROOT.parent / "shared" / "traces" / "real"


@pytest.fixture(scope="session")
def real_traces() -> Path:
    if not REAL_TRACES.is_dir():
        pytest.skip(f"real traces not present at {REAL_TRACES}")
    return REAL_TRACES


@pytest.fixture
def event_steps(monkeypatch) -> list:
    """(copy policy, StepWork, marks) of every step the simulator's event models run while the test runs."""
    import sim.run as run_mod
    captured = []
    real = run_mod.EventModel.run_step

    def spy(self, work, background=None):
        marks = real(self, work, background)
        captured.append((self.policy, work, marks))
        return marks

    monkeypatch.setattr(run_mod.EventModel, "run_step", spy)
    return captured


def port_serves_two(copies, num_layers: int):
    """bool [L]: some GPU sends, or receives, two transfers in the layer (then they queue, and the
    closed form is only a lower bound)."""
    import numpy as np

    link = copies.src != copies.dst
    out = np.zeros(num_layers, dtype=bool)
    for end in (copies.src, copies.dst):
        key = copies.layer[link] * 1_000_000 + end[link]
        uniq, n = np.unique(key, return_counts=True)
        out[(uniq[n > 1] // 1_000_000).astype(int)] = True
    return out


@pytest.fixture
def queued_layers():
    return port_serves_two


def one_line(capsys, code: int, *words: str) -> str:
    """Exit 2 and exactly one stderr line (no traceback) holding every one of ``words``: how every command
    reports bad input. Returns the line."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("moe-gps: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err.strip()
