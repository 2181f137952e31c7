"""Waterfill: balance the shared expert across EP ranks.

``WaterfillBalancer(P, n_ep, rank, WaterfillConfig(...)).expand_topk`` turns a layer's top-k
``[M, K]`` into ``[M, K + 1]``, the last column sending the token's shared expert to a less
loaded rank. Modules: ``config`` (the settings and what they resolve to), ``balancer`` (the
step), ``tables`` (host-side inputs built from recorded loads), ``reference`` (the step in
torch) and ``kernel`` (the step as one Triton kernel, imported only when used); ``layout`` gives
the expanded slot layout and where the checkpoint's shared expert is loaded.
"""

from eplb.runtime.waterfill.balancer import WaterfillBalancer
from eplb.runtime.waterfill.config import WaterfillConfig
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
    "WaterfillConfig",
    "check_one_shared_expert",
    "expand_routed_ids",
    "expanded_phy2log",
    "num_shared_experts",
    "shared_slot",
    "slots_per_rank",
]
