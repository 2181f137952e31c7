"""The expanded slot layout of waterfill: one shared-expert slot after each rank's routed slots.

With ``P`` routed slots over ``n_ep`` ranks, rank ``r`` holds routed slots
``[r * epr, (r + 1) * epr)`` (``epr = P / n_ep``, as in :class:`eplb.Placement`). Waterfill
turns the shared expert into one more routed expert: every rank gets one extra local slot,
after its routed ones, that holds a copy of the checkpoint's shared expert. In the expanded
``[P + n_ep]`` numbering, rank ``r`` holds slots ``[r * (epr + 1), (r + 1) * (epr + 1))``, its
routed slot ``j`` keeps local index ``j`` and its shared slot is local index ``epr``. So a routed
id ``p`` becomes ``p + p // epr`` and the shared copy of rank ``r`` is ``r * (epr + 1) + epr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from eplb.cluster import require_count
from eplb.errors import EplbError


def slots_per_rank(num_routed_slots: int, ep_size: int) -> int:
    """``epr = P / n_ep``, the routed slots of each rank; raises EplbError unless it is whole."""
    require_count("num_routed_slots", num_routed_slots, fix="pass the routed slots over all EP ranks")
    require_count("ep_size", ep_size, fix="pass the EP group's size")
    if num_routed_slots % ep_size != 0:
        raise EplbError(
            f"{num_routed_slots} routed slots cannot be split evenly over {ep_size} EP ranks; "
            f"use a slot count that is a multiple of {ep_size}"
        )
    return num_routed_slots // ep_size


def expand_routed_ids(ids: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
    """Routed slot ids in the expanded numbering: ``p -> p + p // epr``; negative ids (padding) are kept.

    Args:
        ids: any-shape integer tensor of routed slot ids in ``[0, P)`` or negative for padding.
        slots_per_rank: ``epr``.
    """
    return torch.where(ids >= 0, ids + torch.div(ids, slots_per_rank, rounding_mode="floor"), ids)


def shared_slot(rank: int | torch.Tensor, slots_per_rank: int) -> int | torch.Tensor:
    """The expanded id of the shared-expert copy on ``rank`` (an int or an integer tensor of ranks)."""
    return rank * (slots_per_rank + 1) + slots_per_rank


def expanded_phy2log(phy2log: torch.Tensor, ep_size: int, shared_expert: int) -> torch.Tensor:
    """Where every expert's weights go in the expanded layout.

    Args:
        phy2log: ``[L, P]`` (or ``[P]``) logical expert of each routed slot, e.g.
            ``Placement.phy2log``; ``-1`` marks an empty slot.
        ep_size: ``n_ep``; must divide ``P``.
        shared_expert: the id given to the shared expert, usually ``E`` (one past the routed ones),
            so that weight loaders can tell it apart.

    Returns:
        ``[L, P + n_ep]`` (or ``[P + n_ep]``) int64: the routed slots in their expanded positions
        and ``shared_expert`` in the last local slot of every rank. A weight loader on rank ``r``
        reads its row slice ``[r * (epr + 1), (r + 1) * (epr + 1))``.
    """
    phy2log = torch.as_tensor(phy2log)
    if phy2log.dtype.is_floating_point or phy2log.ndim not in (1, 2):
        raise EplbError(
            f"phy2log must be an integer [layers, slots] or [slots] tensor, got {phy2log.dtype} "
            f"of shape {tuple(phy2log.shape)}; pass Placement.phy2log"
        )
    epr = slots_per_rank(phy2log.shape[-1], ep_size)
    routed = phy2log.to(torch.int64).unflatten(-1, (ep_size, epr))
    shared = torch.full((*routed.shape[:-1], 1), shared_expert, dtype=torch.int64)
    return torch.cat([routed, shared], dim=-1).flatten(-2)


# Config keys that count the shared experts of a Hugging Face MoE config, by model family.
_SHARED_COUNT_KEYS = ("n_shared_experts", "num_shared_experts")  # DeepSeek V2/V3, Kimi, GLM; others
_SHARED_SIZE_KEYS = ("shared_expert_intermediate_size",)  # Qwen2-MoE: one shared expert of this size


def num_shared_experts(config: Mapping[str, Any]) -> int:
    """The number of shared experts a model config declares (0 when it names none)."""
    for key in _SHARED_COUNT_KEYS:
        if config.get(key) is not None:
            return int(config[key])
    return int(any(config.get(key) for key in _SHARED_SIZE_KEYS))


def check_one_shared_expert(config_or_count: Mapping[str, Any] | int) -> None:
    """Raise EplbError unless the model has exactly one shared expert (a config dict or a count)."""
    count = config_or_count if isinstance(config_or_count, int) else num_shared_experts(config_or_count)
    if count == 0:
        raise EplbError(
            "the model has no shared expert, so waterfill has nothing to move; run its MoE layers without "
            "WaterfillBalancer"
        )
    if count != 1:
        raise EplbError(
            f"the model has {count} shared experts but waterfill moves exactly one; fuse them into one MLP "
            "(concatenate their intermediate dimensions, as DeepSeek's code does) and count it as one"
        )
