"""SGLang's time-series-aware DeepSeek variants (``deepseek_vec`` in sgl-project/sglang).

DeepSeek's greedy plans on the load summed over the recording window, so an expert that is hot
in every step and one that is very hot in a single step look alike. These variants keep the
steps ``[T, L, E]`` apart: each redundant slot goes to the expert whose extra replica most
reduces the sum over steps of the per-step peak replica load, and the replicas are then dealt
onto the GPUs in serpentine order of their (summed) load per replica.

- ``deepseek_vec`` (SGLang's decode policy): one pool of slots over all GPUs;
- ``deepseek_vec_hierarchical`` (SGLang's prefill policy): expert groups packed onto nodes as in
  DeepSeek's hierarchical policy, then replication and serpentine placement inside each node.

Where SGLang's code differs from these stated semantics, we follow the semantics (see
``replicate_experts_vec``): ties are broken explicitly, not by adding ``1e-4 * expert id`` to the
loads, which float32 drops for large counts and which also skews the comparison it is meant to
break ties in. We plan in float64 (SGLang: float32) and sort replicas stably for the serpentine.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.cluster import Cluster
from eplb.planning.algorithm import Algorithm
from eplb.planning.deepseek import (
    check_hierarchical,
    inverse_permutation,
    node_slots_to_experts,
    pack_groups_to_nodes,
)


def replicate_experts_vec(load: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray]:
    """Give ``num_phy - n`` redundant slots, one at a time, to the expert whose extra replica
    most reduces ``sum over t of max over e of load[t, e] / logcnt[e]``.

    Only the expert with the unique peak of step ``t`` can lower that step's peak, so the
    reduction ("gain") of each candidate is a sum over the steps it peaks in. When several
    candidates gain equally (typically nobody gains: every step's peak is tied), the one with
    the highest summed load per replica wins, then the lowest id -- DeepSeek's rule, which also
    spreads a uniform load instead of piling replicas onto expert 0.

    Args:
        load: ``[T, X, n]`` float64 load of each logical expert in each step; the ``X`` rows
            (layers, or (layer, node) pairs) are independent.
        num_phy: physical experts per row after replication, ``>= n``.

    Returns:
        phy2log: ``[X, num_phy]`` int64, experts ``0..n-1`` first, then the redundant replicas
            in the order they were made.
        logcnt: ``[X, n]`` int64, replicas per expert.
    """
    num_steps, num_rows, num_log = load.shape
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    total = load.sum(0)
    per_replica = load.copy()
    rows = np.arange(num_rows)
    row_base = rows * num_log
    for slot in range(num_log, num_phy):
        peak_expert = per_replica.argmax(-1)[..., None]  # [T, X, 1]
        peak = np.take_along_axis(per_replica, peak_expert, -1)
        np.put_along_axis(per_replica, peak_expert, -np.inf, -1)
        runner_up = per_replica.max(-1, keepdims=True)
        np.put_along_axis(per_replica, peak_expert, peak, -1)
        relieved = np.take_along_axis(load, peak_expert, -1) / (logcnt[rows, peak_expert[..., 0], None] + 1)
        drop = peak - np.maximum(runner_up, relieved)  # 0 where the peak is tied
        gain = np.bincount((row_base[:, None] + peak_expert).ravel(), drop.ravel(),
                           minlength=num_rows * num_log).reshape(num_rows, num_log)
        tie_break = np.where(gain == gain.max(1, keepdims=True), total / logcnt, -np.inf)
        expert = tie_break.argmax(1)
        phy2log[:, slot] = expert
        logcnt[rows, expert] += 1
        per_replica[:, rows, expert] = load[:, rows, expert] / logcnt[rows, expert]
    return phy2log, logcnt


def serpentine_order(slot_load: np.ndarray, num_gpus: int) -> np.ndarray:
    """Deal the slots onto ``num_gpus`` GPUs in serpentine order of load.

    Sorted by load (heaviest first, lower slot first on ties), round ``r`` deals the next
    ``num_gpus`` slots to GPUs ``0, 1, ..., G-1`` when ``r`` is even and ``G-1, ..., 0`` when odd;
    the slot dealt in round ``r`` becomes local slot ``r`` of its GPU.

    Args:
        slot_load: ``[X, C]`` load of each slot; ``C`` a multiple of ``num_gpus``.
        num_gpus: GPUs the ``C`` slots are spread over.

    Returns:
        ``[X, C]`` int64: new slot ``j`` (GPU ``j // (C / G)``) takes old slot ``order[:, j]``.
    """
    num_rows, num_slots = slot_load.shape
    by_load = np.argsort(-slot_load, axis=1, kind="stable")
    rounds = by_load.reshape(num_rows, num_slots // num_gpus, num_gpus)
    rounds[:, 1::2] = rounds[:, 1::2, ::-1]
    return rounds.transpose(0, 2, 1).reshape(num_rows, num_slots)


def _replicate_and_place(load: np.ndarray, num_phy: int, num_gpus: int) -> np.ndarray:
    """``[X, num_phy]``: replicate the experts of each row of ``load [T, X, n]``, then deal the
    replicas onto ``num_gpus`` GPUs by their summed load per replica."""
    phy2log, logcnt = replicate_experts_vec(load, num_phy)
    slot_load = np.take_along_axis(load.sum(0) / logcnt, phy2log, 1)
    return np.take_along_axis(phy2log, serpentine_order(slot_load, num_gpus), 1)


def vec_global(load: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    """SGLang's decode policy.

    Args:
        load: ``[T, L, E]`` float64 load history.
        cluster: the GPUs, slots and nodes.

    Returns:
        phy2log ``[L, P]`` int64.
    """
    return torch.from_numpy(_replicate_and_place(load.numpy(), cluster.num_slots, cluster.num_gpus))


def vec_hierarchical(load: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    """SGLang's prefill policy: groups onto nodes by summed load, then ``vec_global`` per node.

    Args:
        load: ``[T, L, E]`` float64 load history.
        cluster: GPUs, slots and nodes; ``num_groups`` set and a multiple of ``num_nodes``.

    Returns:
        phy2log ``[L, P]`` int64.
    """
    history = load.numpy()
    num_steps, num_layers, num_experts = history.shape
    nodes = cluster.num_nodes
    mlog2log = inverse_permutation(pack_groups_to_nodes(history.sum(0), cluster.num_groups, nodes))
    node_load = np.take_along_axis(history, mlog2log[None], -1).reshape(num_steps, num_layers * nodes, -1)
    phy2mlog = _replicate_and_place(node_load, cluster.num_slots // nodes, cluster.gpus_per_node)
    return torch.from_numpy(node_slots_to_experts(phy2mlog, mlog2log, nodes))


GLOBAL = Algorithm(
    name="deepseek_vec",
    fn=vec_global,
    summary="SGLang's time-series DeepSeek: replicas cut the summed per-step peak; serpentine onto GPUs",
)
HIERARCHICAL = Algorithm(
    name="deepseek_vec_hierarchical",
    fn=vec_hierarchical,
    summary="SGLang's time-series DeepSeek, hierarchical: expert groups onto nodes, then deepseek_vec per node",
    check=check_hierarchical,
)
