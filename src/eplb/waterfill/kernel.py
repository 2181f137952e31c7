"""Waterfill as one Triton kernel: count, choose and expand in a single launch.

It computes exactly what ``eplb.waterfill.reference.waterfill_torch`` computes. Each program
handles ``BLOCK_M`` tokens; the rank-level work (counting the batch when the loads come from it,
the water level, the weights) is a few hundred integer ops on ``W`` values that every program
repeats, which is cheaper than a second launch or a grid-wide barrier. Imported on first use
(triton is optional). On CPU tensors it runs under the Triton interpreter, which needs
``TRITON_INTERPRET=1`` set before triton is first imported; loops take compile-time trip
counts because the interpreter cannot run a loop over a runtime bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb.dispatch.hashing import MUL1, MUL2, UNIFORM_BITS
from eplb.waterfill.reference import NO_RANK_LOAD, WEIGHT_BITS, Rule, Source

# Kernels read module globals only as constexprs.
_WEIGHT_BITS = tl.constexpr(WEIGHT_BITS)
_NO_RANK_LOAD = tl.constexpr(NO_RANK_LOAD)
_UNIFORM_BITS = tl.constexpr(UNIFORM_BITS)
_MUL1 = tl.constexpr(MUL1)
_MUL2 = tl.constexpr(MUL2)
# Ids binned per histogram step when a program counts the whole batch.
_COUNT_IDS = 4096
# Tokens x ranks per program for the choice: keeps the [BLOCK_M, W] tiles in registers.
_CHOICE_CELLS = 2048


@triton.jit
def _count_batch(ids_ptr, num_tokens, slots_per_rank,
                 K: tl.constexpr, K_PAD: tl.constexpr, W_PAD: tl.constexpr, HIST: tl.constexpr,
                 CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """(``[W_PAD]`` routed entries per rank (zeros unless HIST), tokens with any routed entry)."""
    cols = tl.arange(0, K_PAD)
    hist = tl.zeros([W_PAD], dtype=tl.int64)
    tokens = tl.zeros([CHUNK], dtype=tl.int64)
    for c in range(NUM_CHUNKS):
        rows = c * CHUNK + tl.arange(0, CHUNK)
        inside = (rows < num_tokens)[:, None] & (cols < K)[None, :]
        ids = tl.load(ids_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=-1)
        valid = ids >= 0
        if HIST:
            rank = tl.where(valid, ids // slots_per_rank, 0).to(tl.int32)
            hist += tl.histogram(tl.reshape(rank, [CHUNK * K_PAD]), W_PAD,
                                 mask=tl.reshape(valid, [CHUNK * K_PAD])).to(tl.int64)
        tokens += tl.max(valid.to(tl.int64), axis=1)
    return hist, tl.sum(tokens, axis=0)


@triton.jit
def _count_kernel(ids_ptr, out_ptr, num_tokens, slots_per_rank,
                  K: tl.constexpr, K_PAD: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr,
                  CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """``out [W + 1]`` = ``local_counts``: one program, so no zeroing and no atomics."""
    hist, tokens = _count_batch(ids_ptr, num_tokens, slots_per_rank, K, K_PAD, W_PAD, True, CHUNK, NUM_CHUNKS)
    ranks = tl.arange(0, W_PAD)
    tl.store(out_ptr + ranks, hist, mask=ranks < W)
    tl.store(out_ptr + W, tokens)


@triton.jit
def _waterfill_kernel(
    ids_ptr, weights_ptr, loads_ptr, shared_weight_ptr, out_ids_ptr, out_weights_ptr,
    num_tokens, slots_per_rank, rank, key, min_tile_tokens, local_weight, remote_weight,
    K: tl.constexpr, K_PAD: tl.constexpr, K1_PAD: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, SOURCE: tl.constexpr, HAS_LOADS: tl.constexpr, ALL_RANKS: tl.constexpr,
    LOCAL_ONLY: tl.constexpr,
    TILE: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_tokens
    if LOCAL_ONLY:
        dest = tl.zeros([BLOCK_M], dtype=tl.int64) + rank
    else:
        ranks = tl.arange(0, W_PAD)
        rank_ok = ranks < W
        # 1. Rank loads [W] and the shared load, and the step's tokens for the tile rule.
        if SOURCE == 0:
            load, local_tokens = _count_batch(ids_ptr, num_tokens, slots_per_rank, K, K_PAD, W_PAD, True,
                                              CHUNK, NUM_CHUNKS)
            shared = local_tokens
            tokens_this_step = local_tokens * W
            if HAS_LOADS:
                load += tl.load(loads_ptr + ranks, mask=rank_ok, other=0)
                shared += tl.load(loads_ptr + W)
        else:
            load = tl.load(loads_ptr + ranks, mask=rank_ok, other=0)
            shared = tl.load(loads_ptr + W)
            tokens_this_step = shared
            if SOURCE == 1 and TILE:
                _, local_tokens = _count_batch(ids_ptr, num_tokens, slots_per_rank, K, K_PAD, W_PAD, False,
                                               CHUNK, NUM_CHUNKS)
                tokens_this_step = local_tokens * W
        # 2. Weights: deficits below the water level (see reference.rank_weights).
        below_or_equal = (load[None, :] <= load[:, None]) & rank_ok[None, :]
        gap = tl.sum(tl.where(below_or_equal, load[:, None] - load[None, :], 0), axis=1)
        top_wet = tl.max(tl.where((gap < shared) & rank_ok, load, -1), axis=0)
        wet = (load <= top_wet) & rank_ok
        count = tl.sum(wet.to(tl.int64), axis=0)
        level = shared + tl.sum(tl.where(wet, load, 0), axis=0)
        deficit = tl.where(rank_ok, tl.maximum(level - load * count, 0), 0)
        weight = deficit // ((tl.max(deficit, axis=0) >> _WEIGHT_BITS) + 1)
        if TILE:
            keep = (weight * tokens_this_step >= min_tile_tokens * tl.sum(weight, axis=0)) | (
                weight == tl.max(weight, axis=0))
            weight = tl.where(keep, weight, 0)
        # 3. Candidates, the weighted draw, and the least-loaded fallback.
        if ALL_RANKS:
            cand = row_ok[:, None] & rank_ok[None, :]
        else:
            cand = row_ok[:, None] & (ranks == rank)[None, :]
            for k in tl.static_range(K):
                idk = tl.load(ids_ptr + rows * K + k, mask=row_ok, other=-1)
                routed = tl.where(idk >= 0, idk // slots_per_rank, -1)
                cand = cand | (routed[:, None] == ranks[None, :])
        is_own = ranks == rank
        pref = tl.where(is_own, local_weight, remote_weight).to(tl.int64)
        w_tok = tl.where(cand, (weight * pref)[None, :], 0)
        total = tl.sum(w_tok, axis=1)
        h = rows.to(tl.uint32) ^ key.to(tl.uint32)
        h ^= h >> 16
        h *= _MUL1
        h ^= h >> 15
        h *= _MUL2
        h ^= h >> 16
        u = ((h >> (32 - _UNIFORM_BITS)).to(tl.int64) * total) >> _UNIFORM_BITS
        drawn = tl.sum((tl.cumsum(w_tok, axis=1) <= u[:, None]).to(tl.int64), axis=1)

        other = tl.where(cand & (~is_own)[None, :], load[None, :], _NO_RANK_LOAD)
        least_load = tl.min(other, axis=1)
        least = tl.min(tl.where(other == least_load[:, None], ranks[None, :], W_PAD), axis=1).to(tl.int64)
        own_load = tl.sum(tl.where(is_own, load, 0), axis=0)
        found = least_load < _NO_RANK_LOAD
        lower = found & (tl.where(found, least_load, 0) * local_weight < own_load * remote_weight)
        dest = tl.where(total > 0, drawn, tl.where(lower, least, rank))
    # 4. Expand: routed ids p -> p + p // epr, the shared column last.
    cols = tl.arange(0, K1_PAD)
    inside = row_ok[:, None] & (cols < K)[None, :]
    ids = tl.load(ids_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=-1)
    wts = tl.load(weights_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0)
    valid = ids >= 0
    has_valid = tl.max(valid.to(tl.int32), axis=1) > 0
    shared_id = tl.where(has_valid, dest * (slots_per_rank + 1) + slots_per_rank, -1)
    shared_w = tl.where(has_valid, tl.load(shared_weight_ptr), 0)
    is_shared = (cols == K)[None, :]
    out_ids = tl.where(is_shared, shared_id[:, None], tl.where(valid, ids + ids // slots_per_rank, ids))
    out_w = tl.where(is_shared, shared_w[:, None], tl.where(valid, wts, 0))
    out = rows[:, None] * (K + 1) + cols[None, :]
    written = row_ok[:, None] & (cols <= K)[None, :]
    tl.store(out_ids_ptr + out, out_ids, mask=written)
    tl.store(out_weights_ptr + out, out_w, mask=written)


def _count_args(num_tokens: int, k: int, counts: bool = True) -> dict[str, int]:
    k_pad = triton.next_power_of_2(k)
    chunk = max(1, _COUNT_IDS // k_pad)
    # A power of two, so that varying batch sizes compile a few variants, not one each; a kernel
    # that counts nothing gets 1 and no variants at all.
    chunks = triton.next_power_of_2(max(1, triton.cdiv(num_tokens, chunk))) if counts else 1
    return {"K_PAD": k_pad, "CHUNK": chunk, "NUM_CHUNKS": chunks}


def local_counts_triton(topk_ids: torch.Tensor, slots_per_rank: int, ep_size: int) -> torch.Tensor:
    """Same contract as ``reference.local_counts``; ``topk_ids`` must be contiguous."""
    m, k = topk_ids.shape
    out = torch.empty(ep_size + 1, dtype=torch.int64, device=topk_ids.device)
    _count_kernel[(1,)](
        topk_ids, out, m, slots_per_rank,
        K=k, W=ep_size, W_PAD=triton.next_power_of_2(ep_size), **_count_args(m, k),
    )
    return out


def waterfill_triton(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    loads: torch.Tensor | None,
    shared_weight: torch.Tensor,
    source: Source,
    rule: Rule,
    local_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.waterfill_torch`` (``local_only``: every shared expert stays on
    ``rule.rank``, as ``reference.expand`` with ``dest=rank``).

    ``topk_ids`` and ``topk_weights`` must be contiguous; ``shared_weight`` is a one-element
    tensor of the weights' dtype (so a float64 weight is not rounded through float32).
    """
    m, k = topk_ids.shape
    out_ids = torch.empty(m, k + 1, dtype=topk_ids.dtype, device=topk_ids.device)
    out_weights = torch.empty(m, k + 1, dtype=topk_weights.dtype, device=topk_weights.device)
    if m == 0:
        return out_ids, out_weights
    w_pad = triton.next_power_of_2(rule.ep_size)
    block_m = max(16, min(128, _CHOICE_CELLS // w_pad))
    _waterfill_kernel[(triton.cdiv(m, block_m),)](
        topk_ids, topk_weights, topk_ids if loads is None else loads, shared_weight, out_ids, out_weights,
        m, rule.slots_per_rank, rule.rank, rule.key, rule.min_tile_tokens, rule.local_weight, rule.remote_weight,
        K=k, K1_PAD=triton.next_power_of_2(k + 1), W=rule.ep_size, W_PAD=w_pad, BLOCK_M=block_m,
        SOURCE=int(source), HAS_LOADS=loads is not None, ALL_RANKS=rule.all_ranks, LOCAL_ONLY=local_only,
        TILE=rule.min_tile_tokens > 0,
        **_count_args(m, k, counts=not local_only and (source == Source.BATCH or rule.min_tile_tokens > 0)),
    )
    return out_ids, out_weights
