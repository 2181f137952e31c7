"""The pure transfer plan: what is staged where, who sends, in which round, and the parts."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from eplb import EplbError, Placement
from eplb.runtime.migration import plan_layer, plan_parts
from tests.runtime.migration.harness import random_placement


def _pairs(num: int, gpus: int = 8, nodes: int = 2, experts: int = 24, slots: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(num):
        yield tuple(random_placement(gen, 2, experts, slots, gpus, nodes) for _ in range(2))


def test_each_needed_expert_is_staged_once_per_rank_from_a_holder() -> None:
    for old, new in _pairs(30):
        s = old.slots_per_gpu
        for layer in range(2):
            t = plan_layer(old, new, layer)
            changed = (old.phy2log[layer] != new.phy2log[layer]).nonzero().flatten().tolist()
            assert sorted(p for p, _ in t.fills) + sorted(t.emptied) == sorted(changed)
            needs = {(p // s, int(new.phy2log[layer, p])) for p in changed}
            received = Counter((m.dst, e) for m in t.messages for e in m.experts)
            local = Counter((r, e) for r, e, _ in t.local)
            assert max(received.values(), default=1) == 1 and max(local.values(), default=1) == 1
            assert set(received) | set(local) == needs and not set(received) & set(local)
            for r, e, slot in t.local:
                assert old.phy2log[layer, r * s + slot] == e
            for m in t.messages:
                assert m.src != m.dst
                for e, slot in zip(m.experts, m.src_slots, strict=True):
                    assert old.phy2log[layer, m.src * s + slot] == e  # the sender holds it now
                    assert e not in old.local_experts(m.dst)[layer].tolist()  # the receiver does not


def test_unchanged_slots_are_neither_filled_nor_read_as_changed() -> None:
    old = Placement(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]]), 8, 2)
    new = Placement(torch.tensor([[0, 1, 7, 3, 4, 5, 6, 2]]), 8, 2)
    t = plan_layer(old, new, 0)
    assert t.fills == ((2, 7), (7, 2)) and t.moves == 2 and t.emptied == ()
    assert [(m.src, m.dst, m.experts) for m in t.messages] == [(0, 1, (2,)), (1, 0, (7,))]
    assert plan_layer(old, old, 0).moves == 0 and plan_layer(old, old, 0).messages == ()


def test_senders_are_spread_over_the_holders() -> None:
    # Ranks 0 and 1 both hold experts 0-3; ranks 2 and 3 need all of them.
    old = Placement(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7]]), 8, 4)
    new = Placement(torch.tensor([[4, 5, 6, 7, 4, 5, 6, 7, 0, 1, 2, 3, 0, 1, 2, 3]]), 8, 4)
    t = plan_layer(old, new, 0)
    sends = Counter()
    for m in t.messages:
        sends[m.src] += len(m.experts)
    assert sends == {0: 4, 1: 4, 2: 4, 3: 4}


def test_a_same_node_sender_is_preferred() -> None:
    # 4 ranks of 2 slots on 2 nodes; expert 4 lives on ranks 1 (node 0) and 2 (node 1), expert 0
    # on ranks 0 (node 0) and 3 (node 1). Ranks 0 and 3 start needing expert 4, rank 2 expert 0.
    old = Placement(torch.tensor([[0, 1, 4, 2, 4, 3, 5, 0]]), 6, 4, 2)
    new = Placement(torch.tensor([[4, 1, 4, 2, 0, 3, 5, 4]]), 6, 4, 2)
    t = plan_layer(old, new, 0)
    assert {(m.dst, e): m.src for m in t.messages for e in m.experts} == {(0, 4): 1, (3, 4): 2, (2, 0): 3}
    assert t.local == ()


@pytest.mark.parametrize("max_peers", [1, 2, 3])
def test_rounds_respect_max_peers_and_the_plan_is_deterministic(max_peers: int) -> None:
    for old, new in _pairs(20, seed=max_peers):
        t = plan_layer(old, new, 1, max_peers=max_peers)
        peers: dict[tuple[int, int], set[int]] = {}
        for m in t.messages:
            peers.setdefault((m.round, m.src), set()).add(m.dst)
            peers.setdefault((m.round, m.dst), set()).add(m.src)
        assert max(map(len, peers.values())) <= max_peers
        assert {m.round for m in t.messages} == set(range(t.num_rounds))
        # One message per direction per pair, all of a pair in one round.
        assert len({(m.src, m.dst) for m in t.messages}) == len(t.messages)
        talks: dict[int, set[int]] = {}
        for m in t.messages:
            talks.setdefault(m.src, set()).add(m.dst)
            talks.setdefault(m.dst, set()).add(m.src)
        degree = max(map(len, talks.values()))
        # A greedy colouring: a pair waits only for rounds full on one of its two ranks.
        assert t.num_rounds <= 2 * ((degree - 1) // max_peers) + 1
        again = plan_layer(old, new, 1, max_peers=max_peers)
        assert (again.messages, again.local, again.fills) == (t.messages, t.local, t.fills)


def test_parts_are_valid_placements_within_the_bound_that_end_at_the_new_row() -> None:
    row_bytes, split, refused = 100, 0, 0
    for old, new in _pairs(10, gpus=4, nodes=1, experts=12, slots=16, seed=3):
        for bound in (3 * row_bytes, 4 * row_bytes, 6 * row_bytes):
            try:
                parts = plan_parts(old, new, 0, row_bytes, bound)
            except EplbError as exc:  # a chain of sole replicas longer than the bound allows
                assert "raise MigrationConfig.staging_bytes to at least" in str(exc)
                refused += 1
                continue
            split += len(parts) > 1
            assert torch.equal(parts[0].old, old.phy2log[0]) and torch.equal(parts[-1].new, new.phy2log[0])
            for before, after in zip(parts, parts[1:], strict=False):
                assert torch.equal(before.new, after.old)
            for part in parts:
                Placement(part.new[None], 12, 4)  # every expert keeps a replica
                assert max(part.staging_rows(r) for r in range(4)) * row_bytes <= bound
            assert sum(p.moves for p in parts) == int((old.phy2log[0] != new.phy2log[0]).sum())
        assert len(plan_parts(old, new, 0, row_bytes, None)) == 1
    assert split >= 20 and refused <= 3


def test_a_swap_of_sole_replicas_stays_in_one_part_and_a_too_small_bound_is_refused() -> None:
    old = Placement(torch.tensor([[0, 1, 2, 3]]), 4, 2)
    new = Placement(torch.tensor([[2, 1, 0, 3]]), 4, 2)
    # Each rank stages one row and sends one: the swap needs two rows per rank at once.
    assert len(plan_parts(old, new, 0, 10, 20)) == 1
    with pytest.raises(EplbError, match="at least 20"):
        plan_parts(old, new, 0, 10, 19)
    assert plan_parts(old, old, 0, 10, 1) == []
