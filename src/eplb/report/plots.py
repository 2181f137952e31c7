"""The report's plots, each a ``Figure``: PNG bytes, a title and a sentence on how to read it.

matplotlib is imported on first use, with the Agg backend (no display needed).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from eplb.errors import EplbError
from eplb.simulation.results import SimResult


@dataclass(frozen=True)
class Figure:
    name: str  # file stem
    title: str
    how_to_read: str
    png: bytes


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise EplbError("eplb report draws with matplotlib; install it: pip install 'eplb[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def layer_bars(layer_ids: list[int], scores: dict[str, torch.Tensor], fitted_on: str) -> Figure:
    """Per-layer max/mean GPU load of each algorithm's plan (``scores``: name -> ``[L]``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / max(len(scores), 1)
    x = torch.arange(len(layer_ids), dtype=torch.float64)
    floor = 1e-5  # excess shown on a log axis: 1.0003 and 2.5 must both be readable
    for i, (name, values) in enumerate(scores.items()):
        ax.bar((x + i * width - 0.4 + width / 2).tolist(), (values - 1).clamp(min=floor).tolist(), width=width,
               label=f"{name} (mean {float(values.mean()):.4f})")
    ax.set_yscale("log")
    top = max(float(v.max()) - 1 for v in scores.values())
    ax.set_ylim(floor, max(top, floor) * 30)  # room for the legend above the bars
    step = max(1, len(layer_ids) // 20)
    ax.set_xticks(x[::step].tolist(), [str(i) for i in layer_ids[::step]])
    ax.set_xlabel("MoE layer (model layer id)")
    ax.set_ylabel("max / mean GPU load - 1 (log)")
    ax.legend(ncol=min(len(scores), 4), fontsize=8)
    ax.set_title(f"Per-layer balance of each algorithm's plan, scored on {fitted_on}")
    return Figure("layers", "Per-layer max/mean GPU load per algorithm",
                  "Each bar is how far one layer's busiest GPU is above its average GPU (0.01: 1% more load than "
                  "perfect balance), on a log scale so that 0.1% and 100% both show; the step waits for the "
                  "busiest GPU, so a tall bar is time lost in that layer. The legend gives the mean max/mean.",
                  _png(fig))


def heatmaps(layer_ids: list[int], before: torch.Tensor, after: torch.Tensor, before_name: str,
             after_name: str) -> Figure:
    """Per-GPU load ``[L, G]`` over the layer's mean, before and after, side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    rel = [t / t.mean(-1, keepdim=True).clamp(min=1e-300) for t in (before, after)]
    top = max(float(r.max()) for r in rel)
    for ax, r, name in zip(axes, rel, (before_name, after_name), strict=True):
        im = ax.imshow(r.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("GPU (rank)")
    step = max(1, len(layer_ids) // 15)
    axes[0].set_yticks(list(range(0, len(layer_ids), step)), [str(i) for i in layer_ids[::step]])
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes, label="GPU load / layer mean")
    return Figure("heatmap", f"Per-GPU load: {before_name} against {after_name}",
                  "Each row is a layer, each column a GPU; colour is that GPU's tokens over the layer's average. "
                  "A balanced placement is one even colour; bright cells are the GPUs everyone waits for.",
                  _png(fig))


def timeline(result: SimResult, policies: list[str] | None = None, title: str = "") -> Figure:
    """Per-step max/mean, step time and cumulative expert copies of ``policies`` (default: the first five),
    with phase switches and rebalances."""
    plt = _pyplot()
    names = policies or list(result.runs)[:5]
    unknown = [n for n in names if n not in result.runs]
    if unknown:
        raise EplbError(f"no policy {unknown[0]!r} in the result; choose from: {', '.join(result.runs)}")
    runs = {n: result.runs[n] for n in names}
    timed = any(run.step_us is not None for run in runs.values())
    rows = 3 if timed else 2
    fig, axes = plt.subplots(rows, 1, figsize=(12, 2.8 * rows), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, run) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        axes[0].plot(run.max_over_mean.tolist(), color=c, linewidth=1.0, label=name)
        steps = run.rebalances
        axes[0].plot(steps, run.max_over_mean[steps].tolist(), "v", color=c, markersize=4, linestyle="none")
        if timed and run.step_us is not None:
            axes[1].plot((run.step_us / 1e3).tolist(), color=c, linewidth=1.0)
        axes[-1].plot(run.copies.cumsum(0).clamp(min=1).tolist(), color=c, linewidth=1.2)
    for ax in axes:
        for s in result.setup.get("switches", []):
            ax.axvline(s, color="grey", linewidth=0.6, linestyle=":")
    axes[0].set_ylabel("max / mean GPU load")
    axes[0].legend(ncol=5, fontsize=8)
    if timed:
        axes[1].set_yscale("log")
        axes[1].set_ylabel("MoE time per step (ms, log)")
    axes[-1].set_yscale("log")
    axes[-1].set_ylabel("expert copies so far (log)")
    axes[-1].set_xlabel("step")
    axes[0].set_title(title or "Replay: balance, step time and expert copies per step")
    return Figure("timeline", "Replay timeline",
                  "Time runs left to right, one point per step; dotted lines are workload switches, triangles mark "
                  "where a policy decided to move experts. Top: the busiest GPU over the average (mean over "
                  "layers); middle: estimated MoE time of the step, stalls for weight copies included (the "
                  "spikes); bottom: expert weights copied so far (the oracles copy for free).", _png(fig))


def tradeoff(result: SimResult) -> Figure:
    """Time-averaged max/mean against expert copies, one point per policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, run in result.runs.items():
        s = run.summary()
        ax.scatter([max(s["copies"], 1)], [s["max_over_mean"]], s=30)
        ax.annotate(name, (max(s["copies"], 1), s["max_over_mean"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("expert copies over the replay (log scale; 1 = none)")
    ax.set_ylabel("time-averaged max / mean GPU load")
    ax.set_title("Balance against weights moved")
    return Figure("tradeoff", "Balance against moves",
                  "Each point is a policy: down is better balance, left is fewer expert weights copied. The oracles "
                  "switch for free, so their copies are not a cost; a real policy wants to be down and left.",
                  _png(fig))


def step_times(rows: list[dict[str, Any]]) -> Figure:
    """Mean MoE step time per policy for each (dispatch, waterfill) setting (``rows``: summary rows with
    ``dispatch`` and ``waterfill``)."""
    plt = _pyplot()
    settings = sorted({(r["dispatch"], bool(r["waterfill"])) for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(len(settings), 1)
    for i, (dispatch, waterfill) in enumerate(settings):
        values = [next((r["step_ms"] for r in rows if r["policy"] == p and r["dispatch"] == dispatch
                        and bool(r["waterfill"]) == waterfill), float("nan")) for p in policies]
        xs = [j + i * width - 0.4 + width / 2 for j in range(len(policies))]
        ax.bar(xs, values, width=width, label=f"dispatch {dispatch}, waterfill {'on' if waterfill else 'off'}")
    ideal = [r["ideal_step_ms"] for r in rows]
    ax.axhline(min(ideal), color="black", linewidth=0.8, linestyle="--", label="perfect balance")
    ax.set_xticks(list(range(len(policies))), policies)
    ax.set_ylabel("mean MoE time per step (ms)")
    low = min(r["step_ms"] for r in rows)
    ax.set_ylim(min(low, min(ideal)) * 0.95, None)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.set_title("Step time per policy with dispatch and waterfill on and off")
    return Figure("step_time", "Step time per policy, dispatch and waterfill",
                  "Bars are the mean estimated MoE time of a step (all layers) for each policy under each dispatch "
                  "rule and with the shared expert waterfilled or not; the dashed line is perfect balance. The gap "
                  "between bars of one policy is what that piece buys.", _png(fig))
