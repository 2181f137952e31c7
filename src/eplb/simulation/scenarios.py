"""Scenarios: per-step expert loads ``[T, L, E]`` built from real per-workload loads, or replayed as recorded.

A scenario is a table of expected loads (one row per phase, per step of a gradual switch, per burst) and,
for each step, the row it draws from. ``build`` samples each step's load at a given number of tokens:
every token picks ``top_k`` distinct experts, expert ``e`` with inclusion probability ``pi_e = top_k *
share_e`` (capped at 1), so the count of ``e`` over ``N`` tokens is Binomial(N, pi_e), as when a router
picks top-k without repeats. A step's picks are drawn by systematic sampling over a random order of the
experts, fresh per layer and step (each token: one uniform ``u``, the experts whose stretch of the cumulative
``pi`` contains ``u, u + 1, ..., u + top_k - 1``); the tokens only enter through how many of their ``u``
fall between consecutive cut points, one multinomial draw, so a step costs O(E) per layer however many
tokens it has. ``replay`` takes a recorded series as it is (no sampling).

Each step's randomness comes from ``(seed, step)``, so a scenario is reproducible and any step can be
drawn on its own (the simulator draws them in chunks, never holding all of a long replay).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eplb.cluster import require_count
from eplb.errors import EplbError
from eplb.loads import as_history


@dataclass(frozen=True)
class Burst:
    """Short bursts of another phase's traffic on top of the scheduled one.

    Args:
        rate: probability that a burst starts at a given step (0.01: about one per 100 steps).
        length: steps a burst lasts.
        share: fraction of the burst steps' tokens that come from the other phase (a random one).
    """

    rate: float = 0.01
    length: int = 5
    share: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.rate) <= 1.0:
            raise EplbError(f"burst rate must be a probability in [0, 1], got {self.rate!r}; e.g. 0.01")
        require_count("burst length", self.length, fix="pass the steps a burst lasts")
        if not 0.0 < float(self.share) <= 1.0:
            raise EplbError(f"burst share must be in (0, 1], got {self.share!r}; e.g. 0.5 for half the tokens")


@dataclass(frozen=True, eq=False)
class Scenario:
    """A time series of expert loads, drawn step by step.

    Attributes:
        expected: ``[K, L, E]`` float64 expected load (token-slot assignments) of each row a step draws
            from: the phases first, then gradual-switch and burst mixtures. For a replay, the recorded steps.
        index: ``[T]`` int64, the row of ``expected`` of each step.
        phase: ``[T]`` int64, the scheduled phase of each step (during a gradual switch: the phase switched
            to; in a replay: the step itself).
        names: ``[K]`` a name for each row.
        phase_names: the phases, in schedule order.
        tokens_per_step: tokens each step samples; None for a replay (steps are the recorded loads).
        top_k: experts each token picks.
        seed: the seed of the sampling.
        layer_ids: ``[L]`` the model's layer id of each row.
    """

    expected: torch.Tensor
    index: torch.Tensor
    phase: torch.Tensor
    names: list[str]
    phase_names: list[str]
    tokens_per_step: int | None
    top_k: int
    seed: int = 0
    layer_ids: list[int] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return int(self.index.numel())

    @property
    def num_layers(self) -> int:
        return self.expected.shape[1]

    @property
    def num_experts(self) -> int:
        return self.expected.shape[2]

    @property
    def switches(self) -> list[int]:
        """Steps at which the scheduled phase changes (for plots and for the oracle)."""
        return (torch.nonzero(self.phase[1:] != self.phase[:-1]).flatten() + 1).tolist()

    def steps(self, start: int, stop: int) -> torch.Tensor:
        """``[stop - start, L, E]`` float64: the loads of steps ``[start, stop)``."""
        if not 0 <= start <= stop <= self.num_steps:
            raise EplbError(f"steps [{start}, {stop}) are outside the scenario's [0, {self.num_steps}); pass a range")
        if self.tokens_per_step is None:
            return self.expected[self.index[start:stop]]
        return _sample(self.expected, self.index[start:stop], self.tokens_per_step, self.top_k, self.seed, start)

    def load(self) -> torch.Tensor:
        """``[T, L, E]``: every step (memory ``T x L x E x 8`` bytes: for short scenarios and tests)."""
        return self.steps(0, self.num_steps)


def inclusion(share: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[..., E]``: per-token inclusion probabilities ``min(1, c * share)`` that sum to ``top_k``.

    ``share [..., E]`` (each row sums to 1); an expert cannot be picked twice by a token, so a share above
    ``1 / top_k`` is capped and the rest scaled up, until no cap is exceeded.
    """
    pi = share * top_k
    for _ in range(share.shape[-1]):
        capped = pi >= 1.0
        if not bool((pi > 1.0 + 1e-12).any()):
            break
        free = torch.where(capped, 0.0, pi)
        room = top_k - capped.sum(-1, keepdim=True)
        pi = torch.where(capped, 1.0, free * room / free.sum(-1, keepdim=True).clamp(min=1e-300))
    return pi.clamp(max=1.0)


