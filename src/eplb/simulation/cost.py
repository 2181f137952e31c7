"""The time model of one MoE step: grouped-GEMM time from a measured table, dispatch/combine and weight
migration from bytes per link.

GEMM: one rank's routed experts run as one grouped GEMM (SwiGLU: ``x @ w13`` ``[2I, H]``, act, ``@ w2``
``[H, I]``). Its time depends on the activated experts ``a`` on the rank and the tokens per activated expert
``t``: decode batches are weight-load bound, so a rank that activates more experts pays more even at equal
tokens. ``benchmarks/bench_gemm_cost.py`` measures it on a GPU over a grid of ``(a, t)`` and writes
``eplb/data/gemm_cost_<device>.json``; ``GemmTable`` interpolates it (bilinear, linear extrapolation past
the largest grid point), made monotone in both ``a`` and ``t`` when loaded: timing noise only adds time,
so a point above a later (larger) one is lowered to it, along each axis in turn. Tokens spread unevenly
over a rank's experts are modelled as spread evenly (the table's shape).

Links (defaults, per GPU and per direction; configurable):

- NVLink within a node: 450 GB/s (NVIDIA H200 SXM datasheet: NVLink 900 GB/s, counted over both
  directions);
- between nodes: 50 GB/s, one 400 Gb/s ConnectX-7 InfiniBand NIC per GPU (NVIDIA DGX H200 datasheet).

These are link peaks; achieved all-to-all bandwidth is lower, so the communication times are optimistic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from eplb.errors import EplbError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_DEVICE = "h200"
BENCH = "benchmarks/bench_gemm_cost.py"

NVLINK_GBPS = 450.0
INTER_NODE_GBPS = 50.0


def table_path(device: str = DEFAULT_DEVICE) -> Path:
    """Where the measured table of ``device`` lives (``eplb/data/gemm_cost_<device>.json``)."""
    return DATA_DIR / f"gemm_cost_{device}.json"


@dataclass(frozen=True, eq=False)
class GemmTable:
    """Measured grouped-GEMM time of one rank on a grid, for one dtype.

    Attributes:
        experts: ``[A]`` ascending activated-expert counts of the grid (``>= 1``).
        tokens: ``[B]`` ascending tokens per activated expert of the grid (``> 0``).
        time_us: ``[A, B]`` microseconds, made monotone in both axes.
        meta: what the file says of the measurement (device, torch, command, date, dtype).
    """

    experts: torch.Tensor
    tokens: torch.Tensor
    time_us: torch.Tensor
    meta: dict[str, Any]

    @classmethod
    def from_grid(cls, experts: Any, tokens: Any, time_us: Any, meta: dict[str, Any] | None = None) -> GemmTable:
        """Validate a grid and make it monotone (see the module doc)."""
        try:
            a = torch.as_tensor(experts, dtype=torch.float64)
            t = torch.as_tensor(tokens, dtype=torch.float64)
            us = torch.as_tensor(time_us, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise EplbError(f"the GEMM cost table is malformed ({exc}); re-measure it with {BENCH}") from None
        if a.ndim != 1 or t.ndim != 1 or us.shape != (a.numel(), t.numel()) or a.numel() < 2 or t.numel() < 2:
            raise EplbError(
                f"the GEMM cost table needs >= 2 expert counts, >= 2 token counts and time_us [experts, tokens], "
                f"got {tuple(a.shape)}, {tuple(t.shape)}, {tuple(us.shape)}; re-measure it with {BENCH}"
            )
        if not (bool((a[1:] > a[:-1]).all()) and bool((t[1:] > t[:-1]).all()) and a[0] >= 1 and t[0] > 0):
            raise EplbError(f"the GEMM cost table's grid must be ascending and positive; re-measure it with {BENCH}")
        if not bool(torch.isfinite(us).all()) or bool((us <= 0).any()):
            raise EplbError(f"the GEMM cost table has non-positive or non-finite times; re-measure it with {BENCH}")
        us = _lower_envelope(_lower_envelope(us, 1), 0)
        return cls(a, t, us, dict(meta or {}))

    @classmethod
    def load(cls, path: str | Path | None = None, dtype: str = "bf16") -> GemmTable:
        """Read the table for ``dtype`` (``"bf16"``, ``"fp8"``) from ``path`` (default: the shipped H200 one).

        Raises EplbError when the file is missing: the time model is measured, never guessed.
        """
        path = Path(path) if path is not None else table_path()
        if not path.is_file():
            raise EplbError(
                f"no GEMM cost table at {path}: the time model needs measured GEMM times; run "
                f"`python {BENCH} --out {path}` on the GPU you serve with (or simulate without the time model)"
            )
        try:
            data = json.loads(path.read_text())
            grid = data["dtypes"][dtype]
        except (OSError, ValueError) as exc:
            raise EplbError(f"cannot read the GEMM cost table {path} ({exc}); re-measure it with {BENCH}") from None
        except (KeyError, TypeError):
            have = sorted(data.get("dtypes", {})) if isinstance(data, dict) else []
            raise EplbError(f"{path} has no {dtype!r} table (it has {have}); pick one or re-measure with {BENCH}") \
                from None
        meta = {k: v for k, v in data.items() if k != "dtypes"} | {"dtype": dtype, "path": str(path)}
        return cls.from_grid(data["experts"], data["tokens_per_expert"], grid["time_us"], meta)

    def __call__(self, experts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Microseconds for ``experts`` activated experts with ``tokens`` tokens each (same shapes, any);
        0 where no expert is activated."""
        a = torch.as_tensor(experts, dtype=torch.float64)
        t = torch.as_tensor(tokens, dtype=torch.float64)
        ia, wa = _bracket(self.experts, a)
        it, wt = _bracket(self.tokens, t.clamp(min=float(self.tokens[0])))
        us = self.time_us
        lo = us[ia, it] + wt * (us[ia, it + 1] - us[ia, it])
        hi = us[ia + 1, it] + wt * (us[ia + 1, it + 1] - us[ia + 1, it])
        out = lo + wa * (hi - lo)
        return torch.where(a > 0, out.clamp(min=0.0), 0.0)


