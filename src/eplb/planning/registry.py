"""The placement algorithms, by name. Each is a pure function ``(load [T, L, E], cluster) -> phy2log``."""

from __future__ import annotations

from eplb.errors import EplbError
from eplb.planning import deepseek, hedged, sglang_vec, static
from eplb.planning.algorithm import Algorithm

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        hedged.HEDGED,
        deepseek.GLOBAL,
        deepseek.HIERARCHICAL,
        sglang_vec.GLOBAL,
        sglang_vec.HIERARCHICAL,
        static.LINEAR,
        static.ROUND_ROBIN,
    )
}

# The candidates of algorithm="auto", in tie-breaking order.
AUTO_ORDER: tuple[str, ...] = ("eplb", "deepseek", "deepseek_hierarchical")


def names() -> list[str]:
    """Every name ``eplb.plan(algorithm=...)`` accepts."""
    return ["auto", *ALGORITHMS]


def get(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise EplbError(f"unknown algorithm {name!r}; choose one of: {', '.join(names())}") from None


__all__ = ["ALGORITHMS", "AUTO_ORDER", "get", "names"]
