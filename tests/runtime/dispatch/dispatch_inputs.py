"""Random placements with redundant replicas for the dispatch tests (a module of its own so that
the kernel check, also run in a child process, can import it)."""

from __future__ import annotations

import torch

from eplb.placement import Placement


def make_placement(seed: int, *, layers: int = 2, experts: int = 12, gpus: int = 4, nodes: int = 2,
                   slots_per_gpu: int = 4) -> Placement:
    """Every expert once, the remaining slots hold random experts (duplicates on a GPU allowed)."""
    g = torch.Generator().manual_seed(seed)
    num_slots = gpus * slots_per_gpu
    rows = []
    for _ in range(layers):
        extra = torch.randint(0, experts, (num_slots - experts,), generator=g)
        row = torch.cat([torch.arange(experts), extra])
        rows.append(row[torch.randperm(num_slots, generator=g)])
    return Placement(torch.stack(rows), num_experts=experts, num_gpus=gpus, num_nodes=nodes)
