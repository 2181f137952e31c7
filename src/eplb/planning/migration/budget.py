"""Budgeted moves: the most balanced placement found within ``max_moves`` changed slots per layer,
by a greedy local search from the current placement (replicate, replace and swap moves of the
hottest GPU, batched over layers)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from eplb.metrics import gpu_totals
from eplb.placement import EMPTY_SLOT

# Candidate replacement experts tried per slot of the hottest GPU (the lightest after one more replica).
_LIGHT_CANDIDATES = 4
# Partner GPUs tried for a swap with the hottest GPU (the coolest ones).
_SWAP_PARTNERS = 8
# Relative tolerance under which a load change counts as no change (float rounding).
_RTOL = 1e-12


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
    per_replica = weight / count.clamp(min=1)
    return gpu_totals(per_replica.gather(1, row), row.shape[1] // num_gpus).amax(1)


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
    # Reused buffers (the GPU loads after each replacement; the replica table): a fresh big tensor every step
    # costs page faults.
    scratch = [torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int32)]
    # Re-changing a slot already changed is free, so steps can outnumber moves; bound them anyway.
    for _ in range(2 * min(max_moves, row.shape[1])):
        state = _State.of(row[live], weight[live], num_gpus, scratch)
        moves = _candidates(state, origin[live], scratch)
        cost = moves.cost
        per_move = cost.clamp(min=1).to(torch.float64)
        top = state.top[:, None]
        lower_max = moves.valid & (moves.new_max < top * (1 - _RTOL))
        gain = torch.where(lower_max, (top - moves.new_max) / per_move, -torch.inf)
        # Free moves (re-changing a changed slot) come first, so that the path takes them before
        # paying for the next move, whatever the budget.
        free = lower_max & (cost <= 0)
        by_max = gain.argmax(1)
        if bool(free.any()):
            by_max = torch.where(free.any(1), torch.where(free, gain, -torch.inf).argmax(1), by_max)
        improves = lower_max.any(1)
        # The branches below are computed only for the layers (if any) that take them.
        pick, moving = by_max, improves
        if not bool(improves.all()):
            # Only the layers where no move lowers the max need the sums of squares.
            flat = (~improves).nonzero().squeeze(1)
            new_squares, squares = moves.squares(flat), state.squares[flat, None]
            flatter = moves.valid[flat] & (moves.new_max[flat] <= top[flat]) & (new_squares < squares * (1 - _RTOL))
            flattest = torch.where(flatter, (squares - new_squares) / per_move[flat], -torch.inf).argmax(1)
            pick, moving = by_max.index_put((flat,), flattest), improves.index_put((flat,), flatter.any(1))
        # The path ignores the budget, so that a larger budget never ends worse.
        on_path = moving & (used[live] + cost.gather(1, pick[:, None]).squeeze(1) <= max_moves)
        off_path = torch.zeros_like(on_path)
        if not bool(on_path.all()):
            last_fit = lower_max & (used[live, None] + cost <= max_moves)
            off_path = ~on_path & last_fit.any(1)
            pick = torch.where(on_path, pick, torch.where(last_fit, gain, -torch.inf).argmax(1))
        stepping = (on_path | off_path).nonzero().squeeze(1)
        chosen = pick[stepping]
        slot_a, value_a, slot_b, value_b = moves.decode(stepping, chosen)
        layers = live[stepping]
        row[layers, slot_a] = value_a
        row[layers, slot_b] = value_b
        used[layers] += cost[stepping, chosen]
        lowered = live[(on_path & improves) | off_path]
        best[lowered] = row[lowered]
        live = live[on_path]
        if live.numel() == 0:
            break
    return best


def _changes(origin: torch.Tensor, row: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Change in the number of slots that differ from ``origin`` when ``slots`` take ``values``
    (``slots`` and ``values`` broadcast against each other; ``origin`` and ``row`` are ``[L, P]``)."""
    was = _at(origin, slots)
    return (values != was).to(torch.int64) - (_at(row, slots) != was).to(torch.int64)


