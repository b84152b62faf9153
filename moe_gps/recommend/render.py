"""HTML and Markdown rendering of the recommendation report: inline CSS, plots as base64 PNG,
no external asset. The content (verdict, key numbers, sentences) comes from moe_gps.recommend.report."""

from __future__ import annotations

import base64
import html
import math
import numbers
from typing import Any

from moe_gps.recommend.sweep import sweep_to_dict

TABLE_COLUMNS = [("num_gpus", "GPUs", ""), ("bandwidth_gb_s", "GB/s", "g"), ("workload", "workload", ""),
                 ("skew", "skew", ".2f"), ("candidate", "strategy", ""), ("status", "status", ""),
                 ("latency_mean_ms", "mean ms", ".3f"), ("speedup_vs_none", "vs none", ".3f"),
                 ("gpu_skew_after", "GPU skew after dup.", ".2f"), ("copied_gb", "copied GB", ".1f"),
                 ("accuracy", "accuracy", ".3f")]


RANK_COLUMNS = [("candidate", "strategy", ""), ("latency_mean_ms", "mean ms", ".3f"),
                ("latency_p99_ms", "p99 ms", ".3f"), ("speedup_vs_none", "vs none", ".3f"),
                ("gpu_skew_after", "GPU skew after dup.", ".2f"), ("copied_gb", "copied GB", ".1f"),
                ("extra_memory_gb_per_gpu", "extra GB/GPU", ".2f"), ("accuracy", "accuracy", ".3f"),
                ("layer_ffn_us", "ffn µs", ".1f"), ("layer_copy_us", "copy µs", ".1f"),
                ("layer_total_us", "layer µs", ".1f")]


def too_big_here(runs: dict) -> str:
    """The runs this machine lacked the memory to simulate, for a count of runs (nothing when none)."""
    n = runs["too_big_here"]
    return f", {n} too big for this machine's memory (not cached: a rerun tries them again)" if n else ""


def _f(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def dump_yaml_plain(d: dict) -> str:
    import yaml
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=100)


