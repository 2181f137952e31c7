"""Waterfill as one Triton kernel: choose and expand in a single launch (and count, where the
loads come from the batch).

It computes exactly what ``eplb.waterfill.reference.waterfill_torch`` computes. Each program
handles ``BLOCK_M`` tokens, one per lane. With fixed rank tables (static mode with recorded
loads, the default) a token's work is O(K) whatever the EP size: ``K`` steps of a weighted
reservoir draw over its routed ranks, which reads each rank's weight from the ``[2, W]`` table
(a few hundred bytes, cached) and skips repeated ranks with a bitmask. Otherwise every program
first builds the same tables from this step's loads (O(W**2) integer ops on ``W`` values) and
writes them to a scratch buffer it then reads back: the programs write identical values, so no
grid-wide barrier is needed, and it is cheaper than a second launch. Imported on first use
(triton is optional). On CPU tensors it runs under the Triton interpreter, which needs
``TRITON_INTERPRET=1`` set before triton is first imported; loops take compile-time trip
counts because the interpreter cannot run a loop over a runtime bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb.dispatch.hashing import MUL1, MUL2, UNIFORM_BITS
from eplb.waterfill.reference import WEIGHT_BITS, Rule, Source

# Kernels read module globals only as constexprs.
_WEIGHT_BITS = tl.constexpr(WEIGHT_BITS)
_UNIFORM_BITS = tl.constexpr(UNIFORM_BITS)
_MUL1 = tl.constexpr(MUL1)
_MUL2 = tl.constexpr(MUL2)
# Ids binned per histogram step (and per program of the count kernel).
_COUNT_IDS = 4096
# Tokens per program and its warps: one token per lane; small programs spread a batch of a few
# thousand tokens over many SMs, since a token's work is a short serial chain.
BLOCK_M = 64
NUM_WARPS = 2
# candidates="all" holds a [BLOCK_M, W] tile: at most this many cells per program.
_ALL_RANKS_CELLS = 4096


@triton.jit
def _entry_uniform(entry, key):
    """``UNIFORM_BITS`` top bits of ``eplb.dispatch.hashing``'s ``h(entry)``, as int64."""
    h = entry.to(tl.uint32) ^ key.to(tl.uint32)
    h ^= h >> 16
    h *= _MUL1
    h ^= h >> 15
    h *= _MUL2
    h ^= h >> 16
    return (h >> (32 - _UNIFORM_BITS)).to(tl.int64)