def _sample(expected: torch.Tensor, rows: torch.Tensor, tokens: int, top_k: int, seed: int, start: int) -> torch.Tensor:
    """``[S, L, E]``: step ``start + i`` draws ``tokens`` tokens that pick ``top_k`` distinct experts each from
    row ``rows[i]`` of ``expected [K, L, E]`` (see the module doc). A step's randomness comes from
    ``(seed, step)`` alone, so a step is the same whichever steps are drawn with it."""
    uniq, inverse = torch.unique(rows, return_inverse=True)
    total = expected[uniq].sum(-1, keepdim=True)
    pi = inclusion(expected[uniq] / torch.where(total > 0, total, 1.0), top_k).numpy()  # once per row
    unloaded = (total.squeeze(-1) == 0).numpy()
    num_layers, num_experts = pi.shape[1:]
    out = np.empty((rows.numel(), num_layers * num_experts))
    # Per-layer orders as indices into the flattened [L * E] arrays: one 1-D take or put each, much cheaper
    # than numpy's along-axis helpers on these small rows.
    offset = np.arange(0, num_layers * num_experts, num_experts)[:, None]
    cuts = np.empty((num_layers, num_experts + 2))  # 0, each layer's cut points in order, 1
    cuts[:, 0], cuts[:, -1] = 0.0, 1.0
    reach = np.empty((num_layers, num_experts + 1))  # 0, then the picks up to the end of each stretch
    reach[:, 0] = 0.0
    for i, k in enumerate(inverse.tolist()):
        rng = np.random.default_rng([seed, start + i])
        # A random order of the experts per layer; each expert's stretch of the cumulative pi ends at a cut
        # point in [0, 1) after ``whole`` full turns.
        order = np.argsort(rng.random((num_layers, num_experts)), axis=-1)
        order += offset
        cum = np.cumsum(pi[k].ravel()[order], -1)
        whole = np.floor(cum)
        frac = cum - whole
        by_cut = np.argsort(frac, axis=-1)
        by_cut += offset
        cuts[:, 1:-1] = frac.ravel()[by_cut]
        gaps = np.diff(cuts, axis=-1).clip(min=0.0)
        # How many of the tokens' uniforms fall between consecutive cut points.
        hits = rng.multinomial(tokens, gaps / gaps.sum(-1, keepdims=True))
        at = np.empty(num_layers * num_experts)  # uniforms below each expert's cut
        at[by_cut] = np.cumsum(hits, -1)[:, :-1]
        np.add(whole * tokens, at.reshape(num_layers, num_experts), out=reach[:, 1:])
        out[i][order] = np.diff(reach, axis=-1)  # back to expert order
        out[i].reshape(num_layers, num_experts)[unloaded[k]] = 0.0
    return torch.from_numpy(out.reshape(rows.numel(), num_layers, num_experts))


