"""A reference expert-parallel MoE layer on ``torch.distributed``, and the dense layer it must equal.

``EPMoE`` runs one MoE layer on one EP rank: route, dispatch to physical replicas, optionally
waterfill the shared expert, exchange tokens with ``all_to_all_single``, run the local SwiGLU
experts, exchange back and combine. It is the correct, readable version an engine's fast path is
compared with, and the harness of the benchmarks and the online rebalancer. Modules: ``config``
(``EPMoEConfig``), ``router`` (the three routers), ``dense`` (``dense_moe``, the single-process
reference), ``weights`` (the weight loader), ``exchange`` (the all-to-all) and ``layer`` (``EPMoE``).
"""

from eplb.runtime.moe.config import EPMoEConfig
from eplb.runtime.moe.dense import dense_moe, swiglu
from eplb.runtime.moe.layer import EPMoE
from eplb.runtime.moe.router import grouped_topk, hash_topk, route, softmax_topk
from eplb.runtime.moe.weights import local_slot_weights, random_checkpoint

__all__ = [
    "EPMoE",
    "EPMoEConfig",
    "dense_moe",
    "grouped_topk",
    "hash_topk",
    "local_slot_weights",
    "random_checkpoint",
    "route",
    "softmax_topk",
    "swiglu",
]
