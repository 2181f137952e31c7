"""The ``eplb`` command: plan, compare and export placements from recorded expert-load statistics."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import click
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import eplb
from eplb import algorithms, io
from eplb.errors import EplbError
from eplb.metrics import BalanceReport, evaluate
from eplb.placement import Placement

T = TypeVar("T")

# A bundled-example cluster: DeepSeek-V3 served with EP32 on 4 nodes of 8 GPUs, 32 redundant slots.
EXAMPLE_SPEC = {"gpus": 32, "slots": 288, "nodes": 4, "groups": 8}



def _console(stderr: bool = False) -> Console:
    # Tables piped to a file or a pager should not be squeezed into rich's 80-column default.
    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 200, soft_wrap=stderr)


@dataclass(frozen=True)
class Request:
    stats: io.LoadFile
    stats_name: str
    gpus: int
    slots: int
    nodes: int
    groups: Optional[int]


def _cluster_options(fn: Callable[..., T]) -> Callable[..., T]:
    options = [
        click.argument("stats", required=False, type=click.Path(path_type=str)),
        click.option("--gpus", "-g", type=int, help="GPUs in the expert-parallel group (G)."),
        click.option("--slots", "-p", type=int, help="Physical expert slots over all GPUs (P, a multiple of G)."),
        click.option("--nodes", "-n", type=int, help="Nodes (N, divides G). Default 1."),
        click.option("--groups", "-k", type=int, help="The router's expert groups (DeepSeek-V3: 8)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _request(stats: Optional[str], gpus: Optional[int], slots: Optional[int], nodes: Optional[int],
             groups: Optional[int]) -> Request:
    if stats is None:
        # The bundled example comes with the cluster it was recorded for, unless overridden.
        gpus = gpus or EXAMPLE_SPEC["gpus"]
        slots = slots or EXAMPLE_SPEC["slots"]
        nodes = nodes or EXAMPLE_SPEC["nodes"]
        groups = groups or EXAMPLE_SPEC["groups"]
        loaded, name = io.read_example(), f"{io.example_path().name} (bundled example)"
    else:
        if gpus is None or slots is None:
            raise EplbError("pass --gpus and --slots for your cluster (e.g. --gpus 32 --slots 288)")
        loaded, name = io.read_load(stats), stats
    return Request(loaded, name, gpus, slots, nodes or 1, groups)


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _plan(req: Request, algorithm: str) -> Placement:
    return eplb.plan(req.stats.load, num_gpus=req.gpus, num_slots=req.slots, num_nodes=req.nodes,
                     num_groups=req.groups, algorithm=algorithm)


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(eplb.__version__, prog_name="eplb")
def main() -> None:
    """Expert-parallel load balancing for MoE inference.

    STATS is a file of recorded expert loads (SGLang dumps and init files, JSON, CSV, .npy/.npz,
    safetensors; see README). Without STATS the bundled DeepSeek-V3-0324 MMLU example is used.
    """


@main.command()
@_cluster_options
@click.option("--algorithm", "-a", default="auto", show_default=True,
              help="Algorithm name (see `eplb compare`), or auto.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=str), help="Write the placement here.")
@click.option("--format", "-f", "fmt", type=click.Choice(list(io.PLACEMENT_FORMATS)),
              help="Output format; inferred from the extension when omitted.")
@click.option("--layers/--no-layers", default=True, show_default=True, help="Print the per-layer table.")
def plan(stats: Optional[str], gpus: Optional[int], slots: Optional[int], nodes: Optional[int],
         groups: Optional[int], algorithm: str, output: Optional[str], fmt: Optional[str], layers: bool) -> None:
    """Plan replication and placement, print how balanced it is, optionally export it."""
    req = _request(stats, gpus, slots, nodes, groups)
    placement, seconds = _timed(lambda: _plan(req, algorithm))
    report = evaluate(placement, req.stats.load)
    if layers:
        _console().print(_layer_table(req, report))
    summary = report.summary()
    _console().print(
        f"[bold]{placement.algorithm}[/] on {req.stats_name}: {req.gpus} GPUs, {req.slots} slots, {req.nodes} nodes; "
        f"max/mean GPU load {_fmt(summary['max_over_mean'])} (worst layer {_fmt(summary['worst_max_over_mean'])}), "
        f"gap to bound {summary['gap']:.2%}, duplicates {summary['duplicates']}, planned in {seconds * 1e3:.1f} ms"
    )
    if req.stats.dense:
        _console().print(f"dense layers (no load, planned uniformly): {', '.join(map(str, _layer_ids(req, req.stats.dense)))}")
    if output:
        written = io.write_placement(placement, output, format=fmt, layer_ids=req.stats.layer_ids,
                                     metadata={"stats": req.stats_name, "algorithm": placement.algorithm})
        _console().print(f"wrote {written}")


def _layer_ids(req: Request, rows: list[int]) -> list[int]:
    return [req.stats.layer_ids[r] for r in rows]


def _layer_table(req: Request, report: BalanceReport) -> Table:
    table = Table(title="per layer", show_lines=False)
    for col in ("layer", "max/mean", "balancedness", "gap to bound", "duplicates"):
        table.add_column(col, justify="right")
    for row, layer_id in enumerate(req.stats.layer_ids):
        if not bool(report.loaded[row]):
            table.add_row(str(layer_id), "dense", "", "", str(int(report.duplicates[row])))
            continue
        table.add_row(
            str(layer_id),
            _fmt(1.0 / float(report.balancedness[row])),
            _fmt(float(report.balancedness[row])),
            f"{float(report.gap[row]):.2%}",
            str(int(report.duplicates[row])),
        )
    return table


@main.command()
@_cluster_options
@click.option("--eval", "eval_stats", type=click.Path(path_type=str),
              help="Score on this other workload too (the number to trust: plans meet new traffic).")
@click.option("--algorithms", "-a", "names", help="Comma-separated algorithms to compare (default: all).")
def compare(stats: Optional[str], gpus: Optional[int], slots: Optional[int], nodes: Optional[int],
            groups: Optional[int], eval_stats: Optional[str], names: Optional[str]) -> None:
    """Every algorithm side by side: in-sample and held-out balance, gap to the bound, duplicates, time."""
    req = _request(stats, gpus, slots, nodes, groups)
    held_out = io.read_load(eval_stats) if eval_stats else None
    if held_out is not None and held_out.load.shape[-2:] != req.stats.load.shape[-2:]:
        raise EplbError(
            f"--eval has {held_out.load.shape[-2]} layers x {held_out.load.shape[-1]} experts but STATS has "
            f"{req.stats.load.shape[-2]} x {req.stats.load.shape[-1]}; compare workloads of the same model"
        )
    chosen = [n.strip() for n in names.split(",")] if names else list(algorithms.ALGORITHMS)
    unknown = [n for n in chosen if n not in algorithms.names()]
    if unknown:
        raise EplbError(f"unknown algorithm {unknown[0]!r}; choose from: {', '.join(algorithms.names())}")

    table = Table(title=f"{req.gpus} GPUs, {req.slots} slots, {req.nodes} nodes, fitted on {req.stats_name}")
    columns = ["algorithm", "max/mean", "worst layer", "gap to bound", "duplicates", "plan ms"]
    if held_out is not None:
        columns[3:3] = ["held-out max/mean", "held-out worst"]
    for col in columns:
        table.add_column(col, justify="right" if col != "algorithm" else "left")

    skipped: list[str] = []
    with Progress(console=_console(stderr=True), transient=True) as progress:
        task = progress.add_task("planning", total=len(chosen))
        for name in chosen:
            progress.update(task, description=f"planning with {name}")
            try:
                placement, seconds = _timed(lambda: _plan(req, name))
            except EplbError as exc:
                skipped.append(f"{name}: {exc}")
                table.add_row(name, "n/a", *[""] * (len(columns) - 2))
                progress.advance(task)
                continue
            s = evaluate(placement, req.stats.load).summary()
            cells = [name, _fmt(s["max_over_mean"]), _fmt(s["worst_max_over_mean"]), f"{s['gap']:.2%}",
                     str(s["duplicates"]), f"{seconds * 1e3:.1f}"]
            if held_out is not None:
                h = evaluate(placement, held_out.load).summary()
                cells[3:3] = [_fmt(h["max_over_mean"]), _fmt(h["worst_max_over_mean"])]
            table.add_row(*cells)
            progress.advance(task)
    console = _console()
    console.print(table)
    console.print("max/mean: max GPU load over mean GPU load, averaged over MoE layers (1.0 is perfect).")
    for line in skipped:
        console.print(f"n/a {line}", highlight=False, markup=False)


def run(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; bad input ends in one line on stderr and exit code 2."""
    try:
        main.main(args=argv, prog_name="eplb", standalone_mode=False)
    except EplbError as exc:
        _console(stderr=True).print(f"eplb: error: {exc}", highlight=False, markup=False)
        return 2
    except click.exceptions.Abort:
        _console(stderr=True).print("eplb: aborted")
        return 130
    except click.ClickException as exc:
        _console(stderr=True).print(f"eplb: error: {exc.format_message()}", highlight=False, markup=False)
        return 2
    except OSError as exc:
        _console(stderr=True).print(f"eplb: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
                                    highlight=False, markup=False)
        return 2
    return 0


def entry() -> None:
    sys.exit(run())
