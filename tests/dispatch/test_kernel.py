"""The Triton kernel against the torch reference: under the interpreter (CPU) and on CUDA."""

import pytest
import torch

from eplb.dispatch import HashDispatch, StaticDispatch, WeightedDispatch

triton = pytest.importorskip("triton")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _policies(placement, device):
    probs = torch.rand(placement.log2phy.shape, dtype=torch.float64) * (placement.log2phy >= 0)
    return [
        StaticDispatch(placement, placement.num_gpus - 1, device=device),
        HashDispatch(placement, seed=11, device=device),
        WeightedDispatch(placement, probs, seed=11, device=device),
    ]


def _ids(placement, tokens, k, dtype, device):
    ids = torch.randint(0, placement.num_experts, (tokens, k))
    ids[torch.rand(tokens, k) < 0.05] = -1
    return ids.to(dtype).to(device)


@pytest.mark.parametrize("dtype", (torch.int32, torch.int64))
def test_interpreter_matches_torch(make_placement, dtype):
    torch.manual_seed(0)
    placement = make_placement(4, experts=10, gpus=4, slots_per_gpu=5)
    ids = _ids(placement, 300, 4, dtype, "cpu")  # 1200 entries: two blocks, the last partial
    for policy in _policies(placement, "cpu"):
        for layer in range(placement.num_layers):
            ref = policy.remap(layer, ids, backend="torch")
            assert torch.equal(policy.remap(layer, ids, backend="triton"), ref)


def test_interpreter_handles_empty_and_strided_ids(placement):
    policy = HashDispatch(placement)
    empty = torch.empty(0, 8, dtype=torch.int64)
    assert policy.remap(0, empty, backend="triton").shape == (0, 8)
    ids = _ids(placement, 40, 6, torch.int64, "cpu")[:, ::2]
    assert torch.equal(policy.remap(0, ids, backend="triton"), policy.remap(0, ids, backend="torch"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", (torch.int32, torch.int64))
def test_cuda_kernel_matches_torch(make_placement, dtype):
    torch.manual_seed(0)
    placement = make_placement(5, layers=3, experts=64, gpus=8, nodes=2, slots_per_gpu=10)
    ids = _ids(placement, 16384, 8, dtype, "cuda")
    for policy in _policies(placement, "cuda"):
        for layer in range(placement.num_layers):
            out = policy.remap(layer, ids)  # auto: Triton on CUDA
            assert torch.equal(out, policy.remap(layer, ids, backend="torch"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ("triton", "torch"))
def test_cuda_graph_capture_and_weight_update(make_placement, backend):
    torch.manual_seed(0)
    placement = make_placement(6, experts=32, gpus=4, slots_per_gpu=12)
    ids = _ids(placement, 4096, 8, torch.int32, "cuda")
    policies = _policies(placement, "cuda")
    for policy in policies:  # warm up (compiles the kernel) outside the capture
        policy.remap(1, ids, backend=backend)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [policy.remap(1, ids, backend=backend) for policy in policies]
    fresh = _ids(placement, 4096, 8, torch.int32, "cuda")
    ids.copy_(fresh)
    graph.replay()
    for policy, out in zip(policies, outs):
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
