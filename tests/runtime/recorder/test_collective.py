"""Summing recorder windows over an EP group: two CPU processes over gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb import EplbError, ExpertLoadRecorder

LAYERS, SLOTS, WINDOW, STEPS = 2, 8, 3, 5


def rank_ids(rank: int, step: int, layer: int) -> torch.Tensor:
    """Each rank's routed ids, reproducible from (rank, step, layer) alone."""
    gen = torch.Generator().manual_seed(100 * rank + 10 * step + layer)
    return torch.randint(-1, SLOTS, (16, 2), generator=gen)


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rec = ExpertLoadRecorder(LAYERS, SLOTS, WINDOW, device="cpu")
        for step in range(STEPS):
            for layer in range(LAYERS):
                rec.record_topk(layer, rank_ids(rank, step, layer))
            rec.step()
        expected = torch.zeros(WINDOW, LAYERS, SLOTS, dtype=torch.int32)
        for other in range(world):
            ref = ExpertLoadRecorder(LAYERS, SLOTS, WINDOW, device="cpu")
            for step in range(STEPS):
                for layer in range(LAYERS):
                    ref.record_topk(layer, rank_ids(other, step, layer))
                ref.step()
            expected += ref.loads()
        got = rec.global_loads()
        assert torch.equal(got, expected), f"rank {rank}: global loads differ from the sum of every rank"
        assert torch.equal(rec.loads(), expected) is (world == 1)
        # A rank that skipped a step must be caught, on every rank.
        if rank == 0:
            rec.step()
        try:
            rec.global_loads()
        except EplbError as exc:
            assert "between 5 and 6 steps" in str(exc)
        else:
            raise AssertionError("mismatched step counts were not caught")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_loads_sum_every_rank_over_gloo(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def test_global_loads_need_an_initialized_group() -> None:
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialized here")
    with pytest.raises(EplbError, match="init_process_group"):
        ExpertLoadRecorder(1, 2, 2, device="cpu").global_loads()
