"""eplb as vLLM's EPLB policy, without editing vLLM.

vLLM (0.34) calls ``policy.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_ranks,
old_global_expert_indices)`` and takes back ``phy2log [L, P]`` only; older vLLM called a function of
five arguments that returned ``(phy2log, log2phy, logcnt)``. ``EplbPolicy`` serves the first,
``LegacyEplbPolicy`` the second. ``install()`` puts one in vLLM's policy table under the name vLLM
selects by default (``--eplb-config '{"policy": "default"}'``), so no vLLM option has to change.

- ``algorithm="deepseek"`` (the default) gives exactly the placements of vLLM's own policy (DeepSeek's,
  with its global fallback) up to vLLM's numpy port's tie-breaking;
- any other eplb algorithm (``"auto"``, ``"eplb"``, ...) plans with ``eplb.plan``; with the current
  placement (``old_global_expert_indices``) the plan is re-labelled to keep the most slots, and
  ``max_moves`` bounds the slots per layer whose expert changes (each costs one weight copy).

Either way, an expert that stays on a GPU keeps its slot there (vLLM's ``preserve_intragpu_slots``).

vLLM has no hook for an initial placement: it loads every layer's expert weights by one linear map
(slot ``p`` holds expert ``p mod E``) before any policy runs. ``install(initial=FILE)`` does the
next best thing: vLLM's first rearrangement (after ``step_interval`` steps) moves the weights to the
file's placement instead of a planned one; later rearrangements plan as usual.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from eplb.errors import EplbError
from eplb.integrations.layers import moe_layer_ids
from eplb.io.placements import PlacementFile, brief_ids, read_placement
from eplb.placement import Placement
from eplb.planning.deepseek import rebalance_experts as deepseek_rebalance
from eplb.planning.migration.align import align
from eplb.planning.planner import plan

ALGORITHM_ENV = "EPLB_VLLM_ALGORITHM"
MAX_MOVES_ENV = "EPLB_VLLM_MAX_MOVES"
INITIAL_ENV = "EPLB_VLLM_INITIAL"


class PolicyInputError(EplbError, AssertionError):
    """Bad counts given by vLLM. Also an ``AssertionError``: vLLM's default policy asserts its
    inputs, and callers (vLLM's own tests included) catch that type."""


class EplbPolicy:
    """vLLM's EPLB policy interface (``AbstractEplbPolicy``, vLLM >= 0.11) backed by eplb.

    Subclass it (or call ``configure``) to change ``algorithm`` and ``max_moves``.
    """

    algorithm: str = "deepseek"
    max_moves: int | None = None
    # [L, P] placement returned by the first call instead of a plan; a list so the first call can empty it.
    initial: list[torch.Tensor] = []

    @classmethod
    def configure(cls, algorithm: str = "deepseek", max_moves: int | None = None,
                  initial: torch.Tensor | None = None) -> type[EplbPolicy]:
        """A subclass planning with ``algorithm`` (an eplb algorithm name) and the move budget
        ``max_moves``, whose first call returns ``initial [L, P]`` when given."""
        return type(cls.__name__, (cls,), {"algorithm": algorithm, "max_moves": max_moves,
                                          "initial": [] if initial is None else [initial]})

    @classmethod
    def rebalance_experts(
        cls,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The new placement.

        Args:
            weight: ``[L, E]`` load of each logical expert (any device, any numeric dtype).
            num_replicas: ``P``, slots over all ranks; a multiple of ``num_ranks``, ``>= E``.
            num_groups: the router's expert groups; the hierarchical policy is used when it is a
                multiple of ``num_nodes``, the global one otherwise (as vLLM's default policy).
            num_nodes: ``N``.
            num_ranks: ``G``, the EP ranks.
            old_global_expert_indices: ``[L, P]`` phy2log now serving, or None.

        Returns:
            ``[L, P]`` int64 phy2log on the CPU.
        """
        weight = torch.as_tensor(weight).detach().cpu()
        if num_ranks <= 0 or num_replicas % num_ranks != 0:
            raise PolicyInputError(
                f"{num_replicas} physical experts cannot be split evenly over {num_ranks} EP ranks; "
                "set --eplb-config num_redundant_experts so that experts + redundant is a multiple of the EP size"
            )
        old = _current(old_global_expert_indices, weight.shape, num_replicas)
        if cls.initial:
            initial = cls.initial.pop()
            if initial.shape != (weight.shape[0], num_replicas):
                raise PolicyInputError(
                    f"the initial placement is {tuple(initial.shape)} but vLLM has {weight.shape[0]} MoE layers and "
                    f"{num_replicas} slots; write it with `eplb plan ... -f vllm --slots {num_replicas}` (MoE rows)"
                )
            return initial.clone()
        if cls.algorithm == "deepseek":
            phy2log = deepseek_rebalance(weight, num_replicas, num_groups, num_nodes, num_ranks)[0]
            if old is None:
                return phy2log
            return torch.from_numpy(cls.preserve_intragpu_slots(phy2log.numpy(), num_ranks, old.numpy()))
        hierarchical = num_groups % num_nodes == 0 and num_ranks % num_nodes == 0
        nodes = num_nodes if hierarchical else 1
        current = None
        if old is not None and bool((old >= 0).all()):
            current = Placement(old, num_experts=weight.shape[1], num_gpus=num_ranks, num_nodes=nodes)
        placement = plan(
            weight.to(torch.float64), num_gpus=num_ranks, num_slots=num_replicas, num_nodes=nodes,
            num_groups=num_groups if hierarchical else None, algorithm=cls.algorithm,
            current=current, max_moves=cls.max_moves if current is not None else None,
        )
        if old is None or current is not None:
            return placement.phy2log
        return torch.from_numpy(cls.preserve_intragpu_slots(placement.phy2log.numpy(), num_ranks, old.numpy()))

    @classmethod
    def preserve_intragpu_slots(cls, phy2log: np.ndarray, num_ranks: int, old_phy2log: np.ndarray) -> np.ndarray:
        """Re-order each rank's slots so that an expert staying on the rank keeps its old slot.

        Args:
            phy2log: ``[L, P]`` new placement.
            num_ranks: ``G``.
            old_phy2log: ``[L, P]`` placement now serving.

        Returns:
            ``[L, P]``: ``phy2log`` with slots permuted within ranks only (same experts per rank,
            so the same balance); unchanged when the shapes differ (the EP size changed).
        """
        new, old = np.asarray(phy2log), np.asarray(old_phy2log)
        if new.shape != old.shape or num_ranks <= 0 or new.shape[1] % num_ranks != 0:
            return new
        kept = align(torch.from_numpy(old.astype(np.int64)), torch.from_numpy(new.astype(np.int64)),
                     num_ranks, permute_gpus=False)
        return kept.numpy().astype(new.dtype, copy=False)


class LegacyEplbPolicy:
    """The interface of vLLM before the policy classes: five arguments, three maps back."""

    policy: type[EplbPolicy] = EplbPolicy

    @classmethod
    def rebalance_experts(
        cls, weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(phy2log [L, P], log2phy [L, E, P - E + 1], logcnt [L, E])``.

        ``log2phy`` has vLLM's fixed width (one more than the redundant slots), ``-1`` padded, so
        that vLLM can copy it into its preallocated map whatever the replica counts are.
        """
        weight = torch.as_tensor(weight)
        phy2log = cls.policy.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
        placement = Placement(phy2log, num_experts=weight.shape[1], num_gpus=num_gpus)
        width = num_replicas - weight.shape[1] + 1
        log2phy = placement.log2phy
        padded = torch.full((*log2phy.shape[:2], width), -1, dtype=torch.int64)
        padded[..., : log2phy.shape[2]] = log2phy
        return placement.phy2log, padded, placement.logcnt


def install(algorithm: str = "deepseek", max_moves: int | None = None,
            initial: str | os.PathLike[str] | None = None) -> type[EplbPolicy]:
    """Make vLLM plan with eplb: call once in every process that runs vLLM's EPLB (before the engine
    starts; with ``plugin`` as a ``vllm.general_plugins`` entry point vLLM does it in each worker).

    Args:
        algorithm: an eplb algorithm name (``eplb.planning.names()``) or ``"auto"``.
        max_moves: the most slots per layer whose expert may change at one rearrangement, or None.
        initial: a placement file with one row per MoE layer (``eplb plan -f vllm`` writes those and
            records its EP size; ``eplb check FILE --engine vllm`` checks it), reached at vLLM's
            first rearrangement.

    Returns:
        The policy class installed.
    """
    phy2log = None if initial is None else read_placement(initial).phy2log
    policy = EplbPolicy.configure(algorithm, max_moves, phy2log)
    try:
        from vllm.distributed.eplb import policy as policies
    except ImportError:
        policies = None
    if policies is not None and hasattr(policies, "EPLB_POLICIES"):
        # vLLM resolves the policy by name from this table when the EPLB state is built, so
        # replacing the entry vLLM selects by default is enough; the table is shared, not copied.
        policies.EPLB_POLICIES["default"] = policy
        return policy
    try:
        from vllm.distributed.eplb import eplb_state, rebalance_algo
    except ImportError as exc:
        raise EplbError(f"cannot import vLLM's EPLB ({exc}); install vLLM (>= 0.9.2) before calling install()") from exc
    legacy = type("LegacyEplbPolicy", (LegacyEplbPolicy,), {"policy": policy})
    rebalance_algo.rebalance_experts = legacy.rebalance_experts
    eplb_state.rebalance_experts = legacy.rebalance_experts
    return policy


def check(file: PlacementFile, *, model_layers: int, ep_size: int, dense_layers: int = 0,
          num_experts: int | None = None, redundant_experts: int | None = None) -> None:
    """Refuse a placement file that ``install(initial=FILE)`` cannot apply to a vLLM server.

    vLLM's map has one row per MoE layer of the model (``num_moe_layers``; its MTP drafter is a model
    of its own) and ``E + num_redundant_experts`` slots; a file of another shape fails at vLLM's
    first rearrangement, and rows of the wrong layers would be applied to the wrong layers silently.

    Args:
        file: the file read (its slots already split over ``ep_size`` ranks).
        model_layers: the model's ``num_hidden_layers``.
        ep_size: vLLM's EP size.
        dense_layers: the leading layers without routed experts (DeepSeek-V3: 3).
        num_experts: the model's routed experts, when known.
        redundant_experts: ``--eplb-config num_redundant_experts``, when known.

    Raises:
        EplbError: naming every mismatch and the fix.
    """
    placement, problems = file.placement, []
    moe = moe_layer_ids(model_layers, dense_layers)
    if placement.num_layers != len(moe):
        problems.append(f"the file has {placement.num_layers} rows but vLLM's map has {len(moe)} (one per MoE layer: "
                        f"{model_layers} layers less {dense_layers} dense); write it with --format vllm")
    elif file.format in ("vllm", "eplb") and file.layer_ids != moe:
        problems.append(f"the rows are layers {brief_ids(file.layer_ids)} but the MoE layers are {brief_ids(moe)}; "
                        "plan from this model's statistics with layer ids")
    if num_experts is not None and placement.num_experts != num_experts:
        problems.append(f"the file places {placement.num_experts} experts, the model has {num_experts}")
    spare = placement.num_slots - placement.num_experts
    if redundant_experts is not None and spare != redundant_experts:
        problems.append(f"the file has {spare} redundant slots but num_redundant_experts is {redundant_experts}: "
                        f"set --eplb-config '{{\"num_redundant_experts\": {spare}}}' or plan for "
                        f"{placement.num_experts + redundant_experts} slots")
    if problems:
        raise EplbError("; ".join(problems))


def plugin() -> None:
    """vLLM ``general_plugins`` entry point: installs eplb when ``EPLB_VLLM_ALGORITHM`` is set
    (``EPLB_VLLM_MAX_MOVES``: the move budget, ``EPLB_VLLM_INITIAL``: the initial placement file),
    and does nothing otherwise."""
    algorithm = os.environ.get(ALGORITHM_ENV)
    if algorithm:
        budget = os.environ.get(MAX_MOVES_ENV)
        install(algorithm, int(budget) if budget else None, os.environ.get(INITIAL_ENV) or None)


def _current(old: Any, shape: torch.Size, num_replicas: int) -> torch.Tensor | None:
    """The serving ``[L, P]`` phy2log, or None when absent or of another shape (the EP size changed)."""
    if old is None:
        return None
    old = torch.as_tensor(old).detach().cpu().to(torch.int64)
    return old if old.shape == (shape[0], num_replicas) else None
