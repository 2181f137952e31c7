"""The backend rule every runtime component shares."""

from __future__ import annotations

import pytest
import torch

from eplb import EplbError
from eplb.runtime import backend
from eplb.runtime.backend import check_backend, use_triton

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU


@pytest.fixture
def triton_imports(monkeypatch: pytest.MonkeyPatch):
    """Set whether ``import triton`` works, as the rule sees it."""

    def set_(works: bool) -> None:
        monkeypatch.setattr(backend, "_triton_import_error", lambda: None if works else "No module named 'triton'")

    return set_


@pytest.mark.parametrize("works", [True, False])
def test_auto_is_triton_on_cuda_when_it_imports_and_torch_elsewhere(triton_imports, monkeypatch, works):
    triton_imports(works)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is never picked by auto
    assert use_triton("auto", CUDA) is works
    assert use_triton("auto", CPU) is False
    assert use_triton("torch", CUDA) is False


def test_triton_runs_on_cuda_or_on_the_cpu_interpreter(triton_imports, monkeypatch):
    triton_imports(True)
    assert use_triton("triton", CUDA)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(EplbError, match="TRITON_INTERPRET=1.*use backend='torch'"):
        use_triton("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("triton", CPU)


def test_triton_without_triton_says_how_to_fix_it(triton_imports):
    triton_imports(False)
    with pytest.raises(EplbError, match="triton does not import.*install triton or use backend='torch'"):
        use_triton("triton", CUDA)


@pytest.mark.parametrize("name", ["cuda", "Triton", None, ""])
def test_unknown_names_are_rejected(name):
    with pytest.raises(EplbError, match="backend must be one of 'auto', 'torch', 'triton'"):
        check_backend(name)
    with pytest.raises(EplbError, match="backend must be one of"):
        use_triton(name, CPU)


def test_every_component_takes_the_rule(monkeypatch):
    from eplb import ExpertLoadRecorder, Placement, WaterfillBalancer, WaterfillConfig
    from eplb.runtime.dispatch import HashDispatch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(EplbError, match="TRITON_INTERPRET"):
        ExpertLoadRecorder(1, 4, window=2, device="cpu", backend="triton")
    assert ExpertLoadRecorder(1, 4, window=2, device="cpu").backend == "torch"
    dispatch = HashDispatch(Placement(torch.tensor([[0, 1]]), num_experts=2, num_gpus=1))
    with pytest.raises(EplbError, match="TRITON_INTERPRET"):
        dispatch.remap(0, torch.zeros(1, 1, dtype=torch.int64), backend="triton")
    with pytest.raises(EplbError, match="backend must be one of"):
        WaterfillConfig(backend="gpu")
    balancer = WaterfillBalancer(32, 4, 0, WaterfillConfig(backend="triton", min_batch=0))
    with pytest.raises(EplbError, match="TRITON_INTERPRET"):
        balancer.expand_topk(torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2))
