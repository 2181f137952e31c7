"""What a simulation returns, and its JSON form (what ``eplb simulate --save`` writes and ``eplb report`` reads)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eplb.errors import EplbError
from eplb.io.atomic import atomic_write

FORMAT = "eplb-simulation/1"


@dataclass(eq=False)
class PolicyRun:
    """One policy over a scenario, per step (``T`` steps, ``L`` layers, ``G`` GPUs).

    Attributes:
        name: the policy.
        layer_max_over_mean: ``[T, L]`` max/mean GPU load of each layer (1 where a layer has no load).
        max_over_mean: ``[T]`` its mean over loaded layers (a step waits for the busiest GPU of each layer).
        copies: ``[T]`` expert copies that landed at each step (changed slots receiving an expert).
        bytes: ``[T]`` weight bytes those copies moved.
        stall_us: ``[T]`` microseconds the step waited on copies (sync: every copy; async: what the step's
            compute could not hide).
        step_us: ``[T]`` estimated MoE time of the step (all layers: dispatch + GEMM + combine, plus the
            stall); None without a time model.
        ideal_us: ``[T]`` the same with every GPU at the mean load (perfect balance), no stall.
        layer_us: ``[T, L]`` per-layer MoE time (no stall).
        rebalances: steps at which a decision to move was made.
        plan_calls: planner calls; plan_seconds: their CPU time.
        rank_tokens, rank_experts: ``[T, L, G]`` token-expert pairs and activated experts per GPU (kept on
            request).
    """

    name: str
    layer_max_over_mean: torch.Tensor
    copies: torch.Tensor
    bytes: torch.Tensor
    stall_us: torch.Tensor
    step_us: torch.Tensor | None = None
    ideal_us: torch.Tensor | None = None
    layer_us: torch.Tensor | None = None
    rebalances: list[int] = field(default_factory=list)
    plan_calls: int = 0
    plan_seconds: float = 0.0
    rank_tokens: torch.Tensor | None = None
    rank_experts: torch.Tensor | None = None
    loaded: torch.Tensor | None = None

    @property
    def max_over_mean(self) -> torch.Tensor:
        loaded = self.loaded if self.loaded is not None else torch.ones_like(self.layer_max_over_mean, dtype=bool)
        ratio = torch.where(loaded, self.layer_max_over_mean.double(), 0.0)
        return ratio.sum(1) / loaded.sum(1).clamp(min=1)

    def summary(self) -> dict[str, Any]:
        """Time-averaged max/mean, the worst step, copies and bytes, stall, step time and its ratio to perfect
        balance, planner calls."""
        mm = self.max_over_mean
        worst = int(mm.argmax())
        out: dict[str, Any] = {
            "policy": self.name,
            "max_over_mean": float(mm.mean()),
            "worst_step": worst,
            "worst_step_max_over_mean": float(mm[worst]),
            "copies": int(self.copies.sum()),
            "bytes": int(self.bytes.sum()),
            "stall_s": float(self.stall_us.sum()) / 1e6,
            "rebalances": len(self.rebalances),
            "plan_calls": self.plan_calls,
            "plan_seconds": self.plan_seconds,
        }
        if self.step_us is not None and self.ideal_us is not None:
            out["step_ms"] = float(self.step_us.mean()) / 1e3
            out["ideal_step_ms"] = float(self.ideal_us.mean()) / 1e3
            out["time_over_ideal"] = float(self.step_us.sum() / self.ideal_us.sum())
        return out


@dataclass(eq=False)
class SimResult:
    """Every policy's run over one scenario, and how it was set up.

    Attributes:
        runs: policy name -> ``PolicyRun``.
        setup: the scenario and cluster (names, switch steps, tokens per step, GPUs, cost model, ...).
        timing: wall seconds spent sampling, planning/deciding and evaluating.
    """

    runs: dict[str, PolicyRun]
    setup: dict[str, Any]
    timing: dict[str, float] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        return [run.summary() for run in self.runs.values()]

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (per-step series and per-layer max/mean; per-GPU detail is not saved)."""
        runs = []
        for run in self.runs.values():
            item: dict[str, Any] = {"name": run.name, "rebalances": run.rebalances, "plan_calls": run.plan_calls,
                                    "plan_seconds": run.plan_seconds}
            for key in ("layer_max_over_mean", "copies", "bytes", "stall_us", "step_us", "ideal_us", "layer_us",
                        "loaded"):
                value = getattr(run, key)
                item[key] = None if value is None else _rounded(value)
            runs.append(item)
        data = {"format": FORMAT, "setup": self.setup, "timing": self.timing, "runs": runs}
        path = Path(path)
        atomic_write(path, json.dumps(data).encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> SimResult:
        """Read what ``save`` wrote."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise EplbError(f"cannot read simulation result {path} ({exc}); write it with `eplb simulate --save`") \
                from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise EplbError(f"{path} is not an eplb simulation result ({FORMAT}); write it with `eplb simulate --save`")
        runs = {}
        for item in data["runs"]:
            tensors = {k: None if item.get(k) is None else torch.tensor(item[k])
                       for k in ("layer_max_over_mean", "copies", "bytes", "stall_us", "step_us", "ideal_us",
                                 "layer_us", "loaded")}
            tensors["loaded"] = None if tensors["loaded"] is None else tensors["loaded"].bool()
            runs[item["name"]] = PolicyRun(name=item["name"], rebalances=list(item["rebalances"]),
                                           plan_calls=int(item["plan_calls"]),
                                           plan_seconds=float(item["plan_seconds"]), **tensors)
        return cls(runs=runs, setup=data["setup"], timing=data.get("timing", {}))


def _rounded(t: torch.Tensor) -> Any:
    if t.dtype.is_floating_point:
        return [round(x, 6) for x in t.flatten().tolist()] if t.ndim == 1 else \
            [[round(x, 6) for x in row] for row in t.flatten(1).tolist()]
    return t.tolist()
