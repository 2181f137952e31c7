"""Migration-aware planning: reach a new placement while moving few expert weights.

A rebalance copies the weights of every slot whose logical expert changes (a *move*), and
serving stalls while it does. Two tools bound that cost:

- :func:`align` re-labels an ideal placement so that as many slots as possible keep their
  expert: GPUs (within nodes) and slots (within GPUs) are interchangeable for balance, so
  the target's GPUs are matched to the current GPUs (an assignment problem) and each expert
  that stays on a GPU keeps its slot;
- :func:`move_within_budget` finds a placement at most ``k`` moves per layer away from the
  current one, greedily buying the largest max-GPU-load reduction per move.

:func:`migration_cost` counts the moves (and bytes) between two placements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from eplb.cluster import Cluster, is_count
from eplb.errors import EplbError
from eplb.placement import EMPTY_SLOT, Placement

# Candidate replacement experts tried per slot of the hottest GPU (the lightest after one more replica).
_LIGHT_CANDIDATES = 4
# Partner GPUs tried for a swap with the hottest GPU (the coolest ones).
_SWAP_PARTNERS = 8
# Relative tolerance under which a load change counts as no change (float rounding).
_RTOL = 1e-12


# Cost ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationCost:
    """What a rebalance from one placement to another moves.

    Attributes:
        changed: ``[L, P]`` bool, the slots whose logical expert changes.
        moves: ``[L]`` int64, changed slots per layer.
        total_moves: changed slots over all layers.
        bytes: weight bytes copied (``bytes_per_expert`` times the changed slots that receive an
            expert; a slot left empty copies nothing), or None when no expert size was given.
    """

    changed: torch.Tensor
    moves: torch.Tensor
    total_moves: int
    bytes: int | None


def migration_cost(current: Placement, new: Placement, bytes_per_expert: int | None = None) -> MigrationCost:
    """The moves (and bytes) a rebalance from ``current`` to ``new`` costs.

    Args:
        current: the placement now serving.
        new: the placement to switch to; same layers, experts, slots, GPUs and nodes.
        bytes_per_expert: weight bytes of one expert (DeepSeek-V3 in fp8:
            ``3 * 7168 * 2048 = 44_040_192``), or None to skip the byte count.
    """
    _check_same_shape(current, new)
    if bytes_per_expert is not None and not is_count(bytes_per_expert, minimum=1):
        raise EplbError(
            f"bytes_per_expert must be a positive integer, got {bytes_per_expert!r}; "
            "pass the weight bytes of one expert (e.g. 3 * hidden * intermediate * bytes per parameter)"
        )
    changed = current.phy2log != new.phy2log
    moves = changed.sum(dim=1)
    filled = int((changed & (new.phy2log != EMPTY_SLOT)).sum())
    return MigrationCost(
        changed=changed,
        moves=moves,
        total_moves=int(moves.sum()),
        bytes=None if bytes_per_expert is None else filled * int(bytes_per_expert),
    )


def _check_same_shape(current: Placement, new: Placement) -> None:
    for name in ("num_layers", "num_experts", "num_slots", "num_gpus", "num_nodes"):
        a, b = getattr(current, name), getattr(new, name)
        if a != b:
            raise EplbError(
                f"the placements differ in {name} ({a} vs {b}); compare placements of the same model and cluster"
            )


# Validation of plan(current=..., max_moves=...) -------------------------------------------


def check_current(current: object, spec: Cluster, num_layers: int, num_experts: int) -> None:
    """Raise EplbError unless ``current`` is a Placement for this many layers and experts on ``spec``."""
    if not isinstance(current, Placement):
        raise EplbError(
            f"current must be a Placement, got {type(current).__name__}; "
            "load it with Placement.from_dict() or pass the result of an earlier eplb.plan()"
        )
    expected = {
        "num_layers": (num_layers, "the load's layer count"),
        "num_experts": (num_experts, "the load's expert count"),
        "num_slots": (spec.num_slots, "num_slots"),
        "num_gpus": (spec.num_gpus, "num_gpus"),
        "num_nodes": (spec.num_nodes, "num_nodes"),
    }
    for name, (want, source) in expected.items():
        have = getattr(current, name)
        if have != want:
            raise EplbError(
                f"current placement has {name}={have} but {source} is {want}; pass the placement now serving "
                "this model on this cluster, or plan without current="
            )


def check_max_moves(max_moves: object, current: object) -> int | None:
    """``max_moves`` as an int (or None), or EplbError."""
    if max_moves is None:
        return None
    if current is None:
        raise EplbError("max_moves bounds the moves away from a current placement; pass current= as well")
    if not is_count(max_moves, minimum=0):
        raise EplbError(
            f"max_moves must be a non-negative integer (slots changed per layer) or None, got {max_moves!r}"
        )
    return int(max_moves)  # type: ignore[call-overload]


# Orchestration ------------------------------------------------------------------------------


def migrate(current: Placement, target: Placement, load: torch.Tensor, max_moves: int | None) -> Placement:
    """The placement to switch to from ``current``, given the ideal ``target``.

    Args:
        current: the placement now serving.
        target: the ideal placement for ``load`` (any algorithm); same shape as ``current``.
        load: ``[L, E]`` or ``[T, L, E]`` (summed over ``T``) expert loads, as recorded: layers
            without load keep their current row, since no move there can improve anything measured.
        max_moves: the most slots changed per layer, or None for the aligned ``target``.
    """
    _check_same_shape(current, target)
    load = load.sum(0) if load.ndim == 3 else load
    aligned = align(current.phy2log, target.phy2log, current.num_gpus, current.num_nodes)
    if max_moves is None:
        out, name = aligned, target.algorithm
    else:
        out = move_within_budget(current.phy2log, aligned, load, current.num_gpus, max_moves)
        name = f"{target.algorithm} (max_moves={max_moves})"
    unloaded = load.sum(1) == 0
    out = torch.where(unloaded[:, None], current.phy2log, out)
    return Placement(out, current.num_experts, current.num_gpus, current.num_nodes, algorithm=name)


# Alignment ------------------------------------------------------------------------------------


def align(
    current: torch.Tensor,
    target: torch.Tensor,
    num_gpus: int,
    num_nodes: int = 1,
    permute_gpus: bool = True,
) -> torch.Tensor:
    """Re-label ``target`` to keep as many slots of ``current`` unchanged as possible.

    Permuting GPUs within a node, nodes as wholes, and slots within a GPU changes neither the
    GPU loads nor the node loads, so the result is exactly as balanced as ``target``. GPUs are
    matched by the number of experts they share (multiset overlap), optimally per layer; within a
    GPU, an expert that stays keeps its current slot and the incoming experts fill the freed
    slots in the target's order.

    Args:
        current: ``[L, P]`` phy2log now serving (``-1``: empty slot).
        target: ``[L, P]`` phy2log to reach, with the same expert multiset per GPU as the result.
        num_gpus: ``G``.
        num_nodes: ``N``; GPUs only move within their node so node-level balance is kept too.
        permute_gpus: False keeps each target GPU on its own rank and only re-orders slots within
            GPUs (what vLLM does when it preserves intra-GPU slots).

    Returns:
        ``[L, P]`` int64 phy2log: ``target`` with GPUs and slots permuted.
    """
    num_layers, num_slots = current.shape
    per_gpu = num_slots // num_gpus
    cur = current.view(num_layers, num_gpus, per_gpu)
    tgt = target.view(num_layers, num_gpus, per_gpu)
    if permute_gpus:
        rank_of = _match_gpus(cur, tgt, num_nodes)  # [L, G]: target GPU for each current rank
        tgt = tgt.gather(1, rank_of[:, :, None].expand(-1, -1, per_gpu))
    return _keep_slots(cur, tgt).reshape(num_layers, num_slots)


def _gpu_counts(phy2log: torch.Tensor) -> torch.Tensor:
    """``[L, G, E + 1]`` replicas of each expert per GPU (the last id counts empty slots)."""
    num_layers, num_gpus, _ = phy2log.shape
    ids = torch.where(phy2log >= 0, phy2log, int(phy2log.max()) + 1)
    width = int(ids.max()) + 1
    counts = torch.zeros(num_layers, num_gpus, width, dtype=torch.int64)
    return counts.scatter_add_(2, ids, torch.ones_like(ids))


def _match_gpus(cur: torch.Tensor, tgt: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``[L, G]``: for each current GPU, the target GPU that shares the most experts with it."""
    num_layers, num_gpus, _ = cur.shape
    # One id space for both, with the empty slot as an extra id, so empty matches empty.
    both = _gpu_counts(torch.cat([cur, tgt], dim=1))
    cur_cnt, tgt_cnt = both[:, :num_gpus], both[:, num_gpus:]
    out = torch.empty(num_layers, num_gpus, dtype=torch.int64)
    for layer in range(num_layers):
        overlap = torch.minimum(cur_cnt[layer, :, None], tgt_cnt[layer, None]).sum(-1).numpy()
        out[layer] = torch.from_numpy(_assign_within_nodes(overlap, num_nodes))
    return out


