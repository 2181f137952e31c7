"""Faults in each phase on one of 4 gloo ranks: nobody commits the layer, every rank raises the same
MigrationError, earlier layers stay committed, and a retry from ``error.serving`` succeeds.

Faults are injected by monkeypatching inside the spawned workers (rank 1, layer 1 only):
a raise, a hang past the timeout, and corrupted bytes (caught by the checksums).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from eplb.placement import Placement
from eplb.runtime.migration import MigrationConfig, MigrationError, migrate, plan_layer
from eplb.runtime.migration import sync as sync_module
from eplb.runtime.migration import transfer as transfer_module
from tests.runtime.migration.harness import canonical, corrupted_slots, make_weights, random_placement, spawn

WORLD, LAYERS, EXPERTS, SLOTS = 4, 3, 16, 20
FAULTY, LAYER = 1, 1
TIMEOUT_S, HANG_S = 1.5, 3.5
FAULTS = [
    ("stage", "raise"), ("stage", "hang"), ("stage", "corrupt"),
    ("verify", "raise"), ("verify", "hang"), ("verify", "corrupt"),
    ("vote", "raise"), ("vote", "hang"),
]
# What the shared cause says, per fault kind.
CAUSES = {"raise": "injected", "hang": "did not", "corrupt": "checksum mismatch"}


def _placements() -> tuple[Placement, Placement]:
    gen = torch.Generator().manual_seed(11)
    return (random_placement(gen, LAYERS, EXPERTS, SLOTS, WORLD, 2), random_placement(gen, LAYERS, EXPERTS, SLOTS,
                                                                                       WORLD, 2))


def _inject(patch: pytest.MonkeyPatch, phase: str, kind: str) -> None:
    """Patch this process so that ``phase`` fails with ``kind`` in layer ``LAYER``."""
    def act(original):
        if kind == "raise":
            raise RuntimeError(f"injected {phase} fault")
        if kind == "hang":
            time.sleep(HANG_S)
        return original()

    if phase == "stage":
        # The second pack of the layer is this rank's first send (the first is its local copies).
        stage, pack, packs = transfer_module.stage, transfer_module._pack, []

        def faulty_pack(out, *args):
            packs.append(1)
            if len(packs) != 2:
                return pack(out, *args)
            if kind == "corrupt":  # on the wire: after the source checksums were written
                pack(out, *args)
                out[0, 0] ^= 0xFF
                return None
            return act(lambda: pack(out, *args))

        def faulty_stage(weights, t, *args, **kwargs):
            if t.layer != LAYER:
                return stage(weights, t, *args, **kwargs)
            with pytest.MonkeyPatch.context() as inner:
                inner.setattr(transfer_module, "_pack", faulty_pack)
                return stage(weights, t, *args, **kwargs)

        patch.setattr(transfer_module, "stage", faulty_stage)
    elif phase == "verify":
        verify = transfer_module.verify

        def faulty_verify(weights, t, staged, *args):
            if t.layer == LAYER and kind == "corrupt":  # a staged buffer
                staged.rows[-1, 0] ^= 0xFF
            elif t.layer == LAYER:
                return act(lambda: verify(weights, t, staged, *args))
            return verify(weights, t, staged, *args)

        patch.setattr(transfer_module, "verify", faulty_verify)
    else:
        vote = sync_module.StepSync.vote

        def faulty_vote(self, failure):
            layer = int(self.prefix.rstrip("/").split("/")[-2])
            return act(lambda: vote(self, failure)) if layer == LAYER else vote(self, failure)

        patch.setattr(sync_module.StepSync, "vote", faulty_vote)


def _worker(rank: int, world: int, out: str) -> None:
    before, after = _placements()
    t = plan_layer(before, after, LAYER)
    # The faults need rank 1 to send and to receive in the faulty layer.
    assert any(m.src == FAULTY for m in t.messages) and any(m.dst == FAULTY for m in t.messages)
    canon = canonical(LAYERS, EXPERTS)
    weights, _ = make_weights(canon, before, rank)
    # Layer 0 commits before the fault; layer 1 fails; layer 2 is never reached.
    mixed = Placement(torch.cat([after.phy2log[:1], before.phy2log[1:]]), EXPERTS, WORLD, 2)
    results = []
    for phase, kind in FAULTS:
        start = time.perf_counter()
        with pytest.MonkeyPatch.context() as patch:
            if rank == FAULTY:
                _inject(patch, phase, kind)
            try:
                migrate(weights, before, after, config=MigrationConfig(timeout_s=TIMEOUT_S))
            except MigrationError as exc:
                error = exc
            else:
                raise AssertionError(f"{phase} {kind}: the migration did not fail on rank {rank}")
        assert error.serving == mixed and error.report.layers_committed == [0], (phase, kind, str(error))
        unchanged = corrupted_slots(weights, canon, mixed, rank)
        retry = migrate(weights, error.serving, after, config=MigrationConfig(timeout_s=30.0))
        assert retry.serving == after and corrupted_slots(weights, canon, after, rank) == 0
        migrate(weights, after, before, config=MigrationConfig(timeout_s=30.0))  # back for the next fault
        results.append({
            "fault": f"{phase} {kind}", "message": str(error), "layer": error.layer, "ranks": list(error.ranks),
            "cause": error.cause, "unchanged": unchanged, "seconds": time.perf_counter() - start,
        })
    Path(out, f"{rank}.json").write_text(json.dumps(results))


def test_a_fault_in_any_phase_aborts_the_layer_everywhere_and_a_retry_succeeds(tmp_path: Path) -> None:
    spawn(_worker, WORLD, str(tmp_path))
    per_rank = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(WORLD)]
    for i, (phase, kind) in enumerate(FAULTS):
        seen = [results[i] for results in per_rank]
        print(f"\n{phase} {kind} ({max(r['seconds'] for r in seen):.1f} s): {seen[0]['message']}", end="")
        # Nothing of layer 1 was committed anywhere (layer 0 was), and it was retried afterwards.
        assert all(r["unchanged"] == 0 for r in seen), (phase, kind)
        # One decision, so one message on every rank, naming the layer, the faulty rank and the cause.
        assert len({r["message"] for r in seen}) == 1, (phase, kind, [r["message"] for r in seen])
        assert seen[0]["layer"] == LAYER and FAULTY in seen[0]["ranks"], (phase, kind, seen[0])
        assert CAUSES[kind] in seen[0]["cause"], (phase, kind, seen[0]["cause"])
