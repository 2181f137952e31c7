"""The cluster a placement is for (GPUs, slots, nodes, router groups) and the checks on its sizes, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any

from eplb.errors import EplbError


def is_count(value: Any, minimum: int = 1) -> bool:
    """Whether ``value`` is an integer ``>= minimum``: numpy and torch integers count, bool does not
    (``True`` would silently mean 1)."""
    return isinstance(value, Integral) and not isinstance(value, bool) and int(value) >= minimum


def require_count(name: str, value: Any, minimum: int = 1, maximum: int | None = None, fix: str = "") -> int:
    """``value`` as an ``int`` if it is an integer in ``[minimum, maximum]``, else one EplbError naming ``name``.

    ``fix`` ends the message with what to pass instead (e.g. "pass the model's expert count").
    """
    if is_count(value, minimum) and (maximum is None or int(value) <= maximum):
        return int(value)
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise EplbError(f"{name} must be an integer {bound}, got {value!r}" + (f"; {fix}" if fix else ""))


@dataclass(frozen=True)
class Cluster:
    """The cluster a placement is planned for.

    Args:
        num_gpus: ``G``, GPUs in the expert-parallel group.
        num_slots: ``P``, physical expert slots over all GPUs (``P - E`` are redundant).
        num_nodes: ``N``, nodes; GPUs of one node share a fast link (NVLink).
        num_groups: expert groups of the router (DeepSeek-V3: 8), or None.
    """

    num_gpus: int
    num_slots: int
    num_nodes: int = 1
    num_groups: int | None = None

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes


def require_groups(spec: Cluster, num_experts: int) -> int:
    """The group count of a group-aware (hierarchical) policy, validated."""
    if spec.num_groups is None:
        raise EplbError(
            "hierarchical placement needs the router's expert-group count; pass num_groups "
            "(--groups; DeepSeek-V3 uses 8) or use the global policy"
        )
    if spec.num_groups % spec.num_nodes != 0:
        raise EplbError(
            f"{spec.num_groups} expert groups cannot be split evenly over {spec.num_nodes} nodes; "
            "use a group count that is a multiple of the node count, or the global policy"
        )
    return spec.num_groups


def check_cluster(spec: Cluster, num_experts: int) -> None:
    """The checks every algorithm shares, for ``num_experts`` logical experts; each error names the fix."""
    for name in ("num_gpus", "num_slots", "num_nodes"):
        value = getattr(spec, name)
        if not is_count(value):
            raise EplbError(f"{name} must be a positive integer, got {value!r}")
    if spec.num_slots % spec.num_gpus != 0:
        raise EplbError(
            f"{spec.num_slots} slots cannot be split evenly over {spec.num_gpus} GPUs; "
            f"use a multiple of {spec.num_gpus}, e.g. {_round_up(max(spec.num_slots, num_experts), spec.num_gpus)}"
        )
    if spec.num_slots < num_experts:
        raise EplbError(
            f"{spec.num_slots} slots cannot hold {num_experts} experts; "
            f"use at least {_round_up(num_experts, spec.num_gpus)} slots"
        )
    if spec.num_gpus % spec.num_nodes != 0:
        raise EplbError(
            f"{spec.num_gpus} GPUs cannot be split evenly over {spec.num_nodes} nodes; "
            "use a GPU count that is a multiple of the node count"
        )
    if spec.num_groups is not None:
        if not is_count(spec.num_groups):
            raise EplbError(f"num_groups must be a positive integer or None, got {spec.num_groups!r}")
        if num_experts % spec.num_groups != 0:
            raise EplbError(
                f"{num_experts} experts cannot be split into {spec.num_groups} equal groups; "
                "pass the router's real group count (it divides the expert count)"
            )


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m
