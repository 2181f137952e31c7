"""Static layouts that need no load: ``linear`` and ``round_robin`` ("zigzag")."""

from __future__ import annotations

import torch

from eplb.cluster import Cluster
from eplb.errors import EplbError
from eplb.placement import EMPTY_SLOT
from eplb.planning.algorithm import Algorithm


def linear(load: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    """Slot ``p`` holds expert ``p % E``: experts in contiguous blocks over the GPUs, then the
    redundant slots repeat experts ``0, 1, ...`` (vLLM's initial layout).

    Args:
        load: ``[T, L, E]``; only its shape is used.
        cluster: the GPUs, slots and nodes.

    Returns:
        phy2log ``[L, P]``.
    """
    num_layers, num_experts = load.shape[-2:]
    row = torch.arange(cluster.num_slots, dtype=torch.int64) % num_experts
    return row.expand(num_layers, -1).clone()


def round_robin(load: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    """Rank ``r`` holds experts ``r, r + G, r + 2G, ...`` (vLLM's round-robin placement).

    When ``G`` does not divide ``E`` the first ``E % G`` ranks hold one expert more, and the
    other ranks leave their last slot empty (``-1``), as vLLM gives them one local expert fewer.

    Args:
        load: ``[T, L, E]``; only its shape is used.
        cluster: GPUs, slots and nodes; ``P`` must be ``G * ceil(E / G)`` (see ``check_round_robin``).

    Returns:
        phy2log ``[L, P]``.
    """
    num_layers, num_experts = load.shape[-2:]
    per_gpu = cluster.slots_per_gpu
    gpu = torch.arange(cluster.num_gpus).unsqueeze(1)
    expert = gpu + torch.arange(per_gpu).unsqueeze(0) * cluster.num_gpus  # [G, S]
    row = torch.where(expert < num_experts, expert, EMPTY_SLOT).flatten()
    return row.expand(num_layers, -1).clone()


def check_round_robin(cluster: Cluster, num_experts: int) -> None:
    per_gpu = -(-num_experts // cluster.num_gpus)
    if cluster.num_slots != per_gpu * cluster.num_gpus:
        raise EplbError(
            f"round_robin places each expert exactly once, so it needs {per_gpu * cluster.num_gpus} slots "
            f"({per_gpu} per GPU) for {num_experts} experts on {cluster.num_gpus} GPUs, not {cluster.num_slots}; "
            "use that slot count, or a load-based algorithm to fill redundant slots"
        )


LINEAR = Algorithm(
    name="linear",
    fn=linear,
    summary="contiguous blocks of experts, redundant slots repeat experts 0, 1, ...",
    uses_load=False,
)
ROUND_ROBIN = Algorithm(
    name="round_robin",
    fn=round_robin,
    summary="rank r holds experts r, r+G, r+2G, ... (zigzag); no redundant slots",
    uses_load=False,
    check=check_round_robin,
)
