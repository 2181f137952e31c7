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
    if maximum is not None:
        kind = f"an integer in [{minimum}, {maximum}]"
    else:
        kind = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
    raise EplbError(f"{name} must be {kind}, got {value!r}" + (f"; {fix}" if fix else ""))


def require_choice(name: str, value: Any, options: tuple[Any, ...], fix: str = "") -> Any:
    """``value`` if it is one of ``options``, else one EplbError naming ``name`` and the options."""
    if value in options:
        return value
    choices = ", ".join(map(repr, options))
    raise EplbError(f"{name} must be one of {choices}, got {value!r}" + (f"; {fix}" if fix else ""))


class ClusterSizes:
    """The sizes derived from ``num_slots``, ``num_gpus`` and ``num_nodes`` (a ``Cluster`` and a ``Placement``)."""

    num_slots: int
    num_gpus: int
    num_nodes: int

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes


@dataclass(frozen=True)
class Cluster(ClusterSizes):
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


def require_groups(cluster: Cluster, num_experts: int) -> int:
    """The group count of a group-aware (hierarchical) policy, validated."""
    if cluster.num_groups is None:
        raise EplbError(
            "hierarchical placement needs the router's expert-group count; pass num_groups "
            "(--groups; DeepSeek-V3 uses 8) or use the global policy"
        )
    if cluster.num_groups % cluster.num_nodes != 0:
        raise EplbError(
            f"{cluster.num_groups} expert groups cannot be split evenly over {cluster.num_nodes} nodes; "
            "use a group count that is a multiple of the node count, or the global policy"
        )
    return cluster.num_groups


# Size guard: far beyond any deployment (DeepSeek-V3 serves 256 experts of 61 layers on <= 320
# GPUs), low enough that a typo (--slots 100000000) is refused before gigabytes are allocated.
MAX_GPUS = 16_384
MAX_SLOTS = 65_536
MAX_SLOTS_PER_GPU = 512
MAX_LAYERS = 4_096
MAX_EXPERTS = 65_536


def check_sizes(num_gpus: Any, num_slots: Any, num_nodes: Any = 1, num_experts: int | None = None) -> None:
    """The size rules of every cluster, checked in one place: ``G``, ``P`` and ``N`` positive integers
    within the size guard (``G <= 16,384``, ``P <= 65,536``, ``P / G <= 512``), ``P`` a multiple of
    ``G`` (and ``>= E`` when ``num_experts`` is given), ``G`` a multiple of ``N``.

    Raises one EplbError that names the first broken rule and the fix.
    """
    for name, value, what, most in (("num_gpus", num_gpus, "GPU", MAX_GPUS), ("num_slots", num_slots, "slot",
                                     MAX_SLOTS), ("num_nodes", num_nodes, "node", MAX_GPUS)):
        require_count(name, value, fix=f"pass the cluster's {what} count")
        if value > most:
            raise EplbError(f"{name} is {value}, above the size guard of {most} that no deployment reaches; "
                            f"pass the cluster's {what} count")
    if num_slots % num_gpus != 0:
        raise EplbError(
            f"{num_slots} slots cannot be split evenly over {num_gpus} GPUs; "
            f"use a multiple of {num_gpus}, e.g. {_round_up(max(num_slots, num_experts or 0), num_gpus)}"
        )
    if num_experts is not None and num_slots < num_experts:
        raise EplbError(
            f"{num_slots} slots cannot hold {num_experts} experts; "
            f"use at least {_round_up(num_experts, num_gpus)} slots"
        )
    if num_slots // num_gpus > MAX_SLOTS_PER_GPU:
        raise EplbError(
            f"{num_slots // num_gpus} slots per GPU is above the size guard of {MAX_SLOTS_PER_GPU}; "
            "check --slots/num_slots (all slots of the cluster, not per GPU)"
        )
    if num_gpus % num_nodes != 0:
        raise EplbError(
            f"{num_gpus} GPUs cannot be split evenly over {num_nodes} nodes; "
            "use a GPU count that is a multiple of the node count"
        )


def check_model(num_layers: int, num_experts: int) -> None:
    """The size guard on a load's shape: at most 4,096 layers and 65,536 logical experts."""
    for what, value, most in (("layers", num_layers, MAX_LAYERS), ("experts", num_experts, MAX_EXPERTS)):
        if value > most:
            raise EplbError(f"the load has {value} {what}, above the size guard of {most}; "
                            "check that the statistics are [layers, experts] (or [steps, layers, experts])")


def check_cluster(cluster: Cluster, num_experts: int) -> None:
    """The checks every algorithm shares, for ``num_experts`` logical experts; each error names the fix."""
    check_sizes(cluster.num_gpus, cluster.num_slots, cluster.num_nodes, num_experts)
    if cluster.num_groups is not None:
        if not is_count(cluster.num_groups):
            raise EplbError(
                f"num_groups must be a positive integer or None, got {cluster.num_groups!r}; "
                "pass the router's group count"
            )
        if num_experts % cluster.num_groups != 0:
            raise EplbError(
                f"{num_experts} experts cannot be split into {cluster.num_groups} equal groups; "
                "pass the router's real group count (it divides the expert count)"
            )


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m
