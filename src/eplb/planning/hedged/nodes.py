"""Replicas over nodes: each router group's home node, the replicas pinned there for locality,
and the dealing of every replica to a node before each node packs its GPUs."""

from __future__ import annotations

import numpy as np

from eplb.cluster import Cluster
from eplb.planning.hedged.packing import deal


def group_homes(mean, num_groups: int, num_nodes: int) -> np.ndarray:
    """``[L, E]`` int64 array: the home node of each expert, its router group's node.

    Groups are dealt to nodes like replicas to GPUs (heaviest group to the lightest node,
    ``num_groups / N`` each), so the nodes' home loads are as even as whole groups allow.

    Args:
        mean: ``[L, E]`` mean load shares (tensor or array); experts
            ``[k * E / num_groups, (k + 1) * E / num_groups)`` form group ``k``.
        num_groups: router groups, a multiple of ``num_nodes``.
        num_nodes: ``N``.
    """
    mean = np.asarray(mean, dtype=np.float64)
    num_layers, num_experts = mean.shape
    group_load = mean.reshape(num_layers, num_groups, -1).sum(-1)
    groups = np.broadcast_to(np.arange(num_groups), (num_layers, num_groups))
    packed = deal(groups, group_load, np.zeros((num_layers, num_groups, 0)), num_nodes, num_groups, 1, 0.0)
    node_of_group = np.empty_like(packed.expert)
    np.put_along_axis(node_of_group, packed.expert,
                      np.broadcast_to(np.arange(num_groups) // (num_groups // num_nodes), groups.shape), 1)
    return np.repeat(node_of_group, num_experts // num_groups, axis=1)


def _pins(expert: np.ndarray, mu: np.ndarray, home: np.ndarray, num_nodes: int, locality: float) -> np.ndarray:
    """``[L, P]`` bool: the replicas pinned to their home node.

    One replica per expert (the first in ``expert``'s order, which must list an expert's replicas
    together), heaviest experts first, while the pinned load of a node stays within ``locality``
    times its fair share ``1 / N`` of the layer.
    """
    first = np.ones_like(expert, dtype=bool)
    first[:, 1:] = expert[:, 1:] != expert[:, :-1]
    node = np.take_along_axis(home, expert, 1)
    order = np.argsort(-np.where(first, mu, -1.0), axis=1, kind="stable")
    node_sorted = np.take_along_axis(node, order, 1)
    at_node = (node_sorted[..., None] == np.arange(num_nodes)) * np.take_along_axis(np.where(first, mu, 0.0), order,
                                                                                    1)[..., None]
    used = np.take_along_axis(at_node.cumsum(1), node_sorted[..., None], 2)[..., 0]
    pinned = np.zeros_like(first)
    np.put_along_axis(pinned, order, np.take_along_axis(first, order, 1) & (used <= locality / num_nodes * (1 + 1e-9)),
                      1)
    return pinned


def split_nodes(expert: np.ndarray, mu: np.ndarray, dev: np.ndarray, counts: np.ndarray,
                home: np.ndarray | None, cluster: Cluster, risk: float, locality: float):
    """Deal ``[L, P]`` replicas to nodes; returns them (expert, mu, dev, fixed) node by node.

    ``fixed`` marks the replicas that must keep their node: the pinned ones, and those of
    experts with several replicas (which the dealing spread over distinct nodes).

    Pinned replicas go to their home node first; then, heaviest first, every other replica goes
    to the node with the lowest planned load after taking it, among those with a free slot and
    the fewest replicas of its expert (LPT on top of the pinned loads).
    """
    num_layers, num_slots = expert.shape
    num_nodes, num_experts, rank = cluster.num_nodes, counts.shape[1], dev.shape[-1]
    per_node = num_slots // num_nodes
    risk = risk if rank else 0.0
    if home is not None and locality > 0:
        pinned = _pins(expert, mu, home, num_nodes, locality)
    else:
        pinned = np.zeros_like(expert, dtype=bool)
    # Pinned replicas first, then the rest heaviest first.
    key = np.where(pinned, np.inf, mu + risk * np.linalg.norm(dev, axis=-1) if risk else mu)
    order = np.argsort(-key, axis=1, kind="stable")
    rows = np.arange(num_layers)
    expert, mu, pinned, dev = (t[rows[:, None], order] for t in (expert, mu, pinned, dev))
    node = np.where(pinned, np.take_along_axis(home, expert, 1) if home is not None else 0, -1)  # -1: not placed
    one_hot = (node[..., None] == np.arange(num_nodes)) & pinned[..., None]  # [L, P, N]
    # Contiguous, so that the flat views below write through: this loop runs once per slot,
    # and small fancy-indexing calls would dominate it. held[l, e, n]: replicas of e on node n.
    filled = np.ascontiguousarray(one_hot.sum(1))
    node_mu = np.ascontiguousarray(np.einsum("lp,lpn->ln", mu, one_hot.astype(np.float64)))
    node_dev = np.einsum("lpk,lpn->lnk", dev, one_hot.astype(np.float64))
    held = np.zeros((num_layers, num_experts, num_nodes), dtype=np.int64)
    np.add.at(held, (rows[:, None], expert, node.clip(min=0)), pinned)
    held_rows = held.reshape(-1, num_nodes)
    node_limit = np.take_along_axis(-(-counts // num_nodes), expert, 1)  # spread each expert over distinct nodes
    layer_expert, layer_node = rows * num_experts, rows * num_nodes
    expert_k, mu_k, pinned_k, limit_k = (np.ascontiguousarray(t.T) for t in (expert, mu, pinned, node_limit))
    num_pinned = pinned.sum(1)
    some_pinned = int(num_pinned.max())  # from here on every row places a free replica
    for k in range(int(num_pinned.min()), num_slots):
        e, m = expert_k[k], mu_k[k]
        load = node_mu + m[:, None]
        if risk:
            load = load + risk * np.linalg.norm(node_dev + dev[:, k, None], axis=-1)
        crowded = held_rows[layer_expert + e] >= limit_k[k][:, None]
        # Tiers: a node with room and a replica of e to spare, then any node with room.
        tiered = load + crowded * (1.0 + load.max(1, keepdims=True))
        choice = np.where(filled >= per_node, np.inf, tiered).argmin(1)
        if k < some_pinned:
            todo = ~pinned_k[k]
            choice = np.where(todo, choice, node[:, k])
            r = rows[todo]
        else:
            todo, r = 1, rows
        node[:, k] = choice
        filled.reshape(-1)[layer_node + choice] += todo
        node_mu.reshape(-1)[layer_node + choice] += m * todo
        if risk:
            node_dev[r, choice[r]] += dev[r, k]
        held.reshape(-1)[(layer_expert + e) * num_nodes + choice] += todo
    # Slot within the node: rank among the replicas dealt to the same node, in dealing order.
    grouped = np.argsort(node, axis=1, kind="stable")
    # Pinned replicas and those of experts spread over nodes keep their node from now on.
    fixed = pinned | (np.take_along_axis(counts, expert, 1) > 1)
    return tuple(t[rows[:, None], grouped] for t in (expert, mu, dev, fixed))

