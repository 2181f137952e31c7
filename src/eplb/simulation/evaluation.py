"""Per-step numbers of one placement on a batch of steps: GPU loads under a dispatch policy, activated
experts, max/mean, and the MoE time of the cost model (with the shared expert, waterfilled or not); and the
time weight copies take on the links.

Dispatch (how an expert's tokens split over its replicas):

- ``"even"``: evenly (what ``Placement.gpu_load`` and ``eplb.evaluate`` assume, and what a uniform hash
  dispatch gives in expectation);
- ``"static"``: each source rank sends all its tokens of an expert to one fixed replica
  (``eplb.runtime.dispatch.static_tables``), sources spread evenly over the ranks;
- ``"weighted"``: the split that minimises the max GPU load of the last few steps
  (``eplb.runtime.dispatch.solve_weights``), applied to the step's load (the simulator refreshes it every
  ``WEIGHTS_EVERY`` steps).

Waterfill (the shared expert): off, each rank runs the shared expert on its own tokens (``N / G``); on,
the shared tokens fill the ranks with the least routed load first, up to a common level (the water level of
``eplb.runtime.waterfill``), and the moved tokens cross the links like routed ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eplb.cluster import require_choice
from eplb.errors import EplbError
from eplb.metrics import gpu_totals
from eplb.placement import Placement
from eplb.simulation.cost import CostModel

DISPATCH = ("even", "static", "weighted")


@dataclass(frozen=True)
class StepMetrics:
    """Numbers of ``n`` steps (shapes for ``L`` layers and ``G`` GPUs)."""

    layer_max_over_mean: torch.Tensor  # [n, L]
    loaded: torch.Tensor  # [n, L] bool
    rank_tokens: torch.Tensor  # [n, L, G]
    rank_experts: torch.Tensor | None  # [n, L, G]; None when not asked for (see ``evaluate_steps``)
    layer_us: torch.Tensor | None = None  # [n, L]
    gemm_us: torch.Tensor | None = None  # [n]: the step's GEMM time, under which async copies hide
    ideal_us: torch.Tensor | None = None  # [n]


def split_matrix(placement: Placement, dispatch: str, probs: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[L, E, P]`` share of each expert's load each slot gets, or None for the even split (computed faster
    by ``Placement.slot_load``). ``probs [L, E, X]`` are the weighted split's replica shares."""
    if require_choice("dispatch", dispatch, DISPATCH) == "even":
        return None
    L, E, P = placement.num_layers, placement.num_experts, placement.num_slots
    out = torch.zeros(L, E, P, dtype=torch.float64)
    if dispatch == "static":
        from eplb.runtime.dispatch import static_tables

        table = static_tables(placement)  # [G, L, E]: the slot each source rank uses
        index = table.permute(1, 2, 0)  # [L, E, G]
        out.scatter_add_(2, index, torch.full(index.shape, 1.0 / placement.num_gpus, dtype=torch.float64))
        return out
    if probs is None:
        raise EplbError("the weighted dispatch needs replica shares; pass probs from solve_weights")
    log2phy = placement.log2phy
    held = log2phy >= 0
    out.scatter_add_(2, torch.where(held, log2phy, 0), torch.where(held, probs, 0.0))
    return out


