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
