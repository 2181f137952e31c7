"""The Triton remap kernel against the torch reference, bit for bit (``kernel_harness``: on CUDA,
and on the CPU under Triton's interpreter)."""

import json

import pytest
import torch

import eplb
from eplb.placement import Placement
from eplb.runtime.dispatch import HashDispatch, StaticDispatch, WeightedDispatch, solve_weights
from eplb.runtime.hashing import UNIFORM_BITS, UNIFORM_ONE, layer_key, mix32_int
from tests.runtime.dispatch.dispatch_inputs import make_placement
from tests.runtime.kernel_harness import KERNEL_DEVICES, run_check

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _policies(placement, device, seed=0):
    probs = torch.rand(placement.log2phy.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [
        StaticDispatch(placement, placement.num_gpus - 1, device=device),
        HashDispatch(placement, seed=11, device=device),
        WeightedDispatch(placement, probs * (placement.log2phy >= 0), seed=11, device=device),
    ]


def _ids(placement, tokens, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, placement.num_experts, (tokens, k), generator=g)
    ids[torch.rand(tokens, k, generator=g) < 0.05] = -1
    return ids.to(dtype).to(device)


def _assert_same(policy, layer, ids):
    assert torch.equal(policy.remap(layer, ids, backend="triton"), policy.remap(layer, ids, backend="torch"))


def _weighted_case(seed):
    """A random placement (one hot expert holds up to a third of the slots, so ``X`` ranges
    widely) with skewed weights, some of them zero, and random ids with padding."""
    g = torch.Generator().manual_seed(seed)
    experts, gpus = int(torch.randint(3, 24, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    slots = gpus * (-(-experts // gpus) + int(torch.randint(0, 6, (1,), generator=g)))
    rows = []
    for _ in range(2):
        extra = torch.randint(0, experts, (slots - experts,), generator=g)
        extra[torch.rand(extra.shape, generator=g) < 0.5] = 0
        rows.append(torch.cat([torch.arange(experts), extra])[torch.randperm(slots, generator=g)])
    placement = Placement(torch.stack(rows), num_experts=experts, num_gpus=gpus)
    held = placement.log2phy >= 0
    probs = torch.rand(held.shape, generator=g, dtype=torch.float64) ** 3
    probs[torch.rand(held.shape, generator=g) < 0.3] = 0.0
    probs[..., 0] += 1e-3
    tokens, k = int(torch.randint(1, 400, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    ids = torch.randint(0, experts, (tokens, k), generator=g)
    ids[torch.rand(tokens, k, generator=g) < 0.05] = -1
    return placement, probs * held, ids


def coin_cases(backend, device):
    """Expert 0 has replicas in slots 0 and 1. Entry 0 lands in bucket b = h mod 2 with coin
    u = h >> 8; the weights make bucket b's threshold exactly u (the alias wins), then u + 1 (the
    bucket's own replica wins)."""
    placement = Placement(torch.tensor([[0, 0, 1]]), num_experts=2, num_gpus=1)
    h = mix32_int(layer_key(5, 0))
    bucket, u = h % 2, h >> (32 - UNIFORM_BITS)
    ids = torch.zeros(1, 1, dtype=torch.int64, device=device)
    for threshold, slot in ((u, 1 - bucket), (u + 1, bucket)):
        probs = torch.zeros(2, 2, dtype=torch.float64)
        probs[0, bucket] = threshold / (2 * UNIFORM_ONE)  # mass 2 * 2**24 * p = threshold
        probs[0, 1 - bucket] = 1.0 - probs[0, bucket]
        probs[1, 0] = 1.0
        policy = WeightedDispatch(placement, probs.unsqueeze(0), seed=5, device=device)
        assert int(policy._threshold[0, 0, bucket]) == threshold
        assert int(policy.remap(0, ids, backend=backend)) == slot


def check_kernel(device):
    """Every policy on both id dtypes, random weighted placements, the coin's boundary, empty and
    strided ids; larger on CUDA (the interpreter runs a block per program in Python)."""
    if device == "cuda":
        placement, tokens, k = make_placement(5, layers=3, experts=64, gpus=8, nodes=2, slots_per_gpu=10), 16384, 8
    else:  # 300 x 4 entries: two blocks, the last partial
        placement, tokens, k = make_placement(4, experts=10, gpus=4, slots_per_gpu=5), 300, 4
    for dtype in (torch.int32, torch.int64):
        ids = _ids(placement, tokens, k, dtype, device)
        for policy in _policies(placement, device):
            for layer in range(placement.num_layers):
                _assert_same(policy, layer, ids)
    for seed in range(8):
        weighted, probs, ids = _weighted_case(seed)
        policy = WeightedDispatch(weighted, probs, seed=seed, device=device)
        for layer in range(weighted.num_layers):
            _assert_same(policy, layer, ids.to(device))
    coin_cases("triton", device)
    policy = HashDispatch(placement, device=device)
    assert policy.remap(0, torch.empty(0, 8, dtype=torch.int64, device=device), backend="triton").shape == (0, 8)
    _assert_same(policy, 0, _ids(placement, 40, 6, torch.int64, device)[:, ::2])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_matches_torch(device):
    run_check(check_kernel, device)


def test_coin_keeps_own_replica_strictly_below_threshold():
    coin_cases("torch", "cpu")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ("triton", "torch"))
def test_cuda_graph_capture_and_weight_update(backend):
    placement = make_placement(6, experts=32, gpus=4, slots_per_gpu=12)
    ids = _ids(placement, 4096, 8, torch.int32, "cuda")
    policies = _policies(placement, "cuda")
    for policy in policies:  # warm up (compiles the kernel) outside the capture
        policy.remap(1, ids, backend=backend)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [policy.remap(1, ids, backend=backend) for policy in policies]
    fresh = _ids(placement, 4096, 8, torch.int32, "cuda", seed=1)
    ids.copy_(fresh)
    graph.replay()
    for policy, out in zip(policies, outs, strict=True):
        assert torch.equal(out, policy.remap(1, fresh, backend="torch"))
    # New weights reach the captured graph without a new capture.
    weighted = policies[2]
    first = torch.zeros(placement.log2phy.shape, dtype=torch.float64)
    first[..., 0] = 1.0
    weighted.set_probs(first)
    graph.replay()
    routed = fresh >= 0
    expect = placement.log2phy[1, fresh.clamp(min=0).long().cpu(), 0].to(torch.int32)
    assert torch.equal(outs[2].cpu()[routed.cpu()], expect[routed.cpu()])


def _deepseek_load(source, request):
    """``[58, 256]`` loads whose deepseek placements span the replica counts that matter."""
    if source == "real":
        path = request.getfixturevalue("real_data") / "sglang-dsv3-ep-stats" / "prefill_in4096.json"
        return torch.tensor(json.loads(path.read_text())["logical_count"], dtype=torch.float64)[3:]
    g = torch.Generator().manual_seed(0)
    if source == "log-normal":  # as skewed as the real files: at most 8 replicas per expert
        return (torch.randn(58, 256, generator=g, dtype=torch.float64) * 0.8).exp()
    return torch.rand(58, 256, generator=g, dtype=torch.float64) ** -1.5  # heavy-tailed: 33 replicas


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("source", ("heavy-tailed", "log-normal", "real"))
def test_cuda_weighted_matches_torch_on_deepseek_placements(source, request):
    load = _deepseek_load(source, request)
    placement = eplb.plan(load, num_gpus=32, num_slots=288, num_nodes=4, algorithm="deepseek")
    probs = solve_weights(placement, load)
    policy = WeightedDispatch(placement, probs, seed=3, device="cuda")
    even = WeightedDispatch(placement, (placement.log2phy >= 0).double(), seed=3, device="cuda")
    hashed = HashDispatch(placement, seed=3, device="cuda")
    ids = _ids(placement, 16384, 8, torch.int32, "cuda")
    for layer in range(placement.num_layers):
        out = policy.remap(layer, ids, backend="triton")
        assert torch.equal(out, policy.remap(layer, ids, backend="torch"))
        assert torch.equal(even.remap(layer, ids, backend="triton"), hashed.remap(layer, ids, backend="triton"))
