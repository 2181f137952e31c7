"""Re-labelling a placement to keep the current slots: GPUs are interchangeable within a node (and
nodes as wholes), slots within a GPU, so neither changes a GPU's or a node's load."""

from __future__ import annotations

import numpy as np
import torch


def align(
    current: torch.Tensor,
    target: torch.Tensor,
    num_gpus: int,
    num_nodes: int = 1,
    permute_gpus: bool = True,
) -> torch.Tensor:
    """Re-label ``target`` to keep as many slots of ``current`` unchanged as possible.

    Permuting GPUs within a node, nodes as wholes, and slots within a GPU changes neither the
    GPU loads nor the node loads, so the result is exactly as balanced as ``target``. GPUs are
    matched by the number of experts they share (multiset overlap), optimally per layer; within a
    GPU, an expert that stays keeps its current slot and the incoming experts fill the freed
    slots in the target's order.

    Args:
        current: ``[L, P]`` phy2log now serving (``-1``: empty slot).
        target: ``[L, P]`` phy2log to reach, with the same expert multiset per GPU as the result.
        num_gpus: ``G``.
        num_nodes: ``N``; GPUs only move within their node so node-level balance is kept too.
        permute_gpus: False keeps each target GPU on its own rank and only re-orders slots within
            GPUs (what vLLM does when it preserves intra-GPU slots).

    Returns:
        ``[L, P]`` int64 phy2log: ``target`` with GPUs and slots permuted.
    """
    num_layers, num_slots = current.shape
    per_gpu = num_slots // num_gpus
    cur = current.view(num_layers, num_gpus, per_gpu)
    tgt = target.view(num_layers, num_gpus, per_gpu)
    if permute_gpus:
        rank_of = _match_gpus(cur, tgt, num_nodes)  # [L, G]: target GPU for each current rank
        tgt = tgt.gather(1, rank_of[:, :, None].expand(-1, -1, per_gpu))
    return _keep_slots(cur, tgt).reshape(num_layers, num_slots)


def _gpu_counts(phy2log: torch.Tensor) -> torch.Tensor:
    """``[L, G, E + 1]`` replicas of each expert per GPU (the last id counts empty slots)."""
    num_layers, num_gpus, _ = phy2log.shape
    ids = torch.where(phy2log >= 0, phy2log, int(phy2log.max()) + 1)
    width = int(ids.max()) + 1
    counts = torch.zeros(num_layers, num_gpus, width, dtype=torch.int64)
    return counts.scatter_add_(2, ids, torch.ones_like(ids))


def _match_gpus(cur: torch.Tensor, tgt: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``[L, G]``: for each current GPU, the target GPU that shares the most experts with it."""
    num_layers, num_gpus, _ = cur.shape
    # One id space for both, with the empty slot as an extra id, so empty matches empty.
    both = _gpu_counts(torch.cat([cur, tgt], dim=1))
    cur_cnt, tgt_cnt = both[:, :num_gpus], both[:, num_gpus:]
    # sum_e min(c, t) = sum_k sum_e [c >= k][t >= k]: one exact matrix product per copy count k.
    overlap = torch.zeros(num_layers, num_gpus, num_gpus, dtype=torch.float64)
    for k in range(1, int(both.max()) + 1):
        overlap += (cur_cnt >= k).to(torch.float64) @ (tgt_cnt >= k).to(torch.float64).transpose(1, 2)
    overlap = overlap.to(torch.int64).numpy()
    return torch.from_numpy(np.stack([_assign_within_nodes(o, num_nodes) for o in overlap]))


def _assign_within_nodes(overlap: np.ndarray, num_nodes: int) -> np.ndarray:
    """Max-overlap assignment of GPUs that maps nodes onto nodes.

    Args:
        overlap: ``[G, G]`` experts shared by current GPU ``i`` and target GPU ``j``.
        num_nodes: ``N``; node ``n`` holds GPUs ``[n * G/N, (n + 1) * G/N)``.

    Returns:
        ``[G]`` int64: the target GPU of each current GPU.
    """
    # Imported here so that eplb imports without SciPy; only re-labelling needs it.
    from scipy.optimize import linear_sum_assignment

    per_node = overlap.shape[0] // num_nodes
    # blocks[n, m]: the [G/N, G/N] overlap of current node n's GPUs with target node m's.
    blocks = overlap.reshape(num_nodes, per_node, num_nodes, per_node).transpose(0, 2, 1, 3)
    best = np.zeros((num_nodes, num_nodes), dtype=np.int64)
    inner = np.zeros((num_nodes, num_nodes, per_node), dtype=np.int64)
    for n in range(num_nodes):
        for m in range(num_nodes):
            rows, cols = linear_sum_assignment(blocks[n, m], maximize=True)
            best[n, m] = blocks[n, m][rows, cols].sum()
            inner[n, m, rows] = cols
    node_rows, node_cols = linear_sum_assignment(best, maximize=True)
    out = np.empty(overlap.shape[0], dtype=np.int64)
    for n, m in zip(node_rows, node_cols, strict=False):
        out[n * per_node : (n + 1) * per_node] = m * per_node + inner[n, m]
    return out


def _keep_slots(cur: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Order each GPU's target experts so that the ones it already holds stay in their slots.

    Args:
        cur: ``[..., S]`` experts now in each local slot.
        tgt: ``[..., S]`` experts the GPU must hold (any order).

    Returns:
        ``[..., S]``: a permutation of ``tgt`` per GPU that agrees with ``cur`` on as many slots
        as the two multisets share.
    """
    per_gpu = cur.shape[-1]
    earlier = torch.ones(per_gpu, per_gpu, dtype=torch.bool).tril(-1)

    def matched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # The k-th copy of an expert in a is matched when b holds at least k + 1 copies.
        seen_before = ((a[..., :, None] == a[..., None, :]) & earlier).sum(-1)
        return seen_before < (a[..., :, None] == b[..., None, :]).sum(-1)

    keep = matched(cur, tgt)
    used = matched(tgt, cur)
    # Freed slots (in slot order) take the unmatched target experts (in target order).
    free_slots = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices
    incoming = tgt.gather(-1, torch.sort(used.to(torch.int8), dim=-1, stable=True).indices)
    filled = torch.empty_like(tgt).scatter_(-1, free_slots, incoming)
    return torch.where(keep, cur, filled)
