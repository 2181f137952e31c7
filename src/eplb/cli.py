"""The ``eplb`` command: plan, compare and export placements from recorded expert-load statistics."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import click
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import eplb
from eplb import io, planning
from eplb.cluster import Cluster, check_cluster, require_count
from eplb.errors import EplbError
from eplb.integrations.commands import COMMANDS as ENGINE_COMMANDS
from eplb.integrations.commands import after_write, output_options
from eplb.io.placements import brief_ids
from eplb.metrics import BalanceReport, evaluate
from eplb.placement import Placement
from eplb.planning.hedged import HEDGED, HedgedConfig
from eplb.report.commands import report_command
from eplb.simulation.commands import simulate_command
from eplb.traffic import expected_remote_nodes

T = TypeVar("T")

# The bundled example's cluster: DeepSeek-V3 (top-8 of 256 experts in 8 groups, 4 groups per
# token) served with EP32 on 4 nodes of 8 GPUs, 32 redundant slots.
EXAMPLE_SPEC = {"gpus": 32, "slots": 288, "nodes": 4, "groups": 8, "topk_groups": 4}
# The knobs of the eplb algorithm (HedgedConfig); other algorithms take none.
HEDGED_FLAGS = "--risk/--half-life/--locality"


def _console(stderr: bool = False) -> Console:
    # Tables piped to a file or a pager should not be squeezed into rich's 80-column default.
    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 200, soft_wrap=stderr)


@dataclass(frozen=True)
class Request:
    """One planning job as the options describe it."""

    stats: io.LoadFile
    stats_name: str
    gpus: int
    slots: int
    nodes: int
    groups: int | None
    top_k: int
    topk_groups: int | None
    config: HedgedConfig | None

    def plan(self, algorithm: str, **kwargs: Any) -> Placement:
        config = self.config if algorithm in ("auto", HEDGED.name) else None
        return eplb.plan(self.stats.load, num_gpus=self.gpus, num_slots=self.slots, num_nodes=self.nodes,
                         num_groups=self.groups, algorithm=algorithm, config=config, **kwargs)

    def traffic(self, placement: Placement, load: torch.Tensor) -> torch.Tensor | None:
        """``[L]`` expected remote nodes per token, or None on one node (no cross-node traffic)."""
        if self.nodes == 1:
            return None
        grouped = self.groups is not None and self.topk_groups is not None
        return expected_remote_nodes(placement, load, top_k=self.top_k, num_groups=self.groups if grouped else None,
                                     groups_per_token=self.topk_groups if grouped else None)


def _options(fn: Callable[..., T]) -> Callable[..., T]:
    options = [
        click.argument("stats", required=False, type=click.Path(path_type=str)),
        click.option("--gpus", "-g", type=int, help="GPUs in the expert-parallel group (G)."),
        click.option("--slots", "-p", type=int, help="Physical expert slots over all GPUs (P, a multiple of G)."),
        click.option("--nodes", "-n", type=int, help="Nodes (N, divides G). Default 1."),
        click.option("--groups", "-k", type=int, help="The router's expert groups (DeepSeek-V3: 8)."),
        click.option("--top-k", type=int, default=8, show_default=True,
                     help="Experts each token picks (for the cross-node traffic column)."),
        click.option("--topk-groups", type=int, help="Groups each token picks from (DeepSeek-V3: 4)."),
        click.option("--risk", type=float, help="eplb algorithm: standard deviations of load shift to plan for (1.0)."),
        click.option("--half-life", type=float,
                     help="eplb algorithm: windows after which a window's weight halves (8)."),
        click.option("--locality", type=float,
                     help="eplb algorithm: 0..1, trade balance for less cross-node traffic (0.25)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _request(stats: str | None, gpus: int | None, slots: int | None, nodes: int | None,
             groups: int | None, top_k: int, topk_groups: int | None, risk: float | None,
             half_life: float | None, locality: float | None) -> Request:
    if stats is None:
        # The bundled example comes with the cluster it was recorded for, unless overridden.
        gpus = EXAMPLE_SPEC["gpus"] if gpus is None else gpus
        slots = EXAMPLE_SPEC["slots"] if slots is None else slots
        nodes = EXAMPLE_SPEC["nodes"] if nodes is None else nodes
        groups = EXAMPLE_SPEC["groups"] if groups is None else groups
        topk_groups = EXAMPLE_SPEC["topk_groups"] if topk_groups is None else topk_groups
        loaded, name = io.read_example(), f"{io.example_path().name} (bundled example)"
    else:
        if gpus is None or slots is None:
            raise EplbError("pass --gpus and --slots for your cluster (e.g. --gpus 32 --slots 288)")
        loaded, name = io.read_load(stats), stats
    nodes = 1 if nodes is None else nodes
    # Up front, so that compare fails like plan: one line, not the same error per algorithm.
    check_cluster(Cluster(num_gpus=gpus, num_slots=slots, num_nodes=nodes, num_groups=groups), loaded.load.shape[-1])
    require_count("--top-k", top_k, fix="pass the experts each token picks (DeepSeek-V3: 8)")
    if topk_groups is not None:
        require_count("--topk-groups", topk_groups, maximum=groups,
                      fix="pass the groups each token picks from, at most --groups (DeepSeek-V3: 4 of 8)")
    knobs = {k: v for k, v in (("risk", risk), ("half_life", half_life), ("locality", locality)) if v is not None}
    config = HedgedConfig(**knobs) if knobs else None
    return Request(loaded, name, gpus, slots, nodes, groups, top_k, topk_groups, config)


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(eplb.__version__, prog_name="eplb")
def main() -> None:
    """Expert-parallel load balancing for MoE inference.

    STATS is a file of recorded expert loads (SGLang dumps and init files, TensorRT-LLM statistics,
    JSON, CSV, .npy/.npz, .pt, safetensors; FILE#NAME picks a part, e.g. an OLMoE domain). Without
    STATS the bundled DeepSeek-V3-0324 MMLU example is used.
    """


@main.command()
@_options
@click.option("--algorithm", "-a", default="auto", show_default=True,
              help="Algorithm name (see `eplb compare`), or auto.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=str), help="Write the placement here.")
@click.option("--format", "-f", "fmt", type=click.Choice(list(io.PLACEMENT_FORMATS)),
              help="Output format; inferred from the extension when omitted.")
@click.option("--current", type=click.Path(dir_okay=False, path_type=str),
              help="The placement now serving (any placement format): keep as many slots as possible.")
@click.option("--max-moves", type=int, help="With --current: at most this many slots change per layer.")
@click.option("--bytes-per-expert", type=int, help="Weight bytes of one expert, to report the bytes moved.")
@click.option("--layers/--no-layers", default=True, show_default=True, help="Print the per-layer table.")
@output_options
def plan(stats: str | None, gpus: int | None, slots: int | None, nodes: int | None,
         groups: int | None, top_k: int, topk_groups: int | None, risk: float | None,
         half_life: float | None, locality: float | None, algorithm: str, output: str | None,
         fmt: str | None, current: str | None, max_moves: int | None, bytes_per_expert: int | None,
         layers: bool, model_layers: int | None, updates_per_iter: int) -> None:
    """Plan replication and placement, print how balanced it is, optionally export it."""
    req = _request(stats, gpus, slots, nodes, groups, top_k, topk_groups, risk, half_life, locality)
    if req.config is not None and algorithm not in ("auto", HEDGED.name):
        raise EplbError(f"{HEDGED_FLAGS} tune the eplb algorithm, not {algorithm}; drop them or use -a eplb")
    if max_moves is not None and current is None:
        raise EplbError("--max-moves bounds the change from a placement: pass --current FILE too")
    serving = _read_current(current, req) if current else None
    with _console(stderr=True).status(f"planning with {algorithm}"):
        placement, seconds = _timed(lambda: req.plan(algorithm, current=serving, max_moves=max_moves))
    report = evaluate(placement, req.stats.load)
    traffic = req.traffic(placement, req.stats.load)
    console = _console()
    if layers:
        console.print(_layer_table(req, report, traffic))
    summary = report.summary()
    console.print(
        f"[bold]{placement.algorithm}[/] on {req.stats_name}: {req.gpus} GPUs, {req.slots} slots, {req.nodes} nodes; "
        f"max/mean GPU load {_fmt(summary['max_over_mean'])} (worst layer {_fmt(summary['worst_max_over_mean'])}), "
        f"gap to bound {summary['gap']:.2%}, duplicates {summary['duplicates']}"
        + (f", remote nodes/token {report.layer_mean(traffic):.3f}" if traffic is not None else "")
        + f", planned in {seconds * 1e3:.1f} ms"
    )
    console.print("gap to bound: how far the busiest GPU is above the lowest peak any placement could reach "
                  "(eplb.metrics.lower_bound).", highlight=False)
    console.print("duplicates: slots holding a second copy of an expert on the same GPU (a wasted slot).",
                  highlight=False)
    if req.stats.dense:
        ids = [req.stats.layer_ids[r] for r in req.stats.dense]
        console.print(f"dense layers (no load, planned uniformly): {', '.join(map(str, ids))}")
    if serving is not None:
        cost = eplb.migration_cost(serving, placement, bytes_per_expert)
        before = evaluate(serving, req.stats.load).summary()["max_over_mean"]
        console.print(
            f"from {current} (max/mean {_fmt(before)}): {cost.total_moves} slots change, "
            f"{float(cost.moves.float().mean()):.1f} per layer on average, at most {int(cost.moves.max())}"
            + (f", {cost.bytes / 1e9:.2f} GB of weights" if cost.bytes is not None else "")
        )
    if output:
        # Without layer ids the writer assumes rows 0..L-1 and warns: one line each on stderr.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written = io.write_placement(
                placement, output, format=fmt, layer_ids=req.stats.layer_ids if req.stats.has_layer_ids else None,
                metadata={"stats": req.stats_name, "algorithm": placement.algorithm},
                model_layers=model_layers, updates_per_iter=updates_per_iter, dense_rows=req.stats.dense)
        for warning in caught:
            _console(stderr=True).print(f"eplb: warning: {warning.message}", highlight=False, markup=False)
        # Read back: proves the file round-trips and names the format the extension (or -f) chose.
        kind = io.read_placement_file(written, num_gpus=req.gpus, num_nodes=req.nodes).format
        console.print(f"wrote {written} ({kind} format)")
        if note := after_write(str(written), kind, placement):
            console.print(note, markup=False, soft_wrap=True)


def _read_current(path: str, req: Request) -> Placement:
    """The ``--current`` placement, checked to cover the same model layers as the statistics."""
    serving = io.read_placement_file(path, num_gpus=req.gpus, num_nodes=req.nodes)
    if serving.layer_ids != req.stats.layer_ids:
        raise EplbError(
            f"--current {path} is for model layers {brief_ids(serving.layer_ids)} but the statistics have "
            f"{brief_ids(req.stats.layer_ids)}; pass the placement now serving these layers"
        )
    return serving.placement


def _layer_table(req: Request, report: BalanceReport, traffic: torch.Tensor | None) -> Table:
    table = Table(title="per layer")
    columns = ["layer", "max/mean", "balancedness", "gap to bound", "duplicates"]
    if traffic is not None:
        columns.append("remote nodes/token")
    for col in columns:
        table.add_column(col, justify="right")
    for row, layer_id in enumerate(req.stats.layer_ids):
        if not bool(report.loaded[row]):
            table.add_row(str(layer_id), "dense", *[""] * (len(columns) - 2))
            continue
        cells = [
            str(layer_id),
            _fmt(float(report.max_over_mean[row])),
            _fmt(float(report.balancedness[row])),
            f"{float(report.gap[row]):.2%}",
            str(int(report.duplicates[row])),
        ]
        if traffic is not None:
            cells.append(f"{float(traffic[row]):.3f}")
        table.add_row(*cells)
    return table


@main.command()
@_options
@click.option("--eval", "eval_stats", type=click.Path(path_type=str),
              help="Score on this other workload too (the number to trust: plans meet new traffic).")
@click.option("--algorithms", "-a", "names", help="Comma-separated algorithms to compare (default: all).")
def compare(stats: str | None, gpus: int | None, slots: int | None, nodes: int | None,
            groups: int | None, top_k: int, topk_groups: int | None, risk: float | None,
            half_life: float | None, locality: float | None, eval_stats: str | None,
            names: str | None) -> None:
    """Every algorithm side by side: in-sample and held-out balance, gap to the bound, duplicates,
    cross-node traffic, time."""
    req = _request(stats, gpus, slots, nodes, groups, top_k, topk_groups, risk, half_life, locality)
    held_out = io.read_load(eval_stats) if eval_stats else None
    if held_out is not None and held_out.load.shape[-2:] != req.stats.load.shape[-2:]:
        raise EplbError(
            f"--eval has {held_out.load.shape[-2]} layers x {held_out.load.shape[-1]} experts but STATS has "
            f"{req.stats.load.shape[-2]} x {req.stats.load.shape[-1]}; compare workloads of the same model"
        )
    chosen = [n.strip() for n in names.split(",")] if names else list(planning.ALGORITHMS)
    unknown = [n for n in chosen if n not in planning.names()]
    if unknown:
        raise EplbError(f"unknown algorithm {unknown[0]!r}; choose one of: {', '.join(planning.names())}")

    columns = ["algorithm", "max/mean", "worst layer", "gap to bound", "duplicates", "plan ms"]
    if held_out is not None:
        columns[3:3] = ["held-out max/mean", "held-out worst"]
    if req.nodes > 1:
        columns.insert(-1, "remote nodes/token")
    table = Table(title=f"{req.gpus} GPUs, {req.slots} slots, {req.nodes} nodes, fitted on {req.stats_name}")
    for col in columns:
        table.add_column(col, justify="left" if col == "algorithm" else "right")

    skipped: list[str] = []
    with Progress(console=_console(stderr=True), transient=True) as progress:
        task = progress.add_task("planning", total=len(chosen))
        for name in chosen:
            progress.update(task, description=f"planning with {name}")
            try:
                placement, seconds = _timed(partial(req.plan, name))
            except EplbError as exc:
                skipped.append(f"{name}: {exc}")
                table.add_row(name, "n/a", *[""] * (len(columns) - 2))
                progress.advance(task)
                continue
            report = evaluate(placement, req.stats.load)
            s = report.summary()
            cells = [name, _fmt(s["max_over_mean"]), _fmt(s["worst_max_over_mean"]), f"{s['gap']:.2%}",
                     str(s["duplicates"]), f"{seconds * 1e3:.1f}"]
            if held_out is not None:
                h = evaluate(placement, held_out.load).summary()
                cells[3:3] = [_fmt(h["max_over_mean"]), _fmt(h["worst_max_over_mean"])]
            traffic = req.traffic(placement, req.stats.load)
            if traffic is not None:
                cells.insert(-1, f"{report.layer_mean(traffic):.3f}")
            table.add_row(*cells)
            progress.advance(task)
    console = _console()
    console.print(table)
    console.print("max/mean: max GPU load over mean GPU load, averaged over MoE layers (1.0 is perfect); "
                  "remote nodes/token: distinct other nodes a token's top-k reaches (eplb.traffic).")
    console.print(_legend(chosen), highlight=False, markup=False)
    for line in skipped:
        console.print(f"n/a {line}", highlight=False, markup=False)


def _legend(names: list[str]) -> str:
    """One line per algorithm: what it is (``Algorithm.summary``), static layouts marked as such."""
    width = max(map(len, names))
    lines = []
    for name in names:
        algo = planning.get(name)
        kind = "" if algo.uses_load else "(static, ignores the load) "
        lines.append(f"  {name:<{width}}  {kind}{algo.summary}")
    return "\n".join(["algorithms:", *lines])


# Commands that live with their wing; registered here so that `eplb --help` lists them.
main.add_command(simulate_command)
main.add_command(report_command)
for _command in ENGINE_COMMANDS:
    main.add_command(_command)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input ends in one line on stderr and exit code 2."""
    err = _console(stderr=True)
    try:
        main.main(args=argv, prog_name="eplb", standalone_mode=False)
    except EplbError as exc:
        err.print(f"eplb: error: {exc}", highlight=False, markup=False)
        return 2
    except click.exceptions.Abort:
        err.print("eplb: aborted")
        return 130
    except click.ClickException as exc:
        err.print(f"eplb: error: {exc.format_message()}", highlight=False, markup=False)
        return 2
    except OSError as exc:
        err.print(f"eplb: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), highlight=False,
                  markup=False)
        return 2
    return 0


def entry() -> None:
    sys.exit(run())
