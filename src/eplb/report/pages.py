"""``write_report``: one self-contained HTML page (plots embedded) and a markdown page with PNG files beside it,
from a plan/compare run (``compare_section``) and/or simulation results."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import eplb
from eplb import planning
from eplb.errors import EplbError
from eplb.io.atomic import atomic_write
from eplb.metrics import evaluate
from eplb.report import plots
from eplb.simulation.results import SimResult


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Section:
    title: str
    text: str
    tables: list[Table] = field(default_factory=list)
    figures: list[plots.Figure] = field(default_factory=list)


def compare_section(load: torch.Tensor, layer_ids: list[int], stats_name: str, *, num_gpus: int, num_slots: int,
                    num_nodes: int = 1, num_groups: int | None = None,
                    algorithms: Sequence[str] | None = None) -> Section:
    """Plan ``load [T, L, E]`` with each algorithm and score it: a table, per-layer bars, and the per-GPU
    heatmap of the best plan against the static ``linear`` layout (what an engine serves without EPLB)."""
    names = list(algorithms or planning.names())
    cluster = {"num_gpus": num_gpus, "num_slots": num_slots, "num_nodes": num_nodes, "num_groups": num_groups}
    loaded = load.sum(dim=(0, 2)) > 0
    ids = [i for i, k in zip(layer_ids, loaded.tolist(), strict=True) if k]
    scores: dict[str, torch.Tensor] = {}
    placements = {}
    rows = []
    skipped = []
    for name in names:
        try:
            placement = eplb.plan(load, **cluster, algorithm=name)
        except EplbError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        report = evaluate(placement, load)
        s = report.summary()
        scores[name] = (1.0 / report.balancedness)[loaded]
        placements[name] = placement
        rows.append([name, f"{s['max_over_mean']:.4f}", f"{s['worst_max_over_mean']:.4f}", f"{s['gap']:.2%}",
                     str(s["duplicates"])])
    if not scores:
        raise EplbError(f"no algorithm could plan {stats_name} on this cluster ({'; '.join(skipped)})")
    best = min(scores, key=lambda n: float(scores[n].mean()))
    before = "linear" if "linear" in placements else names[0]
    total = load.sum(0)
    figures = [plots.layer_bars(ids, scores, stats_name),
               plots.heatmaps(ids, placements[before].gpu_load(total)[loaded], placements[best].gpu_load(total)[loaded],
                              f"{before} (no balancing)", f"{best} (best here)")]
    table = Table(f"Plans for {stats_name}: {num_gpus} GPUs, {num_slots} slots, {num_nodes} node(s)",
                  ["algorithm", "max/mean", "worst layer", "gap to bound", "duplicates"], rows,
                  "max/mean: busiest GPU over the average GPU, mean over MoE layers (1.0 is perfect), scored on the "
                  "file planned from (in sample)." + (f" Not run: {'; '.join(skipped)}." if skipped else ""))
    return Section("Placement plans", "Each algorithm plans the recorded load; the bars show every layer, the heatmap "
                   "shows where the load lands on the GPUs.", [table], figures)


def simulation_sections(results: Sequence[SimResult], timeline: list[str] | None = None) -> list[Section]:
    """A timeline and a trade-off per scenario (the first result of each scenario), and step times per
    dispatch/waterfill setting when several results share a scenario. ``timeline``: the policies to draw
    there (default: the first five)."""
    out = []
    by_scenario: dict[str, list[SimResult]] = {}
    for r in results:
        by_scenario.setdefault(_scenario_key(r), []).append(r)
    for group in by_scenario.values():
        first = group[0]
        s = first.setup
        name = ", ".join(s["phases"][:3]) + (f" and {len(s['phases']) - 3} more" if len(s["phases"]) > 3 else "")
        table = Table("Policies over the replay", SUMMARY_COLUMNS, [summary_cells(row) for row in first.summary()],
                      "max/mean is averaged over steps and layers; copies are expert weights moved (the oracles "
                      "switch for free); stall is serving time lost waiting for copies; step ms is the estimated "
                      "MoE time of a step and 'vs ideal' its ratio to perfect balance.")
        text = (f"{s['num_steps']} steps of {s['tokens_per_step'] or 'recorded'} tokens (top-{s['top_k']}) over "
                f"{name}; {s['num_gpus']} GPUs, {s['num_slots']} slots, {s['num_nodes']} node(s); dispatch "
                f"{s['dispatch']}, waterfill {'on' if s['waterfill'] else 'off'}."
                + (f" Time model: {s['cost']}." if s.get("cost") else " No time model (balance only)."))
        sec = Section(f"Replay: {name}", text, [table], [plots.timeline(first, timeline), plots.tradeoff(first)])
        settings = {(r.setup["dispatch"], r.setup["waterfill"]) for r in group}
        if len(settings) > 1 and all(r.setup.get("cost") for r in group):
            # One row per (policy, dispatch, waterfill): results of one setting may repeat a policy.
            unique = {(row["policy"], r.setup["dispatch"], r.setup["waterfill"]):
                      {"dispatch": r.setup["dispatch"], "waterfill": r.setup["waterfill"], **row}
                      for r in reversed(group) for row in r.summary()}
            # Policies simulated under every setting only, so that each bar group compares like with like.
            everywhere = [p for p in dict.fromkeys(k[0] for k in unique)
                          if all((p, *setting) in unique for setting in settings)]
            rows = [unique[(p, *setting)] for p in everywhere for setting in sorted(settings)]
            sec.tables.append(Table("Step time with dispatch and waterfill", STEP_COLUMNS,
                                    [step_cells(row) for row in rows]))
            sec.figures.append(plots.step_times(rows))
        out.append(sec)
    return out


SUMMARY_COLUMNS = ["policy", "max/mean", "worst step", "copies", "GB moved", "stall s", "step ms", "vs ideal",
                   "planner calls"]
STEP_COLUMNS = ["policy", "dispatch", "waterfill", "max/mean", "step ms", "ideal ms", "vs ideal"]


def summary_cells(row: dict[str, Any]) -> list[str]:
    timed = "step_ms" in row
    return [row["policy"], f"{row['max_over_mean']:.4f}", f"{row['worst_step_max_over_mean']:.4f}",
            str(row["copies"]), f"{row['bytes'] / 1e9:.1f}", f"{row['stall_s']:.3f}",
            f"{row['step_ms']:.2f}" if timed else "-", f"{row['time_over_ideal']:.4f}" if timed else "-",
            str(row["plan_calls"])]


def step_cells(row: dict[str, Any]) -> list[str]:
    return [row["policy"], row["dispatch"], "on" if row["waterfill"] else "off", f"{row['max_over_mean']:.4f}",
            f"{row['step_ms']:.2f}", f"{row['ideal_step_ms']:.2f}", f"{row['time_over_ideal']:.4f}"]


def _scenario_key(result: SimResult) -> str:
    s = result.setup
    return repr((s["phases"], s["switches"], s["num_steps"], s["tokens_per_step"], s["seed"], s["num_gpus"]))


def write_report(out_dir: str | Path, sections: Sequence[Section], title: str = "eplb report") -> dict[str, Path]:
    """Write ``report.html`` (self-contained), ``report.md`` and the PNGs into ``out_dir``."""
    if not sections:
        raise EplbError("nothing to report; pass a loads file to plan, or simulation results (eplb simulate --save)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for i, sec in enumerate(sections):
        md += [f"## {sec.title}", "", sec.text, ""]
        body += [f"<h2>{html.escape(sec.title)}</h2>", f"<p>{html.escape(sec.text)}</p>"]
        for table in sec.tables:
            md += [f"**{table.title}**", "", "| " + " | ".join(table.columns) + " |",
                   "|" + "---|" * len(table.columns)]
            md += ["| " + " | ".join(r) + " |" for r in table.rows]
            md += ["", table.note, ""] if table.note else [""]
            body.append(_html_table(table))
        for fig in sec.figures:
            path = out / f"{i + 1:02d}-{fig.name}.png"
            atomic_write(path, fig.png)
            written[path.stem] = path
            md += [f"### {fig.title}", "", f"![{fig.title}]({path.name})", "", fig.how_to_read, ""]
            data = base64.b64encode(fig.png).decode()
            body += [f"<h3>{html.escape(fig.title)}</h3>",
                     f'<img alt="{html.escape(fig.title)}" src="data:image/png;base64,{data}">',
                     f"<p class=how>{html.escape(fig.how_to_read)}</p>"]
    page = ("<!DOCTYPE html><html><head><meta charset=utf-8><title>" + html.escape(title) + "</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
            ".how,.note{color:#555}</style></head><body>" + "\n".join(body) + "</body></html>\n")
    written["html"] = out / "report.html"
    written["markdown"] = out / "report.md"
    atomic_write(written["html"], page.encode())
    atomic_write(written["markdown"], "\n".join(md).encode())
    return written


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table.rows)
    note = f"<p class=note>{html.escape(table.note)}</p>" if table.note else ""
    return f"<p><b>{html.escape(table.title)}</b></p><table><tr>{head}</tr>{rows}</table>{note}"
