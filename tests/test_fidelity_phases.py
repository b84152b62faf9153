"""validate per phase: the measurement's 95% interval of every phase, how far a prediction lies outside
it, ``--max-phase-error`` (synthetic comparisons, no torchrun)."""

from __future__ import annotations

import numpy as np
import pytest

from moe_gps.cli.main import main
from moe_gps.fidelity.compare import compare_run, phase_failures, ranking, t95
from moe_gps.fidelity.measured import MeasuredRun
from moe_gps.fidelity.report import format_report, phase_table, plot


class _Sim:
    """A simulation whose phases are fixed shares of the given per-step totals (ms)."""

    def __init__(self, per_step_ms, shares):
        x = np.asarray(per_step_ms, dtype=float)[:, None] * 1e-3
        z = np.zeros_like(x)
        self.phases = {"predictor": z, "correction": z, **{p: x * s for p, s in shares.items()}}
        self.step_latency = x[:, 0]


SHARES = {"attention": 0.4, "dispatch": 0.2, "ffn": 0.3, "combine": 0.07, "copy": 0.0, "sync": 0.03}


def _measured(steps, total_ms, shares=SHARES):
    t = np.asarray(total_ms, dtype=float) * 1e-3
    return MeasuredRun(np.asarray(steps), {p: t * s for p, s in shares.items()}, t, np.zeros(len(t), bool))


def _comparison(pred_shares, spread=0.0, runs=1, seed=0):
    steps = np.arange(2, 42)
    rng = np.random.default_rng(seed)
    pairs = []
    for r in range(runs):
        meas = 100.0 + spread * rng.standard_normal(len(steps))
        pairs.append((_Sim(np.full(len(steps), 100.0), pred_shares), steps, _measured(steps, meas)))
    return compare_run(2, "off", pairs, 2)


def test_phase_interval_is_the_standard_error_of_the_mean():
    c = _comparison(SHARES, spread=5.0)
    v = c.measured["dispatch"]
    se = np.std(v, ddof=1) / np.sqrt(len(v))
    assert c.stderr_of("dispatch") == pytest.approx(se)
    assert c.ci95("dispatch") == pytest.approx(t95(len(v) - 1) * se)          # 40 steps: t = 2.02
    assert c.share("dispatch") == pytest.approx(0.2, rel=1e-2) and c.share("total") == 1.0
    row = {r["phase"]: r for r in c.rows()}
    assert row["dispatch"]["measured_ci95_ms"] == pytest.approx(t95(len(v) - 1) * se * 1e3)
    assert row["dispatch"]["share_of_step"] == pytest.approx(0.2, rel=1e-2)


def test_between_run_spread_widens_a_phase_interval():
    steps = np.arange(2, 12)
    pairs = [(_Sim(np.full(10, 100.0), SHARES), steps, _measured(steps, np.full(10, t))) for t in (90.0, 110.0)]
    c = compare_run(4, "static", pairs, 2)
    # no spread within a run: the interval is the spread of the two runs' means, phase by phase
    assert c.stderr_of("ffn") == pytest.approx(np.std([0.3 * 0.09, 0.3 * 0.11], ddof=1) / np.sqrt(2))
    assert c.stderr_of("total") == pytest.approx(c.stderr)
    # ... and its 95% interval is Student's t of 1 degree of freedom (two runs), not the normal 1.96
    assert c.ci95("ffn") == pytest.approx(12.706 * c.stderr_of("ffn"), rel=1e-4)


def test_t95_is_students_two_sided_quantile():
    # the tabulated two-sided 95% values, and the normal limit
    for dof, q in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (10, 2.2281), (30, 2.0423)):
        assert t95(dof) == pytest.approx(q, abs=1e-4)
    assert t95(10 ** 6) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError):
        t95(0)


def test_ranking_resolves_a_pair_of_three_runs_only_beyond_their_t_interval():
    """Three runs a strategy: the difference's standard error has 2 degrees of freedom, so a pair is
    separated only beyond 4.30 standard errors (a pair 3 apart is not; with the normal 2 it was)."""
    steps = np.arange(2, 12)

    def runs(strategy, means, predicted):
        pairs = [(_Sim(np.full(10, predicted), SHARES), steps, _measured(steps, np.full(10, t))) for t in means]
        return compare_run(4, strategy, pairs, 2)

    a = runs("off", (99.0, 100.0, 101.0), 90.0)              # se of the mean 0.577 each
    for gap, resolved in ((3.0, False), (5.0, True)):
        se_diff = np.hypot(a.stderr, a.stderr) * 1e3                   # ms
        b = runs("static", tuple(m + gap * se_diff for m in (99.0, 100.0, 101.0)), 80.0)   # predicted faster
        r = ranking([a, b])[4]
        assert (("off", "static") in r["misordered"]) == resolved
        assert (("off", "static") in r["unresolved"]) == (not resolved)
        line = [ln for ln in format_report([a, b], ranking([a, b])).splitlines() if ln.startswith("ranking, 4")][0]
        assert ("misordered beyond the 95% interval: off/static" in line) == resolved
        assert line.endswith(f"({0 if resolved else 1} of 1 pairs not separated)")


