"""Known expert contents, to check a migration byte for byte (the tests, the multi-GPU benchmarks, a smoke test).

Expert ``e`` of layer ``l`` has deterministic content per tensor (random bytes from a seeded CPU
generator, so float tensors hold NaN and infinity patterns too, which only a bit-exact copy
preserves), the same on every rank, so any rank can tell whether a slot holds exactly its expert.

A tensor spec maps a name to ``(dtype, per-slot shape)``; ``TENSORS`` is a small mixed one.
"""

from __future__ import annotations

from typing import Any

import torch

from eplb.placement import Placement
from eplb.runtime.migration.weights import ExpertWeights

TensorSpec = dict[str, tuple[torch.dtype, tuple[int, ...]]]

# An int8 weight with float32 block scales and a bf16 bias.
TENSORS: TensorSpec = {
    "w_int8": (torch.int8, (8, 16)),
    "scale": (torch.float32, (2, 2)),
    "bias": (torch.bfloat16, (8,)),
}


def canonical(num_layers: int, num_experts: int, tensors: TensorSpec = TENSORS, *, device: Any = None
              ) -> list[dict[str, torch.Tensor]]:
    """Per layer and tensor name, ``[E, n]`` uint8: the bytes of every logical expert's slot
    (``n`` the tensor's bytes per slot), generated on the CPU and moved to ``device``."""
    out = []
    for layer in range(num_layers):
        gen = torch.Generator().manual_seed(1000 + layer)
        named = {}
        for name, (dtype, shape) in tensors.items():
            nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            named[name] = torch.randint(0, 256, (num_experts, nbytes), generator=gen, dtype=torch.uint8).to(device)
        out.append(named)
    return out


def local_bytes(canon: list[dict[str, torch.Tensor]], placement: Placement, rank: int) -> list[dict]:
    """Per layer and tensor, ``[S, n]`` uint8 on ``canon``'s device: what ``rank``'s slots must hold
    under ``placement`` (every slot filled)."""
    held = placement.local_experts(rank)
    return [{name: table[held[layer].to(table.device)] for name, table in named.items()}
            for layer, named in enumerate(canon)]


def make_weights(
    canon: list[dict[str, torch.Tensor]], placement: Placement, rank: int, tensors: TensorSpec = TENSORS
) -> tuple[ExpertWeights, list[dict[str, torch.Tensor]]]:
    """This rank's engine tensors (real dtypes and shapes, on ``canon``'s device) loaded for
    ``placement``, registered; and the tensors themselves."""
    layers = []
    for named in local_bytes(canon, placement, rank):
        layers.append({
            name: rows.clone().view(tensors[name][0]).view(rows.shape[0], *tensors[name][1])
            for name, rows in named.items()
        })
    return ExpertWeights(layers), layers


def corrupted_slots(weights: ExpertWeights, canon: list[dict], placement: Placement, rank: int) -> int:
    """Slots of ``rank`` (over layers and tensors) whose bytes differ from their expert's."""
    want = local_bytes(canon, placement, rank)
    bad = 0
    for layer in range(weights.num_layers):
        for rows, expected in zip(weights.byte_rows(layer), want[layer].values(), strict=True):
            bad += int((rows != expected.to(rows.device)).any(1).sum())
    return bad


def random_placement(
    gen: torch.Generator, num_layers: int, num_experts: int, num_slots: int, num_gpus: int, num_nodes: int = 1
) -> Placement:
    """Every expert once, the spare slots random experts, all shuffled (a valid placement)."""
    rows = []
    for _ in range(num_layers):
        row = torch.cat([torch.randperm(num_experts, generator=gen),
                         torch.randint(0, num_experts, (num_slots - num_experts,), generator=gen)])
        rows.append(row[torch.randperm(num_slots, generator=gen)])
    return Placement(torch.stack(rows), num_experts, num_gpus, num_nodes)
