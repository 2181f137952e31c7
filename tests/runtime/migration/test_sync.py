"""The store protocol (handshakes, vote, cleanup), with threads standing in for ranks."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from eplb.runtime.migration.sync import Failure, StepSync

PREFIX = "t/1/0/0/"


def _run(fns: dict[int, object]) -> dict[int, object]:
    out: dict[int, object] = {}

    def call(rank, fn):
        out[rank] = fn()

    threads = [threading.Thread(target=call, args=item) for item in fns.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def _syncs(store, world: int, timeout_s: float = 5.0, pairs=((0, 0, 1),)) -> list[StepSync]:
    return [StepSync(store, r, world, PREFIX, timeout_s, list(pairs)) for r in range(world)]


def test_both_ends_agree_to_go_and_a_clean_step_commits_and_deletes_its_keys() -> None:
    store = dist.HashStore()
    a, b = _syncs(store, 2)
    assert _run({0: lambda: a.handshake(0, [1]), 1: lambda: b.handshake(0, [0])}) == {0: {1: None}, 1: {0: None}}
    assert _run({0: lambda: a.vote(None), 1: lambda: b.vote(None)}) == {0: None, 1: None}
    a.finish()
    assert store.num_keys() > 0
    b.finish()
    assert store.num_keys() == 0


def test_an_absent_peer_aborts_the_handshake_for_both_even_when_it_arrives_late() -> None:
    store = dist.HashStore()
    a, b = _syncs(store, 2, timeout_s=0.2)
    start = time.monotonic()
    early = a.handshake(0, [1])[1]
    assert 0.15 < time.monotonic() - start < 2.0
    assert early is not None and early.ranks == (1, 0) and "rank 1 did not reach round 0" in early.cause
    assert b.handshake(0, [0]) == {0: early}  # the late rank reads the same answer, at once


def test_a_failed_rank_wakes_its_waiting_peer_and_its_cause_is_every_rank_s_decision() -> None:
    store = dist.HashStore()
    a, b = _syncs(store, 2, timeout_s=30.0)
    failure = Failure((1,), "rank 1 failed: RuntimeError: boom")

    def fail():
        time.sleep(0.1)
        b.abort(failure)
        return b.vote(failure)

    start = time.monotonic()
    out = _run({0: lambda: (a.handshake(0, [1]), a.vote(None)), 1: fail})
    assert time.monotonic() - start < 5.0  # woken, not timed out
    assert out == {0: ({1: failure}, failure), 1: failure}


def test_a_missing_vote_aborts_and_a_late_ok_vote_cannot_commit() -> None:
    store = dist.HashStore()
    syncs = _syncs(store, 3, timeout_s=0.2, pairs=())
    out = _run({0: lambda: syncs[0].vote(None), 1: lambda: syncs[1].vote(None)})
    assert out[0] == out[1] and out[0].ranks == (2,) and "did not vote within 0.2 s" in out[0].cause
    assert syncs[2].vote(None) == out[0]
    # Failing while voting: the decision that stands is read, never guessed.
    assert syncs[2].settle(Failure((2,), "late")) == out[0]


def test_the_store_survives_a_timed_out_wait() -> None:
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=5), wait_for_workers=False)
    with pytest.raises(RuntimeError):
        store.wait(["never"], timedelta(milliseconds=50))
    store.set("after", b"1")
    assert store.get("after") == b"1" and store.compare_set("c", b"", b"x") == b"x"
