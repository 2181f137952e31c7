"""The weight loader: a rank's local slot tensors from the full checkpoint weights and a placement."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from eplb.cluster import require_count
from eplb.errors import EplbError
from eplb.placement import Placement


def local_slot_weights(
    full: Mapping[str, torch.Tensor], placement: Placement, rank: int, layer: int, *, device: Any = None
) -> dict[str, torch.Tensor]:
    """The tensors of the local slots of ``rank`` in ``layer``: slot ``s`` gets expert
    ``placement.local_experts(rank)[layer, s]``.

    Args:
        full: named checkpoint tensors of one layer with a leading expert dim, e.g.
            ``{"w13": [E, 2I, H], "w2": [E, H, I]}`` (any names and trailing shapes: scales too).
        placement: the placement; its GPUs are the EP ranks.
        rank: the EP rank in ``[0, G)``.
        layer: the MoE layer, a row of the placement.
        device: where the result lives (default: where ``full`` is).

    Returns:
        ``{name: [S, ...]}`` (``S = placement.slots_per_gpu``), new tensors; an empty slot (``-1``)
        is all zeros. Build them for a new placement, then hand them to ``EPMoE.set_placement``
        (or copy them into the layer's own tensors).
    """
    if not isinstance(placement, Placement):
        raise EplbError(f"expected a Placement, got {type(placement).__name__}; build one with eplb.plan(...)")
    require_count("rank", rank, 0, placement.num_gpus - 1, fix="pass a GPU index of this placement")
    require_count("layer", layer, 0, placement.num_layers - 1, fix="pass a layer index of the placement")
    if not isinstance(full, Mapping) or not full:
        raise EplbError("full must be a non-empty mapping of name -> [E, ...] tensor; pass the layer's expert weights")
    experts = placement.local_experts(rank)[layer]  # [S]
    held = experts >= 0
    out = {}
    for name, tensor in full.items():
        if not isinstance(tensor, torch.Tensor) or tensor.ndim < 1 or tensor.shape[0] != placement.num_experts:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise EplbError(
                f"full[{name!r}] has shape {got}; pass a tensor with a leading dim of the "
                f"{placement.num_experts} logical experts"
            )
        index = experts.clamp(min=0).to(tensor.device)
        mask = held.to(tensor.device).view(-1, *[1] * (tensor.ndim - 1))
        out[name] = torch.where(mask, tensor[index], torch.zeros((), dtype=tensor.dtype, device=tensor.device))
        if device is not None:
            out[name] = out[name].to(device)
    return out


def random_checkpoint(
    config: Any, *, seed: int = 0, scale: float = 0.5
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Random full weights of one MoE layer in ``config.dtype`` on the CPU (tests, examples, benchmarks).

    Args:
        config: an ``EPMoEConfig``.
        seed: the generator seed; equal seeds give equal weights on every rank.
        scale: the weights' standard deviation times ``sqrt(fan_in)``.

    Returns:
        ``(router_params, experts, shared)``: ``{"gate": [E, H], "bias": [E]}``,
        ``{"w13": [E, 2I, H], "w2": [E, H, I]}`` and ``{"w13": [2Is, H], "w2": [H, Is]}`` or None.
    """
    gen = torch.Generator().manual_seed(seed)
    h, i, e = config.hidden, config.intermediate, config.num_experts

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale / shape[-1] ** 0.5).to(config.dtype)

    router = {"gate": normal(e, h), "bias": normal(e, 1)[:, 0]}
    experts = {"w13": normal(e, 2 * i, h), "w2": normal(e, h, i)}
    shared = None
    if config.shared_expert:
        shared = {"w13": normal(2 * config.shared_size, h), "w2": normal(h, config.shared_size)}
    return router, experts, shared
