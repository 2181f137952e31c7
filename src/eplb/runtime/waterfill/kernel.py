"""Waterfill as one Triton kernel: count, choose and expand in a single launch.

It computes exactly what ``eplb.runtime.waterfill.reference.waterfill_torch`` computes. Each program
handles ``BLOCK_M`` tokens at a time, one per lane, column by column. With fixed rank tables
(static mode with ``estimate="recorded"``) a token's work is O(K) whatever the EP size: ``K``
steps of a weighted reservoir draw over its routed ranks, which reads each rank's weight from the
``[2, W]`` table (a few hundred bytes, cached) and skips repeated ranks with a bitmask (a serial
draw per lane measured faster than a ``[BLOCK_M, K]`` prefix-sum form). Otherwise every program
first builds the same tables from this step's loads (the water level by all pairs of ranks,
or from 32 ranks by a bitonic sort, whichever measured faster) and writes them to a scratch
buffer it then reads back: the programs write identical values, so that needs no barrier
(holding them in registers and gathering from them measured slower). Where those loads need
this batch's counts (static mode's batch rules, the tile rule), the launch is persistent (at
most one program per SM, so all are resident; kernels on other streams can delay a program's
start, not block it, as none waits on this one) and counts the batch across the grid: each
program adds its tiles' counts with integer atomics, each count carrying an arrival mark in its
high bits, and each lane spins on one count until it shows all programs' marks (no fence and no
barrier counter), writing its first tile's routed columns (which need no table) between its add
and its wait; two sets of counters alternate between launches, so each launch leaves the next
one's set zeroed and stays one kernel under CUDA-graph replay. (A separate count kernel and
its zero fill cost two more launches; counting the whole batch in every program, ten times the
fixed rule.) Imported on first use (triton is optional). On CPU tensors it runs under the
Triton interpreter, which needs ``TRITON_INTERPRET=1`` set before triton is first imported, runs
one program, has no inline PTX, and takes compile-time trip counts for loops.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from eplb.errors import EplbError
from eplb.runtime.hashing import UNIFORM_BITS
from eplb.runtime.hashing_triton import entry_hash, uniform
from eplb.runtime.waterfill.reference import EXCESS_BITS, NO_FALLBACK, WEIGHT_BITS, Rule, Source

# Kernels read module globals only as constexprs.
_WEIGHT_BITS = tl.constexpr(WEIGHT_BITS)
_EXCESS_BITS = tl.constexpr(EXCESS_BITS)
_UNIFORM_BITS = tl.constexpr(UNIFORM_BITS)
_NO_FALLBACK = tl.constexpr(NO_FALLBACK)
# A grid count entry keeps, from this bit up, how many programs have added to it.
_ARRIVED_SHIFT = tl.constexpr(40)
# Ids binned per program of the count kernel.
_COUNT_IDS = 4096
# Tokens per program and its warps: one token per lane; small programs spread a batch of a few
# thousand tokens over many SMs, since a token's work is a short serial chain.
BLOCK_M = 64
NUM_WARPS = 2
# candidates="all" holds a [BLOCK_M, W] tile: at most this many cells per program.
_ALL_RANKS_CELLS = 4096


@triton.jit
def _count_tile(ids_ptr, rows, num_tokens, K: tl.constexpr, K_PAD: tl.constexpr, W_PAD: tl.constexpr,
                EPR: tl.constexpr, ROWS: tl.constexpr):
    """``(hist [W_PAD] int32, tokens)``: routed entries per rank and tokens with any, of ``rows``."""
    cols = tl.arange(0, K_PAD)
    inside = (rows < num_tokens)[:, None] & (cols < K)[None, :]
    ids = tl.load(ids_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=-1)
    valid = ids >= 0
    rank = tl.where(valid, ids.to(tl.int32) // EPR, 0)
    hist = tl.histogram(tl.reshape(rank, [ROWS * K_PAD]), W_PAD, mask=tl.reshape(valid, [ROWS * K_PAD]))
    return hist, tl.sum(tl.max(valid.to(tl.int64), axis=1), axis=0)


@triton.jit
def _count_kernel(ids_ptr, out_ptr, num_tokens,
                  K: tl.constexpr, K_PAD: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr,
                  EPR: tl.constexpr, CHUNK: tl.constexpr):
    """``out [W + 1]`` (zeroed) += ``local_counts`` of this program's ``CHUNK`` tokens."""
    rows = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    hist, tokens = _count_tile(ids_ptr, rows, num_tokens, K, K_PAD, W_PAD, EPR, CHUNK)
    ranks = tl.arange(0, W_PAD)
    tl.atomic_add(out_ptr + ranks, hist.to(tl.int64), mask=ranks < W)
    tl.atomic_add(out_ptr + W, tokens)


