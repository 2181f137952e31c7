"""DeepSeek's EPLB policies (deepseek-ai/EPLB ``eplb.py``), with identical outputs, vectorised over layers.

- global policy (``deepseek``): replicate the hottest logical experts into the redundant slots,
  then pack the replicas onto the GPUs;
- hierarchical policy (``deepseek_hierarchical``): pack the router's expert groups onto nodes,
  replicate inside each node, then pack each node's replicas onto its GPUs, so that
  node-limited routing keeps a token's experts on few nodes.

The reference plans in float32 and its ties are decided by float32 values, by torch's default
(unstable) sort and by "first index wins" argmax/argmin. Every step below makes the same
decision on the same float32 values, so ``phy2log``, ``log2phy`` and ``logcnt`` come out
identical. The greedy loops run over items (groups, redundant slots, replicas) with every layer
(and node) as a row of one array, so the Python loop count does not grow with the layer count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from eplb.cluster import Cluster, check_cluster, require_count, require_groups
from eplb.errors import EplbError
from eplb.loads import as_history
from eplb.planning.algorithm import Algorithm


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the ``n`` items of each row into ``num_packs`` packs of exactly ``n / num_packs`` items.

    Items go heaviest first, each into the lightest pack that still has room (the lowest pack
    index among equally light ones); pack weights are accumulated in the dtype of ``weight``.

    Args:
        weight: ``[X, n]`` item weights; the ``X`` rows are packed independently.
        num_packs: ``m``, a divisor of ``n``.

    Returns:
        pack_index: ``[X, n]`` int64, the pack of each item.
        rank_in_pack: ``[X, n]`` int64, the item's position in its pack (order of arrival).
    """
    num_rows, num_items = weight.shape
    capacity = num_items // num_packs
    if capacity == 1:
        return (np.broadcast_to(np.arange(num_items), weight.shape).copy(),
                np.zeros(weight.shape, dtype=np.int64))
    order = _descending_order(weight)
    sorted_weight = np.take_along_axis(weight, order, 1).T.copy()  # [n, X]: one row per greedy step
    # A pack's key is its weight while it has room and +inf once full, so one argmin finds the
    # lightest open pack (first index on ties, as the reference's min()). Adding closing[count]
    # (0, or +inf for the item that fills the pack) keeps the sum exact without a branch.
    key = np.zeros(num_rows * num_packs, dtype=weight.dtype)
    key_rows = key.reshape(num_rows, num_packs)
    closing = np.zeros(capacity + 1, dtype=weight.dtype)
    closing[capacity] = np.inf
    count = np.zeros(num_rows * num_packs, dtype=np.int64)
    row_base = np.arange(num_rows) * num_packs
    pack_sorted = np.empty((num_items, num_rows), dtype=np.int64)
    filled_sorted = np.empty((num_items, num_rows), dtype=np.int64)
    for j in range(num_items):
        pack = key_rows.argmin(1)
        pack_sorted[j] = pack
        flat = row_base + pack
        filled = count[flat] + 1
        filled_sorted[j] = filled
        count[flat] = filled
        key[flat] = key[flat] + sorted_weight[j] + closing[filled]
    pack_index = np.empty_like(order)
    rank_in_pack = np.empty_like(order)
    np.put_along_axis(pack_index, order, pack_sorted.T, 1)
    np.put_along_axis(rank_in_pack, order, filled_sorted.T - 1, 1)
    return pack_index, rank_in_pack


