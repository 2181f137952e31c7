"""``EPMoEConfig``: the shape and rules of one MoE layer, shared by ``EPMoE`` and ``dense_moe``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eplb.cluster import require_choice, require_count
from eplb.errors import EplbError

ROUTERS = ("softmax", "grouped", "hash")
DISPATCHES = ("static", "hash", "weighted")


@dataclass(frozen=True)
class EPMoEConfig:
    """One MoE layer: SwiGLU experts, a router, an optional shared expert, and how EP runs it.

    Attributes:
        hidden: ``H``, the model's hidden size (rows of the layer's input ``[M, H]``).
        intermediate: ``I``, each routed expert's intermediate size (``w13 [2I, H]``, ``w2 [H, I]``).
        num_experts: ``E``, logical (checkpoint) routed experts.
        top_k: ``K``, routed experts per token.
        router: ``"softmax"`` (softmax over the gate logits, then top-k; Mixtral, Qwen-MoE),
            ``"grouped"`` (DeepSeek-V3: sigmoid scores plus a correction bias pick ``topk_groups`` of
            ``num_groups`` expert groups, then the top-k inside them) or ``"hash"`` (experts drawn
            from a hash of the token id, equal weights; Hash Layers). See ``eplb.runtime.moe.router``.
        num_groups: ``"grouped"`` only: expert groups; must divide ``E``.
        topk_groups: ``"grouped"`` only: groups each token may pick its experts from.
        normalize_topk: ``"softmax"`` and ``"grouped"``: rescale each token's top-k weights to sum 1
            (DeepSeek-V3 and Mixtral do; Qwen2-MoE does not).
        routed_scaling_factor: the routed experts' weighted sum is multiplied by this (DeepSeek-V3:
            2.5) before the shared expert is added.
        shared_expert: whether the layer has one shared expert, visited by every token.
        shared_intermediate: the shared expert's intermediate size (None: ``intermediate``).
        dispatch: which replica of a logical expert a token goes to (``eplb.runtime.dispatch``):
            ``"static"`` (a fixed nearest replica per rank), ``"hash"`` (a hash of the entry spreads
            tokens evenly over the replicas) or ``"weighted"`` (a hash-driven draw with replica
            weights solved from recorded loads, which must then be given).
        waterfill: run each token's shared expert on a less loaded rank (``eplb.runtime.waterfill``)
            instead of locally; needs ``shared_expert``.
        dtype: the weights' and activations' dtype.
        seed: the hash router's and the hash / weighted dispatch's seed; equal on all ranks.
    """

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    router: str = "softmax"
    num_groups: int = 1
    topk_groups: int = 1
    normalize_topk: bool = True
    routed_scaling_factor: float = 1.0
    shared_expert: bool = False
    shared_intermediate: int | None = None
    dispatch: str = "static"
    waterfill: bool = False
    dtype: torch.dtype = torch.float32
    seed: int = 0

    def __post_init__(self) -> None:
        require_count("hidden", self.hidden, fix="pass the model's hidden size")
        require_count("intermediate", self.intermediate, fix="pass the routed experts' intermediate size")
        require_count("num_experts", self.num_experts, fix="pass the model's routed expert count")
        require_count("top_k", self.top_k, 1, self.num_experts, fix="pass at most num_experts experts per token")
        require_choice("router", self.router, ROUTERS)
        require_choice("dispatch", self.dispatch, DISPATCHES)
        if self.router == "grouped":
            groups = require_count("num_groups", self.num_groups, 1, self.num_experts, fix="pass the router's groups")
            if self.num_experts % groups:
                raise EplbError(
                    f"num_groups={groups} does not divide num_experts={self.num_experts}; pass a divisor of it"
                )
            require_count("topk_groups", self.topk_groups, 1, groups, fix="pass at most num_groups groups")
            if self.top_k > self.topk_groups * self.experts_per_group:
                raise EplbError(
                    f"top_k={self.top_k} exceeds the {self.topk_groups * self.experts_per_group} experts of "
                    f"{self.topk_groups} groups; raise topk_groups or lower top_k"
                )
        factor = self.routed_scaling_factor
        number = not isinstance(factor, bool) and isinstance(factor, (int, float))
        if not (number and math.isfinite(factor) and factor > 0):
            raise EplbError(f"routed_scaling_factor must be a positive finite number, got {factor!r}; 1.0 for none")
        if self.shared_intermediate is not None:
            require_count("shared_intermediate", self.shared_intermediate, fix="pass None to use intermediate")
        if self.waterfill and not self.shared_expert:
            raise EplbError("waterfill moves the shared expert, but shared_expert is False; enable both or neither")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise EplbError(f"dtype must be a floating torch.dtype, got {self.dtype!r}; e.g. torch.bfloat16")
        require_count("seed", self.seed, 0, fix="pass a non-negative integer, equal on all ranks")

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    @property
    def shared_size(self) -> int:
        """The shared expert's intermediate size."""
        return self.intermediate if self.shared_intermediate is None else self.shared_intermediate