def test_beyond_counts_only_what_lies_outside_the_interval():
    exact = _comparison(SHARES, spread=5.0)
    assert all(exact.beyond(p) == pytest.approx(0.0, abs=0.02) for p in ("attention", "dispatch", "ffn"))
    off = _comparison({**SHARES, "dispatch": 0.3}, spread=0.0)      # dispatch predicted 50% high, no noise
    assert off.error("dispatch") == pytest.approx(0.5)
    assert off.beyond("dispatch") == pytest.approx(0.5)
    noisy = _comparison({**SHARES, "dispatch": 0.3}, spread=20.0)
    ci = noisy.ci95("dispatch") / noisy.mean("measured", "dispatch")
    assert noisy.beyond("dispatch") == pytest.approx(max(0.0, abs(noisy.error("dispatch")) - ci))
    assert np.isnan(off.beyond("copy"))                              # no step moved weights


def test_phase_failures_skip_small_phases_and_name_the_worst():
    c = _comparison({**SHARES, "dispatch": 0.26, "ffn": 0.36, "sync": 0.06}, spread=0.0)
    # dispatch +30%, ffn +20%, sync +100% but only 3% of the step: not checked
    bad = phase_failures([c], 0.10)
    assert [(n, s, p) for n, s, p, *_ in bad] == [(2, "off", "dispatch"), (2, "off", "ffn")]
    assert bad[0][3] == pytest.approx(0.3) and bad[0][4] == pytest.approx(0.2)
    assert phase_failures([c], 0.35) == []
    assert [p for _, _, p, *_ in phase_failures([c], 0.10, min_share=0.01)][0] == "sync"


def test_report_and_plot_show_every_phase(tmp_path):
    c = _comparison({**SHARES, "dispatch": 0.26}, spread=0.0)
    text = phase_table([c])
    assert "beyond 95% interval" in text and "dispatch" in text and "+30.0%" in text
    assert "per phase" in format_report([c], {})
    plot([c], tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def _fake_validate(comparisons):
    def run(opt):
        return comparisons, {}, "report"
    return run


@pytest.mark.parametrize("limit, code, phrase", [("10", 1, "phase dispatch (2 ranks, off; 20% of the step)"),
                                                 ("40", 0, "within 40%")])
def test_max_phase_error_exit_code(limit, code, phrase, tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    import runtime.validate as v
    monkeypatch.setattr(v, "validate", _fake_validate([_comparison({**SHARES, "dispatch": 0.26})]))
    rc = main(["validate", "traces/mixtral_mmlu.parquet", "--config", "benchmarks/fidelity/run.yaml",
               "--max-phase-error", limit, "-o", str(tmp_path / "o")])
    out = capsys.readouterr()
    assert rc == code
    if code:
        err = out.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("moe-gps: error: ") and phrase in err[0], err
    else:
        assert phrase in out.out


@pytest.mark.parametrize("value", ["-5", "nan", "inf"])
def test_max_phase_error_bad_value_is_one_line_and_exit_2(value, tmp_path, capsys):
    pytest.importorskip("torch")
    rc = main(["validate", "traces/mixtral_mmlu.parquet", "--config", "benchmarks/fidelity/run.yaml",
               "--max-phase-error", value, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--max-phase-error" in err[0], err


def test_a_phase_measured_on_one_step_has_no_interval_and_is_not_checked():
    """The copies of a run that re-planned once: one value, no interval; it counted as a failure with a
    zero-width interval."""
    steps = np.arange(2, 42)
    meas = _measured(steps, np.full(len(steps), 100.0))
    sim = _Sim(np.full(len(steps), 100.0), SHARES)
    meas.replanned[5] = True
    meas.phases["copy"][5], sim.phases["copy"] = 0.02, np.where(np.arange(len(steps)) == 5, 0.04, 0.0)[:, None]
    c = compare_run(2, "static", [(sim, steps, meas)], 2)
    assert c.error("copy") == pytest.approx(1.0) and np.isnan(c.ci95("copy"))
    assert np.isnan(c.beyond("copy"))
    assert not [f for f in phase_failures([c], 0.1) if f[2] == "copy"]
