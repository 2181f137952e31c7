"""``migrate``: move expert weights from one placement to another, layer by layer, two-phase.

Per layer (per part of it, see ``MigrationConfig.staging_bytes``) every rank of the group:

1. STAGE: puts every expert its changed slots need into staging rows (``transfer.stage``);
2. VERIFY: checks each staged row against its source's checksums (``transfer.verify``);
3. VOTE: publishes ok/fail and reads the one decision every rank gets (``sync.StepSync.vote``);
4. COMMIT: on ``commit`` only, copies the staged rows into place (``transfer.commit``), then
   calls ``on_commit(layer, row)`` so the caller switches its dispatch table in the same step.

A failure, checksum mismatch or timeout on any rank before the commit aborts the step on every
rank: the weights and that layer's row stay as they were everywhere, and every rank raises the
same ``MigrationError``, which carries the placement now serving; a retry from it goes on where
this call stopped. ``Step`` is the same loop body for one part, for a caller (the online
rebalancer) that drives one layer per serving step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from eplb.cluster import is_count
from eplb.errors import EplbError
from eplb.placement import Placement, check_same_shape
from eplb.runtime.migration import transfer
from eplb.runtime.migration.config import MigrationConfig
from eplb.runtime.migration.plan import LayerTransfers, plan_parts
from eplb.runtime.migration.report import PHASES, MigrationError, MigrationReport
from eplb.runtime.migration.sync import Failure, PeerAbort, StepSync, all_ready
from eplb.runtime.migration.weights import ExpertWeights

# Tags of one call start at (epoch mod 2**11) << 20, so that an op of an earlier call never
# matches one of a later call between the same pair (defence in depth: ops are only posted once
# both ends agreed, see ``sync``).
_TAG_EPOCH_BITS, _TAG_STEP_BITS = 11, 20


@dataclass
class Session:
    """One ``migrate`` call's place in the group: this rank, the store and a fresh epoch.

    Every rank must call ``migrate`` the same number of times on the same group, so that their
    per-rank epoch counters in the store agree. ``staging_store`` is the client staging uses
    (``store`` itself unless the session was opened with ``background=True``).
    """

    group: Any
    store: Any
    rank: int
    world: int
    namespace: str
    epoch: int
    staging_store: Any = None
    tags_used: int = 0
    boundaries: int = 0

    @classmethod
    def open(cls, group: Any, store: Any, num_gpus: int, background: bool = False) -> Session:
        """The session of this rank; ``background``: staging runs on a thread of its own, which then gets its
        own client of the store (see ``sync``)."""
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            if rank < 0:
                raise EplbError("this process is not in the migration group; call migrate on the EP group's ranks")
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
            store = store if store is not None else _default_store()
        elif num_gpus == 1:
            rank, world, ranks = 0, 1, [0]
            store = store if store is not None else dist.HashStore()
        else:
            raise EplbError(
                f"a placement over {num_gpus} GPUs migrates over torch.distributed; call "
                "torch.distributed.init_process_group() on every rank first"
            )
        if world != num_gpus:
            raise EplbError(
                f"the group has {world} ranks but the placement has {num_gpus} GPUs; pass the expert-parallel group "
                "(group rank g holds the placement's GPU g)"
            )
        namespace = "eplb/migration/" + "-".join(map(str, ranks)) + "/"
        epoch = int(store.add(f"{namespace}epoch/{rank}", 1))
        return cls(group, store, rank, world, namespace, epoch, store.clone() if background else store)

    def step_sync(self, t: LayerTransfers, part: int, timeout_s: float) -> StepSync:
        """The store keys of part ``part`` of ``t.layer`` in this call."""
        pairs = sorted({(m.round, min(m.src, m.dst), max(m.src, m.dst)) for m in t.messages})
        return StepSync(self.store, self.rank, self.world, f"{self.namespace}{self.epoch}/{t.layer}/{part}/",
                        timeout_s, pairs, self.staging_store)

    def all_ready(self, ready: bool, timeout_s: float) -> bool:
        """Whether every rank is ``ready`` at this step boundary (``sync.all_ready``); every rank calls it at
        the same boundaries."""
        self.boundaries += 1
        prefix = f"{self.namespace}{self.epoch}/ready/{self.boundaries}/"
        return all_ready(self.store, prefix, self.rank, self.world, ready, timeout_s)

    def take_tags(self, count: int) -> int:
        """The tag base of a step using ``count`` tags."""
        base = ((self.epoch % (1 << _TAG_EPOCH_BITS)) << _TAG_STEP_BITS) + self.tags_used % (1 << _TAG_STEP_BITS)
        self.tags_used += count
        return base


def _default_store() -> Any:
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError) as exc:
        raise EplbError(f"cannot reach the default torch.distributed store ({exc}); pass store= explicitly") from None


class Step:
    """One part of one layer, run two-phase by every rank of the group:
    ``step.decide(step.prepare())`` is None on every rank or on none; then ``step.commit()``, and
    ``step.finish()`` in any case. ``step.seconds`` holds this rank's time per phase.

    Args:
        weights: this rank's registered weights.
        t: the part's transfers (``plan_parts``), the same on every rank.
        part: its index within the layer.
        session: the call's ``Session``.
        config: the migration's config.
        stream: a CUDA stream to stage and verify on (None: the current stream).
    """

    def __init__(
        self, weights: ExpertWeights, t: LayerTransfers, part: int, session: Session, config: MigrationConfig,
        stream: Any = None,
    ) -> None:
        self.weights, self.t, self.part, self.session, self.config, self.stream = (
            weights, t, part, session, config, stream
        )
        self.sync = session.step_sync(t, part, config.timeout_s)
        row_bytes = weights.layout(t.layer).row_bytes
        self.tag_base = session.take_tags(sum(map(len, transfer.message_tags(t, row_bytes, config.chunk_bytes))))
        self.staged: transfer.Staged | None = None
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def _lap(self, phase: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - start
        return now

    def prepare(self) -> Failure | None:
        """STAGE and VERIFY on this rank; returns None when ready to commit, else why not (which
        is then published, so that peers stop waiting for this rank)."""
        rank, clock = self.session.rank, time.perf_counter()
        try:
            self.staged = transfer.stage(
                self.weights, self.t, rank, self.sync, group=self.session.group, timeout_s=self.config.timeout_s,
                chunk_bytes=self.config.chunk_bytes, verify=self.config.verify, tag_base=self.tag_base,
                stream=self.stream, backend=self.config.backend,
            )
            clock = self._lap("stage", clock)
            if self.config.verify:
                transfer.verify(self.weights, self.t, self.staged, rank, self.config.backend)
            self._lap("verify", clock)
            return None
        except PeerAbort as exc:
            failure = exc.failure
        except transfer.ChecksumMismatch as exc:
            failure = Failure(exc.ranks, str(exc))
        except Exception as exc:  # any local failure must abort the step on every rank
            failure = Failure((rank,), f"rank {rank} failed: {type(exc).__name__}: {exc}")
        self._lap("stage" if self.staged is None else "verify", clock)
        self.staged = None
        self.sync.abort(failure)
        return failure

    def decide(self, failure: Failure | None) -> Failure | None:
        """VOTE: None to commit (the same answer on every rank), else why the step aborts."""
        clock = time.perf_counter()
        try:
            return self.sync.vote(failure)
        except Exception as exc:  # the decision may stand already: read it, never guess
            rank = self.session.rank
            mine = Failure((rank,), f"rank {rank} failed to vote: {type(exc).__name__}: {exc}")
            return self.sync.settle(failure or mine)
        finally:
            self._lap("vote", clock)

    def commit(self) -> None:
        """COMMIT the staged rows into place; only after ``decide`` returned None."""
        if self.staged is None:
            raise EplbError("nothing is staged to commit; call commit() only when decide() returned None")
        clock = time.perf_counter()
        transfer.commit(self.weights, self.t, self.staged, self.session.rank, self.config.backend)
        self._lap("commit", clock)

    def finish(self) -> None:
        """Release the step's store keys (the last rank deletes them) and its staging."""
        self.staged = None
        self.sync.finish()


