"""Cross-node traffic of a placement: how many remote nodes a token's top-k picks touch.

A token sits on a source node (every node equally likely, as with data-parallel attention) and
is dispatched to the nodes that serve its ``top_k`` picks; one transfer per remote node carries
all its picks there (DeepSeek's node-limited dispatch). A pick of expert ``e`` is served
locally when the source node holds a replica of ``e``; otherwise by one of ``e``'s replicas,
each equally likely, so remote node ``m`` serves it with probability
``replicas of e on m / replicas of e``.

Without co-activation counts, picks are independent draws weighted by expert load; with router
groups, a token first draws ``groups_per_token`` groups (weighted by group load) and then
``top_k / groups_per_token`` picks inside each, which is what makes keeping a group on one node
pay off. With co-activation counts ``[L, E, E]`` (tokens that picked both ``e`` and ``f``) the
estimate uses them instead of independence: the second-moment estimate
``P(X >= 1) ~ E[X]^2 / E[X^2]`` of the number ``X`` of picks landing on a node.
"""

from __future__ import annotations

from typing import Any

import torch

from eplb.cluster import is_count, require_count
from eplb.errors import EplbError
from eplb.loads import as_layer_load
from eplb.placement import Placement

# Elements of one chunk of the [layers, E, N, N] routing tensor (32 MB of float64): at 512 GPUs on
# 128 nodes a layer alone is 33 MB, all 61 layers of DeepSeek-V3 at once several GB.
_CHUNK_ELEMENTS = 1 << 22


def remote_share(placement: Placement) -> torch.Tensor:
    """``[L, E, N, N]``: probability that a pick of expert ``e`` from source node ``n`` is served
    by remote node ``m`` (zero where ``n`` holds ``e``, and on the diagonal).

    Args:
        placement: the placement; nodes come from its ``num_nodes``.
    """
    return _route(_replicas_per_node(placement))


def _replicas_per_node(placement: Placement) -> torch.Tensor:
    """``[L, E, N]`` float64: replicas of each expert on each node."""
    num_nodes = placement.num_nodes
    node = placement.slot_node.expand_as(placement.phy2log)
    held = placement.phy2log >= 0
    expert = placement.phy2log.clamp(min=0)
    count = torch.zeros(placement.num_layers, placement.num_experts * num_nodes, dtype=torch.float64)
    count.scatter_add_(1, expert * num_nodes + node, held.to(torch.float64))
    return count.view(placement.num_layers, placement.num_experts, num_nodes)


def _route(count: torch.Tensor) -> torch.Tensor:
    """``remote_share`` of the layers whose replicas per node are ``count [l, E, N]``."""
    serve = count / count.sum(-1, keepdim=True).clamp(min=1)  # [l, E, m]
    remote = (count == 0).to(torch.float64)  # [l, E, n]: source n must go remote
    return remote.unsqueeze(-1) * serve.unsqueeze(-2)