@triton.jit
def _wait_at_least(ptrs, threshold, SPIN: tl.constexpr):
    """The int64 values at ``ptrs`` (any shape) once each is at least ``threshold``.

    Every lane polls its own copy of each value (a spin loop in PTX, one per element it holds):
    a Triton vector is held in several copies across a program's lanes, and a loop on a reduction
    of it checks one copy, so another lane could leave with a stale one. Volatile loads, as other
    programs' adds land in L2 during this launch (L1 is not coherent). ``SPIN`` false (the
    interpreter, which has no inline PTX and runs one program): one load.
    """
    if SPIN:
        return tl.inline_asm_elementwise(
            "{ .reg .pred done; spin: ld.volatile.global.b64 $0, [$1]; setp.ge.s64 done, $0, $2; @!done bra spin; }",
            "=l,l,l", [ptrs, threshold], dtype=tl.int64, is_pure=False, pack=1)
    else:
        return tl.load(ptrs, volatile=True)


@triton.jit
def _grid_add(ids_ptr, sync_ptr, gen, num_tokens, K: tl.constexpr, K_PAD: tl.constexpr, W: tl.constexpr,
              W_PAD: tl.constexpr, EPR: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """Add this program's share of the batch's ``local_counts`` to the grid's count.

    ``sync_ptr``: int64 ``[sync_size(W)]``, zeros before the first launch: the generation ``g``
    (0 or 1), then two ``[W + 1]`` count vectors. Each program adds its counts plus
    ``2**_ARRIVED_SHIFT`` to every entry of set ``g``, then (``_grid_wait``) waits until every
    entry shows all programs' adds: each entry is its own arrival counter, whatever order the adds
    land in, so the count needs no fence and no separate barrier.
    """
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    counts_ptr = sync_ptr + 1 + gen * (W + 1)
    hist = tl.zeros([W_PAD], dtype=tl.int32)
    tokens = tl.zeros([], dtype=tl.int64)
    for t in range(TILES):
        h, n = _count_tile(ids_ptr, (pid + t * grid) * BLOCK + tl.arange(0, BLOCK), num_tokens, K, K_PAD, W_PAD,
                           EPR, BLOCK)
        hist += h
        tokens += n
    ranks = tl.arange(0, W_PAD)
    arrival = tl.full([], 1, tl.int64) << _ARRIVED_SHIFT
    tl.atomic_add(counts_ptr + ranks, hist.to(tl.int64) + arrival, mask=ranks < W, sem="relaxed")
    tl.atomic_add(counts_ptr + W, tokens + arrival, sem="relaxed")


@triton.jit
def _grid_wait(sync_ptr, gen, W: tl.constexpr, W_PAD: tl.constexpr, POLL: tl.constexpr, SPIN: tl.constexpr):
    """``(load [W_PAD], tokens)``: the whole batch's ``local_counts`` once every program has added
    its share (``_grid_add``). Then (every program has read ``g``) program 0 zeroes set ``1 - g``,
    which the previous launch used and has finished with (launches on a stream run in order), and
    flips ``g``; nothing waits on that."""
    counts_ptr = sync_ptr + 1 + gen * (W + 1)
    complete = tl.num_programs(0).to(tl.int64) << _ARRIVED_SHIFT
    # One entry per lane (POLL >= W + 1 lanes, the rest repeat entries), so the waits overlap.
    lanes = tl.arange(0, POLL)
    done = _wait_at_least(counts_ptr + lanes % (W + 1), complete, SPIN) - complete
    ranks = tl.arange(0, W_PAD)
    rank_ok = ranks < W
    load = tl.where(rank_ok, tl.gather(done, ranks, 0), 0)
    tokens = tl.sum(tl.where(lanes == W, done, 0), axis=0)
    if tl.program_id(0) == 0:
        spent = sync_ptr + 1 + (1 - gen) * (W + 1)
        tl.store(spent + ranks, tl.zeros([W_PAD], dtype=tl.int64), mask=rank_ok)
        tl.store(spent + W, 0)
        tl.store(sync_ptr, 1 - gen)
    return load, tokens


@triton.jit
def _build_tables(counts, local_tokens, given, given_shared, tables_ptr, rank, min_tile_tokens, local_weight,
                  remote_weight, W: tl.constexpr, W_PAD: tl.constexpr,
                  SOURCE: tl.constexpr, HAS_LOADS: tl.constexpr, TILE: tl.constexpr):
    """``reference.rank_tables(reference.rank_weights(...))`` of this step, stored at ``tables_ptr``
    (``counts [W_PAD]`` and ``local_tokens``: this batch's ``local_counts``, where the source or
    the tile rule needs them; ``given [W_PAD]`` and ``given_shared``: the ``loads`` argument)."""
    ranks = tl.arange(0, W_PAD)
    rank_ok = ranks < W
    # Rank loads [W] and the shared load, and the step's tokens for the tile rule.
    if SOURCE == 0 or SOURCE == 3:
        load = counts
        shared = local_tokens
        tokens_this_step = local_tokens * W
        if SOURCE == 3:  # the others' recorded excess per token, times this batch's tokens
            load += (given * local_tokens) >> _EXCESS_BITS
        elif HAS_LOADS:
            load += given
            shared += given_shared
    else:
        load = given
        shared = given_shared
        tokens_this_step = shared
        if SOURCE == 1 and TILE:
            tokens_this_step = local_tokens * W
    # Weights: deficits below the water level (reference._water_level, rank_weights). The top
    # load whose fill gap is below the shared load: from 32 ranks by sorting (a bitonic network,
    # O(W log**2 W)), below that by all pairs (O(W**2), measured faster at EP16, slower from EP32).
    if W_PAD >= 32:
        # Padding sorts last as a tie with the largest load, so it shifts no real position.
        ordered = tl.sort(tl.where(rank_ok, load, tl.max(tl.where(rank_ok, load, 0), axis=0)))
        gap = (ranks + 1).to(tl.int64) * ordered - tl.cumsum(ordered, axis=0)
        top_wet = tl.max(tl.where((gap < shared) & rank_ok, ordered, -1), axis=0)
    else:
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
    # Tables (reference.rank_tables): weight x preference; fallback keys are the loads.
    own = ranks == rank
    drawn = weight * tl.where(own, local_weight, remote_weight).to(tl.int64)
    own_load = tl.sum(tl.where(own, load, 0), axis=0)
    lower = (~own) & (load * local_weight < own_load * remote_weight)
    tl.store(tables_ptr + ranks, drawn, mask=rank_ok)
    tl.store(tables_ptr + W + ranks, tl.where(lower, load, _NO_FALLBACK), mask=rank_ok)
    # Makes this program's stores visible to all its lanes before they read the tables.
    tl.debug_barrier()


@triton.jit
def _waterfill_kernel(
    ids_ptr, weights_ptr, sync_ptr, loads_ptr, tables_ptr, shared_weight_ptr, out_ids_ptr, out_weights_ptr,
    num_tokens, rank, key, min_tile_tokens, local_weight, remote_weight,
    K: tl.constexpr, K_PAD: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr,
    EPR: tl.constexpr, WORDS: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr,
    SOURCE: tl.constexpr, HAS_LOADS: tl.constexpr, FIXED_TABLES: tl.constexpr, ALL_RANKS: tl.constexpr,
    LOCAL_ONLY: tl.constexpr, TILE: tl.constexpr, COUNT: tl.constexpr, POLL: tl.constexpr, SPIN: tl.constexpr,
):
    """``TILES`` tiles of ``BLOCK`` tokens per program, strided by the grid; ``COUNT``: count the
    batch across the grid first, into ``sync_ptr``. The first tile's routed columns, which need no
    table, are read and written while the grid count completes; values carried across the table
    build cost it registers (measured slower from EP32), so the draw reads the ids again (cached)."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    counts = tl.zeros([W_PAD], dtype=tl.int64)
    local_tokens = tl.zeros([], dtype=tl.int64)
    # The generation was written by an earlier launch, or is zero, so a plain load sees it.
    gen = tl.load(sync_ptr)
    ranks = tl.arange(0, W_PAD)
    given = tl.load(loads_ptr + ranks, mask=ranks < W, other=0)
    given_shared = tl.load(loads_ptr + W)
    shared_weight = tl.load(shared_weight_ptr)
    if COUNT:
        _grid_add(ids_ptr, sync_ptr, gen, num_tokens, K, K_PAD, W, W_PAD, EPR, BLOCK, TILES)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    has_valid = _expand_routed(ids_ptr, weights_ptr, out_ids_ptr, out_weights_ptr, rows, num_tokens, K, EPR, BLOCK)
    if COUNT:
        counts, local_tokens = _grid_wait(sync_ptr, gen, W, W_PAD, POLL, SPIN)
    if not (FIXED_TABLES or LOCAL_ONLY):
        _build_tables(counts, local_tokens, given, given_shared, tables_ptr, rank, min_tile_tokens, local_weight,
                      remote_weight, W, W_PAD, SOURCE, HAS_LOADS, TILE)
    _choose_shared(ids_ptr, tables_ptr, out_ids_ptr, out_weights_ptr, shared_weight, has_valid, rows, num_tokens,
                   rank, key, K, W, W_PAD, EPR, WORDS, BLOCK, ALL_RANKS, LOCAL_ONLY)
    for t in range(1, TILES):
        rows = (pid + t * grid) * BLOCK + tl.arange(0, BLOCK)
        has_valid = _expand_routed(ids_ptr, weights_ptr, out_ids_ptr, out_weights_ptr, rows, num_tokens, K, EPR,
                                   BLOCK)
        _choose_shared(ids_ptr, tables_ptr, out_ids_ptr, out_weights_ptr, shared_weight, has_valid, rows,
                       num_tokens, rank, key, K, W, W_PAD, EPR, WORDS, BLOCK, ALL_RANKS, LOCAL_ONLY)


@triton.jit
def _expand_routed(ids_ptr, weights_ptr, out_ids_ptr, out_weights_ptr, rows, num_tokens,
                   K: tl.constexpr, EPR: tl.constexpr, BLOCK: tl.constexpr):
    """Write the routed columns of the tokens ``rows``; return whether each has a routed entry.

    Column by column, one token per lane: a ``[BLOCK, K]`` tile would be loaded in one layout and
    stored in another (the expanded rows are ``K + 1`` long), a conversion through shared memory.
    Every load comes before the first store, as the compiler cannot move a load past a store that
    might alias it.
    """
    row_ok = rows < num_tokens
    has_valid = tl.zeros([BLOCK], dtype=tl.int1)
    routed_ids = ()
    routed_weights = ()
    for k in tl.static_range(K):
        idk = tl.load(ids_ptr + rows * K + k, mask=row_ok, other=-1)
        valid = idk >= 0
        has_valid = has_valid | valid
        # p -> p + p // epr
        routed_ids = routed_ids + (tl.where(valid, idk + idk // EPR, idk),)
        routed_weights = routed_weights + (tl.where(valid, tl.load(weights_ptr + rows * K + k, mask=row_ok, other=0),
                                                    0),)
    for k in tl.static_range(K):
        tl.store(out_ids_ptr + rows * (K + 1) + k, routed_ids[k], mask=row_ok)
        tl.store(out_weights_ptr + rows * (K + 1) + k, routed_weights[k], mask=row_ok)
    return has_valid


@triton.jit
def _choose_shared(ids_ptr, tables_ptr, out_ids_ptr, out_weights_ptr, shared_weight, has_valid, rows, num_tokens,
                   rank, key, K: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, EPR: tl.constexpr,
                   WORDS: tl.constexpr, BLOCK: tl.constexpr, ALL_RANKS: tl.constexpr, LOCAL_ONLY: tl.constexpr):
    """Choose the shared rank of the tokens ``rows`` from the tables and write their shared column
    (``has_valid``: from ``_expand_routed``)."""
    row_ok = rows < num_tokens
    dest = tl.zeros([BLOCK], dtype=tl.int64) + rank
    if ALL_RANKS and not LOCAL_ONLY:
        # Inverse CDF over all ranks (reference.choose_shared_rank, candidates="all").
        ranks = tl.arange(0, W_PAD)
        weight = tl.load(tables_ptr + ranks, mask=ranks < W, other=0)
        total = tl.zeros([BLOCK], dtype=tl.int64) + tl.sum(weight, axis=0)
        u = (uniform(entry_hash(rows * K, key)) * total) >> _UNIFORM_BITS
        chosen = tl.sum((tl.cumsum(weight, axis=0)[None, :] <= u[:, None]).to(tl.int64), axis=1)
        keys = tl.load(tables_ptr + W + ranks, mask=ranks < W, other=_NO_FALLBACK)
        least = tl.min(keys, axis=0)
        fallback = tl.zeros([BLOCK], dtype=tl.int64) + tl.min(tl.where(keys == least, ranks, W), axis=0)
        dest = tl.where(total > 0, chosen, fallback)
    elif not LOCAL_ONLY:
        # Chao's weighted reservoir over the own rank and the routed ranks, each counted once
        # (a bitmask of 64-rank words marks the ranks seen), drawn as the columns go by.
        words = tl.arange(0, WORDS)
        seen = tl.where((words == rank // 64)[None, :], tl.full([BLOCK, WORDS], 1, tl.int64) << (rank % 64), 0)
        total = tl.zeros([BLOCK], dtype=tl.int64) + tl.load(tables_ptr + rank)
        chosen = dest
        fallback_key = tl.full([BLOCK], _NO_FALLBACK, tl.int64)
        fallback = dest
        for k in tl.static_range(K):
            idk = tl.load(ids_ptr + rows * K + k, mask=row_ok, other=-1)
            valid = idk >= 0
            r = tl.where(valid, idk.to(tl.int32) // EPR, 0)
            bit = tl.full([BLOCK], 1, tl.int64) << (r % 64).to(tl.int64)
            in_word = (words[None, :] == (r // 64)[:, None]) & valid[:, None]
            new = valid & ((tl.sum(tl.where(in_word, seen, 0), axis=1) & bit) == 0)
            seen = seen | tl.where(in_word, bit[:, None], 0)
            # Unmasked loads (r is a rank): a mask on the seen-chain would make each step wait
            # for the previous one's table read.
            w_k = tl.where(new, tl.load(tables_ptr + r), 0)
            total += w_k
            replaces = uniform(entry_hash(rows * K + k, key)) * total < (w_k << _UNIFORM_BITS)
            chosen = tl.where(replaces, r.to(tl.int64), chosen)
            # The least-loaded candidate, ties by the lowest rank.
            key_k = tl.where(new, tl.load(tables_ptr + W + r), _NO_FALLBACK)
            better = (key_k < fallback_key) | ((key_k == fallback_key) & (r.to(tl.int64) < fallback))
            fallback = tl.where(better & (key_k < _NO_FALLBACK), r.to(tl.int64), fallback)
            fallback_key = tl.minimum(fallback_key, key_k)
        dest = tl.where(total > 0, chosen, fallback)
    # The shared column: -1 and weight 0 for a token without routed entries.
    shared = rows * (K + 1) + K
    tl.store(out_ids_ptr + shared, tl.where(has_valid, dest * (EPR + 1) + EPR, -1).to(out_ids_ptr.dtype.element_ty),
             mask=row_ok)
    tl.store(out_weights_ptr + shared, tl.where(has_valid, shared_weight, 0), mask=row_ok)


def local_counts_triton(topk_ids: torch.Tensor, slots_per_rank: int, ep_size: int) -> torch.Tensor:
    """Same contract as ``reference.local_counts``; ``topk_ids`` must be contiguous. A zero fill
    and one program per ``CHUNK`` tokens adding into it (integer atomics: exact)."""
    m, k = topk_ids.shape
    out = torch.zeros(ep_size + 1, dtype=torch.int64, device=topk_ids.device)
    k_pad = triton.next_power_of_2(k)
    chunk = max(1, _COUNT_IDS // k_pad)
    if m:
        _count_kernel[(triton.cdiv(m, chunk),)](
            topk_ids, out, m, K=k, K_PAD=k_pad, W=ep_size, W_PAD=triton.next_power_of_2(ep_size),
            EPR=slots_per_rank, CHUNK=chunk,
        )
    return out


def sync_size(ep_size: int) -> int:
    """Length of the int64 ``sync`` buffer of ``waterfill_triton`` (see ``_grid_add``)."""
    return 2 * ep_size + 3


@functools.cache
def _resident_programs(device: torch.device) -> int:
    """Programs of the counting launch that are surely resident at once: one per SM (a program
    needs a small part of one); the interpreter runs one program at a time, so one."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


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
    sync: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.waterfill_torch`` (``local_only``: every shared expert stays on
    ``rule.rank``, as ``reference.expand`` with ``dest=rank``).

    ``topk_ids`` and ``topk_weights`` must be contiguous; ``shared_weight`` is a one-element
    tensor of the weights' dtype (so a float64 weight is not rounded through float32).
    ``tables``: ``[2, W]`` int64, the fixed ``reference.rank_tables`` when ``fixed_tables``, else a
    scratch buffer the kernel writes them to. ``sync``: ``[sync_size(W)]`` int64, zeros before its
    first use, where the source counts the batch: the grid's counters (see ``_grid_add``), kept
    by the kernel between launches; one buffer per stream (two launches must not share it at once).
    """
    m, k = topk_ids.shape
    out_ids = torch.empty(m, k + 1, dtype=topk_ids.dtype, device=topk_ids.device)
    out_weights = torch.empty(m, k + 1, dtype=topk_weights.dtype, device=topk_weights.device)
    if m == 0:
        return out_ids, out_weights
    w_pad = triton.next_power_of_2(rule.ep_size)
    block = max(16, min(BLOCK_M, _ALL_RANKS_CELLS // w_pad)) if rule.all_ranks else BLOCK_M
    count = not (local_only or fixed_tables) and (
        source in (Source.BATCH, Source.BATCH_OFFSET) or (source == Source.PRIOR and rule.min_tile_tokens > 0))
    num_tiles = triton.cdiv(m, block)
    tiles = 1
    if count:
        if sync is None or sync.shape != (sync_size(rule.ep_size),):
            raise EplbError(f"this source counts the batch: pass sync, zeros of shape ({sync_size(rule.ep_size)},)")
        # All programs must be resident at the barrier; a power of two keeps the compiled
        # variants few as the batch size varies.
        tiles = triton.next_power_of_2(triton.cdiv(num_tiles, _resident_programs(topk_ids.device)))
    _waterfill_kernel[(triton.cdiv(num_tiles, tiles),)](
        topk_ids, topk_weights, sync if count else tables, tables if loads is None else loads, tables, shared_weight,
        out_ids, out_weights,
        m, rule.rank, rule.key, rule.min_tile_tokens, rule.local_weight, rule.remote_weight,
        K=k, K_PAD=triton.next_power_of_2(k), W=rule.ep_size, W_PAD=w_pad,
        EPR=rule.slots_per_rank, WORDS=triton.next_power_of_2(triton.cdiv(rule.ep_size, 64)), BLOCK=block,
        TILES=tiles, SOURCE=int(source), HAS_LOADS=loads is not None, FIXED_TABLES=fixed_tables,
        ALL_RANKS=rule.all_ranks, LOCAL_ONLY=local_only, TILE=rule.min_tile_tokens > 0, COUNT=count,
        POLL=max(32 * NUM_WARPS, triton.next_power_of_2(rule.ep_size + 1)), SPIN=topk_ids.is_cuda,
        num_warps=NUM_WARPS,
    )
    return out_ids, out_weights
