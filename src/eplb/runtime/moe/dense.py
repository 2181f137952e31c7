"""The single-process MoE layer with the full checkpoint weights: what ``EPMoE`` must equal.

Weights are plain named tensors: routed experts ``{"w13": [E, 2I, H], "w2": [E, H, I]}`` and the
shared expert ``{"w13": [2Is, H], "w2": [H, Is]}``. ``w13`` stacks the gate projection (rows
``[0, I)``) over the up projection (rows ``[I, 2I)``), as fused checkpoints store them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from eplb.errors import EplbError
from eplb.runtime.moe.config import EPMoEConfig
from eplb.runtime.moe.router import route, routing_dtype


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert on a batch of rows: ``(silu(x @ w1.T) * (x @ w3.T)) @ w2.T``.

    Args:
        x: ``[N, H]`` rows.
        w13: ``[2I, H]``, the gate projection ``w1`` over the up projection ``w3``.
        w2: ``[H, I]``, the down projection.

    Returns:
        ``[N, H]``, in ``x``'s dtype.
    """
    gate, up = (x @ w13.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.T


def check_expert_weights(weights: Mapping[str, torch.Tensor], leading: int | None, inter: int, hidden: int,
                         what: str) -> None:
    """Raise EplbError unless ``weights`` holds ``w13 [*, 2I, H]`` and ``w2 [*, H, I]``.

    Args:
        weights: the named tensors.
        leading: the size of the leading expert / slot dim, or None for one expert (no leading dim).
        inter: ``I``.
        hidden: ``H``.
        what: what they are, for the message (e.g. ``"local slot weights"``).
    """
    lead = () if leading is None else (leading,)
    want = {"w13": (*lead, 2 * inter, hidden), "w2": (*lead, hidden, inter)}
    for name, shape in want.items():
        tensor = weights.get(name) if isinstance(weights, Mapping) else None
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None
        if got != shape:
            raise EplbError(
                f"{what}[{name!r}] must be a tensor of shape {list(shape)}, got {got if got else 'none'}; "
                f"pass {{'w13': {list(want['w13'])}, 'w2': {list(want['w2'])}}}"
            )


def dense_moe(
    x: torch.Tensor,
    router_params: Mapping[str, torch.Tensor],
    experts: Mapping[str, torch.Tensor],
    shared: Mapping[str, torch.Tensor] | None,
    config: EPMoEConfig,
    *,
    layer: int = 0,
    token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """One MoE layer on one process: route, run every expert on its tokens, combine, add the shared expert.

    ``out = routed_scaling_factor * sum_k weight[m, k] * expert[ids[m, k]](x[m]) + shared(x[m])``,
    the sum taken in the routing dtype (at least float32).

    Args:
        x: ``[M, H]`` hidden states.
        router_params: see ``eplb.runtime.moe.router.route``.
        experts: the checkpoint's routed experts ``{"w13": [E, 2I, H], "w2": [E, H, I]}``.
        shared: the shared expert ``{"w13": [2Is, H], "w2": [H, Is]}``; None without one.
        config: the layer's config.
        layer: the MoE layer (the hash router's key).
        token_ids: ``[M]`` vocabulary ids (hash router only).

    Returns:
        ``[M, H]`` in ``x``'s dtype.
    """
    check_expert_weights(experts, config.num_experts, config.intermediate, config.hidden, "experts")
    if config.shared_expert:
        check_expert_weights(shared, None, config.shared_size, config.hidden, "shared")
    ids, weights = route(x, router_params, config, layer=layer, token_ids=token_ids)
    out = torch.zeros(x.shape, dtype=routing_dtype(x.dtype), device=x.device)
    for expert in ids.unique().tolist():
        token, column = (ids == expert).nonzero(as_tuple=True)
        y = swiglu(x[token], experts["w13"][expert], experts["w2"][expert])
        out.index_add_(0, token, weights[token, column].unsqueeze(1) * y)
    out *= config.routed_scaling_factor
    if config.shared_expert:
        out += swiglu(x, shared["w13"], shared["w2"])
    return out.to(x.dtype)
