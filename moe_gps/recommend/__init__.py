"""Recommendation sweeps: which duplication strategy and predictor to run on a cluster, and why.

>>> from moe_gps.config import WorkloadConfig, load_cluster, load_model
>>> from moe_gps.recommend import load_sweep, recommend, write_report
>>> r = recommend(trace, load_cluster("4xA100-nvlink"), load_model("mixtral-8x7b"), WorkloadConfig(),
...               load_sweep(), out_dir="report/", jobs=2)
>>> r.headline.winner["candidate"]          # the fastest deployable strategy at your point
>>> write_report(r, "report/")              # report.html, report.md, runs.csv, sweep.yaml, ...

This sits above the simulator (it calls ``sim.run.simulate`` for every run), like the
CLI. Modules: ``sweep`` (the sweep file), ``skew`` (skew variants of a trace), ``plan``
(points, candidates, studies), ``runner`` (parallel, cached runs), ``analysis``
(headline, maps, sensitivity, predictor study), ``plots``, ``render`` and ``report``
(the folder). Docs: docs/recommend.md.
"""

from moe_gps.recommend.core import Recommendation, recommend
from moe_gps.recommend.skew import SkewVariant, reweight, search_gamma
from moe_gps.recommend.sweep import SweepConfig, load_sweep, parse_sweep


def write_report(result, out_dir, command: str = "", jobs: int = 1):
    """Write the report folder of ``result`` (see :func:`moe_gps.recommend.report.write_report`)."""
    from moe_gps.recommend.report import write_report as _write

    return _write(result, out_dir, command, jobs)


__all__ = ["Recommendation", "SkewVariant", "SweepConfig", "load_sweep", "parse_sweep", "recommend", "reweight",
           "search_gamma", "write_report"]