@triton.jit
def _count_batch(ids_ptr, start, num_tokens,
                 K: tl.constexpr, K_PAD: tl.constexpr, W_PAD: tl.constexpr, EPR: tl.constexpr,
                 HIST: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """Of tokens ``[start, start + CHUNK * NUM_CHUNKS)``: (``[W_PAD]`` routed entries per rank
    (zeros unless HIST), tokens with any routed entry)."""
    cols = tl.arange(0, K_PAD)
    hist = tl.zeros([W_PAD], dtype=tl.int64)
    tokens = tl.zeros([CHUNK], dtype=tl.int64)
    for c in range(NUM_CHUNKS):
        rows = start + c * CHUNK + tl.arange(0, CHUNK)
        inside = (rows < num_tokens)[:, None] & (cols < K)[None, :]
        ids = tl.load(ids_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=-1)
        valid = ids >= 0
        if HIST:
            rank = tl.where(valid, ids.to(tl.int32) // EPR, 0)
            hist += tl.histogram(tl.reshape(rank, [CHUNK * K_PAD]), W_PAD,
                                 mask=tl.reshape(valid, [CHUNK * K_PAD])).to(tl.int64)
        tokens += tl.max(valid.to(tl.int64), axis=1)
    return hist, tl.sum(tokens, axis=0)


@triton.jit
def _count_kernel(ids_ptr, out_ptr, num_tokens,
                  K: tl.constexpr, K_PAD: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr,
                  EPR: tl.constexpr, CHUNK: tl.constexpr):
    """``out [W + 1]`` (zeroed) += ``local_counts`` of this program's ``CHUNK`` tokens."""
    hist, tokens = _count_batch(ids_ptr, tl.program_id(0) * CHUNK, num_tokens, K, K_PAD, W_PAD, EPR, True,
                                CHUNK, 1)
    ranks = tl.arange(0, W_PAD)
    tl.atomic_add(out_ptr + ranks, hist, mask=ranks < W)
    tl.atomic_add(out_ptr + W, tokens)


@triton.jit
def _build_tables(ids_ptr, loads_ptr, tables_ptr, num_tokens, rank, min_tile_tokens, local_weight, remote_weight,
                  K: tl.constexpr, K_PAD: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, EPR: tl.constexpr,
                  SOURCE: tl.constexpr, HAS_LOADS: tl.constexpr, TILE: tl.constexpr,
                  CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """``reference.rank_tables(reference.rank_weights(...))`` of this step, stored at ``tables_ptr``."""
    ranks = tl.arange(0, W_PAD)
    rank_ok = ranks < W
    # Rank loads [W] and the shared load, and the step's tokens for the tile rule.
    if SOURCE == 0:
        load, local_tokens = _count_batch(ids_ptr, 0, num_tokens, K, K_PAD, W_PAD, EPR, True, CHUNK, NUM_CHUNKS)
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
            _, local_tokens = _count_batch(ids_ptr, 0, num_tokens, K, K_PAD, W_PAD, EPR, False, CHUNK, NUM_CHUNKS)
            tokens_this_step = local_tokens * W
    # Weights: deficits below the water level (reference._water_level, rank_weights).
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
    # Tables (reference.rank_tables): weight x preference; fallback keys by load order.
    own = ranks == rank
    drawn = weight * tl.where(own, local_weight, remote_weight).to(tl.int64)
    before = ((load[None, :] < load[:, None]) | ((load[None, :] == load[:, None]) & (ranks[None, :] < ranks[:, None])))
    order = tl.sum((before & rank_ok[None, :]).to(tl.int64), axis=1)
    own_load = tl.sum(tl.where(own, load, 0), axis=0)
    lower = (~own) & (load * local_weight < own_load * remote_weight)
    key = tl.where(lower, order * W + ranks, W * W)
    tl.store(tables_ptr + ranks, drawn, mask=rank_ok)
    tl.store(tables_ptr + W + ranks, key, mask=rank_ok)
    # Makes this program's stores visible to all its lanes before they read the tables.
    tl.debug_barrier()


@triton.jit
def _waterfill_kernel(
    ids_ptr, weights_ptr, loads_ptr, tables_ptr, shared_weight_ptr, out_ids_ptr, out_weights_ptr,
    num_tokens, rank, key, min_tile_tokens, local_weight, remote_weight,
    K: tl.constexpr, K_PAD: tl.constexpr, K1_PAD: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr,
    EPR: tl.constexpr, WORDS: tl.constexpr, BLOCK: tl.constexpr,
    SOURCE: tl.constexpr, HAS_LOADS: tl.constexpr, FIXED_TABLES: tl.constexpr, ALL_RANKS: tl.constexpr,
    LOCAL_ONLY: tl.constexpr, TILE: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < num_tokens
    if LOCAL_ONLY:
        dest = tl.zeros([BLOCK], dtype=tl.int64) + rank
    else:
        if not FIXED_TABLES:
            _build_tables(ids_ptr, loads_ptr, tables_ptr, num_tokens, rank, min_tile_tokens, local_weight,
                          remote_weight, K, K_PAD, W, W_PAD, EPR, SOURCE, HAS_LOADS, TILE, CHUNK, NUM_CHUNKS)
        if ALL_RANKS:
            # Inverse CDF over all ranks (reference.choose_shared_rank, candidates="all").
            ranks = tl.arange(0, W_PAD)
            weight = tl.load(tables_ptr + ranks, mask=ranks < W, other=0)
            total = tl.zeros([BLOCK], dtype=tl.int64) + tl.sum(weight, axis=0)
            u = (_entry_uniform(rows * K, key) * total) >> _UNIFORM_BITS
            chosen = tl.sum((tl.cumsum(weight, axis=0)[None, :] <= u[:, None]).to(tl.int64), axis=1)
            least = tl.min(tl.load(tables_ptr + W + ranks, mask=ranks < W, other=W * W), axis=0)
            fallback_key = tl.zeros([BLOCK], dtype=tl.int64) + least
        else:
            # Chao's weighted reservoir over the own rank and the routed ranks, each counted once
            # (a bitmask of 64-rank words marks the ranks seen).
            words = tl.arange(0, WORDS)
            seen = tl.where((words == rank // 64)[None, :], tl.full([BLOCK, WORDS], 1, tl.int64) << (rank % 64), 0)
            total = tl.zeros([BLOCK], dtype=tl.int64) + tl.load(tables_ptr + rank)
            chosen = tl.zeros([BLOCK], dtype=tl.int64) + rank
            fallback_key = tl.full([BLOCK], W * W, tl.int64)
            for k in tl.static_range(K):
                idk = tl.load(ids_ptr + rows * K + k, mask=row_ok, other=-1)
                valid = idk >= 0
                r = tl.where(valid, idk.to(tl.int32) // EPR, 0)
                bit = tl.full([BLOCK], 1, tl.int64) << (r % 64).to(tl.int64)
                in_word = (words[None, :] == (r // 64)[:, None]) & valid[:, None]
                new = valid & ((tl.sum(tl.where(in_word, seen, 0), axis=1) & bit) == 0)
                seen = seen | tl.where(in_word, bit[:, None], 0)
                w_k = tl.load(tables_ptr + r, mask=new, other=0)
                total += w_k
                replaces = _entry_uniform(rows * K + k, key) * total < (w_k << _UNIFORM_BITS)
                chosen = tl.where(replaces, r.to(tl.int64), chosen)
                fallback_key = tl.minimum(fallback_key, tl.load(tables_ptr + W + r, mask=new, other=W * W))
        fallback = tl.where(fallback_key < W * W, fallback_key % W, rank)
        dest = tl.where(total > 0, chosen, fallback)
    # Expand: routed ids p -> p + p // epr, the shared column last.
    cols = tl.arange(0, K1_PAD)
    inside = row_ok[:, None] & (cols < K)[None, :]
    ids = tl.load(ids_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=-1)
    wts = tl.load(weights_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0)
    valid = ids >= 0
    has_valid = tl.max(valid.to(tl.int32), axis=1) > 0
    shared_id = tl.where(has_valid, dest * (EPR + 1) + EPR, -1)
    shared_w = tl.where(has_valid, tl.load(shared_weight_ptr), 0)
    is_shared = (cols == K)[None, :]
    out_ids = tl.where(is_shared, shared_id[:, None], tl.where(valid, ids + ids // EPR, ids))
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
    """Same contract as ``reference.local_counts``; ``topk_ids`` must be contiguous. A zero fill
    and one program per ``CHUNK`` tokens adding into it (integer atomics: exact)."""
    m, k = topk_ids.shape
    out = torch.zeros(ep_size + 1, dtype=torch.int64, device=topk_ids.device)
    args = _count_args(m, k, counts=False)
    if m:
        _count_kernel[(triton.cdiv(m, args["CHUNK"]),)](
            topk_ids, out, m, K=k, K_PAD=args["K_PAD"], W=ep_size, W_PAD=triton.next_power_of_2(ep_size),
            EPR=slots_per_rank, CHUNK=args["CHUNK"],
        )
    return out


def waterfill_triton(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    loads: torch.Tensor | None,
    shared_weight: torch.Tensor,
    source: Source,
    rule: Rule,
    local_only: bool,
    tables: torch.Tensor,
    fixed_tables: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.waterfill_torch`` (``local_only``: every shared expert stays on
    ``rule.rank``, as ``reference.expand`` with ``dest=rank``).

    ``topk_ids`` and ``topk_weights`` must be contiguous; ``shared_weight`` is a one-element
    tensor of the weights' dtype (so a float64 weight is not rounded through float32).
    ``tables``: ``[2, W]`` int64, the fixed ``reference.rank_tables`` when ``fixed_tables``, else a
    scratch buffer the kernel writes them to.
    """
    m, k = topk_ids.shape
    out_ids = torch.empty(m, k + 1, dtype=topk_ids.dtype, device=topk_ids.device)
    out_weights = torch.empty(m, k + 1, dtype=topk_weights.dtype, device=topk_weights.device)
    if m == 0:
        return out_ids, out_weights
    w_pad = triton.next_power_of_2(rule.ep_size)
    block = max(16, min(BLOCK_M, _ALL_RANKS_CELLS // w_pad)) if rule.all_ranks else BLOCK_M
    counts = not (local_only or fixed_tables) and (source == Source.BATCH or rule.min_tile_tokens > 0)
    _waterfill_kernel[(triton.cdiv(m, block),)](
        topk_ids, topk_weights, tables if loads is None else loads, tables, shared_weight, out_ids, out_weights,
        m, rule.rank, rule.key, rule.min_tile_tokens, rule.local_weight, rule.remote_weight,
        K=k, K1_PAD=triton.next_power_of_2(k + 1), W=rule.ep_size, W_PAD=w_pad, EPR=rule.slots_per_rank,
        WORDS=triton.next_power_of_2(triton.cdiv(rule.ep_size, 64)), BLOCK=block,
        SOURCE=int(source), HAS_LOADS=loads is not None, FIXED_TABLES=fixed_tables, ALL_RANKS=rule.all_ranks,
        LOCAL_ONLY=local_only, TILE=rule.min_tile_tokens > 0, **_count_args(m, k, counts=counts),
        num_warps=NUM_WARPS,
    )
    return out_ids, out_weights