def _phase_load(spec: Any) -> tuple[str, torch.Tensor, list[int]]:
    """``(name, [L, E] mean load per step, layer ids)`` of one phase: a path (``FILE#ENTRY`` picks one
    entry), a ``LoadFile``, or a tensor; a file with several steps gives their mean."""
    from eplb.io.loads import LoadFile, read_load

    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        name, spec = spec
    else:
        name = None
    if isinstance(spec, (str, bytes)) or hasattr(spec, "__fspath__"):
        loaded = read_load(str(spec))
        name = name or str(spec).replace("\\", "/").rsplit("/", 1)[-1]
    elif isinstance(spec, LoadFile):
        loaded, name = spec, name or spec.path.rsplit("/", 1)[-1]
    else:
        history = as_history(spec, what="phase load")
        return name or "phase", history.mean(0), list(range(history.shape[1]))
    return name, loaded.load.mean(0), list(loaded.layer_ids)


def build(
    phases: Sequence[Any],
    *,
    steps_per_phase: int | Sequence[int],
    tokens_per_step: int,
    top_k: int,
    switch: str = "abrupt",
    ramp_steps: int = 10,
    burst: Burst | None = None,
    seed: int = 0,
) -> Scenario:
    """A scenario that goes through ``phases`` in order, sampling every step.

    Args:
        phases: each a loads file path (``FILE#ENTRY`` for one OLMoE domain or dict entry), a ``LoadFile``,
            an ``[L, E]`` (or ``[T, L, E]``, averaged) tensor, or a ``(name, any of those)`` pair. All must
            have the same layers and experts; layers without load in every phase (dense layers) are dropped.
        steps_per_phase: steps of each phase (one number, or one per phase).
        tokens_per_step: tokens of each step (e.g. 16384: a prefill batch over the EP group).
        top_k: experts each token picks (DeepSeek-V3: 8); ``top_k <= E``.
        switch: ``"abrupt"`` (the next phase starts at once) or ``"gradual"`` (the first ``ramp_steps``
            steps of each next phase mix the two loads linearly).
        ramp_steps: steps of a gradual switch (counted in the new phase).
        burst: optional bursts of another phase's traffic (see ``Burst``).
        seed: makes the scenario reproducible.
    """
    if not isinstance(phases, Sequence) or isinstance(phases, (str, bytes)) or len(phases) == 0:
        raise EplbError("phases must be a non-empty list of loads files or tensors; e.g. ['a.json', 'b.json']")
    tokens_per_step = require_count("tokens_per_step", tokens_per_step, fix="e.g. 16384 tokens per step")
    seed = require_count("seed", seed, minimum=0, fix="pass a non-negative integer")
    if switch not in ("abrupt", "gradual"):
        raise EplbError(f"switch must be 'abrupt' or 'gradual', got {switch!r}")
    lengths = [steps_per_phase] * len(phases) if not isinstance(steps_per_phase, Sequence) else list(steps_per_phase)
    if len(lengths) != len(phases):
        raise EplbError(f"steps_per_phase has {len(lengths)} entries for {len(phases)} phases; pass one per phase")
    lengths = [require_count("steps_per_phase", n, fix="pass the steps of each phase") for n in lengths]
    loaded = [_phase_load(p) for p in phases]
    names = [name for name, _, _ in loaded]
    table = _stack_phases(loaded)
    keep = table.sum(dim=(0, 2)) > 0
    if not bool(keep.any()):
        raise EplbError("every phase is all zeros; pass recorded expert loads")
    layer_ids = [i for i, k in zip(loaded[0][2], keep.tolist(), strict=True) if k]
    table = table[:, keep]
    top_k = require_count("top_k", top_k, maximum=table.shape[2], fix="pass the router's experts per token")
    # Each row in units of tokens_per_step tokens x top_k picks, whatever the file's totals.
    table = table / table.sum(-1, keepdim=True).clamp(min=1e-300) * (tokens_per_step * top_k)
    phase = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(lengths)])
    rows, row_names, index = list(table), list(names), phase.clone()
    if switch == "gradual":
        ramp_steps = require_count("ramp_steps", ramp_steps, fix="pass the steps a gradual switch takes")
        for start in (torch.nonzero(phase[1:] != phase[:-1]).flatten() + 1).tolist():
            a, b = int(phase[start - 1]), int(phase[start])
            for j in range(min(ramp_steps, lengths[b])):
                w = (j + 1) / (ramp_steps + 1)
                index[start + j] = len(rows)
                rows.append((1 - w) * table[a] + w * table[b])
                row_names.append(f"{names[a]} -> {names[b]} ({w:.0%})")
    if burst is not None and len(phases) > 1:
        rng = np.random.default_rng([seed, 1 << 31])
        t = 0
        while t < len(phase):
            if rng.random() < burst.rate:
                own = int(phase[t])
                other = int(rng.choice([i for i in range(len(phases)) if i != own]))
                for s in range(t, min(t + burst.length, len(phase))):
                    index[s] = len(rows)
                    rows.append((1 - burst.share) * table[int(phase[s])] + burst.share * table[other])
                    row_names.append(f"{names[int(phase[s])]} + burst of {names[other]}")
                t += burst.length
            else:
                t += 1
    return Scenario(expected=torch.stack(rows), index=index, phase=phase, names=row_names, phase_names=names,
                    tokens_per_step=tokens_per_step, top_k=top_k, seed=seed, layer_ids=layer_ids)


