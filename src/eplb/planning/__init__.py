"""Planning: ``(load [T, L, E], cluster) -> Placement``, on the CPU, with pure functions.

``plan`` validates and runs one algorithm (or ``"auto"``) from the registry; each algorithm module
is a pure function from loads to ``phy2log``; ``migration`` keeps a new plan close to the one serving.
"""

from eplb.planning.planner import plan
from eplb.planning.registry import ALGORITHMS, AUTO_ORDER, get, names

__all__ = ["ALGORITHMS", "AUTO_ORDER", "get", "names", "plan"]