def _descending_order(weight: np.ndarray) -> np.ndarray:
    # torch's default sort is not stable: the order it gives equal weights is part of the
    # reference's output, so it has to be this very sort, not numpy's.
    return torch.from_numpy(weight).sort(dim=-1, descending=True).indices.numpy()


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give ``num_phy - n`` redundant slots, one at a time, to the expert with the highest load
    per replica (the lowest id among equal ones), which minimises the largest replica load.

    Args:
        weight: ``[X, n]`` load of each logical expert; the ``X`` rows are independent.
        num_phy: physical experts per row after replication, ``>= n``.

    Returns:
        phy2log: ``[X, num_phy]`` int64, experts ``0..n-1`` first, then the redundant replicas
            in the order they were made.
        replica_rank: ``[X, num_phy]`` int64, how many replicas of the expert existed before it.
        logcnt: ``[X, n]`` int64, replicas per expert.
    """
    num_rows, num_log = weight.shape
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log)
    replica_rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    per_replica = weight.copy()
    rows = np.arange(num_rows)
    for slot in range(num_log, num_phy):
        expert = per_replica.argmax(1)
        count = logcnt[rows, expert]
        phy2log[:, slot] = expert
        replica_rank[:, slot] = count
        logcnt[rows, expert] = count + 1
        # Divide in weight's dtype (float32), as the reference does: a float64 quotient can
        # order two nearly equal loads per replica differently.
        per_replica[rows, expert] = weight[rows, expert] / (count + 1).astype(weight.dtype)
    return phy2log, replica_rank, logcnt


def pack_groups_to_nodes(weight: np.ndarray, num_groups: int, num_nodes: int) -> np.ndarray:
    """Step 1 of the hierarchical policy: balance the expert groups over the nodes.

    Args:
        weight: ``[L, E]`` load of each logical expert.
        num_groups: expert groups of the router; divides ``E`` and is a multiple of ``num_nodes``.
        num_nodes: ``N``.

    Returns:
        log2mlog: ``[L, E]`` int64, each logical expert's node-major position ("mlog"): node
        ``k`` holds positions ``[k E/N, (k+1) E/N)``, its groups in packing order, each group's
        experts in id order.
    """
    num_experts = weight.shape[1]
    group_size = num_experts // num_groups
    # torch sums as the reference does; a different summation order could flip near-equal groups.
    group_weight = torch.from_numpy(weight).unflatten(-1, (num_groups, group_size)).sum(-1).numpy()
    pack, rank = balanced_packing(group_weight, num_nodes)
    group_start = (pack * (num_groups // num_nodes) + rank) * group_size
    return (group_start[:, :, None] + np.arange(group_size)).reshape(weight.shape)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """``[X, n]``: the inverse of each row's permutation ``perm [X, n]``."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), 1)
    return inv


