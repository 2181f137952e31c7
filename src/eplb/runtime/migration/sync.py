"""Agreement through the ``torch.distributed`` key-value store: round handshakes and the commit vote.

Why a store and not collectives: a gloo op that times out closes every connection of its
context (gloo's ``signalException``; tested in ``tests/runtime/migration/test_sync.py``), so
after one timed-out ``recv`` or ``all_reduce`` the group cannot exchange anything any more and
a retry fails; an NCCL op left half-matched shifts every later message between the pair. A store
``wait`` that times out leaves the store usable, so every wait that may time out is a store
wait, and P2P ops are only posted once both ends have agreed, through the store, to post them:

- *handshake* (per rank pair and round): both ranks ``add`` 1 to the pair's counter; the second
  to arrive proposes ``go`` on the pair's answer key, the first waits (bounded) for that answer
  and proposes ``abort`` when the wait times out. Proposals are ``compare_set`` on an empty key,
  so the first one wins and both ends read the same answer: either both post their ops or
  neither does, and a posted pair completes unless a process or a link dies. Peers are taken in
  ascending order, so waits cannot form a cycle.
- *vote* (per step): every rank publishes its vote and, once it has seen all of them (or its
  wait timed out), proposes ``commit`` (or ``abort``) on the step's decision key, again first
  proposal wins: every rank commits or none does, whatever their timing.
- a rank that fails writes the abort decision with its cause *before* its vote, and aborts the
  handshakes it has not resolved (which wakes peers waiting there). So a ``commit`` proposal made
  after seeing every vote loses to any failure: no vote values need reading.
- *all_ready* (per step boundary of the online rebalancer): whether every rank's staging is done,
  so that all vote now or all wait for the next boundary.

Handshakes and a staging failure's abort may use their own client of the store (``staging_store``):
a client serialises its operations, so a staging thread waiting in a handshake would otherwise hold
up the serving thread's agreement.

Keys live under ``<namespace><epoch>/<layer>/<part>/``; the last rank to read a step's decision
deletes them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

COMMIT = b"commit"
GO = b"go"
ABORT = b"abort:"


@dataclass(frozen=True)
class Failure:
    """Why a step aborts: the ranks involved (the failing or unresponsive one first) and a cause."""

    ranks: tuple[int, ...]
    cause: str

    def encode(self) -> bytes:
        return ABORT + json.dumps({"ranks": list(self.ranks), "cause": self.cause}).encode()

    @classmethod
    def decode(cls, value: bytes) -> Failure:
        data = json.loads(value[len(ABORT):].decode())
        return cls(tuple(data["ranks"]), data["cause"])


class PeerAbort(RuntimeError):
    """A round handshake was aborted (by a peer, or by this rank's wait on it timing out)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.cause)
        self.failure = failure


def _answer(value: bytes) -> Failure | None:
    return None if value in (GO, COMMIT) else Failure.decode(value)


class StepSync:
    """The store keys of one step (one part of one layer of one ``migrate`` call), seen from one rank.

    Args:
        store: the group's key-value store (``torch.distributed.Store``).
        rank: this rank's index in the group.
        world: the group size ``G``.
        prefix: the step's key prefix (ends with ``/``).
        timeout_s: the bound on every wait for other ranks.
        pairs: ``(round, a, b)`` for every rank pair ``a < b`` exchanging in a round, over the group.
        staging_store: the client of the same store that ``handshake`` and ``abort`` use (default: ``store``).
    """

    def __init__(
        self, store: Any, rank: int, world: int, prefix: str, timeout_s: float, pairs: list[tuple[int, int, int]],
        staging_store: Any = None,
    ) -> None:
        self.store, self.rank, self.world, self.prefix = store, rank, world, prefix
        self.staging_store = store if staging_store is None else staging_store
        self.timeout_s = timeout_s
        self.pairs = pairs
        # Handshakes of this rank not resolved yet: (round, peer).
        self._open = {(k, b if a == rank else a) for k, a, b in pairs if rank in (a, b)}

    def _pair_key(self, round_: int, peer: int, what: str) -> str:
        a, b = sorted((self.rank, peer))
        return f"{self.prefix}{what}/{round_}/{a}-{b}"

    def _vote_key(self, rank: int) -> str:
        return f"{self.prefix}vote/{rank}"

    @property
    def _decision_key(self) -> str:
        return f"{self.prefix}decision"

    def handshake(self, round_: int, peers: list[int]) -> dict[int, Failure | None]:
        """Agree with each peer of ``round_`` whether to post the round's ops.

        Returns:
            per peer: None to post the ops with it, else why not (post nothing with it).
        """
        deadline = time.monotonic() + self.timeout_s
        out: dict[int, Failure | None] = {}
        for peer in sorted(peers):
            answer_key = self._pair_key(round_, peer, "go")
            proposal = GO
            if self.staging_store.add(self._pair_key(round_, peer, "arrived"), 1) < 2:
                try:
                    left = max(deadline - time.monotonic(), 1e-3)
                    self.staging_store.wait([answer_key], timedelta(seconds=left))
                except RuntimeError:  # DistStoreError: timed out; the store stays usable
                    pass
                proposal = Failure(
                    (peer, self.rank), f"rank {peer} did not reach round {round_} within {self.timeout_s:g} s "
                    f"(rank {self.rank} waited for it)"
                ).encode()
            out[peer] = _answer(self.staging_store.compare_set(answer_key, b"", proposal))
            self._open.discard((round_, peer))
        return out

    def abort(self, failure: Failure) -> Failure | None:
        """Publish this rank's failure: the abort decision (unless one exists), then an abort on
        every handshake it has not resolved, so that no peer posts ops with it or waits for it.

        Returns:
            the step's decision as ``vote`` does: None when the step had already been decided to
            commit (possible only once this rank voted ok), else why it aborts.
        """
        message = failure.encode()
        answer = self.staging_store.compare_set(self._decision_key, b"", message)
        for round_, peer in sorted(self._open):
            self.staging_store.compare_set(self._pair_key(round_, peer, "go"), b"", message)
        self._open.clear()
        return _answer(answer)

    def settle(self, failure: Failure) -> Failure | None:
        """The decision after this rank failed while voting: abort unless already decided, with a
        vote so that no rank waits for this one."""
        answer = self.abort(failure)
        self.store.set(self._vote_key(self.rank), b"fail")
        return answer

    def vote(self, failure: Failure | None) -> Failure | None:
        """This rank's vote (``failure``: None for ok, else why not, already ``abort``-ed); every
        rank gets the same answer. Returns None to commit, else why the step aborts."""
        self.store.set(self._vote_key(self.rank), b"fail" if failure else b"ok")
        if failure is not None:
            proposal = failure.encode()
        else:
            keys = [self._vote_key(r) for r in range(self.world)]
            try:
                self.store.wait(keys, timedelta(seconds=self.timeout_s))
                # Every rank voted; a failed one wrote its abort decision before voting.
                proposal = COMMIT
            except RuntimeError:  # DistStoreError: the wait timed out
                missing = [r for r, key in enumerate(keys) if not self.store.check([key])]
                proposal = Failure(
                    tuple(missing), f"rank(s) {missing} did not vote within {self.timeout_s:g} s"
                ).encode()
        return _answer(self.store.compare_set(self._decision_key, b"", proposal))

    def finish(self) -> None:
        """Count this rank out of the step; the last one deletes the step's keys (no rank
        touches them after reading the decision)."""
        done = f"{self.prefix}done"
        if self.store.add(done, 1) < self.world:
            return
        keys = [self._decision_key, done, *(self._vote_key(r) for r in range(self.world))]
        for k, a, b in self.pairs:
            keys += [f"{self.prefix}{what}/{k}/{a}-{b}" for what in ("arrived", "go")]
        for key in keys:
            self.store.delete_key(key)


def all_ready(store: Any, prefix: str, rank: int, world: int, ready: bool, timeout_s: float) -> bool:
    """Whether every rank of the group passed ``ready=True``: the same answer on every rank.

    A rank that is not ready counts itself in ``<prefix>late`` before it announces itself, so the
    count is final once every rank has announced; the last rank to read it deletes the keys.

    Raises:
        TimeoutError: not every rank announced itself within ``timeout_s``.
    """
    if not ready:
        store.add(f"{prefix}late", 1)
    keys = [f"{prefix}at/{r}" for r in range(world)]
    store.set(keys[rank], b"")
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except RuntimeError as exc:  # DistStoreError: the wait timed out
        raise TimeoutError(f"not every rank reached the step boundary within {timeout_s:g} s") from exc
    late = store.add(f"{prefix}late", 0)
    if store.add(f"{prefix}done", 1) == world:
        for key in [*keys, f"{prefix}late", f"{prefix}done"]:
            store.delete_key(key)
    return late == 0
