"""Every multi-GPU benchmark script runs end to end on 2 gloo ranks with ``--small`` shapes, as torchrun runs
it (the same environment variables, the module run as ``__main__``), a kill and a delay included.

One spawn runs the scripts one after another (each joins and leaves its own group), to pay the process
start-up once; the kill runs last, since it ends a rank. Each test then reads one result file.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S, DELAY_S = 1.0, 2.5
RUNS = {
    "correctness": ("correctness", []),
    "bandwidth": ("bandwidth", []),
    "step_time": ("step_time", []),
    "delay": ("replacements", ["--migrations", "12", "--at", "4", "--delay-rank", "1", "--delay-s", str(DELAY_S),
                               "--fault-phase", "vote", "--migration-timeout-s", str(TIMEOUT_S)]),
    "kill": ("replacements", ["--migrations", "12", "--at", "5", "--kill-rank", "1",
                              "--migration-timeout-s", str(TIMEOUT_S)]),
}


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all bound at once, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _torchrun_like(rank: int, runs: list[tuple[str, list[str], int]]) -> None:
    """Run each ``(module, argv, port)`` as torchrun would run it on this rank."""
    torch.set_num_threads(1)
    for module, argv, port in runs:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        sys.argv = [module, *argv]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                raise


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("multi_gpu")
    runs = [(f"benchmarks.multi_gpu.{script}", ["--small", "--deadline-s", "120", "--out", str(out / f"{name}.json"),
                                                 *extra], port)
            for (name, (script, extra)), port in zip(RUNS.items(), free_ports(len(RUNS)), strict=True)]
    start = time.perf_counter()
    mp.spawn(_torchrun_like, args=(runs,), nprocs=WORLD, join=True)
    print(f"\nthe {len(runs)} runs on {WORLD} gloo ranks took {time.perf_counter() - start:.1f} s", end="")
    return {name: json.loads((out / f"{name}.json").read_text()) for name in RUNS}


def test_correctness_ep_layer_equals_dense(results: dict[str, dict]) -> None:
    result = results["correctness"]
    assert result["meta"]["world"] == WORLD and result["meta"]["backend"] == "gloo"
    configs = result["summary"]["configs"]
    assert [c["waterfill"] for c in configs] == ["static", "dynamic"]
    assert result["summary"]["all_allclose"] and all(c["max_rel_err"] < 2e-2 for c in configs)
    # Waterfill moved shared-expert rows between the ranks, and each rank compared its own output.
    assert all(len(rank["configs"]) == 2 for rank in result["ranks"])


def test_replacements_survive_a_delayed_rank_and_stay_exact(results: dict[str, dict]) -> None:
    summary = results["delay"]["summary"]
    assert summary["migrations"] == 12 and summary["corrupted_slots"] == 0 and summary["moves"] > 0
    fault = summary["fault"]
    # Both ranks raised the same error, served the old rows with exact bytes, and the retry went on.
    assert fault["errors_on_ranks"] == WORLD and fault["same_error_everywhere"]
    assert fault["old_placement_serving"] and fault["corrupted_after_error"] == 0 and fault["retry_ok"]
    assert "did not vote" in fault["message"] and "retry with migrate" in fault["message"]


def test_a_killed_rank_leaves_the_survivor_serving_the_old_placement(results: dict[str, dict]) -> None:
    result = results["kill"]
    summary = result["summary"]
    assert result["meta"]["dead_ranks"] == [1] and summary["ranks_reporting"] == [0]
    assert summary["migrations"] == 5 and summary["corrupted_slots"] == 0
    fault = summary["fault"]
    assert fault["errors_on_ranks"] == 1 and fault["old_placement_serving"] and fault["corrupted_after_error"] == 0
    assert fault["retry_ok"] is None  # the survivor stops: its peer is gone
    assert "rank 1 did not reach round" in fault["message"]
    assert fault["max_seconds_to_error"] < TIMEOUT_S + 5  # bounded by the migration timeout: no hang


def test_bandwidth_reports_sync_and_async(results: dict[str, dict]) -> None:
    summary = results["bandwidth"]["summary"]
    assert [s["direction"] for s in summary["sync"]] == ["old->new", "new->old"]
    for run in summary["sync"]:
        assert run["moves"] > 0 and run["bytes_intra_node"] > 0 and run["bytes_inter_node"] == 0
        assert run["recv_GBps_per_gpu_mean"] > 0 and run["plain_p2p_s"] > 0
    (round_,) = summary["async"]
    assert round_["landed"] and round_["error"] is None and round_["migrating_steps"] > 0
    assert round_["moves"] == summary["sync"][0]["moves"]


def test_step_time_covers_every_placement_and_variant_and_the_shift(results: dict[str, dict]) -> None:
    summary = results["step_time"]["summary"]
    rows = {(r["placement"], r["variant"]): r for r in summary["placements"]}
    assert len(rows) == 12 and all(r["step_ms"] > 0 for r in rows.values())
    assert rows[("eplb", "plain")]["planned_max_over_mean"] < rows[("linear", "plain")]["planned_max_over_mean"]
    assert rows[("eplb", "weighted")]["dispatch"] == "weighted"
    assert summary["shift"]["off"]["rebalances"] == []
    done = summary["shift"]["on"]["rebalances"]
    assert done and all(r["error"] is None and r["moves"] > 0 for r in done)
