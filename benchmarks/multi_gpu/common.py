"""What the multi-GPU benchmarks share: joining torchrun's group, common arguments, the result file, inputs.

Every script runs under torchrun at any world size, 1 included, from the repository root:

    torchrun --nproc-per-node G -m benchmarks.multi_gpu.<script> --out $OUT/<script>.json

NCCL with one GPU per rank where CUDA is available, gloo on the CPU (``--small`` shapes). Each rank
hands its result to the store; the lowest live rank writes ``--out`` as ``{"meta", "summary", "ranks"}``.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from benchmarks.timing import meta

from eplb import io

# Set by run_all.sh on the GPU machines (NVLink multicast stays off); recorded with every result.
NVLS_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every script has."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON result file (under $OUT on the device)")
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run with gloo)")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="auto: NCCL where CUDA is available, else gloo")
    p.add_argument("--timeout-s", type=float, default=120.0,
                   help="the process group's timeout (collectives and NCCL P2P)")
    p.add_argument("--deadline-s", type=float, default=560.0,
                   help="the whole run: past it every rank prints its threads' stacks and exits (no silent hang)")
    p.add_argument("--seed", type=int, default=0)
    return p


@dataclass(frozen=True)
class Group:
    """This process in the benchmark's group."""

    rank: int
    world: int
    device: torch.device
    backend: str

    def sync(self) -> None:
        """Wait for this rank's device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def join(args: argparse.Namespace) -> Group:
    """Join torchrun's group (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) with
    ``args.timeout_s`` as its timeout, and arm the ``args.deadline_s`` watchdog."""
    faulthandler.dump_traceback_later(args.deadline_s, exit=True)
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout_s),
                            device_id=device if backend == "nccl" else None)
    return Group(dist.get_rank(), dist.get_world_size(), device, backend)


def run_meta(group: Group, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """What a result was measured on and how: device, driver, torch, CUDA, NCCL, the command, the NVLS env."""
    nccl = None
    if torch.cuda.is_available():
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return meta(
        driver=_driver(), cuda=torch.version.cuda, nccl=nccl, world=group.world, backend=group.backend,
        host=socket.gethostname(), utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        command=" ".join([os.path.basename(sys.executable), "-m", _module(), *sys.argv[1:]]),
        env={name: os.environ.get(name) for name in NVLS_ENV}, args=vars(args), **extra,
    )


def _module() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else sys.argv[0]


def _driver() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else None
    except (OSError, subprocess.SubprocessError):
        return None


def finish(group: Group, args: argparse.Namespace, row: dict[str, Any],
           summarize: Callable[[list[dict[str, Any]]], dict[str, Any]], *, dead: tuple[int, ...] = (),
           **extra: Any) -> None:
    """Hand this rank's ``row`` to the store; the lowest live rank gathers every live rank's row, writes
    ``args.out`` (``{"meta", "summary": summarize(rows), "ranks": rows}``) and prints the summary.

    Goes through the store rather than a collective, so that it also works once ranks ``dead`` have
    exited (a killed rank): then the survivors leave without tearing the group down, since a
    process group with a dead member may not shut down cleanly.
    """
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    alive = [r for r in range(group.world) if r not in dead]
    store.set(f"bench/row/{group.rank}", json.dumps(row))
    if group.rank == alive[0]:
        keys = [f"bench/row/{r}" for r in alive]
        store.wait(keys, timedelta(seconds=args.timeout_s))
        rows = [json.loads(store.get(key)) for key in keys]
        summary = summarize(rows)
        result = {"meta": run_meta(group, args, dead_ranks=list(dead), **extra), "summary": summary, "ranks": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(summary, indent=1), flush=True)
        print(f"wrote {args.out}", flush=True)
        store.set("bench/written", b"1")
        # The store may live in this process (rank 0 outside torchrun): stay until every rank has read it.
        deadline = time.monotonic() + args.timeout_s
        while store.add("bench/left", 0) < len(alive) - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        store.wait(["bench/written"], timedelta(seconds=args.timeout_s))
        store.add("bench/left", 1)
    if dead:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.barrier()
    dist.destroy_process_group()


def gathered_max(values: list[float], group: Group) -> list[float]:
    """Elementwise maximum over the ranks of a list of the same length on every rank (the slowest rank's time)."""
    t = torch.tensor(values, dtype=torch.float64, device=group.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def land(rebalancer: Any, limit: int = 100) -> int:
    """Untimed steps (the recorder's and the rebalancer's only) until no rebalance is moving; how many. A
    commit waits until every rank has staged, so the last timed step may leave one in flight; every rank sees
    the same commits and takes the same steps."""
    steps = 0
    while rebalancer.migrating and steps < limit:
        rebalancer.recorder.step()
        rebalancer.step()
        steps += 1
    return steps


def read_layer_loads(path: str | None, layers: int, experts: int) -> torch.Tensor:
    """``[layers, experts]`` float64 expected expert loads from a loads file (None: the bundled DeepSeek-V3
    MMLU example): its MoE layers (dense all-zero rows dropped) summed over its steps, ``layers`` of them
    evenly spaced, each restricted to its first ``experts`` experts (scaled-down models keep the real skew)."""
    loaded = io.read_example() if path is None else io.read_load(path)
    load = loaded.load.sum(0)
    load = load[load.sum(1) > 0]
    if layers > load.shape[0] or experts > load.shape[1]:
        raise SystemExit(f"the loads file has {load.shape[0]} MoE layers x {load.shape[1]} experts; "
                         f"asked for {layers} x {experts}: pass fewer layers or experts")
    rows = torch.linspace(0, load.shape[0] - 1, layers).round().long()
    return load[rows, :experts].to(torch.float64)


def default_slots(experts: int, world: int) -> int:
    """Physical slots: one eighth more than the experts (DeepSeek-V3: 288 for 256), rounded up to a
    multiple of the ranks."""
    slots = -(-experts * 9 // 8)
    return -(-slots // world) * world


def device_experts(num: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                   gen: torch.Generator, scale: float = 0.5) -> torch.Tensor:
    """``[num, rows, cols]`` random weights (std ``scale / sqrt(cols)``) made on ``device`` from ``gen``, one
    expert at a time: ``random_checkpoint`` builds a checkpoint in float64 on the CPU, which DeepSeek-V3 sizes
    do not fit. Equal generator states give equal weights on every rank of one device type."""
    out = torch.empty(num, rows, cols, dtype=dtype, device=device)
    for e in range(num):
        out[e] = torch.randn(rows, cols, device=device, generator=gen) * (scale / cols ** 0.5)
    return out