def evaluate_steps(
    placement: Placement,
    loads: torch.Tensor,
    *,
    top_k: int,
    cost: CostModel | None = None,
    split: torch.Tensor | None = None,
    waterfill: bool = False,
    ranks: bool = True,
) -> StepMetrics:
    """Per-step numbers of ``placement`` on ``loads [n, L, E]``.

    Args:
        placement: the placement serving.
        loads: ``[n, L, E]`` token-expert pairs per step.
        top_k: experts each token picked (the step's tokens are the pairs over ``top_k``).
        cost: the time model, or None for balance only.
        split: ``[L, E, P]`` dispatch split (``split_matrix``); None: the even split.
        waterfill: spread the shared expert's tokens by the water level (else each rank runs its own).
        ranks: count the activated experts per rank; without a cost model, False leaves ``rank_experts`` None
            (a pass over every slot that a long balance-only replay does not need).
    """
    if split is None:
        slot = placement.slot_load(loads)  # [n, L, P]
    else:
        slot = torch.einsum("nle,lep->nlp", loads, split)
    spg = placement.slots_per_gpu
    tokens = gpu_totals(slot, spg)  # [n, L, G]
    peak, mean = tokens.amax(-1), tokens.mean(-1)
    loaded = peak > 0
    ratio = torch.where(loaded, peak / torch.where(loaded, mean, 1.0), 1.0)
    if cost is None and not ranks:
        return StepMetrics(ratio, loaded, tokens, None)
    experts = gpu_totals((slot > 0).to(torch.float64), spg)
    if cost is None:
        return StepMetrics(ratio, loaded, tokens, experts)
    num_gpus = placement.num_gpus
    step_tokens = loads.sum(-1, keepdim=True) / top_k  # [n, L, 1]
    own = step_tokens / num_gpus * cost.shared_experts
    shared = _waterfill(tokens, step_tokens * cost.shared_experts) if waterfill else own.expand_as(tokens)
    has_shared = (shared > 0).to(torch.float64)
    received = tokens + (shared - own).clamp(min=0)
    gemm = cost.gemm_us(tokens + shared, experts + has_shared).amax(-1)  # [n, L]
    comm = cost.comm_us(received, placement.num_nodes)
    layer_us = torch.where(loaded, gemm + comm, 0.0)
    # Perfect balance: every rank at the mean tokens and activated experts, its own shared tokens.
    m_tok, m_exp = mean.unsqueeze(-1), experts.mean(-1, keepdim=True)
    ideal = cost.gemm_us(m_tok + own, m_exp + (own > 0).to(torch.float64)).squeeze(-1)
    ideal = torch.where(loaded, ideal + cost.comm_us(m_tok, placement.num_nodes), 0.0)
    return StepMetrics(ratio, loaded, tokens, experts, layer_us, torch.where(loaded, gemm, 0.0).sum(-1),
                       ideal.sum(-1))


def _waterfill(routed: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """``[..., G]`` shared tokens per rank: ``shared [..., 1]`` poured onto the ranks by routed load
    ``routed [..., G]``, least loaded first (``eplb.runtime.waterfill``'s rank weights, per step and layer)."""
    from eplb.runtime.waterfill.reference import rank_weights

    flat_routed = routed.reshape(-1, routed.shape[-1]).round().to(torch.int64)
    flat_shared = shared.reshape(-1).round().to(torch.int64)
    out = torch.zeros(flat_routed.shape, dtype=torch.float64)
    for i in range(flat_routed.shape[0]):
        if int(flat_shared[i]) == 0:
            continue
        w = rank_weights(torch.cat([flat_routed[i], flat_shared[i : i + 1]]), flat_shared[i], 0).to(torch.float64)
        out[i] = flat_shared[i] * w / w.sum().clamp(min=1)
    return out.view_as(routed)


def copy_us(old: Placement, new: Placement, cost: CostModel, layers: torch.Tensor | None = None) -> float:
    """Microseconds to copy the experts that change from ``old`` to ``new`` (only ``layers``, if given): each
    changed slot receives one expert's weights, over NVLink when ``old`` held that expert on the slot's node,
    else between nodes; every GPU receives at once and the slowest one sets the time."""
    changed = (old.phy2log != new.phy2log) & (new.phy2log >= 0)  # [L, P]
    if layers is not None:
        keep = torch.zeros(old.num_layers, dtype=torch.bool)
        keep[layers] = True
        changed &= keep[:, None]
    if not bool(changed.any()):
        return 0.0
    node_of_slot = old.slot_node  # [P]
    held = torch.zeros(old.num_layers, old.num_experts, old.num_nodes, dtype=torch.bool)
    valid = old.phy2log >= 0
    held[torch.arange(old.num_layers)[:, None].expand_as(old.phy2log)[valid], old.phy2log[valid],
         node_of_slot.expand_as(old.phy2log)[valid]] = True
    local = held[torch.arange(old.num_layers)[:, None], new.phy2log.clamp(min=0), node_of_slot[None, :]]
    per_slot = float(cost.bytes_per_expert)
    intra = gpu_totals((changed & local).to(torch.float64).sum(0) * per_slot, old.slots_per_gpu)
    inter = gpu_totals((changed & ~local).to(torch.float64).sum(0) * per_slot, old.slots_per_gpu)
    return float(cost.link_us(intra, inter).max())
