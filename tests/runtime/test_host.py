import pytest
import torch

from eplb.runtime.dispatch import HashDispatch, StaticDispatch, WeightedDispatch
from eplb.runtime.host import upload
from tests.runtime.dispatch.dispatch_inputs import make_placement

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_upload_copies_and_fills_out_in_place() -> None:
    host = torch.arange(12).view(3, 4).t()  # not contiguous
    copy = upload(host, torch.device("cpu"))
    assert torch.equal(copy, host) and copy.is_contiguous() and copy.data_ptr() != host.data_ptr()
    out = torch.zeros(4, 3, dtype=host.dtype)
    address = out.data_ptr()
    assert upload(host, torch.device("cpu"), out=out) is out and out.data_ptr() == address
    assert torch.equal(out, host)


@pytest.mark.gpu
@CUDA
def test_upload_neither_waits_for_the_stream_nor_reads_the_host_tensor_late() -> None:
    host = torch.arange(1 << 16, dtype=torch.int32)
    out = torch.zeros_like(host, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # queued work ahead of the copies (~50 ms)
    fresh = upload(host, torch.device("cuda"))
    upload(host, torch.device("cuda"), out=out)
    assert not torch.cuda.current_stream().query(), "upload waited for the queued work"
    host.fill_(-1)  # the copies are still queued: they must not read this
    torch.cuda.synchronize()
    expected = torch.arange(1 << 16, dtype=torch.int32)
    assert torch.equal(fresh.cpu(), expected) and torch.equal(out.cpu(), expected)


@pytest.mark.gpu
@CUDA
def test_dispatch_tables_switch_without_waiting_for_the_forward_pass() -> None:
    # A commit's table switch runs at a step boundary while the forward pass is still queued.
    placement = make_placement(0)
    probs = (placement.log2phy >= 0).double()
    ids = torch.randint(0, placement.num_experts, (64, 4), device="cuda")
    torch.cuda.synchronize()
    makers = [lambda device: StaticDispatch(placement, 1, device=device),
              lambda device: HashDispatch(placement, device=device),
              lambda device: WeightedDispatch(placement, probs, device=device)]
    torch.cuda._sleep(100_000_000)
    policies = [make("cuda") for make in makers]
    assert not torch.cuda.current_stream().query(), "building the tables waited for the queued work"
    for make, policy in zip(makers, policies, strict=True):
        on_cpu = make("cpu")
        for layer in range(placement.num_layers):
            assert torch.equal(policy.remap(layer, ids).cpu(), on_cpu.remap(layer, ids.cpu()))