def node_slots_to_experts(phy2mlog: np.ndarray, mlog2log: np.ndarray, num_nodes: int) -> np.ndarray:
    """Turn per-node results back into ``phy2log``.

    Args:
        phy2mlog: ``[L * N, P / N]``, row ``l * N + k``: the node-local mlog id (in ``[0, E/N)``)
            held by each slot of node ``k`` in layer ``l``.
        mlog2log: ``[L, E]``, the logical expert at each mlog position (inverse of ``log2mlog``).
        num_nodes: ``N``.

    Returns:
        phy2log ``[L, P]`` int64.
    """
    num_layers, num_experts = mlog2log.shape
    node_start = np.arange(num_nodes)[:, None] * (num_experts // num_nodes)
    mlog = (phy2mlog.reshape(num_layers, num_nodes, -1) + node_start).reshape(num_layers, -1)
    return np.take_along_axis(mlog2log, mlog, 1)


def rebalance_hierarchical(
    weight: np.ndarray, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek's hierarchical policy; with ``num_groups = num_nodes = 1`` it is the global policy.

    Args:
        weight: ``[L, E]`` float32 load of each logical expert.
        num_slots: ``P``, a multiple of ``num_gpus``, ``>= E``.
        num_groups: expert groups; divides ``E``; a multiple of ``num_nodes``.
        num_nodes: ``N``, divides ``num_gpus``.
        num_gpus: ``G``.

    Returns:
        phy2log: ``[L, P]`` int64.
        replica_rank: ``[L, P]`` int64, the rank of each slot among its expert's replicas.
        logcnt: ``[L, E]`` int64.
    """
    num_layers, num_experts = weight.shape
    slots_per_gpu = num_slots // num_gpus

    log2mlog = pack_groups_to_nodes(weight, num_groups, num_nodes)
    mlog2log = inverse_permutation(log2mlog)

    # Step 2: replicate inside each node; rows are (layer, node) pairs.
    node_weight = np.take_along_axis(weight, mlog2log, 1).reshape(num_layers * num_nodes, -1)
    phy2mlog, phyrank, mlogcnt = replicate_experts(node_weight, num_slots // num_nodes)

    # Step 3: pack each node's replicas onto its GPUs by their load per replica.
    replica_weight = np.take_along_axis(node_weight / mlogcnt.astype(weight.dtype), phy2mlog, 1)
    pack, rank = balanced_packing(replica_weight, num_gpus // num_nodes)
    pphy2phy = inverse_permutation(pack * slots_per_gpu + rank)

    phy2log = node_slots_to_experts(np.take_along_axis(phy2mlog, pphy2phy, 1), mlog2log, num_nodes)
    replica_rank = np.take_along_axis(phyrank, pphy2phy, 1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, 1)
    return phy2log, replica_rank, logcnt


def as_float32(layer_load: torch.Tensor) -> np.ndarray:
    """``[L, E]`` float32 numpy copy of a validated float64 load, as the reference plans in float32."""
    peak = float(layer_load.sum(-1).max())
    if peak > float(np.finfo(np.float32).max) / 2:
        raise EplbError(
            f"a layer's total load is {peak:.3g}, too large for the float32 arithmetic of the DeepSeek "
            "policies; divide the loads by a constant (only their ratios matter)"
        )
    return layer_load.to(torch.float32).numpy()


def deepseek_global(load: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    """The global policy on the load summed over steps.

    Args:
        load: ``[T, L, E]`` float64 load history.
        cluster: the GPUs, slots and nodes.

    Returns:
        phy2log ``[L, P]`` int64.
    """
    phy2log, _, _ = rebalance_hierarchical(as_float32(load.sum(0)), cluster.num_slots, 1, 1, cluster.num_gpus)
    return torch.from_numpy(phy2log)


def deepseek_hierarchical(load: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    """The hierarchical policy on the load summed over steps.

    Args:
        load: ``[T, L, E]`` float64 load history.
        cluster: GPUs, slots and nodes; ``num_groups`` set and a multiple of ``num_nodes``.

    Returns:
        phy2log ``[L, P]`` int64.
    """
    phy2log, _, _ = rebalance_hierarchical(
        as_float32(load.sum(0)), cluster.num_slots, cluster.num_groups, cluster.num_nodes, cluster.num_gpus
    )
    return torch.from_numpy(phy2log)


def check_hierarchical(cluster: Cluster, num_experts: int) -> None:
    """The hierarchical policies need the group count, a multiple of the node count."""
    require_groups(cluster, num_experts)


def rebalance_experts(
    weight: Any, num_replicas: int, num_groups: int | None, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in replacement for deepseek-ai/EPLB's ``rebalance_experts``, with identical outputs.

    The hierarchical policy is used when ``num_groups`` is a multiple of ``num_nodes``, the
    global policy otherwise -- and then, as in the reference, ``num_groups`` need not divide the
    experts nor ``num_nodes`` the GPUs. ``num_groups=None`` (no router groups) counts as one group.

    Args:
        weight: ``[L, E]`` load statistics of the logical experts (tensor, array or nested list).
        num_replicas: ``P``, physical experts over all GPUs; a multiple of ``num_gpus``, ``>= E``.
        num_groups: expert groups of the router; divides ``E`` when the hierarchical policy is used.
        num_nodes: ``N``, server nodes; divides ``num_gpus`` when the hierarchical policy is used.
        num_gpus: ``G``.

    Returns:
        phy2log: ``[L, P]`` int64, the logical expert of each physical slot.
        log2phy: ``[L, E, X]`` int64, ``X = logcnt.max()``: the slots of each logical expert,
            ordered by replica rank (the order the replicas were made), ``-1`` padded.
        logcnt: ``[L, E]`` int64, replicas per logical expert.

    Raises:
        EplbError: for a load that is not ``[L, E]`` or holds NaN, infinite or negative values,
            and for counts that do not fit together.
    """
    history = as_history(weight, what="weight")
    if history.shape[0] != 1 or torch.as_tensor(weight).ndim != 2:
        raise EplbError(
            f"weight has shape {tuple(torch.as_tensor(weight).shape)}; rebalance_experts takes one "
            "[layers, experts] load (sum a history over its steps, or use eplb.plan)"
        )
    layer_load = history[0]
    num_layers, num_experts = layer_load.shape
    groups = 1 if num_groups is None else num_groups
    require_count("num_nodes", num_nodes, fix="pass the cluster's node count")
    if isinstance(groups, int) and groups % num_nodes != 0:
        # The reference's fallback: the global policy ignores groups and nodes, so neither has to
        # divide anything (groups need not divide the experts, nodes need not divide the GPUs).
        groups, num_nodes = 1, 1
    check_cluster(Cluster(num_gpus=num_gpus, num_slots=num_replicas, num_nodes=num_nodes, num_groups=groups),
                  num_experts)
    phy2log, replica_rank, logcnt = rebalance_hierarchical(
        as_float32(layer_load), num_replicas, groups, num_nodes, num_gpus
    )
    width = int(logcnt.max())
    log2phy = np.full((num_layers, num_experts * width), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * width + replica_rank,
                      np.broadcast_to(np.arange(num_replicas), phy2log.shape), 1)
    return (torch.from_numpy(phy2log), torch.from_numpy(log2phy).view(num_layers, num_experts, width),
            torch.from_numpy(logcnt))


GLOBAL = Algorithm(
    name="deepseek",
    fn=deepseek_global,
    summary="DeepSeek EPLB, global policy: replicate the hottest experts, pack replicas onto GPUs",
)
HIERARCHICAL = Algorithm(
    name="deepseek_hierarchical",
    fn=deepseek_hierarchical,
    summary="DeepSeek EPLB, hierarchical policy: expert groups onto nodes, replicate and pack inside each node",
    check=check_hierarchical,
)
