"""``WaterfillBalancer``: run the shared expert of each token on a less loaded EP rank.

In DeepSeek-style MoE every token also visits a shared expert. Run on the token's own rank, it
adds the same load to every rank, also to the one whose routed load is already the highest.
Waterfill makes the shared expert one more routed column of the top-k, so the EP dispatch sends
it where routed load is low: ``[M, K]`` becomes ``[M, K + 1]`` (``eplb.runtime.waterfill.layout`` has
the expanded slot numbering and where the shared expert's weights go).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch

from eplb.errors import EplbError
from eplb.loads import as_history
from eplb.placement import Placement
from eplb.runtime.hashing import layer_key, mix32_int
from eplb.runtime.waterfill import reference
from eplb.runtime.waterfill.layout import slots_per_rank
from eplb.runtime.waterfill.reference import MAX_EP_SIZE, Rule, Source

MODES = ("static", "dynamic")
CANDIDATES = ("routed", "all")
MOVES = ("excess", "all")
ESTIMATES = ("recorded", "batch")
BACKENDS = ("auto", "torch", "triton")
# Static loads are rescaled to integers summing to about this: fine enough for the weights
# (WEIGHT_BITS) and far from int64 overflow in the water level.
PRIOR_SCALE = 1 << 24
# The local preference is a fraction with a denominator up to this (SGLang's 11/10 is exact).
PREFERENCE_DENOMINATOR = 64
MAX_LOCAL_PREFERENCE = 16


def _whole(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise EplbError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def _choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise EplbError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


class WaterfillBalancer:
    """Expand one MoE layer's top-k with a shared-expert column sent to a less loaded EP rank.

    Args:
        num_routed_slots: ``P``, the routed (physical) expert slots over all EP ranks; the
            ids ``expand_topk`` reads are slot ids in ``[0, P)`` (after EPLB dispatch).
        ep_size: ``n_ep``, the EP ranks; must divide ``P``.
        rank: this rank, in ``[0, n_ep)``.
        routed_scaling_factor: the factor the MoE output is scaled by after the combine; the
            shared column gets weight ``1 / factor`` so that the shared expert counts once.
            ``None`` or 0: no scaling (weight 1).
        mode: ``"static"``: no collective; the rank loads are estimated from this batch's own
            routed counts and ``rank_load`` (from the EPLB placement and recorded statistics, see
            :meth:`from_placement` and ``estimate``) or, without it, from the batch alone.
            ``"dynamic"``: one all-reduce of every rank's routed counts and token count per call;
            every rank must call ``expand_topk`` on every step, also with an empty batch, or the
            group hangs.
        rank_load: static mode only: ``[n_ep]`` expected routed load per rank (any unit), e.g.
            ``placement.gpu_load(load)[layer]``.
        estimate: static mode with ``rank_load``: how this step's rank loads are estimated.
            ``"batch"`` (the default, unless ``prior_tokens`` is given): this batch's own counts
            per rank (SGLang's static rule, which evens out this rank's share of the step's
            fluctuation) plus the other ranks' expected excess above the recorded water level
            (``reference.recorded_excess``), so that no shared expert goes to a rank that is hot
            overall but light in this batch; ``docs/benchmarks/waterfill.md`` has the simulation
            that chose it. ``"recorded"``: from ``rank_load`` alone (fixed tables, no counting;
            see ``prior_tokens``).
        prior_tokens: static mode with ``rank_load`` and ``estimate="recorded"``: ``None``
            balances on ``rank_load`` alone; a number ``n`` balances on this batch's own counts
            plus ``rank_load`` scaled to ``n`` tokens, so a small batch leans on the recorded
            loads and a large one on itself (a Dirichlet prior worth ``n`` tokens).
        layer_id: the MoE layer, which varies the per-token hash between layers.
        seed: varies the hash between runs.
        candidates: ``"routed"``: a token's shared expert may go to its own rank or a rank it
            already routes to (no extra communication); ``"all"``: to any rank.
        min_batch: batches of fewer tokens keep the shared expert local (SGLang: 64).
        min_tile_tokens: a rank expected to receive fewer shared tokens than this over the whole
            step gets none (e.g. 128, a GEMM tile); 0 turns the rule off.
        local_preference: the own rank's weight relative to a remote one (SGLang: 11/10).
        move: which shared tokens may leave their rank. ``"excess"`` (the default where it
            applies: static mode with ``rank_load``, ``estimate="recorded"``, no ``prior_tokens``,
            no tile rule): a rank at or below the water level keeps all of them, one above keeps
            its fair share and sends the rest to the ranks with room (``reference.excess_weights``).
            ``"all"``: every token samples a rank in proportion to the deficits (SGLang's rule;
            the default elsewhere).
        group: dynamic mode: the ``torch.distributed`` EP group (default: the world).
        all_reduce: dynamic mode: a function that sums an int64 tensor over the EP ranks, in
            place or returning the sum, instead of ``torch.distributed.all_reduce`` (an engine's
            own collective, or an emulation in tests).
        backend: ``"auto"`` (the Triton kernel on CUDA, torch elsewhere), ``"torch"`` or
            ``"triton"`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).
        check_inputs: check that ids are below ``P`` (a device sync; skipped while a CUDA graph
            is being captured). Shapes and dtypes are always checked.

    ``expand_topk`` has no host syncs (with ``check_inputs=False`` or during capture) and keeps
    its buffers, so it can be captured in a CUDA graph after one warm-up call.
    """

    def __init__(
        self,
        num_routed_slots: int,
        ep_size: int,
        rank: int,
        routed_scaling_factor: float | None = None,
        mode: str = "static",
        *,
        rank_load: torch.Tensor | None = None,
        estimate: str | None = None,
        prior_tokens: int | None = None,
        layer_id: int = 0,
        seed: int = 0,
        candidates: str = "routed",
        min_batch: int = 64,
        min_tile_tokens: int = 0,
        local_preference: float = 1.1,
        move: str | None = None,
        group: Any = None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
        backend: str = "auto",
        check_inputs: bool = True,
    ) -> None:
        epr = slots_per_rank(num_routed_slots, ep_size)
        _whole("ep_size", ep_size, 1, MAX_EP_SIZE)
        _whole("rank", rank, 0, ep_size - 1)
        self.num_routed_slots = num_routed_slots
        self.ep_size = ep_size
        self.rank = rank
        self.mode = _choice("mode", mode, MODES)
        self.min_batch = _whole("min_batch", min_batch, 0)
        self.backend = _choice("backend", backend, BACKENDS)
        self.check_inputs = bool(check_inputs)
        self.group = group
        self._all_reduce = all_reduce
        if mode == "static" and (group is not None or all_reduce is not None):
            raise EplbError("static mode runs no collective; drop group / all_reduce or use mode='dynamic'")
        self._prior = None if rank_load is None else self._validate_rank_load(rank_load)
        if prior_tokens is not None:
            _whole("prior_tokens", prior_tokens, 0)
            if self._prior is None:
                raise EplbError("prior_tokens weighs the recorded rank loads; pass rank_load too, or drop prior_tokens")
        self.prior_tokens = prior_tokens
        self.estimate = self._validate_estimate(estimate)
        pref = self._validate_preference(local_preference)
        self.rule = Rule(
            ep_size=ep_size,
            slots_per_rank=epr,
            rank=rank,
            shared_weight=self._validate_scaling(routed_scaling_factor),
            key=mix32_int(layer_key(_whole("seed", seed, 0), _whole("layer_id", layer_id, 0)) ^ rank),
            all_ranks=_choice("candidates", candidates, CANDIDATES) == "all",
            local_weight=pref.numerator,
            remote_weight=pref.denominator,
            min_tile_tokens=_whole("min_tile_tokens", min_tile_tokens, 0),
        )
        self.move = self._validate_move(move)
        self._buffers: dict[tuple, torch.Tensor] = {}

    # Construction ------------------------------------------------------------------------

    @classmethod
    def from_placement(
        cls, placement: Placement, load: Any, *, layer: int, rank: int, **kwargs: Any
    ) -> WaterfillBalancer:
        """A static-mode balancer whose rank loads come from an EPLB placement and recorded loads.

        Args:
            placement: the placement in use; its GPUs are the EP ranks and its slots the routed slots.
            load: logical loads ``[L, E]`` or a history ``[T, L, E]`` (summed over ``T``), e.g.
                the recorder's statistics.
            layer: the MoE layer (index into ``L``); also the hash's ``layer_id``.
            rank: this rank.
            kwargs: any other setting of the constructor.
        """
        history = as_history(load)
        if not 0 <= layer < placement.num_layers:
            raise EplbError(f"layer {layer} is outside [0, {placement.num_layers}); pass a layer of the placement")
        rank_load = placement.gpu_load(history.sum(0))[layer]
        return cls(placement.num_slots, placement.num_gpus, rank, rank_load=rank_load, layer_id=layer, **kwargs)

    def _validate_rank_load(self, rank_load: Any) -> torch.Tensor:
        if self.mode != "static":
            raise EplbError("rank_load is the static mode's load estimate; drop it or use mode='static'")
        load = torch.as_tensor(rank_load).detach().to("cpu", torch.float64)
        if load.shape != (self.ep_size,):
            raise EplbError(
                f"rank_load has shape {tuple(load.shape)}; pass one load per EP rank, shape ({self.ep_size},)"
            )
        if not torch.isfinite(load).all() or (load < 0).any():
            raise EplbError("rank_load has negative, NaN or infinite entries; pass non-negative token counts")
        if load.sum() <= 0:
            raise EplbError(
                "rank_load sums to 0 (a dense layer?); pass the recorded loads of an MoE layer, or None to "
                "balance on each batch's own counts"
            )
        return torch.round(load / load.sum() * PRIOR_SCALE).to(torch.int64)

    def _validate_estimate(self, estimate: Any) -> str | None:
        if self._prior is None:
            if estimate is not None:
                raise EplbError("estimate chooses how the recorded rank loads are used; pass rank_load too, or drop it")
            return None
        if estimate is None:
            return "recorded" if self.prior_tokens is not None else "batch"
        if _choice("estimate", estimate, ESTIMATES) == "batch" and self.prior_tokens is not None:
            raise EplbError(
                "prior_tokens blends the batch into estimate='recorded'; drop prior_tokens or use estimate='recorded'"
            )
        return estimate

    @property
    def _fixed_tables(self) -> bool:
        """Fixed loads without the tile rule give fixed rank tables, built once per top-k width."""
        return self.estimate == "recorded" and self.prior_tokens is None and self.rule.min_tile_tokens == 0

    def _validate_move(self, move: Any) -> str:
        fixed = self._fixed_tables
        if move is None:
            return "excess" if fixed else "all"
        if _choice("move", move, MOVES) == "excess" and not fixed:
            raise EplbError(
                "move='excess' needs fixed recorded loads: static mode with rank_load and estimate='recorded', "
                "without prior_tokens and min_tile_tokens; drop those settings or use move='all'"
            )
        return move

    @staticmethod
    def _validate_scaling(factor: Any) -> float:
        if factor is None or factor == 0:
            return 1.0
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 0:
            raise EplbError(f"routed_scaling_factor must be a positive finite number (or 0/None: none), got {factor!r}")
        return 1.0 / float(factor)

    @staticmethod
    def _validate_preference(value: Any) -> Fraction:
        number = not isinstance(value, bool) and isinstance(value, (int, float, Fraction))
        if not number or not 1 <= value <= MAX_LOCAL_PREFERENCE:
            raise EplbError(
                f"local_preference must be a number in [1, {MAX_LOCAL_PREFERENCE}] (1: no preference), got {value!r}"
            )
        return Fraction(value).limit_denominator(PREFERENCE_DENOMINATOR)

    # Layout ------------------------------------------------------------------------------

    @property
    def slots_per_rank(self) -> int:
        """``epr``: routed slots per rank (the expanded layout has ``epr + 1``)."""
        return self.rule.slots_per_rank

    @property
    def num_expanded_slots(self) -> int:
        """``P + n_ep``: the expert count the EP dispatch sees after expansion."""
        return self.num_routed_slots + self.ep_size

    @property
    def shared_weight(self) -> float:
        return self.rule.shared_weight

    # The step ----------------------------------------------------------------------------

    def expand_topk(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each token's shared-expert column.

        Args:
            topk_ids: ``[M, K]`` int32/int64 routed slot ids in ``[0, P)``, negative for padding
                (any router: softmax or grouped top-k, hash routing).
            topk_weights: ``[M, K]`` floating routed weights.

        Returns:
            ``ids [M, K + 1]`` in the expanded layout (routed ``p -> p + p // epr``, then the
            chosen rank's shared slot, or ``-1`` for a token without routed entries) and
            ``weights [M, K + 1]`` (padded entries 0, then ``1 / routed_scaling_factor``, or 0).
            Both conventions give the right output: the expert kernel or the combine may apply
            the weights.
        """
        ids, weights = self._checked(topk_ids, topk_weights)
        local_only = ids.shape[0] < self.min_batch
        if self.mode == "dynamic":
            # Counted and all-reduced also for an empty or small batch: every rank must join.
            return self._run(ids, weights, self.global_counts(ids), Source.GLOBAL, local_only)
        if self._prior is None:
            return self._run(ids, weights, None, Source.BATCH, local_only)
        if self._fixed_tables:
            return self._run(ids, weights, None, Source.PRIOR, local_only)
        if self.estimate == "batch":
            return self._run(ids, weights, self._excess(ids.shape[1], ids.device), Source.BATCH_OFFSET, local_only)
        source = Source.PRIOR if self.prior_tokens is None else Source.BATCH
        return self._run(ids, weights, self._prior_loads(ids.shape[1], ids.device), source, local_only)

    def local_counts(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """``[n_ep + 1]`` int64: this batch's routed entries per rank, then its tokens (dynamic mode's
        contribution to the all-reduce)."""
        ids = topk_ids.contiguous()
        if self._use_triton(ids):
            from eplb.runtime.waterfill.kernel import local_counts_triton

            return local_counts_triton(ids, self.slots_per_rank, self.ep_size)
        return reference.local_counts(ids, self.slots_per_rank, self.ep_size)

    def global_counts(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """The all-reduce of :meth:`local_counts` over the EP group (dynamic mode)."""
        counts = self.local_counts(topk_ids)
        if self._all_reduce is not None:
            summed = self._all_reduce(counts)
            return counts if summed is None else summed
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise EplbError(
                "dynamic mode needs an initialised torch.distributed process group; call "
                "init_process_group first or pass all_reduce=..."
            )
        dist.all_reduce(counts, group=self.group)
        return counts

    def expand_topk_global(
        self, topk_ids: torch.Tensor, topk_weights: torch.Tensor, global_counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`expand_topk` of dynamic mode, given the all-reduced counts ``[n_ep + 1]`` (for an
        engine that runs its own collective, or to emulate EP in one process)."""
        ids, weights = self._checked(topk_ids, topk_weights)
        if global_counts.shape != (self.ep_size + 1,) or global_counts.dtype != torch.int64:
            raise EplbError(
                f"global_counts must be int64 of shape ({self.ep_size + 1},), got {global_counts.dtype} "
                f"{tuple(global_counts.shape)}; pass the all-reduce of local_counts()"
            )
        return self._run(ids, weights, global_counts.to(ids.device), Source.GLOBAL, ids.shape[0] < self.min_batch)

    # Internals ---------------------------------------------------------------------------

    def _checked(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(topk_ids, torch.Tensor) or not isinstance(topk_weights, torch.Tensor):
            raise EplbError("topk_ids and topk_weights must be torch tensors; pass the router's top-k output")
        if topk_ids.ndim != 2 or topk_ids.shape[1] < 1 or topk_weights.shape != topk_ids.shape:
            raise EplbError(
                f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be "
                "[tokens, k] with k >= 1; pass the router's top-k output"
            )
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise EplbError(f"topk_ids has dtype {topk_ids.dtype}; pass int32 or int64 slot ids")
        if not topk_weights.dtype.is_floating_point:
            raise EplbError(f"topk_weights has dtype {topk_weights.dtype}; pass floating-point weights")
        if topk_ids.device != topk_weights.device:
            raise EplbError(
                f"topk_ids is on {topk_ids.device} but topk_weights on {topk_weights.device}; use one device"
            )
        capturing = topk_ids.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.check_inputs and not capturing and topk_ids.numel() and int(topk_ids.max()) >= self.num_routed_slots:
            raise EplbError(
                f"topk_ids holds slot {int(topk_ids.max())} but there are {self.num_routed_slots} routed slots; "
                "pass physical slot ids (after EPLB dispatch) in [0, num_routed_slots)"
            )
        return topk_ids.contiguous(), topk_weights.contiguous()

    def _use_triton(self, ids: torch.Tensor) -> bool:
        if self.backend == "auto":
            if not ids.is_cuda:
                return False
            try:
                import triton  # noqa: F401
            except ImportError:
                return False
            return True
        return self.backend == "triton"

    def _buffer(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        # Built once per key, so that CUDA-graph replays read the same memory.
        if key not in self._buffers:
            self._buffers[key] = make()
        return self._buffers[key]

    def _prior_loads_cpu(self, k: int) -> torch.Tensor:
        """``[W + 1]``: the recorded rank loads and their shared load, or, with ``prior_tokens``,
        the same scaled to pseudo-counts of that many tokens."""
        prior = self._prior
        if self.prior_tokens is not None:
            # prior sums to PRIOR_SCALE; as pseudo-counts it sums to prior_tokens * k entries.
            prior = torch.round(prior.double() * (self.prior_tokens * k / PRIOR_SCALE)).to(torch.int64)
        # Each token has k routed entries and one shared, so the shared load is the routed total / k.
        return torch.cat([prior, (prior.sum() // k).reshape(1)])

    def _prior_loads(self, k: int, device: torch.device) -> torch.Tensor:
        return self._buffer(("prior", k, device), lambda: self._prior_loads_cpu(k).to(device))

    def _excess(self, k: int, device: torch.device) -> torch.Tensor:
        """``[W + 1]`` ``reference.recorded_excess`` of the recorded loads (``estimate="batch"``)."""
        return self._buffer(
            ("excess", k, device), lambda: reference.recorded_excess(self._prior_loads_cpu(k), self.ep_size).to(device)
        )

    def _tables(self, k: int, device: torch.device) -> torch.Tensor:
        """``[2, W]`` fixed ``reference.rank_tables`` of the recorded loads, built on the host."""

        def make() -> torch.Tensor:
            loads = self._prior_loads_cpu(k)
            if self.move == "excess":
                weights = reference.excess_weights(loads, self.rank)
            else:
                weights = reference.rank_weights(loads, loads[-1], 0)
            return reference.rank_tables(weights, loads, self.rule).to(device)

        return self._buffer(("tables", k, device), make)

    def _run(self, ids, weights, loads, source: Source, local_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        device = ids.device
        tables = self._tables(ids.shape[1], device) if self._fixed_tables else None
        if self._use_triton(ids):
            from eplb.runtime.waterfill.kernel import sync_size, waterfill_triton

            shared_weight = self._buffer(
                ("shared_weight", weights.dtype, device),
                lambda: torch.full((1,), self.rule.shared_weight, dtype=weights.dtype, device=device),
            )
            if tables is not None:
                return waterfill_triton(ids, weights, None, shared_weight, source, self.rule, local_only, tables,
                                        fixed_tables=True)
            # The kernel builds the tables from this step's loads into scratch, and where the
            # source counts the batch, uses the rest as the grid's counters.
            w = self.ep_size
            scratch = self._buffer(
                ("scratch", device), lambda: torch.zeros(2 * w + sync_size(w), dtype=torch.int64, device=device)
            )
            return waterfill_triton(ids, weights, loads, shared_weight, source, self.rule, local_only,
                                    scratch[: 2 * w].view(2, w), sync=scratch[2 * w :])
        if local_only:
            return reference.expand(ids, weights, self.rank, self.rule)
        return reference.waterfill_torch(ids, weights, loads, source, self.rule, tables)

    def __repr__(self) -> str:
        if self.mode == "dynamic":
            source = "dynamic"
        else:
            source = "static, batch counts" if self._prior is None else f"static, estimate={self.estimate}"
        return (
            f"WaterfillBalancer(slots={self.num_routed_slots}, ep_size={self.ep_size}, rank={self.rank}, "
            f"{source}, move={self.move}, candidates={'all' if self.rule.all_ranks else 'routed'})"
        )
