"""Staging, P2P rounds, checksums and the in-place commit of one part of one layer.

- ``stage``: every expert this rank's changed slots need lands in one staging row (local copies
  from its own slots, the rest received in the plan's rounds); senders read the current weights,
  so a slot that is both a source and a destination is safe. Nothing registered is written.
- ``verify``: each staged row's tensors are checksummed and compared with the checksums its
  source wrote into the row (the sender on its own slot, before packing).
- ``commit``: every changed slot copies its expert's staged row into place (no allocation).

Checksums are ``checksums.checksum`` of each tensor's bytes, one per slot and tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from eplb.errors import EplbError
from eplb.runtime.backend import use_triton
from eplb.runtime.migration.checksums import checksum
from eplb.runtime.migration.plan import LayerTransfers
from eplb.runtime.migration.sync import PeerAbort, StepSync
from eplb.runtime.migration.weights import CHECKSUM_BYTES, ExpertWeights, RowLayout

_TAG_LIMIT = 1 << 31
# Source rows below this size are gathered when packed; larger ones are copied row by row.
_GATHER_BYTES = 1 << 16


class ChecksumMismatch(RuntimeError):
    """A staged row differs from its source; ``ranks``: the receiver, then the sender."""

    def __init__(self, message: str, ranks: tuple[int, int]) -> None:
        super().__init__(message)
        self.ranks = ranks


@dataclass
class Staged:
    """One rank's staging of one part.

    Attributes:
        rows: ``[R, row_bytes]`` uint8, one row per staged expert (``RowLayout``).
        row_of: the staging row of each staged expert.
        sources: the rank each row came from (this rank for local copies).
        stream: the CUDA stream that wrote ``rows``, or None.
        fills: the commit's ``(slot, staging row)`` copies on this rank.
        fill_index: ``fills`` as a ``[2, n]`` device tensor, made while staging (so the commit, at the step
            boundary, launches copies only).
    """

    rows: torch.Tensor
    row_of: dict[int, int]
    sources: list[int]
    stream: Any = None
    fills: list[tuple[int, int]] = field(default_factory=list)
    fill_index: torch.Tensor | None = None


def _pack(
    out: torch.Tensor, src_rows: list[torch.Tensor], layout: RowLayout, slots: list[int], verify: bool, backend: str
) -> None:
    """Fill ``out [k, row_bytes]`` with local slots ``slots``, and with their checksums when
    ``verify`` (computed on the rows read from the slots, not on ``out``, with ``backend``)."""
    if not slots:
        return
    sums = _sums(out, layout)
    # One index for every tensor: each host-to-device copy of it waits for the stream's queued kernels.
    index = copy_index(range(len(slots)), slots, out.device)
    for t, (seg, src) in enumerate(zip(layout.segments, src_rows, strict=True)):
        dst = out[:, seg.offset : seg.offset + seg.nbytes]
        copy_rows(dst, range(len(slots)), src, slots, sums[:, t] if verify else None, backend, index=index)


def copy_rows(
    dst: torch.Tensor, dst_index: Sequence[int], src: torch.Tensor, src_index: Sequence[int],
    sums: torch.Tensor | None = None, backend: str = "auto", index: torch.Tensor | None = None,
) -> None:
    """``dst[dst_index[r]] = src[src_index[r]]`` for byte rows ``[*, n]`` uint8 (rows contiguous, any
    row stride); with ``sums [R]`` int64, ``sums[r]`` = the checksum of source row ``src_index[r]``.
    ``index``: ``[dst_index, src_index]`` as a ``[2, R]`` int64 tensor on the device, made ahead (a
    host-to-device copy from pageable memory waits for the stream's queued work).

    With the Triton backend and rows of whole aligned 32-bit words: one kernel per call that reads
    each word once for the copy and the checksum. Otherwise torch: small rows gathered in one op,
    large ones copied row by row (a GPU gathers large byte rows far below its copy bandwidth).
    """
    if not src_index:
        return
    if index is None and (src.shape[1] < _GATHER_BYTES or use_triton(backend, src.device)):
        index = copy_index(dst_index, src_index, src.device)
    if use_triton(backend, src.device):
        words = _word_rows(dst), _word_rows(src)
        if words[0] is not None and words[1] is not None:
            from eplb.runtime.migration.checksums_triton import copy_word_rows

            if sums is not None:
                sums.zero_()
            copy_word_rows(words[0], index[0], words[1], index[1], sums)
            return
    if src.shape[1] < _GATHER_BYTES:
        rows = src.index_select(0, index[1])
        dst.index_copy_(0, index[0], rows)
        if sums is not None:
            sums.copy_(checksum(rows, backend))
        return
    for r, (d, s) in enumerate(zip(dst_index, src_index, strict=True)):
        dst[d].copy_(src[s])
        if sums is not None:
            sums[r] = checksum(src[s : s + 1], backend)[0]


def copy_index(dst_index: Sequence[int], src_index: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[dst_index, src_index]`` as a ``[2, n]`` int64 tensor on ``device`` whose rows both start on a 16-byte
    boundary: the Triton kernel is compiled per pointer alignment, so every call then reuses the variant the
    warm-up compiled."""
    n = len(dst_index)
    index = torch.zeros(2, n + n % 2, dtype=torch.int64)
    index[0, :n], index[1, :n] = torch.as_tensor(list(dst_index)), torch.as_tensor(list(src_index))
    return index.to(device)[:, :n]


def _word_rows(rows: torch.Tensor) -> torch.Tensor | None:
    """``rows [*, 4 m]`` uint8 as int32 words (a view), or None where they are not whole aligned words."""
    if rows.shape[1] % 4 or rows.stride(0) % 4 or rows.storage_offset() % 4 or rows.data_ptr() % 4:
        return None
    return rows.view(torch.int32)


def _sums(rows: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """``[R, T]`` int64 view of the checksums stored in each row."""
    end = layout.checksum_offset + CHECKSUM_BYTES * len(layout.segments)
    return rows[:, layout.checksum_offset : end].view(torch.int64)


def _stream_context(stream: Any) -> Any:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def message_tags(t: LayerTransfers, row_bytes: int, chunk_bytes: int) -> list[list[tuple[int, int, int]]]:
    """Per message of ``t``: its chunks as ``(tag offset, first byte, end byte)``; offsets count up
    from 0 over the part, so that tags are distinct within it."""
    out, tag = [], 0
    for m in t.messages:
        size = len(m.experts) * row_bytes
        out.append([(tag + i, a, min(a + chunk_bytes, size)) for i, a in enumerate(range(0, size, chunk_bytes))])
        tag += len(out[-1])
    return out


def stage(
    weights: ExpertWeights,
    t: LayerTransfers,
    rank: int,
    sync: StepSync,
    *,
    group: Any = None,
    timeout_s: float,
    chunk_bytes: int,
    verify: bool,
    tag_base: int = 0,
    stream: Any = None,
    backend: str = "auto",
) -> Staged:
    """Stage this rank's experts of part ``t`` (see the module docstring).

    Args:
        weights: this rank's registered weights.
        t: the part's transfers (the same on every rank).
        rank: this rank in ``group``.
        sync: the step's store keys (round handshakes).
        group: the ``torch.distributed`` group, or None for the world.
        timeout_s: bound on each P2P wait once both ends posted.
        chunk_bytes: the most bytes per P2P op.
        verify: write source checksums into the rows.
        tag_base: added to each message chunk's tag offset (``message_tags``), mod ``2**31``.
        stream: a CUDA stream to stage on, or None for the current one.
        backend: the checksums' backend (``eplb.runtime.backend``).

    Raises:
        PeerAbort: a round was aborted (a peer failed or timed out); nothing is left posted.
    """
    layout = weights.layout(t.layer)
    src_rows = weights.byte_rows(t.layer)
    staged = t.staged_experts(rank)
    tags = message_tags(t, layout.row_bytes, chunk_bytes)
    with _stream_context(stream):
        rows = torch.empty(len(staged), layout.row_bytes, dtype=torch.uint8, device=weights.device)
        local = [slot for r, _, slot in t.local if r == rank]
        _pack(rows[: len(local)], src_rows, layout, local, verify, backend)
        # Incoming messages land in consecutive staging rows, in message order.
        at, received = len(local), {}
        for i, m in enumerate(t.messages):
            if m.dst == rank:
                received[i] = rows[at : at + len(m.experts)]
                at += len(m.experts)
        for round_ in range(t.num_rounds):
            mine = [i for i, m in enumerate(t.messages) if m.round == round_ and rank in (m.src, m.dst)]
            if not mine:
                continue
            sent = [i for i in mine if t.messages[i].src == rank]
            send = torch.empty(sum(len(t.messages[i].experts) for i in sent), layout.row_bytes, dtype=torch.uint8,
                               device=weights.device)
            buffers, at = dict(received), 0
            for i in sent:
                buffers[i] = send[at : at + len(t.messages[i].experts)]
                _pack(buffers[i], src_rows, layout, list(t.messages[i].src_slots), verify, backend)
                at += len(t.messages[i].experts)
            peer = {i: t.messages[i].dst if i in sent else t.messages[i].src for i in mine}
            answers = sync.handshake(round_, sorted(set(peer.values())))
            ops = [
                (i in sent, buffers[i].view(-1)[a:b], peer[i], (tag_base + tag) % _TAG_LIMIT)
                for i in mine if answers[peer[i]] is None
                for tag, a, b in tags[i]
            ]
            for work in _post(ops, group):
                work.wait(timeout=timedelta(seconds=timeout_s))
            aborted = [failure for failure in answers.values() if failure is not None]
            if aborted:
                raise PeerAbort(aborted[0])
        row_of = {e: i for i, (e, _) in enumerate(staged)}
        fills = [(slot, row_of[e]) for slot, e in t.rank_fills(rank)]
        fill_index = copy_index([f[0] for f in fills], [f[1] for f in fills], weights.device)
    return Staged(rows=rows, row_of=row_of, sources=[rank if m is None else m.src for _, m in staged], stream=stream,
                  fills=fills, fill_index=fill_index)


def _post(ops: list[tuple[bool, torch.Tensor, int, int]], group: Any) -> list[Any]:
    """Post ``(is_send, tensor, peer, tag)`` ops: one by one on gloo (whose batch is slower and
    whose async ops cannot deadlock), as one group elsewhere (NCCL serialises a pair's ops, so a
    send and a receive between two ranks must be grouped)."""
    if not ops:
        return []
    to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    if dist.get_backend(group) == "gloo":
        return [
            (dist.isend if is_send else dist.irecv)(tensor, to_global(peer), group=group, tag=tag)
            for is_send, tensor, peer, tag in ops
        ]
    return dist.batch_isend_irecv([
        dist.P2POp(dist.isend if is_send else dist.irecv, tensor, to_global(peer), group=group, tag=tag)
        for is_send, tensor, peer, tag in ops
    ])


def warm_up(weights: ExpertWeights, rows: int, verify: bool, backend: str = "auto", stream: Any = None) -> None:
    """Run a migration's kernels once per layer, on slot 0 (pack it into a staging row, check that row as
    ``verify`` does, commit it back onto itself: the same bytes), and leave ``rows`` staging rows of the
    widest layer in the allocator's cache for ``stream``, so that the first rebalance does not pay for kernel
    compilation, module loading and device allocations inside a serving step. Every registered byte keeps
    its value.

    Args:
        weights: this rank's registered weights.
        rows: staging rows to reserve (the most a rebalance holds staged at once).
        verify: exercise the checksums as well (as ``stage`` and ``verify`` will).
        backend: the kernels' backend (``eplb.runtime.backend``).
        stream: the CUDA stream staging runs on, or None.
    """
    widest = max(range(weights.num_layers), key=lambda layer: weights.layout(layer).row_bytes)
    with _stream_context(stream), torch.no_grad():
        for layer in range(weights.num_layers):
            layout, slot_rows = weights.layout(layer), weights.byte_rows(layer)
            # Two rows: some operations take another kernel for a single row than for several.
            row = torch.empty(2, layout.row_bytes, dtype=torch.uint8, device=weights.device)
            _pack(row, slot_rows, layout, [0, 0], verify, backend)
            # verify's own operations: each kernel's first launch in a process loads its module (CUDA's lazy
            # loading), which stalls the device for milliseconds.
            if verify and _mismatches(row, layout, backend):
                raise EplbError(f"migration warm-up: layer {layer}'s slot 0 does not match its own checksums after a "
                                "copy; the checksum backend is broken here, pass MigrationConfig(backend='torch')")
            for seg, dst in zip(layout.segments, slot_rows, strict=True):
                copy_rows(dst, [0], row[:, seg.offset : seg.offset + seg.nbytes], [0], backend=backend)
        torch.empty(rows, weights.layout(widest).row_bytes, dtype=torch.uint8, device=weights.device)
    if stream is not None:
        stream.synchronize()


def verify(weights: ExpertWeights, t: LayerTransfers, staged: Staged, rank: int, backend: str = "auto") -> None:
    """Compare every staged row's tensors with the checksums its source wrote (computed with ``backend``).

    Raises:
        ChecksumMismatch: naming the layer, the expert, the tensor and the sending rank.
    """
    layout = weights.layout(t.layer)
    if staged.rows.shape[0] == 0:
        return
    with _stream_context(staged.stream):
        bad = _mismatches(staged.rows, layout, backend)
    if bad:
        experts = {row: e for e, row in staged.row_of.items()}
        row, tensor = bad[0]
        raise ChecksumMismatch(
            f"checksum mismatch on rank {rank}: {len(bad)} staged tensor row(s) differ from their source, first "
            f"expert {experts[row]} tensor {layout.segments[tensor].name!r} staged from rank {staged.sources[row]}",
            (rank, staged.sources[row]),
        )


def _mismatches(rows: torch.Tensor, layout: RowLayout, backend: str) -> list[list[int]]:
    """``[row, tensor]`` of every tensor of staged ``rows [R, row_bytes]`` whose checksum differs from the one
    stored in its row (waits for the current stream)."""
    got = torch.stack([checksum(rows[:, s.offset : s.offset + s.nbytes], backend) for s in layout.segments], 1)
    return (got != _sums(rows, layout)).nonzero().tolist()


def commit(weights: ExpertWeights, t: LayerTransfers, staged: Staged, rank: int, backend: str = "auto") -> None:
    """Copy each changed slot's staged expert into place, on the current stream (after ``staged``'s), with
    ``backend`` (``copy_rows``)."""
    layout = weights.layout(t.layer)
    dst_rows = weights.byte_rows(t.layer)
    if staged.stream is not None:
        current = torch.cuda.current_stream(staged.rows.device)
        current.wait_stream(staged.stream)
        staged.rows.record_stream(current)
        if staged.fill_index is not None:
            staged.fill_index.record_stream(current)
    slots, rows = [slot for slot, _ in staged.fills], [row for _, row in staged.fills]
    with torch.no_grad():
        for seg, dst in zip(layout.segments, dst_rows, strict=True):
            src = staged.rows[:, seg.offset : seg.offset + seg.nbytes]
            copy_rows(dst, slots, src, rows, backend=backend, index=staged.fill_index)
