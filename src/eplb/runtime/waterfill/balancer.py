"""``WaterfillBalancer``: run the shared expert of each token on a less loaded EP rank.

In DeepSeek-style MoE every token also visits a shared expert. Run on the token's own rank, it
adds the same load to every rank, also to the one whose routed load is already the highest.
Waterfill makes the shared expert one more routed column of the top-k, so the EP dispatch sends
it where routed load is low: ``[M, K]`` becomes ``[M, K + 1]`` (``eplb.runtime.waterfill.layout``
has the expanded slot numbering and where the shared expert's weights go).

The path of a step: ``expand_topk`` checks the ids, takes the rank loads its ``Strategy`` names
(all-reduced counts, or a host-built input of ``tables``, made once per top-k width) and hands
them to the Triton kernel (``kernel.waterfill_triton``) or its torch twin
(``reference.waterfill_torch``), which count, choose and expand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from eplb.errors import EplbError
from eplb.loads import as_history
from eplb.placement import Placement
from eplb.runtime.backend import use_triton
from eplb.runtime.host import upload
from eplb.runtime.waterfill import reference, tables
from eplb.runtime.waterfill.config import HostInput, WaterfillConfig
from eplb.runtime.waterfill.layout import slots_per_rank
from eplb.runtime.waterfill.reference import Source


class WaterfillBalancer:
    """Expand one MoE layer's top-k with a shared-expert column sent to a less loaded EP rank.

    Args:
        num_routed_slots: ``P``, the routed (physical) expert slots over all EP ranks; the
            ids ``expand_topk`` reads are slot ids in ``[0, P)`` (after EPLB dispatch).
        ep_size: ``n_ep``, the EP ranks; must divide ``P``.
        rank: this rank, in ``[0, n_ep)``.
        config: the settings (``WaterfillConfig``), shared by every layer and rank of a model.
        layer_id: the MoE layer, which varies the per-token hash between layers. An argument
            rather than a setting, so that one config serves every layer.
        rank_load: static mode only: ``[n_ep]`` expected routed load per rank (any unit), e.g.
            ``placement.gpu_load(load)[layer]`` (see :meth:`from_placement` and the config's
            ``estimate``).
        group: dynamic mode: the ``torch.distributed`` EP group (default: the world).
        all_reduce: dynamic mode: a function that sums an int64 tensor over the EP ranks, in
            place or returning the sum, instead of ``torch.distributed.all_reduce`` (an engine's
            own collective, or an emulation in tests).

    ``expand_topk`` has no host syncs (with ``check_inputs=False`` or during capture) and keeps
    its buffers, so it can be captured in a CUDA graph after one warm-up call.
    """

    def __init__(
        self,
        num_routed_slots: int,
        ep_size: int,
        rank: int,
        config: WaterfillConfig | None = None,
        *,
        layer_id: int = 0,
        rank_load: torch.Tensor | None = None,
        group: Any = None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ) -> None:
        config = WaterfillConfig() if config is None else config
        if not isinstance(config, WaterfillConfig):
            raise EplbError(f"config must be a WaterfillConfig, got {type(config).__name__}; build one with its knobs")
        self.config = config
        self.rule = config.rule(ep_size, slots_per_rank(num_routed_slots, ep_size), rank, layer_id)
        self.strategy = config.strategy(rank_load is not None)
        if config.mode == "static" and (group is not None or all_reduce is not None):
            raise EplbError("static mode runs no collective; drop group / all_reduce or use mode='dynamic'")
        self._prior = None if rank_load is None else tables.scaled_rank_load(rank_load, ep_size)
        self.num_routed_slots = num_routed_slots
        self.ep_size = ep_size
        self.rank = rank
        self.layer_id = layer_id
        self.group = group
        self._all_reduce = all_reduce
        self._buffers: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_placement(
        cls,
        placement: Placement,
        load: Any,
        *,
        layer: int,
        rank: int,
        config: WaterfillConfig | None = None,
        **runtime_args: Any,
    ) -> WaterfillBalancer:
        """A static-mode balancer whose rank loads come from an EPLB placement and recorded loads.

        Args:
            placement: the placement in use; its GPUs are the EP ranks and its slots the routed slots.
            load: logical loads ``[L, E]`` or a history ``[T, L, E]`` (summed over ``T``), e.g.
                the recorder's statistics.
            layer: the MoE layer (index into ``L``); also the hash's ``layer_id``.
            rank: this rank.
            config: the settings (default ``WaterfillConfig()``).
            runtime_args: any other keyword argument of the constructor.
        """
        history = as_history(load)
        if not 0 <= layer < placement.num_layers:
            raise EplbError(f"layer {layer} is outside [0, {placement.num_layers}); pass a layer of the placement")
        rank_load = placement.gpu_load(history.sum(0))[layer]
        return cls(placement.num_slots, placement.num_gpus, rank, config, layer_id=layer, rank_load=rank_load,
                   **runtime_args)

    # Settings ----------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def estimate(self) -> str | None:
        """The resolved ``estimate`` (None without ``rank_load``)."""
        return self.strategy.estimate

    @property
    def move(self) -> str:
        """The resolved ``move``."""
        return self.strategy.move

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
        if self.strategy.source == Source.GLOBAL:
            # Counted and all-reduced also for an empty or small batch: every rank must join.
            return self._run(ids, weights, self.global_counts(ids))
        return self._run(ids, weights, self._host_input(ids.shape[1], ids.device))

    def local_counts(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """``[n_ep + 1]`` int64: this batch's routed entries per rank, then its tokens (dynamic mode's
        contribution to the all-reduce)."""
        ids = topk_ids.contiguous()
        if use_triton(self.config.backend, ids.device):
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
        if self.strategy.source != Source.GLOBAL:
            raise EplbError("expand_topk_global is dynamic mode's step; call expand_topk, or use mode='dynamic'")
        ids, weights = self._checked(topk_ids, topk_weights)
        if global_counts.shape != (self.ep_size + 1,) or global_counts.dtype != torch.int64:
            raise EplbError(
                f"global_counts must be int64 of shape ({self.ep_size + 1},), got {global_counts.dtype} "
                f"{tuple(global_counts.shape)}; pass the all-reduce of local_counts()"
            )
        return self._run(ids, weights, global_counts.to(ids.device))

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
        if (self.config.check_inputs and not capturing and topk_ids.numel()
                and int(topk_ids.max()) >= self.num_routed_slots):
            raise EplbError(
                f"topk_ids holds slot {int(topk_ids.max())} but there are {self.num_routed_slots} routed slots; "
                "pass physical slot ids (after EPLB dispatch) in [0, num_routed_slots)"
            )
        return topk_ids.contiguous(), topk_weights.contiguous()

    def _buffer(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        # Built once per key, so that CUDA-graph replays read the same memory.
        if key not in self._buffers:
            self._buffers[key] = make()
        return self._buffers[key]

    def _host_input(self, k: int, device: torch.device) -> torch.Tensor | None:
        """The strategy's ``tables.host_input`` for top-k width ``k`` on ``device`` (None if it has none)."""
        host = self.strategy.host
        if host is HostInput.NONE:
            return None
        return self._buffer(
            (host, k, device), lambda: upload(tables.host_input(self.strategy, self._prior, k, self.rule), device)
        )

    def _run(
        self, ids: torch.Tensor, weights: torch.Tensor, given: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Count, choose and expand, with ``given``: the strategy's ``[W + 1]`` loads, its ``[2, W]``
        fixed tables (``strategy.fixed_tables``), or None (the batch's own counts)."""
        source, fixed = self.strategy.source, self.strategy.fixed_tables
        local_only = ids.shape[0] < self.config.min_batch
        if not use_triton(self.config.backend, ids.device):
            if local_only:
                return reference.expand(ids, weights, self.rank, self.rule)
            if fixed:
                return reference.waterfill_torch(ids, weights, None, source, self.rule, tables=given)
            return reference.waterfill_torch(ids, weights, given, source, self.rule)
        from eplb.runtime.waterfill.kernel import sync_size, waterfill_triton

        device = ids.device
        shared_weight = self._buffer(
            ("shared_weight", weights.dtype, device),
            lambda: torch.full((1,), self.rule.shared_weight, dtype=weights.dtype, device=device),
        )
        if fixed:
            return waterfill_triton(ids, weights, None, shared_weight, source, self.rule, local_only, given,
                                    fixed_tables=True)
        # The kernel builds the tables from this step's loads into scratch, and where the source
        # counts the batch, uses the rest as the grid's counters.
        w = self.ep_size
        scratch = self._buffer(
            ("scratch", device), lambda: torch.zeros(2 * w + sync_size(w), dtype=torch.int64, device=device)
        )
        return waterfill_triton(ids, weights, given, shared_weight, source, self.rule, local_only,
                                scratch[: 2 * w].view(2, w), sync=scratch[2 * w :])

    def __repr__(self) -> str:
        if self.mode == "dynamic":
            source = "dynamic"
        else:
            source = "static, batch counts" if self._prior is None else f"static, estimate={self.estimate}"
        return (
            f"WaterfillBalancer(slots={self.num_routed_slots}, ep_size={self.ep_size}, rank={self.rank}, "
            f"layer_id={self.layer_id}, {source}, move={self.move}, candidates={self.config.candidates})"
        )