def _lower_envelope(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The largest non-decreasing lower bound of ``x`` along ``dim`` (each entry: the min of it and every later one)."""
    return torch.cummin(x.flip(dim), dim).values.flip(dim)


def _bracket(grid: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index ``i`` of the grid segment ``[grid[i], grid[i + 1]]`` for each ``x`` and the weight of its right
    end; past the last point the last segment extends (linear extrapolation), below the first it clamps."""
    i = (torch.searchsorted(grid, x.contiguous(), right=True) - 1).clamp(0, grid.numel() - 2)
    left, right = grid[i], grid[i + 1]
    return i, ((x - left) / (right - left)).clamp(min=0.0)


@dataclass(frozen=True)
class CostModel:
    """Step-time model of the MoE layers (see the module doc for the sources of the defaults).

    Args:
        table: the GEMM cost table file (default: the shipped ``gemm_cost_h200.json``).
        dtype: the expert weights' dtype in the table, ``"bf16"`` or ``"fp8"``.
        hidden: model hidden size ``H`` (DeepSeek-V3: 7168).
        intermediate: expert intermediate size ``I`` (DeepSeek-V3: 2048).
        dispatch_bytes: bytes of one token sent to one rank (fp8 hidden plus one fp32 scale per 128).
        combine_bytes: bytes of one token's result sent back (bf16 hidden).
        nvlink_gbps: intra-node bandwidth per GPU and direction, GB/s.
        inter_node_gbps: inter-node bandwidth per GPU and direction, GB/s.
        shared_experts: shared experts every token also runs (DeepSeek-V3: 1).
    """

    table: str | None = None
    dtype: str = "bf16"
    hidden: int = 7168
    intermediate: int = 2048
    dispatch_bytes: int = 7168 + 7168 // 128 * 4
    combine_bytes: int = 7168 * 2
    nvlink_gbps: float = NVLINK_GBPS
    inter_node_gbps: float = INTER_NODE_GBPS
    shared_experts: int = 1

    def __post_init__(self) -> None:
        for name in ("nvlink_gbps", "inter_node_gbps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise EplbError(f"{name} must be a positive bandwidth in GB/s, got {value!r}")

    @cached_property
    def gemm(self) -> GemmTable:
        return GemmTable.load(self.table, self.dtype)

    @property
    def bytes_per_expert(self) -> int:
        """Weight bytes of one expert (``w13`` and ``w2``: ``3 * H * I`` parameters)."""
        return 3 * self.hidden * self.intermediate * (1 if self.dtype == "fp8" else 2)

    def link_us(self, intra_bytes: torch.Tensor, inter_bytes: torch.Tensor) -> torch.Tensor:
        """Microseconds to move ``intra_bytes`` over NVLink and ``inter_bytes`` between nodes, at the same time
        (separate links: the slower one sets the time)."""
        return torch.maximum(intra_bytes / (self.nvlink_gbps * 1e3), inter_bytes / (self.inter_node_gbps * 1e3))

    def comm_us(self, rank_tokens: torch.Tensor, num_nodes: int) -> torch.Tensor:
        """``[...]``: dispatch plus combine microseconds of a layer from ``rank_tokens [..., G]`` (token-expert
        pairs each rank receives). Sources are spread evenly over the ranks (data-parallel attention), so a
        share ``(N - 1) / N`` comes from other nodes; the busiest rank's links set the time. Tokens are not
        deduplicated per rank (DeepEP sends a token once per rank): an upper bound on the bytes."""
        remote = (num_nodes - 1) / num_nodes
        per_rank = rank_tokens * (self.dispatch_bytes + self.combine_bytes)
        return self.link_us(per_rank * (1 - remote), per_rank * remote).amax(-1)

    def gemm_us(self, rank_tokens: torch.Tensor, rank_experts: torch.Tensor) -> torch.Tensor:
        """``[..., G]``: grouped-GEMM microseconds of each rank with ``rank_tokens`` token-expert pairs over
        ``rank_experts`` activated experts."""
        tokens = rank_tokens / rank_experts.clamp(min=1)
        return self.gemm(rank_experts, tokens)


def describe(model: CostModel) -> str:
    """One line on where the model's numbers come from."""
    meta = model.gemm.meta
    return (f"GEMM table {meta.get('path')} ({meta.get('dtype')}, measured on {meta.get('device', '?')} "
            f"with torch {meta.get('torch', '?')}, {meta.get('date', '?')}); NVLink {model.nvlink_gbps:g} GB/s, "
            f"inter-node {model.inter_node_gbps:g} GB/s per GPU and direction")