def _stack_phases(loaded: list[tuple[str, torch.Tensor, list[int]]]) -> torch.Tensor:
    first_name, first, first_ids = loaded[0]
    for name, load, ids in loaded[1:]:
        if load.shape != first.shape or ids != first_ids:
            raise EplbError(
                f"phase {name!r} has {load.shape[0]} layers x {load.shape[1]} experts (layer ids {ids[:3]}...) but "
                f"{first_name!r} has {first.shape[0]} x {first.shape[1]} ({first_ids[:3]}...); "
                "build a scenario from loads of one model"
            )
    return torch.stack([load for _, load, _ in loaded])


def replay(load: Any, *, top_k: int, name: str = "replay", layer_ids: list[int] | None = None) -> Scenario:
    """A scenario that replays a recorded series step by step, as it is.

    Args:
        load: ``[T, L, E]`` recorded loads (a recorder dump's windows, a training trace's iterations), a
            loads file path, or a ``LoadFile``. Layers without load in any step are dropped.
        top_k: experts each token picked (for the token counts of the time model).
        name: a name for the plots.
        layer_ids: the model's layer id of each row (default: from the file, or 0..L-1).
    """
    from eplb.io.loads import LoadFile, read_load

    if isinstance(load, (str, bytes)) or hasattr(load, "__fspath__"):
        load = read_load(str(load))
    if isinstance(load, LoadFile):
        layer_ids = layer_ids or list(load.layer_ids)
        load = load.load
    history = as_history(load, what="recorded load")
    keep = history.sum(dim=(0, 2)) > 0
    if not bool(keep.any()):
        raise EplbError("the recorded load is all zeros; pass a series with expert loads")
    ids = layer_ids or list(range(history.shape[1]))
    if len(ids) != history.shape[1]:
        raise EplbError(f"layer_ids has {len(ids)} entries for {history.shape[1]} layers; pass one per layer")
    top_k = require_count("top_k", top_k, maximum=history.shape[2], fix="pass the router's experts per token")
    steps = torch.arange(history.shape[0])
    return Scenario(expected=history[:, keep].contiguous(), index=steps, phase=steps,
                    names=[f"{name} step {t}" for t in range(history.shape[0])], phase_names=[name],
                    tokens_per_step=None, top_k=top_k, seed=0, layer_ids=[i for i, k in zip(ids, keep.tolist(),
                                                                                          strict=True) if k])
