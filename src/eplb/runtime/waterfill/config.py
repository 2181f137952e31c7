"""``WaterfillConfig``: the settings of a ``WaterfillBalancer``, and what they resolve to.

A config holds the knobs every MoE layer of a model shares (one config, one balancer per layer
and rank). A balancer resolves it once, with whether recorded rank loads were given, into:

- a ``Strategy``: where the rank loads of a step come from (``Source``) and what is built on the
  host once per top-k width to go with them (``HostInput``), so ``expand_topk`` only executes it;
- a ``reference.Rule``: the settings that decide each token's shared-expert rank, which the
  Triton kernel and its torch twin take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction
from typing import Any

from eplb.cluster import require_choice, require_count
from eplb.errors import EplbError
from eplb.runtime.backend import check_backend
from eplb.runtime.hashing import layer_key, mix32_int
from eplb.runtime.waterfill.reference import MAX_EP_SIZE, Rule, Source

MODES = ("static", "dynamic")
ESTIMATES = ("batch", "recorded")
CANDIDATES = ("routed", "all")
MOVES = ("excess", "all")
# The local preference is a fraction with a denominator up to this (SGLang's 11/10 is exact).
PREFERENCE_DENOMINATOR = 64
MAX_LOCAL_PREFERENCE = 16
_EXCESS_NEEDS = (
    "move='excess' needs fixed recorded loads: static mode with rank_load and estimate='recorded', "
    "without prior_tokens and min_tile_tokens; drop those settings or use move='all'"
)


def _preference(value: Any) -> Fraction:
    """``local_preference`` as the fraction the kernel weighs with."""
    number = not isinstance(value, bool) and isinstance(value, (int, float, Fraction))
    if not number or not 1 <= value <= MAX_LOCAL_PREFERENCE:
        raise EplbError(
            f"local_preference must be a number in [1, {MAX_LOCAL_PREFERENCE}] (1: no preference), got {value!r}"
        )
    return Fraction(value).limit_denominator(PREFERENCE_DENOMINATOR)


def _shared_weight(factor: Any) -> float:
    """The shared column's weight, ``1 / routed_scaling_factor`` (1 without a factor)."""
    if factor is None or factor == 0:
        return 1.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 0:
        raise EplbError(f"routed_scaling_factor must be a positive finite number (or 0/None: none), got {factor!r}")
    return 1.0 / float(factor)


