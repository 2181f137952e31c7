"""``eplb simulate``: replay a scenario of recorded loads through balancing policies, print what each costs."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from eplb.cluster import require_count
from eplb.errors import EplbError
from eplb.planning.online import OnlineConfig
from eplb.simulation.cost import CostModel, describe
from eplb.simulation.policies import LAYERS_AUTO, POLICIES, Online, Oracle, Periodic, StepOracle
from eplb.simulation.scenarios import build, replay
from eplb.simulation.simulator import simulate


@click.command("simulate")
@click.argument("phases", nargs=-1, type=click.Path(path_type=str))
@click.option("--replay", "replay_file", type=click.Path(path_type=str),
              help="Replay this recorded series (recorder dump with many windows) as it is, instead of PHASES.")
@click.option("--steps", default=60, show_default=True, help="Steps per phase.")
@click.option("--tokens", default=16384, show_default=True, help="Tokens per step (over the EP group).")
@click.option("--top-k", default=8, show_default=True, help="Experts each token picks.")
@click.option("--switch", type=click.Choice(["abrupt", "gradual"]), default="abrupt", show_default=True)
@click.option("--ramp", default=10, show_default=True, help="Steps of a gradual switch.")
@click.option("--seed", default=0, show_default=True)
@click.option("--gpus", "-g", type=int, required=True, help="GPUs in the expert-parallel group.")
@click.option("--slots", "-p", type=int, required=True, help="Physical expert slots over all GPUs.")
@click.option("--nodes", "-n", type=int, default=1, show_default=True)
@click.option("--groups", "-k", type=int, help="The router's expert groups (DeepSeek-V3: 8).")
@click.option("--policies", default="static,periodic,eplb,oracle", show_default=True,
              help=f"Comma-separated: {', '.join(POLICIES)}.")
@click.option("--algorithm", default="deepseek", show_default=True, help="Planning algorithm of every policy.")
@click.option("--interval", default=3000, show_default=True, help="periodic: steps between re-plans (vLLM: 3000).")
@click.option("--window", default=1000, show_default=True, help="periodic: steps planned from (vLLM: 1000).")
@click.option("--max-moves", default=32, show_default=True, help="eplb: changed slots per layer per move.")
@click.option("--min-gain", default=0.02, show_default=True, help="eplb: act on this predicted max/mean drop.")
@click.option("--layers-per-step", default="auto", show_default=True,
              help="eplb: layers committed per step, or auto: as many as the links copy under a step's GEMMs.")
@click.option("--time/--no-time", "timed", default=True, show_default=True,
              help="Estimate step time (needs the measured GEMM table; DeepSeek-V3 expert shapes by default).")
@click.option("--table", type=click.Path(dir_okay=False, path_type=str), help="GEMM cost table (bench_gemm_cost.py).")
@click.option("--dtype", type=click.Choice(["bf16", "fp8"]), default="bf16", show_default=True)
@click.option("--dispatch", type=click.Choice(["even", "static", "weighted"]), default="even", show_default=True)
@click.option("--waterfill/--no-waterfill", default=False, show_default=True, help="Waterfill the shared expert.")
@click.option("--save", type=click.Path(dir_okay=False, path_type=str), help="Write the result (for eplb report).")
def simulate_command(phases: tuple[str, ...], replay_file: str | None, steps: int, tokens: int, top_k: int,
                     switch: str, ramp: int, seed: int, gpus: int, slots: int, nodes: int, groups: int | None,
                     policies: str, algorithm: str, interval: int, window: int, max_moves: int, min_gain: float,
                     layers_per_step: str, timed: bool, table: str | None, dtype: str, dispatch: str,
                     waterfill: bool, save: str | None) -> None:
    """Replay PHASES (loads files; FILE#NAME picks a part) through balancing policies and print, per policy,
    the time-averaged max/mean GPU load, expert copies, stall and estimated step time."""
    if bool(phases) == bool(replay_file):
        raise EplbError("pass loads files as PHASES to build a scenario, or --replay FILE, not both or neither")
    if replay_file:
        scenario = replay(replay_file, top_k=top_k)
    else:
        scenario = build(list(phases), steps_per_phase=steps, tokens_per_step=tokens, top_k=top_k, switch=switch,
                         ramp_steps=ramp, seed=seed)
    lps = layers_per_step if layers_per_step == LAYERS_AUTO else require_count(
        "--layers-per-step", int(layers_per_step) if layers_per_step.isdigit() else layers_per_step,
        fix=f"pass a positive integer or {LAYERS_AUTO}")
    config = OnlineConfig(window=16, max_moves=max_moves, min_gain=min_gain, algorithm=algorithm, num_groups=groups)
    makers = {"static": lambda: "static", "periodic": lambda: Periodic(interval=interval, window=window),
              "eplb": lambda: Online(config=config, layers_per_step=lps), "oracle": Oracle,
              "step_oracle": StepOracle}
    chosen = [p.strip() for p in policies.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in makers]
    if unknown or not chosen:
        raise EplbError(f"unknown policy {unknown[0] if unknown else policies!r}; choose from: {', '.join(makers)}")
    cost = CostModel(table=table, dtype=dtype) if timed else None
    result = simulate(scenario, [makers[p]() for p in chosen], num_gpus=gpus, num_slots=slots, num_nodes=nodes,
                      num_groups=groups, cost=cost, dispatch=dispatch, waterfill=waterfill, algorithm=algorithm,
                      progress=sys.stderr.isatty())
    console = Console(width=None if sys.stdout.isatty() else 200)
    out = Table(title=f"{scenario.num_steps} steps, {len(scenario.phase_names)} phase(s), {gpus} GPUs, {slots} slots, "
                      f"{nodes} node(s)")
    columns = ["policy", "max/mean", "worst step", "copies", "GB moved", "stall s", "planner calls", "plan s"]
    if cost is not None:
        columns[6:6] = ["step ms", "vs ideal"]
    for col in columns:
        out.add_column(col, justify="left" if col == "policy" else "right")
    for row in result.summary():
        cells = [row["policy"], f"{row['max_over_mean']:.4f}", f"{row['worst_step_max_over_mean']:.4f} "
                 f"@{row['worst_step']}", str(row["copies"]), f"{row['bytes'] / 1e9:.1f}", f"{row['stall_s']:.3f}",
                 str(row["plan_calls"]), f"{row['plan_seconds']:.1f}"]
        if cost is not None:
            cells[6:6] = [f"{row['step_ms']:.2f}", f"{row['time_over_ideal']:.4f}"]
        out.add_row(*cells)
    console.print(out)
    console.print("max/mean: busiest GPU over the average, averaged over steps and MoE layers (1.0 is perfect); "
                  "copies: expert weights moved (the oracles switch for free).")
    if cost is not None:
        console.print(f"time model: {describe(cost)}", highlight=False)
    if save:
        console.print(f"wrote {result.save(save)}")