def _assign_within_nodes(overlap: np.ndarray, num_nodes: int) -> np.ndarray:
    """Max-overlap assignment of GPUs that maps nodes onto nodes.

    Args:
        overlap: ``[G, G]`` experts shared by current GPU ``i`` and target GPU ``j``.
        num_nodes: ``N``; node ``n`` holds GPUs ``[n * G/N, (n + 1) * G/N)``.

    Returns:
        ``[G]`` int64: the target GPU of each current GPU.
    """
    # Imported here so that eplb imports without SciPy; only re-labelling needs it.
    from scipy.optimize import linear_sum_assignment

    per_node = overlap.shape[0] // num_nodes
    # blocks[n, m]: the [G/N, G/N] overlap of current node n's GPUs with target node m's.
    blocks = overlap.reshape(num_nodes, per_node, num_nodes, per_node).transpose(0, 2, 1, 3)
    best = np.zeros((num_nodes, num_nodes), dtype=np.int64)
    inner = np.zeros((num_nodes, num_nodes, per_node), dtype=np.int64)
    for n in range(num_nodes):
        for m in range(num_nodes):
            rows, cols = linear_sum_assignment(blocks[n, m], maximize=True)
            best[n, m] = blocks[n, m][rows, cols].sum()
            inner[n, m, rows] = cols
    node_rows, node_cols = linear_sum_assignment(best, maximize=True)
    out = np.empty(overlap.shape[0], dtype=np.int64)
    for n, m in zip(node_rows, node_cols, strict=False):
        out[n * per_node : (n + 1) * per_node] = m * per_node + inner[n, m]
    return out


