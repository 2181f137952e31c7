"""Dynamic mode over a real torch.distributed group (gloo, 2 forked processes on the CPU)."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb import WaterfillBalancer, WaterfillConfig

WORLD = 2
# Tokens per rank and step: rank 1 has an empty batch, then a small one; it must still join.
BATCHES = ((200, 0), (200, 10), (100, 300))
DYNAMIC = WaterfillConfig(mode="dynamic", routed_scaling_factor=2.0, backend="torch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        gen = torch.Generator().manual_seed(rank)
        b = WaterfillBalancer(16, WORLD, rank, DYNAMIC)
        steps = []
        for sizes in BATCHES:
            ids = torch.randint(0, 16, (sizes[rank], 2), generator=gen)
            out_ids, out_w = b.expand_topk(ids, torch.rand(ids.shape, generator=gen))
            steps.append((ids, b.local_counts(ids), out_ids, out_w))
        torch.save(steps, os.path.join(folder, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or sys.platform != "linux", reason="needs torch.distributed and fork")
def test_dynamic_mode_all_reduces_over_the_group(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="fork")
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    for step in range(len(BATCHES)):
        total = sum(results[r][step][1] for r in range(WORLD))
        for rank in range(WORLD):
            ids, _, out_ids, out_w = results[rank][step]
            ref = WaterfillBalancer(16, WORLD, rank, DYNAMIC, all_reduce=lambda t: t)
            assert torch.equal(out_ids, ref.expand_topk_global(ids, torch.rand(ids.shape), total)[0])
            assert (out_w[:, -1] == 0.5).all()
