"""``EPMoE``: one MoE layer on one expert-parallel rank, the readable reference of the EP path.

A forward step on every rank of the EP group (data-parallel attention in front: each rank has
its own tokens ``[M, H]``, ``M`` may differ between ranks and be 0):

1. route: logical top-k ``ids [M, K]`` and ``weights [M, K]`` (``eplb.runtime.moe.router``);
2. dispatch: logical -> physical slot ids (``eplb.runtime.dispatch``), recorded by the optional
   ``ExpertLoadRecorder``;
3. waterfill (optional): one more column per token, the shared expert on some rank's extra slot
   (``eplb.runtime.waterfill``), so slot ids are in the expanded ``[P + W]`` numbering;
4. exchange: counts per destination rank, then one row of ``x`` per routed entry, and its local
   slot id (``all_to_all_single`` with variable splits; ``eplb.runtime.moe.exchange``);
5. experts: the received rows grouped by local slot, one SwiGLU per slot;
6. exchange back, then combine on the token's own rank: ``routed_scaling_factor`` times the
   weighted sum of its entries, plus the shared expert computed locally (without waterfill).

It is written for correctness and reading, not speed: it sends one row per routed entry (engines
send a token once per destination rank), syncs with the host for the split sizes, and loops over
local slots. Inference only (no autograd through the exchange).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.runtime.dispatch import HashDispatch, StaticDispatch, WeightedDispatch
from eplb.runtime.moe.config import EPMoEConfig
from eplb.runtime.moe.dense import check_expert_weights, swiglu
from eplb.runtime.moe.exchange import exchange_counts, exchange_rows
from eplb.runtime.moe.router import route, routing_dtype


class EPMoE(torch.nn.Module):
    """One MoE layer on one EP rank; every rank of ``group`` must call ``forward`` on every step.

    Args:
        config: the layer's config (``config.dtype`` is the weights' dtype).
        placement: the expert placement; its GPUs are the ranks of ``group`` and row ``layer`` is used.
        layer: this MoE layer's index, a row of the placement (and of the recorder).
        weights: this rank's local slots, ``{"w13": [S, 2I, H], "w2": [S, H, I]}`` (``S =
            placement.slots_per_gpu``; ``local_slot_weights`` builds them), any ``Mapping`` of
            tensors, e.g. ``ExpertWeights.tensors(layer)`` of ``eplb.runtime.migration``. The
            tensors are kept by reference: weights moved in place by the migration code are seen
            by the next step.
        router_params: ``{"gate": [E, H]}`` (softmax), plus ``"bias": [E]`` (grouped); ``{}`` (hash).
        shared: the shared expert ``{"w13": [2Is, H], "w2": [H, Is]}`` (every rank holds it), or None.
        load: recorded logical loads ``[L, E]`` or ``[T, L, E]``; needed by ``dispatch="weighted"``
            (replica weights) and used by static-mode waterfill (``WaterfillBalancer.from_placement``).
        recorder: an ``ExpertLoadRecorder`` over the placement's ``P`` slots; each step records the
            physical top-k ``[M, K]`` at ``layer``. None: no recording.
        waterfill_config: ``WaterfillConfig`` of the balancer (``config.waterfill`` only; default
            ``WaterfillConfig()``); its ``routed_scaling_factor`` is taken from ``config``.
        group: the EP process group (None: the world).

    Attributes:
        last_slot_tokens: ``[S]`` (``[S + 1]`` with waterfill, the shared slot last) int64, the routed
            entries this rank's local slots computed in the last step.
    """

    def __init__(
        self,
        config: EPMoEConfig,
        placement: Placement,
        layer: int,
        weights: Mapping[str, torch.Tensor],
        router_params: Mapping[str, torch.Tensor],
        shared: Mapping[str, torch.Tensor] | None = None,
        *,
        load: Any = None,
        recorder: Any = None,
        waterfill_config: Any = None,
        group: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, EPMoEConfig):
            raise EplbError(f"config must be an EPMoEConfig, got {type(config).__name__}; build one with its sizes")
        if not dist.is_available() or not dist.is_initialized():
            raise EplbError("EPMoE exchanges tokens over torch.distributed; call init_process_group first")
        self.config = config
        self.layer = layer
        self.group = group
        self.rank = dist.get_rank(group)
        self.ep_size = dist.get_world_size(group)
        self.router_params = router_params
        self.recorder = recorder
        if config.shared_expert:
            check_expert_weights(shared, None, config.shared_size, config.hidden, "shared")
        elif shared is not None:
            raise EplbError("shared expert weights were given but config.shared_expert is False; drop one")
        self.shared = shared
        self.waterfill_config = self._waterfill_config(waterfill_config) if config.waterfill else None
        self.last_slot_tokens = torch.zeros(0, dtype=torch.int64)
        self.set_placement(placement, load, weights=weights)

    # Placement changes ---------------------------------------------------------------------

    def set_placement(
        self, placement: Placement, load: Any = None, *, weights: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Switch to ``placement``: rebuild the dispatch tables (and the waterfill balancer).

        Call it only after this layer's weights hold ``placement``'s experts on every rank (the
        migration code moved them in place and committed, or pass the new tensors as ``weights``),
        and on every rank before the group's next step: a rank that dispatches with the new
        tables while its peers' slots still hold the old experts computes the wrong experts.

        Args:
            placement: the new placement (same GPUs, slots per GPU and experts).
            load: recorded logical loads (see the class), for the new tables; required by
                ``dispatch="weighted"``.
            weights: the local slot tensors of the new placement; None keeps the current ones.
        """
        self._check_placement(placement)
        weights = self.weights if weights is None else weights
        check_expert_weights(weights, placement.slots_per_gpu, self.config.intermediate, self.config.hidden,
                             "weights")
        if weights["w13"].dtype != self.config.dtype:
            raise EplbError(
                f"the local weights are {weights['w13'].dtype} but config.dtype is {self.config.dtype}; "
                "convert them or fix config.dtype"
            )
        # Both built before either is replaced, so that a bad argument leaves the layer as it was.
        dispatch = self._dispatch(placement, load, weights["w13"].device)
        balancer = self._balancer(placement, load) if self.config.waterfill else None
        self.dispatch, self.balancer, self.placement, self.weights = dispatch, balancer, placement, weights

    def _check_placement(self, placement: Placement) -> None:
        if not isinstance(placement, Placement):
            raise EplbError(f"expected a Placement, got {type(placement).__name__}; build one with eplb.plan(...)")
        if placement.num_gpus != self.ep_size:
            raise EplbError(
                f"the placement is for {placement.num_gpus} GPUs but the EP group has {self.ep_size} ranks; "
                "plan for the group's size"
            )
        if placement.num_experts != self.config.num_experts:
            raise EplbError(
                f"the placement has {placement.num_experts} experts but config.num_experts is "
                f"{self.config.num_experts}; plan for the model's experts"
            )
        if not 0 <= self.layer < placement.num_layers:
            raise EplbError(f"layer {self.layer} is outside the placement's {placement.num_layers} layers; pass a row")
        if getattr(self, "placement", None) is not None and placement.slots_per_gpu != self.placement.slots_per_gpu:
            raise EplbError(
                f"the new placement has {placement.slots_per_gpu} slots per GPU, the layer "
                f"{self.placement.slots_per_gpu}; keep the slot count (the weights' leading dim)"
            )

    def _dispatch(self, placement: Placement, load: Any, device: torch.device) -> Any:
        kind, seed = self.config.dispatch, self.config.seed
        if kind == "static":
            return StaticDispatch(placement, self.rank, device=device)
        if kind == "hash":
            return HashDispatch(placement, seed=seed, device=device)
        if load is None:
            raise EplbError("dispatch='weighted' solves replica weights from recorded loads; pass load=[L, E]")
        return WeightedDispatch.from_load(placement, load, seed=seed, device=device)

    def _waterfill_config(self, given: Any) -> Any:
        from eplb.runtime.waterfill import WaterfillConfig

        given = WaterfillConfig() if given is None else given
        if not isinstance(given, WaterfillConfig):
            raise EplbError(f"waterfill_config must be a WaterfillConfig, got {type(given).__name__}")
        factor = self.config.routed_scaling_factor
        if given.routed_scaling_factor not in (None, factor):
            raise EplbError(
                f"waterfill_config.routed_scaling_factor={given.routed_scaling_factor} differs from the layer's "
                f"{factor}; leave it None (the layer sets it)"
            )
        return dataclasses.replace(given, routed_scaling_factor=factor)

    def _balancer(self, placement: Placement, load: Any) -> Any:
        from eplb.runtime.waterfill import WaterfillBalancer

        cfg = self.waterfill_config
        if cfg.mode == "dynamic":
            return WaterfillBalancer(placement.num_slots, self.ep_size, self.rank, cfg, layer_id=self.layer,
                                     group=self.group)
        if load is None:
            return WaterfillBalancer(placement.num_slots, self.ep_size, self.rank, cfg, layer_id=self.layer)
        return WaterfillBalancer.from_placement(placement, load, layer=self.layer, rank=self.rank, config=cfg)

    # The step ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output for this rank's tokens (a collective: every rank calls it, also with ``M = 0``).

        Args:
            x: ``[M, H]`` hidden states on the weights' device.
            token_ids: ``[M]`` vocabulary ids (hash router only).

        Returns:
            ``[M, H]`` in ``x``'s dtype; equals ``dense_moe`` on the same tokens.
        """
        cfg = self.config
        w13 = self.weights["w13"]
        if not isinstance(x, torch.Tensor) or x.dtype != w13.dtype or x.device != w13.device:
            got = f"{x.dtype} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise EplbError(f"x is {got} but the weights are {w13.dtype} on {w13.device}; move or cast x")
        ids, weights = route(x, self.router_params, cfg, layer=self.layer, token_ids=token_ids)
        slots = self.dispatch.remap(self.layer, ids)
        if self.recorder is not None:
            self.recorder.record_topk(self.layer, slots)
        slots_per_rank = self.placement.slots_per_gpu
        if self.balancer is not None:
            slots, weights = self.balancer.expand_topk(slots, weights)
            slots_per_rank += 1  # the shared expert's slot, after the routed ones
        out = self._routed(x, slots, weights, slots_per_rank)
        out *= cfg.routed_scaling_factor
        if cfg.shared_expert and self.balancer is None:
            out += swiglu(x, self.shared["w13"], self.shared["w2"])
        return out.to(x.dtype)

    def _routed(
        self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int
    ) -> torch.Tensor:
        """``[M, H]``: the weighted sum of every entry's expert output, exchanged over the group.

        Args:
            x: ``[M, H]``.
            slots: ``[M, C]`` slot ids, rank ``r`` holding ``[r * slots_per_rank, (r + 1) * slots_per_rank)``;
                negative ids (padding) are skipped.
            weights: ``[M, C]`` combine weights.
            slots_per_rank: slots per rank in the numbering of ``slots``.
        """
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(slots.shape[1])
        slot, weight = slots.reshape(-1).long(), weights.reshape(-1)
        kept = slot >= 0
        token, slot, weight = token[kept], slot[kept], weight[kept]
        # A stable sort by destination keeps each peer's rows in token order.
        order = torch.argsort(slot // slots_per_rank, stable=True)
        token, slot, weight = token[order], slot[order], weight[order]
        send = torch.bincount(slot // slots_per_rank, minlength=self.ep_size)
        recv = exchange_counts(send, self.group)
        send_counts, recv_counts = send.tolist(), recv.tolist()
        rows = exchange_rows(x[token], send_counts, recv_counts, self.group)
        local = exchange_rows(slot % slots_per_rank, send_counts, recv_counts, self.group)
        done = self._experts(rows, local, slots_per_rank)
        back = exchange_rows(done, recv_counts, send_counts, self.group)
        out = torch.zeros(x.shape, dtype=routing_dtype(x.dtype), device=x.device)
        return out.index_add_(0, token, weight.unsqueeze(1) * back)

    def _experts(self, rows: torch.Tensor, local: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
        """Each received row through its local slot's expert: ``[N, H]`` rows, ``[N]`` local slot ids."""
        counts = torch.bincount(local, minlength=slots_per_rank)
        self.last_slot_tokens = counts
        out = torch.empty_like(rows)
        routed = self.placement.slots_per_gpu
        for slot, index in enumerate(torch.argsort(local, stable=True).split(counts.tolist())):
            if index.numel() == 0:
                continue
            # With waterfill the slot after the routed ones is this rank's copy of the shared expert.
            expert = self.shared if slot == routed else {name: self.weights[name][slot] for name in ("w13", "w2")}
            out[index] = swiglu(rows[index], expert["w13"], expert["w2"])
        return out

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"layer={self.layer}, rank={self.rank}/{self.ep_size}, experts={cfg.num_experts}, top_k={cfg.top_k}, "
            f"slots_per_rank={self.placement.slots_per_gpu}, router={cfg.router}, dispatch={cfg.dispatch}, "
            f"waterfill={cfg.waterfill}"
        )