def _keep_slots(cur: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Order each GPU's target experts so that the ones it already holds stay in their slots.

    Args:
        cur: ``[..., S]`` experts now in each local slot.
        tgt: ``[..., S]`` experts the GPU must hold (any order).

    Returns:
        ``[..., S]``: a permutation of ``tgt`` per GPU that agrees with ``cur`` on as many slots
        as the two multisets share.
    """
    per_gpu = cur.shape[-1]
    earlier = torch.ones(per_gpu, per_gpu, dtype=torch.bool).tril(-1)

    def matched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # The k-th copy of an expert in a is matched when b holds at least k + 1 copies.
        seen_before = ((a[..., :, None] == a[..., None, :]) & earlier).sum(-1)
        return seen_before < (a[..., :, None] == b[..., None, :]).sum(-1)

    keep = matched(cur, tgt)
    used = matched(tgt, cur)
    # Freed slots (in slot order) take the unmatched target experts (in target order).
    free_slots = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices
    incoming = tgt.gather(-1, torch.sort(used.to(torch.int8), dim=-1, stable=True).indices)
    filled = torch.empty_like(tgt).scatter_(-1, free_slots, incoming)
    return torch.where(keep, cur, filled)


# Budgeted moves -----------------------------------------------------------------------------------


def move_within_budget(
    current: torch.Tensor,
    target: torch.Tensor,
    load: torch.Tensor,
    num_gpus: int,
    max_moves: int,
) -> torch.Tensor:
    """The most balanced placement found at most ``max_moves`` changed slots per layer away.

    Per layer, a greedy local search from ``current`` (see :func:`_greedy_moves`) is compared
    with ``target`` whenever ``target`` is within the budget; ``target`` wins only with a lower
    max GPU load. The result is never worse than ``current`` and, as the greedy path for a
    larger budget extends the one for a smaller budget, does not get worse as the budget grows.

    Args:
        current: ``[L, P]`` phy2log now serving (``-1``: empty slot).
        target: ``[L, P]`` the ideal phy2log, best already aligned to ``current`` (:func:`align`).
        load: ``[L, E]`` expert loads the result is balanced for.
        num_gpus: ``G``.
        max_moves: the most slots whose expert may change, per layer.

    Returns:
        ``[L, P]`` int64 phy2log; every expert keeps at least one replica, and the greedy moves
        never give a GPU a second replica of an expert it holds (``target`` is taken as it is).
    """
    num_experts = load.shape[1]
    weight = torch.cat([load.to(torch.float64), load.new_zeros(load.shape[0], 1, dtype=torch.float64)], dim=1)
    greedy = _greedy_moves(_with_empty_id(current, num_experts), weight, num_gpus, max_moves)
    greedy = torch.where(greedy == num_experts, EMPTY_SLOT, greedy)
    reachable = (target != current).sum(1) <= max_moves
    tgt_max = _max_gpu_load(_with_empty_id(target, num_experts), weight, num_gpus)
    greedy_max = _max_gpu_load(_with_empty_id(greedy, num_experts), weight, num_gpus)
    take_target = reachable & (tgt_max < greedy_max * (1 - _RTOL))
    return torch.where(take_target[:, None], target, greedy)


def _with_empty_id(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Empty slots as the extra expert id ``E`` (zero load), so they index like experts."""
    return torch.where(phy2log >= 0, phy2log, num_experts)


def _max_gpu_load(row: torch.Tensor, weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[L]`` max GPU load of ``row [L, P]`` (ids in ``[0, E]``) under ``weight [L, E + 1]``."""
    count = torch.zeros_like(weight).scatter_add_(1, row, torch.ones_like(row, dtype=weight.dtype))
    return _gpu_loads(row, weight / count.clamp(min=1), num_gpus).max(1).values


def _gpu_loads(row: torch.Tensor, per_replica: torch.Tensor, num_gpus: int) -> torch.Tensor:
    return per_replica.gather(1, row).view(row.shape[0], num_gpus, -1).sum(-1)


def _greedy_moves(row: torch.Tensor, weight: torch.Tensor, num_gpus: int, max_moves: int) -> torch.Tensor:
    """Greedy local search from ``row`` that spends at most ``max_moves`` changed slots per layer.

    Every step looks at the hottest GPU of each layer and applies the move with the largest
    max-load reduction per changed slot, among:

    - *replicate*: a slot elsewhere (holding an expert with another replica, or empty) takes an
      expert of the hottest GPU, which then carries a smaller share of that expert;
    - *replace*: a slot of the hottest GPU (holding an expert with another replica) takes one of
      the experts lightest after one more replica;
    - *swap*: a slot of the hottest GPU and a slot of another GPU exchange experts (two moves).

    Moves that re-change an already changed slot cost nothing and go first. When no move lowers
    the max (several GPUs share it), the move that most lowers the sum of squared GPU loads
    without raising the max is taken, so the next steps can lower each of them. The path does
    not depend on ``max_moves``, so a larger budget only follows it further; a layer leaves it
    when its next move does not fit (after one last max-lowering move that fits, if any) or
    nothing improves. Its result is the state after its last max-lowering move, so no budget is
    spent on moves that did not pay off.

    Args:
        row: ``[L, P]`` phy2log with empty slots as id ``E``.
        weight: ``[L, E + 1]`` expert loads, with ``0`` for the empty id ``E``.
        num_gpus: ``G``.
        max_moves: changed slots allowed per layer, counted against ``row``.

    Returns:
        ``[L, P]`` phy2log, empty slots as id ``E``.
    """
    origin, row, best = row, row.clone(), row.clone()
    used = torch.zeros(row.shape[0], dtype=torch.int64)
    live = torch.arange(row.shape[0])  # layers still on the greedy path
    # Re-changing a slot already changed is free, so steps can outnumber moves; bound them anyway.
    for _ in range(2 * min(max_moves, row.shape[1])):
        state = _State.of(row[live], weight[live], num_gpus)
        moves = _candidates(state)
        cost = _cost(origin[live], state.row, moves.slot_a, moves.value_a)
        cost += _cost(origin[live], state.row, moves.slot_b, moves.value_b) * (moves.slot_b != moves.slot_a)
        per_move = cost.clamp(min=1).to(torch.float64)
        top, squares = state.top[:, None], state.squares[:, None]
        lower_max = moves.valid & (moves.new_max < top * (1 - _RTOL))
        flatter = moves.valid & (moves.new_max <= top) & (moves.new_squares < squares * (1 - _RTOL))
        gain = torch.where(lower_max, (top - moves.new_max) / per_move, -torch.inf)
        # Free moves (re-changing a changed slot) come first, so that the path takes them before
        # paying for the next move, whatever the budget.
        free = lower_max & (cost <= 0)
        by_max = torch.where(free.any(1), torch.where(free, gain, -torch.inf).argmax(1), gain.argmax(1))
        improves = lower_max.any(1)
        pick = torch.where(
            improves, by_max,
            torch.where(flatter, (squares - moves.new_squares) / per_move, -torch.inf).argmax(1),
        )
        # The path ignores the budget, so that a larger budget never ends worse.
        fits = used[live, None] + cost <= max_moves
        on_path = (improves | flatter.any(1)) & fits.gather(1, pick[:, None]).squeeze(1)
        last_fit = lower_max & fits
        off_path = ~on_path & last_fit.any(1)
        pick = torch.where(on_path, pick, torch.where(last_fit, gain, -torch.inf).argmax(1))
        step = on_path | off_path
        lowered = (on_path & improves) | off_path
        pick = pick[step, None]
        for slots, values in ((moves.slot_a, moves.value_a), (moves.slot_b, moves.value_b)):
            row[live[step], slots[step].gather(1, pick).squeeze(1)] = values[step].gather(1, pick).squeeze(1)
        used[live[step]] += cost[step].gather(1, pick).squeeze(1)
        best[live[lowered]] = row[live[lowered]]
        live = live[on_path]
        if live.numel() == 0:
            break
    return best


def _cost(origin: torch.Tensor, row: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Change in the number of slots that differ from ``origin`` when ``slots`` take ``values``."""
    was = origin.gather(1, slots)
    return (values != was).to(torch.int64) - (row.gather(1, slots) != was).to(torch.int64)


class _State(NamedTuple):
    """What a greedy step needs to know about a batch of layers (shapes for ``L`` layers)."""

    row: torch.Tensor  # [L, P] phy2log, empty slots as id E
    weight: torch.Tensor  # [L, E + 1] expert loads
    held: torch.Tensor  # [L, E + 1, G] float64 replicas of each expert on each GPU
    count: torch.Tensor  # [L, E + 1] replicas of each expert
    per_replica: torch.Tensor  # [L, E + 1] load of each replica
    spare: torch.Tensor  # [L, E + 1] experts that may give up a slot (another replica remains; or empty)
    gpu: torch.Tensor  # [L, G] GPU loads
    top: torch.Tensor  # [L] max GPU load
    squares: torch.Tensor  # [L] sum of squared GPU loads
    hot: torch.Tensor  # [L] the hottest GPU
    hot_slots: torch.Tensor  # [L, S] its slots

    @classmethod
    def of(cls, row: torch.Tensor, weight: torch.Tensor, num_gpus: int) -> _State:
        num_layers, num_slots = row.shape
        width = weight.shape[1]
        per_gpu = num_slots // num_gpus
        slot_gpu = torch.arange(num_slots) // per_gpu
        held = torch.zeros(num_layers, width, num_gpus, dtype=torch.float64)
        held.view(num_layers, -1).scatter_add_(1, row * num_gpus + slot_gpu, torch.ones_like(row, dtype=torch.float64))
        count = held.sum(-1)
        per_replica = weight / count.clamp(min=1)
        gpu = _gpu_loads(row, per_replica, num_gpus)
        top, hot = gpu.max(1)
        return cls(
            row=row,
            weight=weight,
            held=held,
            count=count,
            per_replica=per_replica,
            spare=(count >= 2) | (torch.arange(width) == width - 1),
            gpu=gpu,
            top=top,
            squares=(gpu**2).sum(1),
            hot=hot,
            hot_slots=hot[:, None] * per_gpu + torch.arange(per_gpu),
        )


class _Moves(NamedTuple):
    """Candidate moves, each ``[L, C]``: slot ``slot_a`` takes ``value_a`` and ``slot_b`` takes
    ``value_b`` (a single move repeats its slot), with the max and the sum of squared GPU loads after."""

    slot_a: torch.Tensor
    value_a: torch.Tensor
    slot_b: torch.Tensor
    value_b: torch.Tensor
    new_max: torch.Tensor
    new_squares: torch.Tensor
    valid: torch.Tensor


def _candidates(state: _State) -> _Moves:
    """Every replicate, replace and swap move of the hottest GPU (see :func:`_greedy_moves`)."""
    row, width = state.row, state.weight.shape[1]
    # Replicate: a slot that its expert can spare takes an expert of the hottest GPU.
    spare_slot = state.spare.gather(1, row)
    num_spare = int(spare_slot.sum(1).max())
    # Spare slots first, each group in slot order (the keys are distinct, so the order is fixed).
    order_key = (~spare_slot) * row.shape[1] + torch.arange(row.shape[1])
    spare_first = order_key.topk(num_spare, dim=1, largest=False).indices
    replicate = _replacements(
        state,
        slot=spare_first[:, None, :],
        expert=row.gather(1, state.hot_slots)[:, :, None],
        allowed=spare_slot.gather(1, spare_first)[:, None, :],
    )
    # Replace: a slot of the hottest GPU takes an expert that is light after one more replica.
    on_hot = state.held.gather(2, state.hot[:, None, None].expand(-1, width, 1)).squeeze(2) > 0
    lighter = torch.where(on_hot, torch.inf, state.weight / (state.count + 1))
    lighter[:, -1] = torch.inf  # the empty id is no expert to add
    light = lighter.topk(min(_LIGHT_CANDIDATES, width - 1), dim=1, largest=False)
    replace = _replacements(
        state,
        slot=state.hot_slots[:, :, None],
        expert=light.indices[:, None, :],
        allowed=light.values[:, None, :].isfinite(),
    )
    parts = [replicate, replace]
    if state.gpu.shape[1] > 1:
        parts.append(_swaps(state))
    return _Moves(*(torch.cat(columns, 1) for columns in zip(*parts, strict=False)))


def _replacements(state: _State, slot: torch.Tensor, expert: torch.Tensor, allowed: torch.Tensor) -> _Moves:
    """Every slot of ``slot`` takes every expert of ``expert`` (shapes broadcast to ``[L, X, Y]``).

    ``slot`` varies along one axis and ``expert`` along the other, so the GPU-load terms of each
    are computed once per axis and only their sum is ``[L, X, Y, G]``.
    """
    num_layers, width, num_gpus = state.held.shape
    per_gpu = state.row.shape[1] // num_gpus
    old = _at(state.row, slot)
    gpu_of = slot // per_gpu
    # No GPU receives a second replica of an expert it holds (this also rules out old == expert).
    valid = allowed & _at(state.spare, old) & (expert != width - 1)
    valid &= _at(state.held.flatten(1), expert * num_gpus + gpu_of) == 0
    # GPU loads after the move: the new expert's replicas shrink, the old expert's grow,
    # and the slot's own GPU trades one replica for the other.
    gain = _at(state.weight, expert) / (_at(state.count, expert) + 1)
    lose = _at(state.weight, old) / (_at(state.count, old) - 1).clamp(min=1)
    new_side = _at(state.held, expert) * (gain - _at(state.per_replica, expert))[..., None]
    old_side = _at(state.held, old) * (lose - _at(state.per_replica, old))[..., None]
    old_side.scatter_add_(3, gpu_of[..., None], -lose[..., None])
    # All but the incoming replica; that one (gain >= 0) only adds to the slot's own GPU, so it
    # is added to that column's value instead of to a copy of the whole [L, X, Y, G] tensor.
    after = (state.gpu[:, None, None, :] + new_side) + old_side
    shape = after.shape[:3]
    at_slot_gpu = after.gather(3, gpu_of.expand(shape)[..., None]).squeeze(3)
    new_max = torch.maximum(after.amax(3), at_slot_gpu + gain)
    squares = torch.linalg.vector_norm(after, dim=3) ** 2 + (2 * at_slot_gpu + gain) * gain

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.expand(shape).reshape(num_layers, -1)

    return _Moves(flat(slot), flat(expert), flat(slot), flat(expert), flat(new_max), flat(squares), flat(valid))


def _at(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[l, index[l, ...]]`` for every layer ``l`` (a ``[L, N]`` or ``[L, N, G]`` table).

    A gather: much cheaper than advanced indexing for the many small lookups of a step.
    """
    flat = index.reshape(index.shape[0], -1)
    if table.ndim == 3:
        flat = flat[..., None].expand(-1, -1, table.shape[2])
    return table.gather(1, flat).reshape(*index.shape, *table.shape[2:])


def _swaps(state: _State) -> _Moves:
    """A slot ``p`` of the hottest GPU and a slot ``q`` of one of the coolest GPUs trade experts.

    Replica counts do not change, so only the two GPUs' loads do. A swap lowers the max most
    with a cool partner, so only the ``_SWAP_PARTNERS`` coolest GPUs are tried.
    """
    num_layers, width, num_gpus = state.held.shape
    row, gpu, hot = state.row, state.gpu, state.hot
    per_gpu = state.hot_slots.shape[1]
    partners = gpu.topk(min(_SWAP_PARTNERS, num_gpus - 1), dim=1, largest=False).indices
    q = (partners[:, :, None] * per_gpu + torch.arange(per_gpu)).reshape(num_layers, 1, -1)  # [L, 1, Q]
    q_gpu = q // per_gpu
    hot3 = hot[:, None, None]
    a = row.gather(1, state.hot_slots)[:, :, None]  # [L, S, 1]
    b = row.gather(1, q[:, 0])[:, None, :]  # [L, 1, Q]
    empty_id = width - 1
    held = state.held.flatten(1)
    valid = (
        (q_gpu != hot3)  # when all loads tie, the hottest GPU can be among the coolest
        & (a != b)
        & ((b == empty_id) | (_at(held, b * num_gpus + hot3) == 0))
        & ((a == empty_id) | (_at(held, a * num_gpus + q_gpu) == 0))
    )
    ra, rb = _at(state.per_replica, a), _at(state.per_replica, b)
    hot_load = state.top[:, None, None]
    other_load = gpu.gather(1, q_gpu[:, 0])[:, None, :]
    new_hot, new_other = hot_load - ra + rb, other_load + ra - rb
    # The max over the GPUs the swap leaves alone: the top two besides the hottest suffice
    # (a padding column stands in when there are only two GPUs).
    others = torch.cat([gpu.scatter(1, hot[:, None], -torch.inf), gpu.new_full((num_layers, 1), -torch.inf)], 1)
    top2 = others.topk(2, dim=1)
    rest = torch.where(top2.indices[:, None, :1] == q_gpu, top2.values[:, None, 1:], top2.values[:, None, :1])
    new_max = torch.maximum(rest, torch.maximum(new_hot, new_other))
    squares = state.squares[:, None, None] - hot_load**2 - other_load**2 + new_hot**2 + new_other**2
    shape = (num_layers, per_gpu, q.shape[2])

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.expand(shape).reshape(num_layers, -1)

    p = state.hot_slots[:, :, None]
    return _Moves(flat(p), flat(b), flat(q), flat(a), flat(new_max), flat(squares), flat(valid))
