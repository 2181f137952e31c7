"""Walker's alias method on integer masses: the tables behind ``WeightedDispatch``.

An expert with ``c`` replicas and weights ``p`` gets ``c`` buckets of equal size, one per
replica. Bucket ``b`` keeps the share ``threshold[b] / 2**24`` for its own replica and hands the
rest to one other replica, ``alias[b]``. A draw takes the bucket ``h mod c`` and the uniform
``u = h >> 8`` in ``[0, 2**24)`` of the entry's hash ``h`` (``eplb.runtime.hashing``) and goes
to the bucket's own replica when ``u < threshold[b]``, to its alias otherwise: one bucket and
one compare, whatever ``c`` is (cumulative thresholds would need one compare per replica).

The weights are first rounded to integer masses ``m`` summing to exactly ``c * 2**24`` (each
replica's probability moves by at most ``1 / (c * 2**24)``); from there the construction is
exact in integers, so replica ``x`` gets probability ``m[x] / (c * 2**24)`` and a zero weight
is never drawn. The bucket and the coin come from one hash, yet they are independent up to
``2**-32``: ``{h : h >> 8 < t}`` is the prefix ``[0, 256 t)`` of the integers, in which every
residue mod ``c`` occurs ``floor`` or ``ceil`` of ``256 t / c`` times.
"""

from __future__ import annotations

from typing import Any

import torch

from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.runtime.hashing import UNIFORM_ONE


def alias_table(placement: Placement, probs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Alias tables for the replica weights ``probs`` (on the CPU).

    Args:
        placement: the expert placement (``log2phy [L, E, X]``, ``logcnt [L, E]``).
        probs: ``[L, E, X]`` non-negative replica weights over ``placement.log2phy`` (zero on
            its ``-1`` padding); each expert's row is normalised to sum 1.

    Returns:
        ``(threshold, alias)``, both ``[L, E, X]`` int32. Bucket ``b < logcnt[l, e]`` of expert
        ``e`` keeps ``u < threshold[l, e, b]`` (out of ``2**24``) for its own slot
        ``log2phy[l, e, b]`` and sends the rest to the physical slot ``alias[l, e, b]``.
        Padding buckets hold threshold ``0`` and alias ``-1``.
    """
    log2phy = placement.log2phy
    mass = _integer_masses(placement, _checked(log2phy, probs))
    width = log2phy.shape[-1]
    # Experts by replica count, most first: each step closes one bucket of every expert still
    # holding two open ones, so at step k those are the experts with more than k + 1 replicas,
    # a prefix of this order, and the work shrinks to the few hot experts as k grows.
    count, order = placement.logcnt.flatten().sort(descending=True, stable=True)
    slots = log2phy.reshape(-1, width)[order]
    mass = mass.reshape(-1, width)[order]
    alias = slots.clone()
    open_ = slots >= 0
    # Close the open bucket with the least mass: it keeps that mass as its threshold and takes
    # as alias the open bucket with the most mass, which gives up the missing 2**24 - low.
    # Open buckets average exactly 2**24, so low <= 2**24 <= high and no mass goes negative;
    # after c - 1 steps the last open bucket holds exactly 2**24.
    for step in range(width - 1):
        busy = int((count > step + 1).sum())
        m, o = mass[:busy], open_[:busy]
        low = torch.where(o, m, torch.iinfo(m.dtype).max).argmin(1, keepdim=True)
        o.scatter_(1, low, False)
        high = torch.where(o, m, -1).argmax(1, keepdim=True)
        alias[:busy].scatter_(1, low, slots[:busy].gather(1, high))
        m.scatter_add_(1, high, m.gather(1, low) - UNIFORM_ONE)
    unsort = order.argsort()
    return mass[unsort].view_as(log2phy).to(torch.int32), alias[unsort].view_as(log2phy).to(torch.int32)


def _checked(log2phy: torch.Tensor, probs: Any) -> torch.Tensor:
    """``probs`` as a float64 CPU tensor, or an EplbError naming what is wrong with it."""
    try:
        p = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EplbError(f"probs is not a numeric array ({exc}); pass an [L, E, X] float tensor") from None
    if p.shape != log2phy.shape:
        raise EplbError(
            f"probs has shape {tuple(p.shape)} but the placement's log2phy is {tuple(log2phy.shape)}; "
            "pass one weight per replica, as solve_weights returns"
        )
    if not torch.isfinite(p).all() or (p < 0).any():
        raise EplbError("probs has negative, NaN or infinite entries; weights must be finite and >= 0")
    if (p[log2phy < 0] != 0).any():
        raise EplbError("probs puts weight on padding (log2phy == -1); set those entries to 0")
    empty = p.sum(-1) <= 0
    if empty.any():
        layer, expert = (int(i) for i in empty.nonzero()[0])
        raise EplbError(
            f"expert {expert} of layer {layer} has all-zero replica weights; give every expert a positive weight"
        )
    return p


def _integer_masses(placement: Placement, p: torch.Tensor) -> torch.Tensor:
    """``[L, E, X]`` int64 masses ``>= 0`` summing to ``logcnt * 2**24`` per expert, each within
    one unit of ``p / sum(p) * logcnt * 2**24``; zero where ``p`` is zero."""
    cum = p.cumsum(-1)
    scale = (placement.logcnt * UNIFORM_ONE).unsqueeze(-1)
    # Dividing by the running sum's own last entry (not p.sum, which may add in another order)
    # makes the edge at the last positive weight exactly the scale; a zero weight leaves the
    # running sum, hence its edge, unchanged, so it gets mass 0.
    edges = (cum / cum[..., -1:] * scale).round().long()
    return edges.diff(dim=-1, prepend=torch.zeros_like(edges[..., :1]))
