"""The model layers an engine keeps an expert map for."""

from __future__ import annotations

from eplb.errors import EplbError


def moe_layer_ids(model_layers: int, dense_layers: int = 0) -> list[int]:
    """The ids of the layers with routed experts: those TensorRT-LLM looks up, and the rows of vLLM's map.

    Args:
        model_layers: the model's layers, MTP layers included (DeepSeek-V3 with one MTP layer: 62).
        dense_layers: the leading layers without routed experts (DeepSeek-V3: 3).

    Returns:
        ``[dense_layers, ..., model_layers - 1]``.
    """
    if not 0 <= dense_layers < model_layers:
        raise EplbError(f"--dense-layers {dense_layers} must be in [0, {model_layers}) for a model of "
                        f"{model_layers} layers; pass the leading layers without routed experts (DeepSeek-V3: 3)")
    return list(range(dense_layers, model_layers))