def expected_remote_nodes(
    placement: Placement,
    load: Any,
    *,
    top_k: int = 8,
    num_groups: int | None = None,
    groups_per_token: int | None = None,
    coactivation: Any | None = None,
) -> torch.Tensor:
    """``[L]``: the expected number of distinct remote nodes one token's picks touch.

    Args:
        placement: the placement to score.
        load: ``[L, E]`` (or ``[T, L, E]``, summed) tokens routed to each logical expert.
        top_k: picks per token (DeepSeek-V3: 8).
        num_groups: the router's expert groups (DeepSeek-V3: 8); with ``groups_per_token``,
            picks are drawn inside a token's groups.
        groups_per_token: groups each token draws from (DeepSeek-V3: ``topk_group = 4``).
        coactivation: optional ``[L, E, E]`` counts of tokens that picked both experts; the
            diagonal is ignored. Overrides the independent-draw model.

    Returns:
        float64 ``[L]``, between 0 (every pick served locally) and ``min(N - 1, top_k)``;
        zero for layers without load.
    """
    layer_load = as_layer_load(load)
    num_layers, num_experts = layer_load.shape
    if layer_load.shape != (placement.num_layers, placement.num_experts):
        raise EplbError(
            f"load has shape {tuple(layer_load.shape)} but the placement is for {placement.num_layers} layers x "
            f"{placement.num_experts} experts; pass the load the placement was planned for"
        )
    top_k = require_count("top_k", top_k, fix="pass the experts each token picks (DeepSeek-V3: 8)")
    pairs = None if coactivation is None else _check_pairs(coactivation, num_layers, num_experts)
    grouped = pairs is None and num_groups is not None and groups_per_token is not None
    if grouped:
        if not is_count(num_groups) or num_experts % num_groups:
            raise EplbError(f"{num_experts} experts cannot be split into {num_groups!r} equal groups; "
                            "pass the router's group count")
        groups_per_token = require_count("groups_per_token", groups_per_token, 1, num_groups,
                                         fix="pass the groups each token picks from (DeepSeek-V3: 4)")
    total = layer_load.sum(-1, keepdim=True)
    share = layer_load / torch.where(total > 0, total, 1.0)  # [L, E]
    count = _replicas_per_node(placement)
    # Layer by layer in chunks: the routing tensor grows with E * N^2.
    step = max(1, _CHUNK_ELEMENTS // (num_experts * placement.num_nodes**2))
    out = torch.empty(num_layers, dtype=torch.float64)
    for start in range(0, num_layers, step):
        rows = slice(start, start + step)
        route = _route(count[rows])  # [l, E, n, m]
        if pairs is not None:
            touched = _touched_pairwise(route, layer_load[rows], top_k, pairs[rows])
        elif grouped:
            touched = _touched_grouped(route, share[rows], top_k, num_groups, groups_per_token)
        else:
            per_pick = torch.einsum("le,lenm->lnm", share[rows], route)
            touched = 1 - (1 - per_pick) ** top_k
        out[rows] = touched.sum(-1).mean(-1)  # remote nodes per source node, averaged over sources
    return torch.where(total.squeeze(-1) > 0, out, 0.0)


def _touched_grouped(route: torch.Tensor, share: torch.Tensor, top_k: int, num_groups: int,
                     groups_per_token: int) -> torch.Tensor:
    """``[L, n, m]``: P(node m is touched) when picks are drawn within ``groups_per_token`` groups."""
    num_layers = share.shape[0]
    group_share = share.view(num_layers, num_groups, -1)
    weight = group_share.sum(-1)  # [L, g]
    inside = group_share / weight.clamp(min=1e-300).unsqueeze(-1)  # pick probabilities within a group
    per_pick = torch.einsum("lgi,lginm->lgnm", inside, route.view(num_layers, num_groups, -1, *route.shape[-2:]))
    missed_by_group = (1 - per_pick) ** (top_k / groups_per_token)
    missed_by_draw = torch.einsum("lg,lgnm->lnm", weight, missed_by_group)
    return 1 - missed_by_draw**groups_per_token


def _check_pairs(coactivation: Any, num_layers: int, num_experts: int) -> torch.Tensor:
    """``coactivation`` as a float64 ``[L, E, E]`` tensor, validated."""
    pairs = torch.as_tensor(coactivation, dtype=torch.float64)
    if pairs.shape != (num_layers, num_experts, num_experts):
        raise EplbError(
            f"coactivation has shape {tuple(pairs.shape)}; pass [L, E, E] = "
            f"[{num_layers}, {num_experts}, {num_experts}] counts of tokens that picked both experts"
        )
    if not torch.isfinite(pairs).all() or (pairs < 0).any():
        raise EplbError("coactivation has negative, NaN or infinite counts; pass token counts >= 0")
    return pairs


def _touched_pairwise(route: torch.Tensor, layer_load: torch.Tensor, top_k: int, pairs: torch.Tensor) -> torch.Tensor:
    """``[L, n, m]``: P(node m is touched) from co-activation counts ``pairs [L, E, E]``, by ``E[X]^2 / E[X^2]``."""
    num_experts = layer_load.shape[1]
    tokens = (layer_load.sum(-1) / top_k).clamp(min=1e-300).view(-1, 1, 1)
    pairs = pairs * (1 - torch.eye(num_experts, dtype=torch.float64))
    mean = torch.einsum("le,lenm->lnm", layer_load, route) / tokens  # E[X]
    # E[X (X - 1)]: ordered pairs of distinct picks that both land on m.
    spread = torch.bmm(pairs, route.flatten(2)).view_as(route)  # sum_f pairs[e, f] route[f]
    both = (route * spread).sum(1) / tokens
    return torch.where(mean > 0, mean**2 / (mean + both).clamp(min=1e-300), 0.0)
