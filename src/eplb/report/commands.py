"""``eplb report``: an HTML page and a markdown page with PNGs from plans and ``eplb simulate --save`` results."""

from __future__ import annotations

import click
from rich.console import Console

from eplb import io
from eplb.report.pages import compare_section, simulation_sections, write_report
from eplb.simulation.results import SimResult

# The bundled example's cluster (as `eplb compare` uses it): DeepSeek-V3 on EP32, 4 nodes, 288 slots.
EXAMPLE = {"num_gpus": 32, "num_slots": 288, "num_nodes": 4, "num_groups": 8}


@click.command("report")
@click.argument("runs", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--output", "-o", "out_dir", type=click.Path(file_okay=False, path_type=str), default="eplb-report",
              show_default=True, help="Folder for report.html, report.md and the PNGs.")
@click.option("--stats", type=click.Path(path_type=str),
              help="A loads file to plan with every algorithm (default without RUNS: the bundled example).")
@click.option("--gpus", "-g", type=int, help="With --stats: GPUs.")
@click.option("--slots", "-p", type=int, help="With --stats: physical slots.")
@click.option("--nodes", "-n", type=int, default=1, show_default=True, help="With --stats: nodes.")
@click.option("--groups", "-k", type=int, help="With --stats: the router's expert groups.")
@click.option("--algorithms", "-a", help="With --stats: comma-separated algorithms (default: all).")
@click.option("--timeline", help="Comma-separated policies drawn on the replay timeline (default: the first five).")
@click.option("--title", default="eplb report", show_default=True)
def report_command(runs: tuple[str, ...], out_dir: str, stats: str | None, gpus: int | None, slots: int | None,
                   nodes: int, groups: int | None, algorithms: str | None, timeline: str | None, title: str) -> None:
    """Write a report from RUNS (files of `eplb simulate --save`; several runs of one scenario with different
    --dispatch/--waterfill give the step-time comparison) and/or the plans of a loads file."""
    sections = []
    if stats or not runs:
        if stats is None:
            loaded, name, cluster = io.read_example(), f"{io.example_path().name} (bundled example)", EXAMPLE
        else:
            if gpus is None or slots is None:
                raise click.UsageError("--stats needs --gpus and --slots for your cluster")
            loaded, name = io.read_load(stats), stats
            cluster = {"num_gpus": gpus, "num_slots": slots, "num_nodes": nodes, "num_groups": groups}
        names = [a.strip() for a in algorithms.split(",")] if algorithms else None
        sections.append(compare_section(loaded.load, loaded.layer_ids, name, **cluster, algorithms=names))
    drawn = [p.strip() for p in timeline.split(",")] if timeline else None
    sections += simulation_sections([SimResult.load(r) for r in runs], drawn)
    written = write_report(out_dir, sections, title=title)
    Console().print(f"wrote {written['html']} and {written['markdown']} ({len(written) - 2} plots)")