@dataclass(frozen=True)
class WaterfillConfig:
    """The knobs of a ``WaterfillBalancer``; every bad value raises EplbError at construction.

    Attributes:
        mode: ``"static"``: no collective; the rank loads are estimated from this batch's own
            routed counts and the balancer's ``rank_load`` (from the EPLB placement and recorded
            statistics, see ``WaterfillBalancer.from_placement`` and ``estimate``) or, without
            it, from the batch alone. ``"dynamic"``: one all-reduce of every rank's routed counts
            and token count per call; every rank must call ``expand_topk`` on every step, also
            with an empty batch, or the group hangs.
        estimate: static mode with ``rank_load``: how a step's rank loads are estimated.
            ``"batch"`` (the default, unless ``prior_tokens`` is given): this batch's own counts
            per rank (SGLang's static rule, which evens out this rank's share of the step's
            fluctuation) plus the other ranks' expected excess above the recorded water level
            (``tables.recorded_excess``), so that no shared expert goes to a rank that is hot
            overall but light in this batch; ``docs/benchmarks/waterfill.md`` has the simulation
            that chose it. ``"recorded"``: from ``rank_load`` alone (fixed tables, no counting;
            see ``prior_tokens``). ``None``: the default.
        prior_tokens: static mode with ``rank_load`` and ``estimate="recorded"``: ``None``
            balances on ``rank_load`` alone; a number ``n`` balances on this batch's own counts
            plus ``rank_load`` scaled to ``n`` tokens, so a small batch leans on the recorded
            loads and a large one on itself (a Dirichlet prior worth ``n`` tokens).
        seed: varies the per-token hash between runs (the balancer's ``layer_id`` varies it
            between layers).
        candidates: ``"routed"``: a token's shared expert may go to its own rank or a rank it
            already routes to (no extra communication); ``"all"``: to any rank.
        min_batch: batches of fewer tokens keep the shared expert local (SGLang: 64).
        min_tile_tokens: a rank expected to receive fewer shared tokens than this over the whole
            step gets none (e.g. 128, a GEMM tile); 0 turns the rule off.
        local_preference: the own rank's weight relative to a remote one (SGLang: 11/10), a
            number in ``[1, 16]``, used as a fraction with a denominator up to 64.
        move: which shared tokens may leave their rank. ``"excess"`` (the default where it
            applies: static mode with ``rank_load``, ``estimate="recorded"``, no ``prior_tokens``,
            no tile rule): a rank at or below the water level keeps all of them, one above keeps
            its fair share and sends the rest to the ranks with room (``tables.excess_weights``).
            ``"all"``: every token samples a rank in proportion to the deficits (SGLang's rule;
            the default elsewhere). ``None``: the default.
        routed_scaling_factor: the factor the MoE output is scaled by after the combine; the
            shared column gets weight ``1 / factor`` so that the shared expert counts once.
            ``None`` or 0: no scaling (weight 1).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (the rule of ``eplb.runtime.backend``).
        check_inputs: check that ids are below ``P`` (a device sync; skipped while a CUDA graph
            is being captured). Shapes and dtypes are always checked.
    """

    mode: str = "static"
    estimate: str | None = None
    prior_tokens: int | None = None
    seed: int = 0
    candidates: str = "routed"
    min_batch: int = 64
    min_tile_tokens: int = 0
    local_preference: float | Fraction = 1.1
    move: str | None = None
    routed_scaling_factor: float | None = None
    backend: str = "auto"
    check_inputs: bool = True

    def __post_init__(self) -> None:
        require_choice("mode", self.mode, MODES)
        if self.estimate is not None:
            require_choice("estimate", self.estimate, ESTIMATES)
        if self.prior_tokens is not None:
            require_count("prior_tokens", self.prior_tokens, 0, fix="pass a token count, or None")
        if self.estimate == "batch" and self.prior_tokens is not None:
            raise EplbError(
                "prior_tokens blends the batch into estimate='recorded'; drop prior_tokens or use estimate='recorded'"
            )
        require_count("seed", self.seed, 0, fix="pass a non-negative integer")
        require_choice("candidates", self.candidates, CANDIDATES)
        require_count("min_batch", self.min_batch, 0, fix="pass 0 to balance every batch")
        require_count("min_tile_tokens", self.min_tile_tokens, 0, fix="pass 0 to turn the tile rule off")
        _preference(self.local_preference)
        _shared_weight(self.routed_scaling_factor)
        if self.move is not None:
            require_choice("move", self.move, MOVES)
        fixed_possible = self.mode == "static" and self.estimate != "batch"
        if self.move == "excess" and not (fixed_possible and self.prior_tokens is None and not self.min_tile_tokens):
            raise EplbError(_EXCESS_NEEDS)
        check_backend(self.backend)
        if not isinstance(self.check_inputs, bool):
            raise EplbError(f"check_inputs must be True or False, got {self.check_inputs!r}")

    def rule(self, ep_size: int, slots_per_rank: int, rank: int, layer_id: int) -> Rule:
        """The ``Rule`` of ``rank`` in MoE layer ``layer_id`` (checked here: the rank and layer)."""
        require_count("ep_size", ep_size, 1, MAX_EP_SIZE, fix="waterfill supports up to this many EP ranks")
        require_count("rank", rank, 0, ep_size - 1, fix="pass this GPU's expert-parallel rank")
        require_count("layer_id", layer_id, 0, fix="pass the MoE layer's index")
        pref = _preference(self.local_preference)
        return Rule(
            ep_size=ep_size,
            slots_per_rank=slots_per_rank,
            rank=rank,
            shared_weight=_shared_weight(self.routed_scaling_factor),
            key=mix32_int(layer_key(self.seed, layer_id) ^ rank),
            all_ranks=self.candidates == "all",
            local_weight=pref.numerator,
            remote_weight=pref.denominator,
            min_tile_tokens=self.min_tile_tokens,
        )

    def strategy(self, has_rank_load: bool) -> Strategy:
        """What ``expand_topk`` runs, with (``has_rank_load``) or without recorded rank loads; the
        defaults of ``estimate`` and ``move`` are resolved here."""
        if has_rank_load and self.mode != "static":
            raise EplbError("rank_load is the static mode's load estimate; drop it or use mode='static'")
        if not has_rank_load:
            for name in ("prior_tokens", "estimate"):
                if getattr(self, name) is not None:
                    raise EplbError(f"{name} weighs the recorded rank loads; pass rank_load too, or drop {name}")
            if self.move == "excess":
                raise EplbError(_EXCESS_NEEDS)
            source = Source.GLOBAL if self.mode == "dynamic" else Source.BATCH
            return Strategy(source, HostInput.NONE, estimate=None, move="all")
        estimate = self.estimate or ("recorded" if self.prior_tokens is not None else "batch")
        if estimate == "batch":
            return Strategy(Source.BATCH_OFFSET, HostInput.EXCESS, estimate, move="all")
        if self.prior_tokens is not None:
            # Pseudo-counts added to the batch's own.
            return Strategy(Source.BATCH, HostInput.LOADS, estimate, move="all", prior_tokens=self.prior_tokens)
        if self.min_tile_tokens:
            # The tile rule turns shares into token counts, so the tables depend on the batch size.
            return Strategy(Source.PRIOR, HostInput.LOADS, estimate, move="all")
        return Strategy(Source.PRIOR, HostInput.TABLES, estimate, move=self.move or "excess")


class HostInput(Enum):
    """What a balancer builds on the host once per top-k width and hands the kernel each step."""

    NONE = "none"  # nothing: the batch's own counts, or dynamic mode's all-reduced counts
    LOADS = "loads"  # tables.recorded_loads [W + 1]: the recorded loads (pseudo-counts with prior_tokens)
    EXCESS = "excess"  # tables.recorded_excess [W + 1]: the others' excess per token (estimate="batch")
    TABLES = "tables"  # tables.fixed_rank_tables [2, W]: the rank tables themselves (fixed loads)


@dataclass(frozen=True)
class Strategy:
    """A config resolved for one balancer: where each step's rank loads come from.

    Attributes:
        source: the ``Source`` the kernel and its torch twin take.
        host: what is built on the host once per top-k width to go with it.
        estimate: the resolved ``estimate`` (None without recorded loads).
        move: the resolved ``move`` (``"excess"`` only with fixed tables).
        prior_tokens: the recorded loads' weight in tokens (``HostInput.LOADS`` pseudo-counts), or None.
    """

    source: Source
    host: HostInput
    estimate: str | None
    move: str
    prior_tokens: int | None = None

    @property
    def fixed_tables(self) -> bool:
        """The rank tables are fixed: the kernel reads them and counts nothing."""
        return self.host is HostInput.TABLES
