"""How balanced a placement is for a given load.

Every metric is per layer; ``BalanceReport.summary()`` averages over the layers that carry
load (dense layers, all-zero in recorded files, would otherwise pull every average to 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from eplb.cluster import check_sizes, is_count
from eplb.errors import EplbError
from eplb.loads import as_layer_load, normalized

if TYPE_CHECKING:  # Placement computes its GPU loads with gpu_totals below
    from eplb.placement import Placement


def gpu_totals(slot_values: torch.Tensor, slots_per_gpu: int) -> torch.Tensor:
    """``[..., G]``: per-GPU sums of per-slot values ``[..., P]`` (slot ``p`` lives on GPU ``p // (P / G)``)."""
    num_slots = slot_values.shape[-1]
    if not is_count(slots_per_gpu) or num_slots % slots_per_gpu != 0:
        raise EplbError(
            f"{num_slots} slots cannot be split into GPUs of {slots_per_gpu} slots; "
            f"pass slots_per_gpu = P / G, a divisor of {num_slots}"
        )
    return slot_values.unflatten(-1, (num_slots // slots_per_gpu, slots_per_gpu)).sum(-1)


def balancedness(gpu_load: torch.Tensor) -> torch.Tensor:
    """``[...]``: mean / max of per-GPU loads ``[..., G]`` (SGLang's and vLLM's metric: 1 is perfect,
    ``1 / balancedness`` is max/mean); a row without load gives 1."""
    peak = gpu_load.amax(-1)
    return torch.where(peak > 0, gpu_load.mean(-1) / torch.where(peak > 0, peak, 1), 1.0)


def mean_max_over_mean(gpu_load: torch.Tensor) -> float:
    """Max / mean of per-GPU loads ``[..., G]``, averaged over the rows with load (``1.0`` if none).

    Over a history ``[T, L, G]`` this is what a run costs: each step waits for its busiest GPU, so
    every step and layer is scored on its own before averaging.
    """
    peak, mean = gpu_load.amax(-1), gpu_load.mean(-1)
    loaded = peak > 0
    return float((peak[loaded] / mean[loaded]).mean()) if bool(loaded.any()) else 1.0


def lower_bound(load: torch.Tensor, num_gpus: int, num_slots: int) -> torch.Tensor:
    """``[L]``: a lower bound on the max GPU load any placement can reach.

    ``max(total / G, min over replica counts c (sum c = P, c >= 1) of max_e load_e / c_e)``.
    The second term is found exactly by bisection on the threshold ``t``: the fewest replicas
    that keep every replica at or under ``t`` are ``max(1, ceil(load_e / t))``.

    Args:
        load: ``[L, E]`` (or ``[T, L, E]``, summed over ``T``) non-negative loads.
        num_gpus: ``G``.
        num_slots: ``P``, a multiple of ``G`` and ``>= E``.
    """
    load = as_layer_load(load)
    check_sizes(num_gpus, num_slots, num_experts=load.shape[1])
    lo = torch.zeros(load.shape[0], 1, dtype=torch.float64)
    hi = load.amax(dim=1, keepdim=True)
    scratch = torch.empty_like(load)  # one [L, E] buffer for every round (a hot path of online planning)
    for _ in range(64):
        mid = (lo + hi) / 2
        feasible = _replicas_needed_per_expert(load, mid, scratch).sum(1, keepdim=True) <= num_slots
        hi = torch.where(feasible, mid, hi)
        lo = torch.where(feasible, lo, mid)
    counts = _replicas_needed_per_expert(load, hi)
    replica_bound = (load / counts).amax(dim=1)
    return torch.maximum(replica_bound, load.sum(1) / num_gpus)


def _replicas_needed_per_expert(load: torch.Tensor, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[L, E]`` the fewest replicas keeping each of ``load``'s under the per-layer threshold ``t [L, 1]``:
    ``max(1, ceil(load / t))``, and 1 where ``t <= 0``; computed in ``out`` (like ``load``) when given."""
    positive = t > 0
    need = torch.div(load, torch.where(positive, t, 1.0), out=out).ceil_().clamp_(min=1)
    return need.masked_fill_(~positive, 1.0)


def duplicates(placement: Placement) -> torch.Tensor:
    """``[L]`` int64: replicas that share a GPU with another replica of the same expert.

    Such a replica wastes a slot: it adds no capacity the first one did not have.
    """
    local = placement.phy2log.view(placement.num_layers, placement.num_gpus, placement.slots_per_gpu)
    ordered = local.sort(dim=-1).values
    repeat = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    return repeat.sum(dim=(1, 2))


@dataclass(frozen=True)
class BalanceReport:
    """Per-layer balance of a placement under a load; every field is a ``[L]`` tensor.

    - ``balancedness``: mean / max GPU load (SGLang's and vLLM's metric; 1 is perfect);
    - ``imbalance``: (max - mean) / mean (TensorRT-LLM's; 0 is perfect);
    - ``max_load`` / ``mean_load``: GPU loads;
    - ``lower_bound``: see :func:`lower_bound`; ``gap``: max_load / lower_bound - 1;
    - ``duplicates``: see :func:`duplicates`;
    - ``loaded``: which layers carry load (dense layers do not).
    """

    balancedness: torch.Tensor
    imbalance: torch.Tensor
    max_load: torch.Tensor
    mean_load: torch.Tensor
    lower_bound: torch.Tensor
    gap: torch.Tensor
    duplicates: torch.Tensor
    loaded: torch.Tensor

    @property
    def max_over_mean(self) -> torch.Tensor:
        """``[L]``: max / mean GPU load, ``1 / balancedness`` (1 is perfect)."""
        return 1.0 / self.balancedness

    def layer_mean(self, values: torch.Tensor) -> float:
        """The mean of a per-layer value ``[L]`` over the layers with load (over all, if none has any)."""
        return float(values[self._scored].mean())

    @property
    def _scored(self) -> torch.Tensor:
        return self.loaded if bool(self.loaded.any()) else torch.ones_like(self.loaded)

    def summary(self) -> dict[str, float]:
        """Means over loaded layers, plus the worst layer's max/mean and the total duplicates."""
        return {
            "balancedness": self.layer_mean(self.balancedness),
            "max_over_mean": self.layer_mean(self.max_over_mean),
            "worst_max_over_mean": float(self.max_over_mean[self._scored].max()),
            "imbalance": self.layer_mean(self.imbalance),
            "gap": self.layer_mean(self.gap),
            "max_gap": float(self.gap[self._scored].max()),
            "duplicates": int(self.duplicates.sum()),
        }


def evaluate(placement: Placement, load: torch.Tensor) -> BalanceReport:
    """Score ``placement`` on ``load`` (``[L, E]``, or ``[T, L, E]`` summed over ``T``)."""
    load = as_layer_load(load)
    gpu = placement.gpu_load(load)
    max_load = gpu.amax(dim=1)
    mean_load = gpu.mean(dim=1)
    loaded = max_load > 0
    # The ratios on loads scaled per layer (exact): subnormal or huge loads keep their precision.
    scaled = normalized(load)
    gpu = placement.gpu_load(scaled)
    peak, mean = gpu.amax(dim=1), gpu.mean(dim=1)
    bound = lower_bound(scaled, placement.num_gpus, placement.num_slots)
    return BalanceReport(
        balancedness=_ratio(mean, peak, loaded, empty=1.0),
        imbalance=_ratio(peak - mean, mean, loaded, empty=0.0),
        max_load=max_load,
        mean_load=mean_load,
        lower_bound=bound * (max_load / torch.where(loaded, peak, 1.0)),
        gap=_ratio(peak, bound, loaded, empty=1.0) - 1.0,
        duplicates=duplicates(placement),
        loaded=loaded,
    )


def _ratio(num: torch.Tensor, den: torch.Tensor, loaded: torch.Tensor, empty: float) -> torch.Tensor:
    """``num / den`` on loaded layers, ``empty`` on layers without load."""
    return torch.where(loaded, num / torch.where(loaded, den, 1.0), empty)

