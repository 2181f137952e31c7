"""The dispatch policies: which physical replica each routed token goes to.

A policy holds its tables on the device, built once from a ``Placement``; ``remap(layer, ids)``
then maps the router's logical top-k ids to physical slots with fixed-shape device ops (a Triton
kernel on CUDA, torch elsewhere), so it can run inside a captured CUDA graph. The tables are
never reallocated: ``WeightedDispatch.set_probs`` rewrites them in place, and a captured graph
sees the new weights.
"""

from __future__ import annotations

from typing import Any

import torch

from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.runtime.backend import use_triton
from eplb.runtime.dispatch.alias import alias_table
from eplb.runtime.dispatch.reference import Mode, remap_torch
from eplb.runtime.hashing import layer_key
from eplb.runtime.host import upload


class _Dispatch:
    """The shared remap: subclasses set ``_mode`` and fill ``_slots [L, E, X]`` and, as their
    mode needs them, ``_counts [L, E]``, ``_threshold`` and ``_alias [L, E, X]`` (see
    ``remap_torch``); the tables a mode ignores are ``_slots`` itself."""

    _mode: Mode
    _slots: torch.Tensor
    _counts: torch.Tensor
    _threshold: torch.Tensor
    _alias: torch.Tensor

    def __init__(self, placement: Placement, seed: int, device: Any) -> None:
        if not isinstance(placement, Placement):
            raise EplbError(f"expected a Placement, got {type(placement).__name__}; build one with eplb.plan(...)")
        self.placement = placement
        # An allocation resolves "cuda" to "cuda:<current>", the device the router's ids report.
        self.device = torch.empty(0, device=device).device
        self._keys = [layer_key(seed, layer) for layer in range(placement.num_layers)]

    def remap(self, layer: int, topk_ids: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """Physical slots for the logical ids ``topk_ids`` of ``layer``.

        Args:
            layer: MoE layer index in ``[0, L)`` of the placement.
            topk_ids: ``[M, K]`` int32 or int64 logical expert ids in ``[0, E)`` on this
                dispatcher's device; negative ids (padding) map to ``-1``. Ids ``>= E`` are not
                checked (that would need a host sync).
            backend: ``"auto"``, ``"torch"`` or ``"triton"``: the rule of ``eplb.runtime.backend``
                (Triton for CUDA tensors when it imports; the interpreter on CPU under
                ``TRITON_INTERPRET=1``).

        Returns:
            ``[M, K]`` physical slot ids, same dtype and device as ``topk_ids``.
        """
        if not 0 <= layer < self.placement.num_layers:
            raise EplbError(
                f"layer {layer} is outside [0, {self.placement.num_layers}); pass a layer index of the placement"
            )
        if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in (torch.int32, torch.int64):
            got = topk_ids.dtype if isinstance(topk_ids, torch.Tensor) else type(topk_ids).__name__
            raise EplbError(f"topk_ids must be an int32 or int64 tensor, got {got}; pass the router's top-k ids")
        if topk_ids.device != self.device:
            raise EplbError(
                f"topk_ids is on {topk_ids.device} but the dispatch tables are on {self.device}; "
                f"build the dispatcher with device={str(topk_ids.device)!r}"
            )
        tables = (self._slots, self._counts, self._threshold, self._alias)
        args = (self._mode, topk_ids, *(table[layer] for table in tables), self._keys[layer])
        if use_triton(backend, topk_ids.device):
            from eplb.runtime.dispatch.kernel import remap_triton

            return remap_triton(*args)
        return remap_torch(*args)


class StaticDispatch(_Dispatch):
    """Each rank sends each expert to one fixed replica, the nearest one.

    A replica on the rank's own GPU wins, then one on its node; ranks with neither are spread
    evenly over all replicas. Ranks that share a choice level are dealt round-robin over the
    replicas of that level, so every replica gets an even share (within one) of the ranks
    that fall back to it. Unlike SGLang's ``static`` (first same-node replica; seeded random
    draw for remote ranks), this spreads the same-node fallback too and needs no RNG.

    Args:
        placement: the expert placement.
        rank: this GPU's index in ``[0, G)``.
        device: where the table lives (the device of the router's ids).
    """

    _mode = Mode.TABLE

    def __init__(self, placement: Placement, rank: int, device: Any = None) -> None:
        super().__init__(placement, 0, device)
        if not 0 <= rank < placement.num_gpus:
            raise EplbError(f"rank {rank} is outside [0, {placement.num_gpus}); pass this GPU's expert-parallel rank")
        self.rank = rank
        table = static_tables(placement)[rank]
        self._slots = upload(table.unsqueeze(-1).to(torch.int32), self.device)
        self._counts = self._slots[..., 0]
        self._threshold = self._alias = self._slots


class HashDispatch(_Dispatch):
    """Entry ``i`` of a layer goes to replica ``h(i, l) mod logcnt[l, e]`` of its expert.

    ``h`` is the counter hash of ``eplb.runtime.hashing``: it depends only on the entry's
    index in the flattened ``[M, K]`` ids, the layer and ``seed``, never on the rank, so every
    rank that holds the same batch makes the same choice, and the replicas of an expert share
    its tokens evenly.

    Args:
        placement: the expert placement.
        seed: selects the hash family; keep it equal on all ranks.
        device: where the tables live.
    """

    _mode = Mode.HASH

    def __init__(self, placement: Placement, seed: int = 0, device: Any = None) -> None:
        super().__init__(placement, seed, device)
        self._slots = upload(placement.log2phy.to(torch.int32), self.device)
        self._counts = upload(placement.logcnt.to(torch.int32), self.device)
        self._threshold = self._alias = self._slots


class WeightedDispatch(_Dispatch):
    """Entry ``i`` goes to replica ``x`` of its expert with probability ``probs[l, e, x]``.

    The draw is Walker's alias method (``eplb.runtime.dispatch.alias``) driven by the entry's hash
    ``h(i, l)`` (``eplb.runtime.hashing``): bucket ``h mod logcnt[l, e]``, then the bucket's
    own replica if ``h >> 8`` is below its integer threshold, else its alias. It costs the
    same whatever the number of replicas, and is reproducible, rank-invariant and CUDA-graph
    safe; probabilities are quantised to multiples of ``2**-24 / logcnt[l, e]``. With equal
    weights every bucket keeps its own replica, so the draw is exactly ``HashDispatch``'s.

    Args:
        placement: the expert placement.
        probs: ``[L, E, X]`` non-negative replica weights over ``placement.log2phy`` (zero on
            its ``-1`` padding); each expert's row is normalised to sum 1. See ``solve_weights``.
        seed: selects the hash family; keep it equal on all ranks.
        device: where the tables live.
    """

    _mode = Mode.WEIGHTED

    def __init__(self, placement: Placement, probs: Any, seed: int = 0, device: Any = None) -> None:
        super().__init__(placement, seed, device)
        self._slots = upload(placement.log2phy.to(torch.int32), self.device)
        self._counts = upload(placement.logcnt.to(torch.int32), self.device)
        self._threshold = torch.empty_like(self._slots)
        self._alias = torch.empty_like(self._slots)
        self.set_probs(probs)

    @classmethod
    def from_load(
        cls, placement: Placement, load: Any, seed: int = 0, device: Any = None, **solver: Any
    ) -> WeightedDispatch:
        """Weights that even out the GPU loads for ``load`` (``[L, E]`` or ``[T, L, E]``);
        ``solver`` is passed to ``solve_weights``."""
        from eplb.runtime.dispatch.solver import solve_weights

        return cls(placement, solve_weights(placement, load, **solver), seed=seed, device=device)

    def set_probs(self, probs: Any) -> None:
        """Replace the weights in place (graphs captured earlier use the new ones).

        The alias table is built on the CPU (tens of milliseconds at DeepSeek-V3 scale, see
        ``eplb.runtime.dispatch.alias``) and copied into the existing device tensors, whose addresses a
        captured graph holds.
        """
        threshold, alias = alias_table(self.placement, probs)
        upload(threshold, self.device, out=self._threshold)
        upload(alias, self.device, out=self._alias)


def static_tables(placement: Placement) -> torch.Tensor:
    """``[G, L, E]`` int64: the slot each rank sends each logical expert to (``StaticDispatch``).

    Level by level (same GPU, same node, anywhere), the ranks still without a choice are
    numbered ``j = 0, 1, ...`` in rank order and rank ``j`` takes the level's replica
    ``(j + e + l) mod n`` (``n`` replicas at that level; same-GPU takes the first). The
    ``e + l`` rotation moves the extra rank of an uneven split to a different replica for each
    expert, so no GPU collects all the remainders.
    """
    log2phy = placement.log2phy  # [L, E, X]
    num_layers, num_experts, _ = log2phy.shape
    held = log2phy >= 0
    slot_gpu = torch.where(held, log2phy, 0) // placement.slots_per_gpu
    ranks = torch.arange(placement.num_gpus).view(-1, 1, 1, 1)
    same_gpu = held & (slot_gpu == ranks)  # [G, L, E, X]
    same_node = held & (slot_gpu // placement.gpus_per_node == ranks // placement.gpus_per_node)
    anywhere = held.expand_as(same_gpu)
    rotation = torch.arange(num_layers).view(-1, 1) + torch.arange(num_experts)  # [L, E]

    choice = torch.full(same_gpu.shape[:-1], -1, dtype=torch.int64)  # replica index, [G, L, E]
    # (candidates, rank groups to number the open ranks in); two replicas on one GPU are equal.
    for candidates, groups in ((same_gpu, None), (same_node, placement.num_nodes), (anywhere, 1)):
        count = candidates.sum(-1)
        open_ = (choice < 0) & (count > 0)
        if groups is None:
            pick = torch.zeros_like(choice)
        else:
            pick = (_open_index(open_, groups) + rotation) % count.clamp(min=1)
        choice = torch.where(open_, _nth_true(candidates, pick), choice)
    return log2phy.expand(placement.num_gpus, -1, -1, -1).gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def _open_index(open_: torch.Tensor, groups: int) -> torch.Tensor:
    """``[G, L, E]``: how many open ranks precede each rank within its group of ``G / groups``
    consecutive ranks (a node, or all ranks)."""
    grouped = open_.long().view(groups, -1, *open_.shape[1:])
    return (grouped.cumsum(1) - grouped).view_as(open_)


def _nth_true(mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Index of the ``n``-th (0-based) True along the last dim of ``mask`` (0 if there is none)."""
    running = mask.long().cumsum(-1)
    hit = mask & (running == (n + 1).unsqueeze(-1))
    return hit.long().argmax(-1)
