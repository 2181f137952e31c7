"""Waterfill: balance the shared expert across EP ranks.

``WaterfillBalancer.expand_topk`` turns a layer's top-k ``[M, K]`` into ``[M, K + 1]``, the last
column sending the token's shared expert to a less loaded rank; ``eplb.runtime.waterfill.layout`` gives
the expanded slot layout and where the checkpoint's shared expert is loaded. The Triton kernel
(``eplb.runtime.waterfill.kernel``) is imported only when used.
"""

from eplb.runtime.waterfill.balancer import WaterfillBalancer
from eplb.runtime.waterfill.layout import (
    check_one_shared_expert,
    expand_routed_ids,
    expanded_phy2log,
    num_shared_experts,
    shared_slot,
    slots_per_rank,
)

__all__ = [
    "WaterfillBalancer",
    "check_one_shared_expert",
    "expand_routed_ids",
    "expanded_phy2log",
    "num_shared_experts",
    "shared_slot",
    "slots_per_rank",
]
