"""What the migration tests share: canonical expert contents and random placements
(``eplb.runtime.migration.selfcheck``), and spawned gloo ranks."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The known contents live in eplb (the multi-GPU benchmarks check migrations with them too).
from eplb.runtime.migration.selfcheck import (  # noqa: F401 - re-exported for the tests
    TENSORS,
    canonical,
    corrupted_slots,
    local_bytes,
    make_weights,
    random_placement,
)

# A quantised layer: fp8 weights with float32 scales, a bf16 tensor, and one that ends in a partial word.
FP8 = {
    "w13": (torch.float8_e4m3fn, (4, 8)),
    "w13_scale": (torch.float32, (1, 2)),
    "w2": (torch.bfloat16, (8, 2)),
    "odd": (torch.int8, (3,)),  # 3 bytes: the checksum pads the last word
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes joined in one gloo group."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
