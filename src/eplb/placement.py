"""The data model: where every physical expert slot lives and which logical expert it holds.

Vocabulary (shapes use L layers, E logical experts, P physical slots, G GPUs, N nodes):

- logical expert: an expert of the model checkpoint, id in ``[0, E)``;
- physical expert (slot): a place for one expert's weights on a GPU, id in ``[0, P)``.
  Slot ``p`` lives on GPU ``p // (P / G)``; GPU ``g`` lives on node ``g // (G / N)``;
- replica: a slot holding a given logical expert; ``logcnt[l, e]`` counts them;
- ``phy2log [L, P]``: the logical expert held by each slot (``-1`` marks an empty slot,
  which only the static ``round_robin`` layout produces, to spread a remainder);
- ``log2phy [L, E, X]``: the slots of each expert in ascending order, padded with ``-1``;
- ``logcnt [L, E]``: replicas per expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from eplb.cluster import ClusterSizes, check_sizes, is_count, require_count
from eplb.errors import EplbError
from eplb.metrics import gpu_totals

EMPTY_SLOT = -1


@dataclass(frozen=True, eq=False)
class Placement(ClusterSizes):
    """An expert placement for every MoE layer.

    Args:
        phy2log: ``[L, P]`` integer tensor, the logical expert held by each physical slot,
            or ``-1`` for an empty slot.
        num_experts: ``E``, the number of logical experts per layer.
        num_gpus: ``G``; must divide ``P``.
        num_nodes: ``N``; must divide ``G``.
        algorithm: the name of the algorithm that produced it (metadata only).

    Every logical expert must have at least one replica in every layer. The tensor is
    stored as int64 on the CPU; the derived maps are computed on first use.
    """

    phy2log: torch.Tensor
    num_experts: int
    num_gpus: int
    num_nodes: int = 1
    algorithm: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        phy2log = torch.as_tensor(self.phy2log)
        if phy2log.dtype.is_floating_point or phy2log.dtype == torch.bool:
            raise EplbError(f"phy2log must hold integer expert ids, got dtype {phy2log.dtype}; pass an integer tensor")
        # A private copy: the caller's tensor may change later, and the derived maps are cached.
        object.__setattr__(self, "phy2log", phy2log.detach().to("cpu", torch.int64, copy=True).contiguous())
        self._validate()

    def _validate(self) -> None:
        m = self.phy2log
        if m.ndim != 2 or m.numel() == 0:
            raise EplbError(f"phy2log must be a non-empty [layers, slots] tensor, got shape {tuple(m.shape)}")
        require_count("num_experts", self.num_experts, fix="pass the model's logical expert count")
        check_sizes(self.num_gpus, m.shape[1], self.num_nodes, self.num_experts)
        if int(m.min()) < EMPTY_SLOT or int(m.max()) >= self.num_experts:
            raise EplbError(
                f"phy2log holds ids outside [-1, {self.num_experts}) (min {int(m.min())}, max {int(m.max())}); "
                "every slot must hold a logical expert id or -1 for an empty slot"
            )
        missing = self.logcnt == 0
        if missing.any():
            layer, expert = (int(i) for i in missing.nonzero()[0])
            raise EplbError(
                f"logical expert {expert} of layer {layer} has no replica "
                f"({int(missing.sum())} (layer, expert) pairs in all); every expert needs at least one slot"
            )

    # Sizes -----------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def slot_gpu(self) -> torch.Tensor:
        """``[P]``: the GPU of each slot."""
        return torch.arange(self.num_slots) // self.slots_per_gpu

    @property
    def slot_node(self) -> torch.Tensor:
        """``[P]``: the node of each slot."""
        return self.slot_gpu // self.gpus_per_node

    # Derived maps ----------------------------------------------------------------------

    @cached_property
    def logcnt(self) -> torch.Tensor:
        """``[L, E]`` int64: replicas per logical expert."""
        cnt = torch.zeros(self.num_layers, self.num_experts + 1, dtype=torch.int64)
        # Empty slots (-1) are counted in the extra last column and dropped.
        cnt.scatter_add_(1, self.phy2log % (self.num_experts + 1), torch.ones_like(self.phy2log))
        return cnt[:, : self.num_experts]

    @cached_property
    def log2phy(self) -> torch.Tensor:
        """``[L, E, X]`` int64: the slots of each expert in ascending slot order, ``-1`` padded."""
        width = int(self.logcnt.max())
        key = torch.where(self.phy2log >= 0, self.phy2log, self.num_experts)
        # A stable sort by expert id lists each expert's slots in ascending order.
        order = torch.sort(key, dim=1, stable=True).indices
        sorted_expert = key.gather(1, order)
        first = torch.cumsum(self.logcnt, dim=1) - self.logcnt
        held = sorted_expert < self.num_experts
        first_of_slot = first.gather(1, sorted_expert.clamp(max=self.num_experts - 1))
        rank = torch.arange(self.num_slots).expand_as(order) - first_of_slot
        out = torch.full((self.num_layers, self.num_experts * width + 1), EMPTY_SLOT, dtype=torch.int64)
        dest = torch.where(held, sorted_expert * width + rank, self.num_experts * width)
        out.scatter_(1, dest, torch.where(held, order, EMPTY_SLOT))
        return out[:, :-1].reshape(self.num_layers, self.num_experts, width)

    def expert_map(self, rank: int) -> torch.Tensor:
        """``[L, E]`` int64: for GPU ``rank``, the local slot holding each checkpoint expert, or ``-1``.

        This is the map a weight loader and a router share: expert ``e`` of layer ``l`` is loaded
        into local slot ``expert_map(rank)[l, e]`` (the first one, if the GPU holds ``e`` twice;
        :meth:`local_experts` lists every local slot). Both come from ``phy2log``, so loading and
        routing agree by construction.
        """
        require_count("rank", rank, 0, self.num_gpus - 1, fix="pass a GPU index of this placement")
        local = self.local_experts(rank)
        s = self.slots_per_gpu
        out = torch.full((self.num_layers, self.num_experts + 1), s, dtype=torch.int64)
        slots = torch.arange(s).expand_as(local)
        # scatter_ leaves the winner of repeated indices undefined; amin keeps the first local slot.
        target = torch.where(local >= 0, local, self.num_experts)
        out.scatter_reduce_(1, target, slots, reduce="amin")
        out = out[:, : self.num_experts]
        return torch.where(out < s, out, EMPTY_SLOT)

    def local_experts(self, rank: int) -> torch.Tensor:
        """``[L, P / G]``: the logical expert held by each local slot of GPU ``rank`` (``-1``: empty)."""
        s = self.slots_per_gpu
        return self.phy2log[:, rank * s : (rank + 1) * s]

    # Loads -----------------------------------------------------------------------------

    def slot_load(self, load: torch.Tensor) -> torch.Tensor:
        """Per-slot load ``[..., L, P]`` for a logical load ``[..., L, E]``.

        An expert's load is split evenly over its replicas; empty slots get zero.
        """
        load = torch.as_tensor(load)
        if load.shape[-2:] != (self.num_layers, self.num_experts):
            raise EplbError(
                f"load has shape {tuple(load.shape)} but the placement is for "
                f"{self.num_layers} layers x {self.num_experts} experts; pass a [..., L, E] load that matches"
            )
        load = load.to(torch.float64)
        per_replica = load / self.logcnt.clamp(min=1)
        held = self.phy2log.clamp(min=0).expand(*load.shape[:-2], -1, -1)
        out = per_replica.gather(-1, held)
        return torch.where(self.phy2log >= 0, out, 0.0)

    def gpu_load(self, load: torch.Tensor) -> torch.Tensor:
        """Per-GPU load ``[..., L, G]`` for a logical load ``[..., L, E]``."""
        return gpu_totals(self.slot_load(load), self.slots_per_gpu)

    # Plain data ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return {
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "num_slots": self.num_slots,
            "num_gpus": self.num_gpus,
            "num_nodes": self.num_nodes,
            "algorithm": self.algorithm,
            "phy2log": self.phy2log.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placement:
        if not isinstance(data, dict):
            raise EplbError(f"placement data is a {type(data).__name__}, not a dict; write it with Placement.to_dict()")
        try:
            # No dtype: a float id must fail validation, not be truncated to an expert id.
            phy2log = torch.tensor(data["phy2log"])
            # As stored: validation rejects 4.7 GPUs rather than truncating it to 4.
            num_experts, num_gpus = data["num_experts"], data["num_gpus"]
            num_nodes = data.get("num_nodes", 1)
        except KeyError as missing:
            raise EplbError(f"placement data lacks the key {missing}; write it with Placement.to_dict()") from None
        except (TypeError, ValueError, RuntimeError) as exc:
            raise EplbError(f"placement data is malformed ({exc}); write it with Placement.to_dict()") from None
        for key, value in (("num_experts", num_experts), ("num_gpus", num_gpus), ("num_nodes", num_nodes)):
            if not is_count(value):
                raise EplbError(f"placement data is malformed ({key} is {value!r}, not a positive integer); "
                                "write it with Placement.to_dict()")
        placement = cls(phy2log, num_experts, num_gpus, num_nodes, algorithm=str(data.get("algorithm", "")))
        for key in ("num_layers", "num_slots"):
            if key in data and data[key] != getattr(placement, key):
                raise EplbError(
                    f"placement data says {key}={data[key]} but phy2log gives {getattr(placement, key)}; fix the file"
                )
        return placement

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return (self.num_experts, self.num_gpus, self.num_nodes) == (
            other.num_experts, other.num_gpus, other.num_nodes
        ) and torch.equal(self.phy2log, other.phy2log)

    __hash__ = None  # type: ignore[assignment]  # mutable tensor inside

    def __repr__(self) -> str:
        return (
            f"Placement(layers={self.num_layers}, experts={self.num_experts}, slots={self.num_slots}, "
            f"gpus={self.num_gpus}, nodes={self.num_nodes}, algorithm={self.algorithm!r})"
        )


def check_same_shape(current: Placement, new: Placement) -> None:
    """Raise EplbError unless the two placements are for the same model and cluster."""
    for name in ("num_layers", "num_experts", "num_slots", "num_gpus", "num_nodes"):
        a, b = getattr(current, name), getattr(new, name)
        if a != b:
            raise EplbError(
                f"the placements differ in {name} ({a} vs {b}); compare placements of the same model and cluster"
            )