def _lap(seconds: dict[str, float], phase: str, start: float) -> None:
    seconds[phase] += time.perf_counter() - start


def migrate(
    weights: ExpertWeights,
    old: Placement,
    new: Placement,
    group: Any = None,
    *,
    config: MigrationConfig = MigrationConfig(),  # noqa: B008 - frozen, so one shared default is safe
    layers: Iterable[int] | None = None,
    on_commit: Callable[[int, torch.Tensor], None] | None = None,
    store: Any = None,
    stream: Any = None,
) -> MigrationReport:
    """Move this rank's expert weights from ``old`` to ``new``, in place; every rank of the group calls it.

    Args:
        weights: this rank's registered tensors (one dict per placement layer row).
        old: the placement now serving (what ``weights`` hold).
        new: the placement to switch to (same layers, experts, slots, GPUs and nodes).
        group: the expert-parallel ``torch.distributed`` group (group rank ``g`` is GPU ``g``), or
            None for the world; with one GPU and no process group, nothing distributed is used.
        config: see ``MigrationConfig``; the same on every rank.
        layers: the layer rows to migrate, in this order (default: all); the others keep ``old``.
        on_commit: called as ``on_commit(layer, row)`` right after each committed step, ``row``
            the ``[P]`` phy2log row now serving that layer.
        store: the key-value store to agree through (default: the default group's store).
        stream: a CUDA stream to stage and verify on (the commit runs on the current stream).

    Returns:
        The ``MigrationReport``; its ``serving`` is ``new`` on the migrated layers.

    Raises:
        MigrationError: a step aborted on every rank (a rank failed, a checksum differed, or a
            rank did not answer within ``config.timeout_s``); ``error.serving`` is the placement
            now serving everywhere, and a retry from it goes on where this call stopped.
        EplbError: bad arguments (before anything is exchanged).
    """
    start = time.perf_counter()
    check_same_shape(old, new)
    if not isinstance(weights, ExpertWeights):
        raise EplbError(f"weights must be an ExpertWeights, got {type(weights).__name__}; wrap the engine's tensors")
    if not isinstance(config, MigrationConfig):
        raise EplbError(f"config must be a MigrationConfig, got {type(config).__name__}")
    weights.check_placement(old.num_layers, old.slots_per_gpu)
    # Every layer is planned before anything moves, so a refused staging bound stops nothing half-way.
    plans = [
        (layer, plan_parts(old, new, layer, weights.layout(layer).row_bytes, config.staging_bytes,
                           max_peers=config.max_peers))
        for layer in _layers(layers, old.num_layers)
    ]
    session = Session.open(group, store, old.num_gpus)
    report = MigrationReport()
    serving = old.phy2log.clone()
    _lap(report.seconds, "plan", start)
    for layer, parts in plans:
        for index, t in enumerate(parts):
            step = Step(weights, t, index, session, config, stream)
            try:
                verdict = step.decide(step.prepare())
                if verdict is None:
                    step.commit()
                    serving[layer] = t.new
                    report.add_step(t, weights.bytes_per_slot(layer))
            finally:
                step.finish()
                for phase, seconds in step.seconds.items():
                    report.seconds[phase] += seconds
            if verdict is not None:
                report.serving = _placement(serving, old)
                raise MigrationError(layer, index, verdict.ranks, verdict.cause, report.serving, report)
            if on_commit is not None:
                on_commit(layer, t.new.clone())
        report.layers_committed.append(layer)
    report.serving = _placement(serving, old)
    return report


def _layers(layers: Iterable[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    order = list(layers)
    if not all(is_count(layer, 0) and layer < num_layers for layer in order) or len(set(order)) != len(order):
        raise EplbError(f"layers must be distinct layer rows in [0, {num_layers}), got {order}; pass e.g. [0, 3]")
    return [int(layer) for layer in order]


def _placement(phy2log: torch.Tensor, like: Placement) -> Placement:
    return Placement(phy2log.clone(), like.num_experts, like.num_gpus, like.num_nodes, algorithm=like.algorithm)