class _State(NamedTuple):
    """What a greedy step needs to know about a batch of layers (shapes for ``L`` layers)."""

    row: torch.Tensor  # [L, P] phy2log, empty slots as id E
    weight: torch.Tensor  # [L, E + 1] expert loads
    held: torch.Tensor  # [L, E + 1, G] int32 replicas of each expert on each GPU (exact in any arithmetic)
    count: torch.Tensor  # [L, E + 1] replicas of each expert
    per_replica: torch.Tensor  # [L, E + 1] load of each replica
    spare: torch.Tensor  # [L, E + 1] experts that may give up a slot (another replica remains; or empty)
    gpu: torch.Tensor  # [L, G] GPU loads
    top: torch.Tensor  # [L] max GPU load
    squares: torch.Tensor  # [L] sum of squared GPU loads
    hot: torch.Tensor  # [L] the hottest GPU
    hot_slots: torch.Tensor  # [L, S] its slots

    @classmethod
    def of(cls, row: torch.Tensor, weight: torch.Tensor, num_gpus: int, scratch: list[torch.Tensor] | None = None
           ) -> _State:
        """The state of ``row [L, P]`` under ``weight [L, E + 1]``; ``scratch[1]``, if given, is a reusable
        buffer for ``held`` (grown as needed)."""
        num_layers, num_slots = row.shape
        width = weight.shape[1]
        per_gpu = num_slots // num_gpus
        slot_gpu = torch.arange(num_slots) // per_gpu
        # A narrow integer type, in a reused buffer: zeroing this [L, E + 1, G] table is much of a step.
        size = num_layers * width * num_gpus
        if scratch is None or scratch[1].numel() < size:
            held = torch.zeros(num_layers, width, num_gpus, dtype=torch.int32)
            if scratch is not None:
                scratch[1] = held.view(-1)
        else:
            held = scratch[1][:size].view(num_layers, width, num_gpus).zero_()
        held.view(num_layers, -1).scatter_add_(1, row * num_gpus + slot_gpu, torch.ones_like(row, dtype=torch.int32))
        count = torch.zeros_like(weight).scatter_add_(1, row, torch.ones_like(row, dtype=weight.dtype))
        per_replica = weight / count.clamp(min=1)
        gpu = gpu_totals(per_replica.gather(1, row), per_gpu)
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


class _Group(NamedTuple):
    """``size`` candidates ``u * width + v`` of one kind: slot ``slot_a`` takes ``value_a`` and slot
    ``slot_b`` takes ``value_b`` (a single move repeats its slot); each field is ``(table [L, n], axis)``,
    read at ``u`` (axis 0) or ``v`` (axis 1)."""

    size: int
    width: int
    fields: tuple[tuple[torch.Tensor, int], ...]


class _Moves(NamedTuple):
    """Candidate moves, each ``[L, C]``: their cost (change in slots that differ from the origin), the
    max GPU load after, and whether allowed; ``squares(layers)``: ``[n, C]`` the sum of squared GPU loads
    after, for the batch's layers ``layers [n]`` only (few steps need it, for few layers); ``groups`` say
    what each move does."""

    cost: torch.Tensor
    new_max: torch.Tensor
    valid: torch.Tensor
    squares: Callable[[torch.Tensor], torch.Tensor]
    groups: tuple[_Group, ...]

    def decode(self, layers: torch.Tensor, pick: torch.Tensor) -> list[torch.Tensor]:
        """``[slot_a, value_a, slot_b, value_b]``, each ``[N]``: the moves ``pick [N]`` of the batch's layers
        ``layers [N]`` (indices)."""
        out: list[torch.Tensor] = [torch.empty_like(pick) for _ in range(4)]
        start = 0
        for group in self.groups:
            local = (pick - start).clamp(0, group.size - 1)
            mine = (pick >= start) & (pick < start + group.size)
            at = (local // group.width, local % group.width)
            for k, (table, axis) in enumerate(group.fields):
                out[k] = torch.where(mine, table[layers, at[axis]], out[k])
            start += group.size
        return out


def _candidates(state: _State, origin: torch.Tensor, scratch: list[torch.Tensor]) -> _Moves:
    """Every replicate, replace and swap move of the hottest GPU (see :func:`_greedy_moves`), with
    its cost against ``origin [L, P]``; ``scratch`` holds a reusable buffer."""
    row, width = state.row, state.weight.shape[1]
    # Replicate: a slot that its expert can spare takes an expert of the hottest GPU.
    spare_slot = state.spare.gather(1, row)
    num_spare = int(spare_slot.sum(1).max())
    # Spare slots first, each group in slot order (the keys are distinct, so the order is fixed).
    order_key = (~spare_slot) * row.shape[1] + torch.arange(row.shape[1])
    spare_first = order_key.topk(num_spare, dim=1, largest=False).indices
    hot_experts = row.gather(1, state.hot_slots)
    replicate = _replacements(
        state,
        slot=spare_first[:, None, :],
        expert=hot_experts[:, :, None],
        allowed=spare_slot.gather(1, spare_first)[:, None, :],
        scratch=scratch,
    )
    replicate_cost = _changes(origin, row, spare_first[:, None, :], hot_experts[:, :, None])
    groups = [_Group(hot_experts.shape[1] * num_spare, num_spare,
                     ((spare_first, 1), (hot_experts, 0), (spare_first, 1), (hot_experts, 0)))]
    # Replace: a slot of the hottest GPU takes an expert that is light after one more replica.
    on_hot = torch.zeros(row.shape[0], width, dtype=torch.bool).scatter_(1, hot_experts, True)
    lighter = torch.where(on_hot, torch.inf, state.weight / (state.count + 1))
    lighter[:, -1] = torch.inf  # the empty id is no expert to add
    light = lighter.topk(min(_LIGHT_CANDIDATES, width - 1), dim=1, largest=False)
    replace = _replacements(
        state,
        slot=state.hot_slots[:, :, None],
        expert=light.indices[:, None, :],
        allowed=light.values[:, None, :].isfinite(),
        scratch=scratch,
    )
    replace_cost = _changes(origin, row, state.hot_slots[:, :, None], light.indices[:, None, :])
    num_light = light.indices.shape[1]
    groups.append(_Group(state.hot_slots.shape[1] * num_light, num_light,
                         ((state.hot_slots, 0), (light.indices, 1), (state.hot_slots, 0), (light.indices, 1))))
    parts = [(*replicate[:2], replicate_cost), (*replace[:2], replace_cost)]
    squares = [replicate[2], replace[2]]
    if state.gpu.shape[1] > 1:
        *swaps, swap_squares, group = _swaps(state, origin)
        parts.append(tuple(swaps))
        squares.append(swap_squares)
        groups.append(group)
    new_max, valid, cost = (torch.cat(column, 1) for column in zip(*map(_flat, parts), strict=True))

    def all_squares(layers: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(layers).flatten(1) for part in squares], 1)

    return _Moves(cost, new_max, valid, all_squares, tuple(groups))


