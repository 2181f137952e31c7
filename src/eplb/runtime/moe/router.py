"""The routers: each token's logical top-k experts and their weights.

Shapes: ``M`` tokens, ``H`` hidden size, ``E`` logical experts, ``K`` experts per token. Every
router returns ``(topk_ids [M, K] int64, topk_weights [M, K])``; the weights are in the routing
dtype (``x``'s dtype promoted to at least float32, so bf16 models route in float32). Scores are
computed row by row, so a token's choice does not depend on the other tokens of its batch: the
EP layer on one rank and the dense reference on all tokens pick the same experts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from eplb.errors import EplbError
from eplb.runtime.hashing import MASK32, layer_key, mix32
from eplb.runtime.moe.config import EPMoEConfig


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routing and the combine run in: ``dtype``, at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _normalized(weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    return weights / weights.sum(-1, keepdim=True) if normalize else weights


def softmax_topk(
    x: torch.Tensor, gate: torch.Tensor, top_k: int, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the gate logits, then the ``top_k`` largest probabilities.

    Args:
        x: ``[M, H]`` hidden states.
        gate: ``[E, H]`` router weight (logits are ``x @ gate.T``).
        top_k: ``K``.
        normalize: rescale each token's ``K`` probabilities to sum 1.

    Returns:
        ``ids [M, K]`` int64 and ``weights [M, K]``, largest first.
    """
    dtype = routing_dtype(x.dtype)
    probs = torch.softmax(x.to(dtype) @ gate.to(dtype).T, dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return ids, _normalized(weights, normalize)


def grouped_topk(
    x: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router: group-limited top-k on bias-corrected sigmoid scores.

    ``scores = sigmoid(x @ gate.T)``; the choice uses ``scores + bias`` (the bias balances load
    during training and does not enter the weights). A group's score is the sum of its two best
    biased scores (its best one for groups of one expert); the ``topk_groups`` best groups are
    kept and the ``top_k`` best biased scores among their experts chosen. The weights are the
    unbiased ``scores`` of the chosen experts.

    Args:
        x: ``[M, H]`` hidden states.
        gate: ``[E, H]`` router weight.
        bias: ``[E]`` score correction bias (``e_score_correction_bias``).
        top_k: ``K``.
        num_groups: expert groups; divides ``E`` (expert ``e`` is in group ``e // (E / num_groups)``).
        topk_groups: groups kept per token.
        normalize: rescale each token's ``K`` weights to sum 1.

    Returns:
        ``ids [M, K]`` int64 and ``weights [M, K]``, best biased score first.
    """
    dtype = routing_dtype(x.dtype)
    scores = torch.sigmoid(x.to(dtype) @ gate.to(dtype).T)
    biased = scores + bias.to(dtype)
    per_group = biased.unflatten(-1, (num_groups, -1))  # [M, groups, E / groups]
    best = min(2, per_group.shape[-1])
    group_score = per_group.topk(best, dim=-1).values.sum(-1)  # [M, groups]
    kept = group_score.topk(topk_groups, dim=-1).indices
    group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
    expert_mask = group_mask.repeat_interleave(per_group.shape[-1], dim=-1)  # [M, E]
    ids = biased.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1).indices
    return ids, _normalized(scores.gather(1, ids), normalize)


def hash_topk(
    token_ids: torch.Tensor, num_experts: int, top_k: int, key: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash routing: ``K`` distinct experts drawn from a hash of each token's vocabulary id.

    Expert ``e`` gets the 32-bit value ``mix32(mix32(t XOR key) XOR e)`` for token id ``t``
    (``mix32`` of ``eplb.runtime.hashing``); the ``K`` largest values win. ``mix32`` is a bijection,
    so a token's ``E`` values are distinct and the choice has no ties. Every occurrence of a token
    id goes to the same experts, on every rank; each chosen expert gets weight ``1 / K``.

    Args:
        token_ids: ``[M]`` integer vocabulary ids of the tokens (non-negative).
        num_experts: ``E``.
        top_k: ``K``.
        key: 32-bit key, e.g. ``eplb.runtime.hashing.layer_key(seed, layer)`` (other experts per layer).
        dtype: the weights' dtype.

    Returns:
        ``ids [M, K]`` int64 and ``weights [M, K]`` (all ``1 / K``).
    """
    token = mix32((token_ids.to(torch.int64) & MASK32) ^ key)  # [M]
    experts = torch.arange(num_experts, dtype=torch.int64, device=token_ids.device)
    ids = mix32(token.unsqueeze(1) ^ experts).topk(top_k, dim=-1).indices
    weights = torch.full(ids.shape, 1.0 / top_k, dtype=dtype, device=token_ids.device)
    return ids, weights


def route(
    x: torch.Tensor,
    router_params: Mapping[str, torch.Tensor],
    config: EPMoEConfig,
    *,
    layer: int = 0,
    token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router ``config.router`` names, on one batch.

    Args:
        x: ``[M, H]`` hidden states.
        router_params: ``"gate"`` ``[E, H]`` (softmax and grouped) and ``"bias"`` ``[E]`` (grouped);
            the hash router needs none (pass ``{}``).
        config: the layer's config.
        layer: the MoE layer; the hash router's key is ``layer_key(config.seed, layer)``.
        token_ids: ``[M]`` vocabulary ids; the hash router only.

    Returns:
        ``ids [M, K]`` int64 logical experts and ``weights [M, K]`` in ``routing_dtype(x.dtype)``.
    """
    if x.ndim != 2 or x.shape[1] != config.hidden:
        raise EplbError(f"x has shape {tuple(x.shape)}; pass the layer's input as [tokens, {config.hidden}]")
    if config.router == "hash":
        if token_ids is None or token_ids.shape != (x.shape[0],) or token_ids.dtype.is_floating_point:
            got = None if token_ids is None else f"{token_ids.dtype} {tuple(token_ids.shape)}"
            raise EplbError(f"the hash router needs token_ids [{x.shape[0]}] of integer ids, got {got}; pass them")
        key = layer_key(config.seed, layer)
        return hash_topk(token_ids, config.num_experts, config.top_k, key, routing_dtype(x.dtype))
    gate = _param(router_params, "gate", (config.num_experts, config.hidden))
    if config.router == "softmax":
        return softmax_topk(x, gate, config.top_k, config.normalize_topk)
    bias = _param(router_params, "bias", (config.num_experts,))
    return grouped_topk(
        x, gate, bias, config.top_k, config.num_groups, config.topk_groups, config.normalize_topk
    )


def _param(params: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = params.get(name) if isinstance(params, Mapping) else None
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
        got = "nothing" if tensor is None else f"{type(tensor).__name__} {tuple(getattr(tensor, 'shape', ()))}"
        raise EplbError(f"router_params[{name!r}] must be a {list(shape)} tensor, got {got}; pass the router weights")
    return tensor
