"""1000 random re-placements over 4 gloo ranks: every slot ends with exactly its expert's bytes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from eplb import EplbError, migration_cost
from eplb.runtime.migration import MigrationConfig, migrate
from tests.runtime.migration.harness import (
    canonical,
    corrupted_slots,
    make_weights,
    random_placement,
    spawn,
)

WORLD, LAYERS, EXPERTS, SLOTS, NODES = 4, 3, 16, 20, 2
MIGRATIONS = 1000


def expected_staging(old, new) -> tuple[int, int]:
    """(local copies, remote receives) by definition: each (rank, expert) a rank's changed slots
    need once, local when the rank held the expert before."""
    s = old.slots_per_gpu
    local = remote = 0
    for layer in range(old.num_layers):
        changed = (old.phy2log[layer] != new.phy2log[layer]).nonzero().flatten().tolist()
        needs = {(p // s, int(new.phy2log[layer, p])) for p in changed if new.phy2log[layer, p] >= 0}
        for rank, expert in needs:
            if expert in old.local_experts(rank)[layer].tolist():
                local += 1
            else:
                remote += 1
    return local, remote


def _worker(rank: int, world: int, out: str) -> None:
    gen = torch.Generator().manual_seed(7)
    canon = canonical(LAYERS, EXPERTS)
    current = random_placement(gen, LAYERS, EXPERTS, SLOTS, WORLD, NODES)
    weights, tensors = make_weights(canon, current, rank)
    addresses = [t.data_ptr() for named in tensors for t in named.values()]
    per_slot = weights.bytes_per_slot(0)
    # Every schedule: one peer per round (the default), two, all at once; and every tenth
    # migration under a staging bound that splits layers into parts.
    configs = [MigrationConfig(max_peers=k, timeout_s=60.0) for k in (1, 2, 3)]
    bounded = MigrationConfig(staging_bytes=6 * weights.layout(0).row_bytes, timeout_s=60.0)
    corrupted = moves = sent = steps = 0
    start = time.perf_counter()
    for i in range(MIGRATIONS):
        new = random_placement(gen, LAYERS, EXPERTS, SLOTS, WORLD, NODES)
        try:
            report = migrate(weights, current, new, config=bounded if i % 10 == 9 else configs[i % 3])
        except EplbError as exc:  # a chain of sole replicas needs more rows than the bound: refused up front
            assert "raise MigrationConfig.staging_bytes" in str(exc)
            report = migrate(weights, current, new)
        cost = migration_cost(current, new, per_slot)
        assert (report.moves, report.filled_bytes) == (cost.total_moves, cost.bytes)
        if report.steps == LAYERS:  # parts may stage an expert once per part
            assert (report.local_copies, report.remote_receives) == expected_staging(current, new)
        assert report.bytes_sent == report.remote_receives * per_slot
        assert report.layers_committed == list(range(LAYERS)) and report.serving == new
        corrupted += corrupted_slots(weights, canon, new, rank)
        moves, sent, steps, current = moves + report.moves, sent + report.bytes_sent, steps + report.steps, new
    elapsed = time.perf_counter() - start
    assert [t.data_ptr() for named in tensors for t in named.values()] == addresses, "a tensor was replaced"
    Path(out, f"{rank}.json").write_text(json.dumps(
        {"corrupted": corrupted, "seconds": elapsed, "moves": moves, "bytes_sent": sent, "steps": steps}
    ))


def test_1000_random_replacements_leave_every_slot_exact(tmp_path: Path) -> None:
    spawn(_worker, WORLD, str(tmp_path))
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(WORLD)]
    print(f"\n{MIGRATIONS} migrations x {LAYERS} layers on {WORLD} gloo ranks: "
          f"{max(r['seconds'] for r in results):.1f} s, {results[0]['moves']} slot moves, "
          f"{results[0]['bytes_sent']} bytes sent, {results[0]['steps']} steps")
    assert sum(r["corrupted"] for r in results) == 0
    assert results[0]["moves"] > MIGRATIONS * LAYERS * 10  # random placements move most slots
    assert results[0]["steps"] > MIGRATIONS * LAYERS + MIGRATIONS // 10  # the staging bound split layers