def sorted_runs(r) -> list[dict]:
    df = r.df.copy()
    df = df.sort_values(["num_gpus", "bandwidth_gb_s", "workload", "skew", "latency_mean_ms"], na_position="last")
    return df.to_dict("records")


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1320px;margin:24px auto;padding:0 18px;
color:#222;line-height:1.45}
h1{font-size:26px;margin-bottom:4px} h2{margin-top:36px;border-bottom:2px solid #ddd;padding-bottom:4px}
.headline{border:3px solid #2a6;border-radius:10px;padding:14px 20px;background:#f3fbf6}
.headline.none{border-color:#888;background:#f6f6f6}
.verdict{font-size:24px;font-weight:700;margin:4px 0 8px}
.sub{color:#555;font-size:14px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:first-child,th:first-child{text-align:left} th{background:#eee}
table.kv td{text-align:left;border:none;padding:2px 12px 2px 0} table.kv td:first-child{font-weight:600;color:#333}
img{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:13px;margin-bottom:18px}
pre{background:#f7f7f7;padding:10px;overflow-x:auto;font-size:12px} .note{color:#a60}
"""


def _html_table(rows: list[dict], columns) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    body = []
    for r in rows:
        cells = []
        for key, _, spec in columns:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and spec:
                s = _f(float(v), spec)
            else:
                s = "-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
            cells.append(f"<td>{html.escape(s)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _md_table(rows: list[dict], columns) -> str:
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, spec in columns:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and spec:
                cells.append(_f(float(v), spec))
            else:
                cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def steps_text(r) -> str:
    """The simulated steps per run as the records have them: '17 steps each after 16 training steps', or
    '17 to 50 steps each after 16 training steps, each run's count in runs.csv's sim_steps' where workloads
    regroup the steps."""
    steps = sorted({int(x["sim_steps"]) for x in r.records
                    if x.get("status") == "ok" and isinstance(x.get("sim_steps"), numbers.Real)
                    and x["sim_steps"] == x["sim_steps"]}) or [r.plan.sweep.sim_steps]
    text = f"{steps[0]} steps each" if len(steps) == 1 else f"{steps[0]} to {steps[-1]} steps each"
    text += f" after {r.plan.sweep.train_steps} training steps"
    return text if len(steps) == 1 else text + ", each run's count in runs.csv's sim_steps"


def _img(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(r, sec: dict, figs: dict, command: str) -> str:
    e = html.escape
    h = r.headline
    s = sec["summary"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>MoE-GPS recommendation</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>MoE-GPS recommendation</h1>",
             f"<div class='sub'>trace {e(r.trace_name)} · {e(sec['title'])}</div>",
             f"<div class='headline{'' if h.duplicates else ' none'}'>",
             f"<div class='sub'>Recommendation for your cluster</div><div class='verdict'>{e(sec['verdict'])}</div>",
             "<table class='kv'>" + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in sec["keys"])
             + "</table>",
             "<h3>Why</h3><ul>" + "".join(f"<li>{e(x)}</li>" for x in h.reasons) + "</ul>",
             "<h3>How far it holds</h3><ul>" + "".join(f"<li>{e(x)}</li>" for x in s["sensitivity"]) + "</ul>",
             "<h3>Token-to-expert prediction, what it would take</h3><ul>"
             + "".join(f"<li>{e(x)}</li>" for x in s["hypothetical"]) + "</ul>",
             f"<div class='sub'>From {s['runs']['total']} simulated runs ({steps_text(r)}, seed {r.plan.sweep.seed}); "
             f"every number is traceable to "
             f"runs.csv (the intervals and steps won to the per-step latencies in cache/) and docs/recommend.md."
             f"</div></div>"]
    n = 0

    def fig(name: str, title: str) -> None:
        nonlocal n
        if name not in figs:
            return
        n += 1
        png, cap = figs[name]
        parts.append(f"<h2>{n}. {e(title)}</h2><figure><img alt='{e(title)}' src='{_img(png)}'>"
                     f"<figcaption>{e(cap)}</figcaption></figure>")

    fig("headline", "Every strategy at your cluster")
    parts.append(_html_table(h.ranking, RANK_COLUMNS))
    if h.infeasible:
        parts.append("<p class='note'>Not run at your point: " + "; ".join(e(x) for x in h.infeasible) + "</p>")
    fig("decision_bw_skew", "Decision map: bandwidth x skew")
    fig("token_vs_distribution", "Token-to-expert vs distribution-only prediction")
    fig("decision_gpus_tokens", "Decision maps: GPU count and tokens per step")
    fig("predictor", "Token-to-expert speed against predictor accuracy and overhead")
    parts.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in s["hypothetical"]) + "</ul>")
    fig("sensitivity", "Sensitivity of the recommendation")
    parts.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in s["sensitivity"]) + "</ul>")
    n += 1
    parts.append(f"<h2>{n}. All runs</h2><p>{len(r.records)} runs; the same table with every column: "
                 f"<a href='runs.csv'>runs.csv</a>.</p><details><summary>show the table</summary>"
                 + _html_table(sorted_runs(r), TABLE_COLUMNS) + "</details>")
    n += 1
    parts.append(f"<h2>{n}. Method and reproducibility</h2>")
    parts.append(f"<p>Command: <code>{e(command)}</code>. Runs: {r.simulated} simulated now, {r.from_cache} read "
                 f"from the cache, {s['runs']['infeasible']} infeasible (do not fit){too_big_here(s['runs'])}, "
                 f"{s['runs']['errors']} errors. "
                 f"Wall time {r.timings.get('total_s', 0):.1f} s. The exact sweep (seed {r.plan.sweep.seed}) is in "
                 f"sweep.yaml; the headline comparison as a simulate config in simulate_config.yaml.</p>")
    if r.notes:
        parts.append("<ul>" + "".join(f"<li class='note'>{e(x)}</li>" for x in r.notes) + "</ul>")
    parts.append("<pre>" + e(dump_yaml_plain(sweep_to_dict(r.plan.sweep))) + "</pre>")
    parts.append("<p class='sub'>Skew variants: " + "; ".join(
        f"{k}: skew {v.achieved:.3f} (gamma {v.gamma:.3g})" for k, v in r.plan.skews.items()) + ".</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_markdown(r, sec: dict, figs: dict, command: str) -> str:
    h = r.headline
    s = sec["summary"]
    L = ["# MoE-GPS recommendation", "", f"trace {r.trace_name} · {sec['title']}", "",
         f"## Recommendation for your cluster: {sec['verdict']}", ""]
    L += [f"- **{k}**: {v}" for k, v in sec["keys"]]
    L += ["", "**Why**", ""] + [f"- {x}" for x in h.reasons]
    L += ["", "**How far it holds**", ""] + [f"- {x}" for x in s["sensitivity"]]
    L += ["", "**Token-to-expert prediction, what it would take**", ""] + [f"- {x}" for x in s["hypothetical"]]
    L += ["", f"From {s['runs']['total']} simulated runs ({steps_text(r)}, seed {r.plan.sweep.seed}); "
              "definitions in docs/recommend.md.", ""]
    titles = {"headline": "Every strategy at your cluster", "decision_bw_skew": "Decision map: bandwidth x skew",
              "token_vs_distribution": "Token-to-expert vs distribution-only prediction",
              "decision_gpus_tokens": "Decision maps: GPU count and tokens per step",
              "predictor": "Token-to-expert speed against predictor accuracy and overhead",
              "sensitivity": "Sensitivity of the recommendation"}
    n = 0
    for name, title in titles.items():
        if name not in figs:
            continue
        n += 1
        L += [f"## {n}. {title}", "", f"![{title}](plots/{name}.png)", "", f"*{figs[name][1]}*", ""]
        if name == "headline":
            L += [_md_table(h.ranking, RANK_COLUMNS), ""]
            if h.infeasible:
                L += ["Not run at your point: " + "; ".join(h.infeasible), ""]
    n += 1
    L += [f"## {n}. All runs", "", f"{len(r.records)} runs; every column in [runs.csv](runs.csv).", "",
          _md_table(sorted_runs(r), TABLE_COLUMNS), ""]
    n += 1
    L += [f"## {n}. Method and reproducibility", "", f"Command: `{command}`", "",
          f"Runs: {r.simulated} simulated now, {r.from_cache} from the cache, {s['runs']['infeasible']} infeasible"
          f"{too_big_here(s['runs'])}, "
          f"{s['runs']['errors']} errors; wall time {r.timings.get('total_s', 0):.1f} s. Exact sweep: "
          "[sweep.yaml](sweep.yaml); headline comparison: [simulate_config.yaml](simulate_config.yaml).", ""]
    L += [f"- note: {x}" for x in r.notes]
    L += ["", "Skew variants: " + "; ".join(f"{k}: skew {v.achieved:.3f} (gamma {v.gamma:.3g})"
                                            for k, v in r.plan.skews.items()) + ".", ""]
    return "\n".join(L)
