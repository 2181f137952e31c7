"""Transfer planning: which rank sends which expert to whom, in which round (pure, on the host).

Every rank computes the same plan from the same two placement rows, so no plan is exchanged.
For one layer going from row ``old`` to row ``new`` (``[P]`` phy2log each):

- a slot whose expert does not change is untouched; one that becomes empty is only relabelled;
- each rank *stages* every distinct expert its changed slots need once: from one of its own
  old slots when it already holds the expert (a local copy), else received once from another
  rank (several slots needing it are all filled from the one staged row at commit);
- a received expert's sender is chosen among the ranks holding it in ``old``: a same-node one
  first (NVLink, not the network), then the one with the fewest sends so far;
- the (sender, receiver) pairs are grouped into rounds in which every rank talks to at most
  ``max_peers`` peers (a greedy edge colouring of the rank graph, heaviest pair first), and a
  pair's experts travel as one message, so a round is a handful of P2P ops, never hundreds.

``plan_parts`` splits a layer whose staging would exceed a memory bound into parts, each a valid
placement row on the way from ``old`` to ``new`` (see its docstring).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from eplb.errors import EplbError
from eplb.placement import EMPTY_SLOT, Placement, check_same_shape


@dataclass(frozen=True)
class Message:
    """Experts one rank sends another in one round, as ``k`` contiguous rows.

    Attributes:
        round: the round it travels in.
        src, dst: the sending and receiving rank.
        experts: the logical experts, ascending.
        src_slots: the sender's local slot read for each expert (in ``old``).
    """

    round: int
    src: int
    dst: int
    experts: tuple[int, ...]
    src_slots: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class LayerTransfers:
    """The transfers of one layer (or one part of it) from row ``old`` to row ``new``.

    Attributes:
        layer: the placement layer row.
        old, new: ``[P]`` int64 phy2log rows before and after.
        num_gpus, num_nodes: ``G`` and ``N`` of the placement.
        fills: ``(slot, expert)`` for every slot that changes to an expert, ascending slot.
        emptied: slots that change to empty (nothing is copied into them).
        local: ``(rank, expert, src_slot)``: an expert a rank stages from its own local slot.
        messages: every message, ordered by round, then pair, then sender.
        num_rounds: rounds of P2P exchange.
    """

    layer: int
    old: torch.Tensor
    new: torch.Tensor
    num_gpus: int
    num_nodes: int
    fills: tuple[tuple[int, int], ...]
    emptied: tuple[int, ...]
    local: tuple[tuple[int, int, int], ...]
    messages: tuple[Message, ...]
    num_rounds: int

    @property
    def slots_per_gpu(self) -> int:
        return self.old.numel() // self.num_gpus

    @property
    def moves(self) -> int:
        """Slots whose expert changes (``migration_cost`` moves)."""
        return len(self.fills) + len(self.emptied)

    def node(self, rank: int) -> int:
        return rank // (self.num_gpus // self.num_nodes)

    def staged_experts(self, rank: int) -> list[tuple[int, Message | None]]:
        """The experts ``rank`` stages, in staging-row order: local copies first (with ``None``),
        then each incoming message's experts (with the message), in message order."""
        rows: list[tuple[int, Message | None]] = [(e, None) for r, e, _ in self.local if r == rank]
        for m in self.messages:
            if m.dst == rank:
                rows.extend((e, m) for e in m.experts)
        return rows

    def rank_fills(self, rank: int) -> list[tuple[int, int]]:
        """``(local slot, expert)`` of ``rank``'s slots that change to an expert."""
        s = self.slots_per_gpu
        return [(slot - rank * s, e) for slot, e in self.fills if slot // s == rank]

    def staging_rows(self, rank: int) -> int:
        """Rows ``rank`` stages plus the most rows it packs to send in one round."""
        sent: dict[int, int] = defaultdict(int)
        for m in self.messages:
            if m.src == rank:
                sent[m.round] += len(m.experts)
        return len(self.staged_experts(rank)) + max(sent.values(), default=0)

    def rounds_of(self, rank: int) -> list[list[Message]]:
        """Per round, the messages ``rank`` sends or receives (empty lists for rounds it sits out)."""
        out: list[list[Message]] = [[] for _ in range(self.num_rounds)]
        for m in self.messages:
            if rank in (m.src, m.dst):
                out[m.round].append(m)
        return out


def plan_layer(old: Placement, new: Placement, layer: int, *, max_peers: int = 1) -> LayerTransfers:
    """The transfers that take ``layer`` from ``old`` to ``new`` (identical on every rank).

    Args:
        old: the placement now serving.
        new: the placement to switch to (same layers, experts, slots, GPUs, nodes).
        layer: the layer row.
        max_peers: the most peers a rank talks to in one round.
    """
    check_same_shape(old, new)
    if not 0 <= layer < old.num_layers:
        raise EplbError(f"layer {layer} is outside [0, {old.num_layers}); pass a layer row of the placement")
    return plan_rows(old.phy2log[layer], new.phy2log[layer], old.num_gpus, old.num_nodes, layer, max_peers)


def plan_rows(
    old: torch.Tensor, new: torch.Tensor, num_gpus: int, num_nodes: int, layer: int, max_peers: int
) -> LayerTransfers:
    """``plan_layer`` on two ``[P]`` phy2log rows (``-1``: empty slot)."""
    old_l, new_l = old.tolist(), new.tolist()
    per_gpu = len(old_l) // num_gpus
    per_node = num_gpus // num_nodes
    fills = tuple((p, e) for p, (o, e) in enumerate(zip(old_l, new_l, strict=True)) if o != e and e != EMPTY_SLOT)
    emptied = tuple(p for p, (o, e) in enumerate(zip(old_l, new_l, strict=True)) if o != e and e == EMPTY_SLOT)
    # holders[e]: rank -> its first old local slot holding e.
    holders: dict[int, dict[int, int]] = defaultdict(dict)
    for p, e in enumerate(old_l):
        if e != EMPTY_SLOT:
            holders[e].setdefault(p // per_gpu, p % per_gpu)
    needs = sorted({(p // per_gpu, e) for p, e in fills})
    local = tuple((r, e, holders[e][r]) for r, e in needs if r in holders[e])
    remote = [(r, e) for r, e in needs if r not in holders[e]]
    # Experts with few holders first: their senders are forced, the flexible ones then balance around them.
    remote.sort(key=lambda need: (len(holders[need[1]]), need[1], need[0]))
    sends = [0] * num_gpus
    links: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for r, e in remote:
        src = min(
            holders[e],
            key=lambda g, r=r: (g // per_node != r // per_node, sends[g], (g - r) % num_gpus),
        )
        sends[src] += 1
        links[src, r].append((e, holders[e][src]))
    rounds = _colour(links, num_gpus, max_peers)
    messages = []
    for (src, dst), items in links.items():
        items.sort()
        pair = (min(src, dst), max(src, dst))
        experts, slots = (tuple(column) for column in zip(*items, strict=True))
        messages.append((rounds[pair], pair, src, Message(rounds[pair], src, dst, experts, slots)))
    messages.sort(key=lambda t: t[:3])
    return LayerTransfers(
        layer=layer,
        old=old.to(torch.int64).clone(),
        new=new.to(torch.int64).clone(),
        num_gpus=num_gpus,
        num_nodes=num_nodes,
        fills=fills,
        emptied=emptied,
        local=local,
        messages=tuple(m for *_, m in messages),
        num_rounds=max(rounds.values(), default=-1) + 1,
    )


def _colour(links: dict[tuple[int, int], list], num_gpus: int, max_peers: int) -> dict[tuple[int, int], int]:
    """Round of each rank pair with traffic: the first round where both ranks still have room.

    Heaviest pairs first (both directions' experts), so that the long transfers share the early
    rounds; a greedy colouring uses at most ``2 * ceil(degree / max_peers) - 1`` rounds.
    """
    weight: dict[tuple[int, int], int] = defaultdict(int)
    for (src, dst), items in links.items():
        weight[min(src, dst), max(src, dst)] += len(items)
    used: list[list[int]] = []
    out = {}
    for pair in sorted(weight, key=lambda p: (-weight[p], p)):
        k = 0
        while k < len(used) and max(used[k][pair[0]], used[k][pair[1]]) >= max_peers:
            k += 1
        if k == len(used):
            used.append([0] * num_gpus)
        used[k][pair[0]] += 1
        used[k][pair[1]] += 1
        out[pair] = k
    return out


def plan_parts(
    old: Placement,
    new: Placement,
    layer: int,
    row_bytes: int,
    staging_bytes: int | None,
    *,
    max_peers: int = 1,
) -> list[LayerTransfers]:
    """The transfers of ``layer`` in parts whose staging fits ``staging_bytes`` on every rank.

    Each part goes from one valid placement row to the next (every expert keeps a replica), so
    each is staged, verified, voted and committed on its own, and after any part the layer
    serves a real placement: a failure leaves that row serving everywhere and a retry continues
    from it. A part is built from *closures*: a slot whose old expert would lose its last
    replica is changed together with a slot that receives that expert (and so on along the
    chain, which the final row guarantees ends), so a swap of two sole replicas is one closure.

    Args:
        old, new: the placements (see ``plan_layer``).
        layer: the layer row.
        row_bytes: bytes of one staged row of this layer (``RowLayout.row_bytes``).
        staging_bytes: per-rank bound on staged plus packed rows of one part, or None for one part.
        max_peers: see ``plan_layer``.

    Raises:
        EplbError: when a closure alone needs more than ``staging_bytes`` on some rank.
    """
    whole = plan_layer(old, new, layer, max_peers=max_peers)
    if staging_bytes is None or _need(whole, row_bytes) <= staging_bytes or not whole.moves:
        return [whole] if whole.moves else []
    args = (old.num_gpus, old.num_nodes, layer, max_peers)
    cur, target = whole.old.clone(), whole.new
    counts = torch.bincount(cur[cur >= 0], minlength=old.num_experts).tolist()
    parts = []
    while not torch.equal(cur, target):
        part: set[int] = set()
        trial_counts = list(counts)
        for slot in (cur != target).nonzero().flatten().tolist():
            if slot in part:
                continue
            group, grown = _closure(slot, cur, target, part, trial_counts)
            nxt = torch.where(_mask(cur, part | group), target, cur)
            if _need(plan_rows(cur, nxt, *args), row_bytes) <= staging_bytes:
                part |= group
                trial_counts = grown
            elif not part:
                need = _need(plan_rows(cur, nxt, *args), row_bytes)
                raise EplbError(
                    f"layer {layer}: changing slots {sorted(group)} together needs {need} staging bytes on one rank "
                    f"but staging_bytes is {staging_bytes}; raise MigrationConfig.staging_bytes to at least {need}"
                )
        nxt = torch.where(_mask(cur, part), target, cur)
        parts.append(plan_rows(cur, nxt, *args))
        cur, counts = nxt, trial_counts
    return parts


def _need(t: LayerTransfers, row_bytes: int) -> int:
    return row_bytes * max(t.staging_rows(r) for r in range(t.num_gpus))


def _mask(row: torch.Tensor, slots: set[int]) -> torch.Tensor:
    mask = torch.zeros_like(row, dtype=torch.bool)
    mask[list(slots)] = True
    return mask


def _closure(
    slot: int, cur: torch.Tensor, target: torch.Tensor, part: set[int], counts: list[int]
) -> tuple[set[int], list[int]]:
    """The slots to change with ``slot`` (on top of ``part``) so every expert keeps a replica,
    and the replica counts after them."""
    counts, group, pending = list(counts), set(), []
    cur_l, target_l = cur.tolist(), target.tolist()

    def add(p: int) -> None:
        group.add(p)
        pending.append(p)
        if target_l[p] != EMPTY_SLOT:
            counts[target_l[p]] += 1

    add(slot)
    while pending:
        gone = cur_l[pending.pop()]
        if gone == EMPTY_SLOT:
            continue
        counts[gone] -= 1
        if counts[gone] == 0:
            # The target row holds `gone` on a slot that is neither unchanged nor already taken
            # (its replica would be counted), so a remaining changed slot brings it back.
            add(next(
                q for q, (c, t) in enumerate(zip(cur_l, target_l, strict=True))
                if t == gone and c != t and q not in part and q not in group
            ))
    return group, counts
