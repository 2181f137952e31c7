"""Recording: the GPU expert-load recorder and conversions of recorded loads.

``ExpertLoadRecorder`` records per-step slot loads on the device (Triton kernels on CUDA, plain
torch elsewhere); ``to_logical`` turns them into the logical loads ``eplb.plan`` takes; its dumps
are written by ``eplb.io.dumps`` and read back by ``eplb.io.read_load``.
"""

from eplb.runtime.recorder.convert import ring_order, step_balancedness, to_logical, windowed_balancedness
from eplb.runtime.recorder.recorder import ExpertLoadRecorder

__all__ = [
    "ExpertLoadRecorder",
    "ring_order",
    "step_balancedness",
    "to_logical",
    "windowed_balancedness",
]
