"""Expert-load statistics: the GPU recorder, its dumps, and conversions of recorded loads.

``ExpertLoadRecorder`` records per-step slot loads on the device (Triton kernels on CUDA, plain
torch elsewhere); ``to_logical`` turns them into the logical loads ``eplb.plan`` takes;
``load_dump`` reads eplb's and SGLang's dump files.
"""

from eplb.stats.convert import gpu_loads, ring_order, step_balancedness, to_logical, windowed_balancedness
from eplb.stats.dump import LoadDump, load_dump, save_eplb, save_sglang
from eplb.stats.recorder import ExpertLoadRecorder

__all__ = [
    "ExpertLoadRecorder",
    "LoadDump",
    "gpu_loads",
    "load_dump",
    "ring_order",
    "save_eplb",
    "save_sglang",
    "step_balancedness",
    "to_logical",
    "windowed_balancedness",
]