def _flat(part: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Each tensor of ``part`` broadcast to their common ``[L, X, Y]`` and flattened to ``[L, X * Y]``."""
    shape = _broadcast(*(t.shape for t in part))
    return [t.expand(shape).reshape(shape[0], -1) for t in part]


def _broadcast(*shapes: torch.Size) -> tuple[int, ...]:
    """The broadcast of ``shapes`` that have one number of dimensions (``torch.broadcast_shapes`` takes
    ~0.2 ms a call, as much as the tensor work of a small step)."""
    return tuple(next((n for n in sizes if n != 1), 1) for sizes in zip(*shapes, strict=True))


def _replacements(
    state: _State, slot: torch.Tensor, expert: torch.Tensor, allowed: torch.Tensor, scratch: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(max of the GPU loads after, allowed, squares)``, each ``[L, X, Y]``, when every slot of ``slot``
    takes every expert of ``expert`` (shapes broadcast to ``[L, X, Y]``); ``squares(layers)``: ``[n, X, Y]``
    the sum of squares of the GPU loads after, for the layers ``layers [n]``. The ``[L, X, Y, G]`` loads go
    to the buffer ``scratch[0]`` (grown as needed).

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
    base = state.gpu[:, None, None, :] + new_side
    full = _broadcast(base.shape, old_side.shape)
    if scratch[0].numel() < math.prod(full):
        scratch[0] = torch.empty(math.prod(full), dtype=base.dtype)
    after = torch.add(base, old_side, out=scratch[0][: math.prod(full)].view(full))
    # The slot's own GPU in ``after``, added from the two small sides (the same sum; a gather from
    # ``after`` would read a whole [L, X, Y, G] tensor's worth of cache lines).
    at = gpu_of.expand(full[:3])[..., None]
    at_slot_gpu = (base.expand(full).gather(3, at) + old_side.gather(3, gpu_of[..., None])).squeeze(3)
    new_max = torch.maximum(after.amax(3), at_slot_gpu + gain)

    def squares(layers: torch.Tensor) -> torch.Tensor:
        # The same arithmetic as on the whole batch, on its layers ``layers`` (the buffer has moved on).
        mine = torch.add(base[layers], old_side[layers])
        return torch.linalg.vector_norm(mine, dim=3) ** 2 + (2 * at_slot_gpu[layers] + gain[layers]) * gain[layers]

    return new_max, valid, squares


def _at(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[l, index[l, ...]]`` for every layer ``l`` (a ``[L, N]`` or ``[L, N, G]`` table).

    A gather: much cheaper than advanced indexing for the many small lookups of a step; whole ``[G]`` rows
    are copied as rows of the flattened table (a gather would read an index per value).
    """
    flat = index.reshape(index.shape[0], -1)
    if table.ndim == 3:
        rows = flat + torch.arange(0, table.shape[0] * table.shape[1], table.shape[1])[:, None]
        return table.flatten(0, 1).index_select(0, rows.flatten()).view(*index.shape, table.shape[2])
    return table.gather(1, flat).reshape(index.shape)


def _swaps(
    state: _State, origin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor], _Group]:
    """A slot ``p`` of the hottest GPU and a slot ``q`` of one of the coolest GPUs trade experts:
    ``(max of the GPU loads after, allowed, cost)`` (each ``[L, S, Q]``), ``squares(layers)`` (the sum of
    squares of the GPU loads after, ``[n, S, Q]`` for the layers ``layers [n]``) and the group.

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
    p = state.hot_slots[:, :, None]
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

    def squares(layers: torch.Tensor) -> torch.Tensor:
        return (state.squares[layers, None, None] - hot_load[layers] ** 2 - other_load[layers] ** 2
                + new_hot[layers] ** 2 + new_other[layers] ** 2)

    cost = _changes(origin, row, p, b) + _changes(origin, row, q, a) * (q != p)
    group = _Group(per_gpu * q.shape[2], q.shape[2],
                   ((state.hot_slots, 0), (b[:, 0], 1), (q[:, 0], 1), (a[:, :, 0], 0)))
    return new_max, valid, cost, squares, group
