"""eplb's load-balancer YAML in TensorRT-LLM: the layer ids a model looks up, and the check that a file fits.

TensorRT-LLM reads ``moe_config.load_balancer`` (the YAML's path) with ``yaml.safe_load`` into its
``MoeLoadBalancerConfig``, a pydantic model that forbids any key but ``num_slots``,
``initial_global_assignments`` and ``layer_updates_per_iter``. Every rank calls ``setup(ep_rank,
ep_size)`` (``num_slots`` must split over the EP size) and serves slots ``[rank * P / G, (rank + 1) * P
/ G)``. Each MoE layer, MTP layers included (their ids follow the model's last layer), looks up its own
layer id: a missing id is a ``KeyError`` at model construction, and its row must hold every expert.
Ids of layers without routed experts (dense) are never looked up.
"""

from __future__ import annotations

from eplb.errors import EplbError
from eplb.integrations.layers import moe_layer_ids
from eplb.io.placements import PlacementFile, brief_ids


def check(file: PlacementFile, *, model_layers: int, ep_size: int, dense_layers: int = 0,
          num_experts: int | None = None) -> None:
    """Refuse a placement file TensorRT-LLM would reject or apply to the wrong layers.

    Args:
        file: the file read (its slots already split over ``ep_size`` ranks).
        model_layers: the model's layers, MTP layers included.
        ep_size: the EP size of the server (checked against ``num_slots`` when the file was read).
        dense_layers: the leading layers without routed experts.
        num_experts: the model's routed experts, when known.

    Raises:
        EplbError: naming every mismatch and the fix.
    """
    if file.format != "trtllm":
        raise EplbError(f"a {file.format} file is not a TensorRT-LLM load-balancer config (its MoeLoadBalancerConfig "
                        "forbids other keys); write it with `eplb plan ... -o FILE.yaml` (or --format trtllm)")
    placement, problems = file.placement, []
    ids = set(file.layer_ids)
    missing = [i for i in moe_layer_ids(model_layers, dense_layers) if i not in ids]
    if missing:
        problems.append(f"no assignment for MoE layer(s) {brief_ids(missing)} (TensorRT-LLM raises KeyError there); "
                        f"write the file with --model-layers {model_layers} from statistics with layer ids")
    beyond = sorted(i for i in ids if i >= model_layers)
    if beyond:
        problems.append(f"layer id(s) {brief_ids(beyond)} beyond a model of {model_layers} layers (MTP included): "
                        "plan from this model's statistics")
    if num_experts is not None and placement.num_experts != num_experts:
        problems.append(f"the file places {placement.num_experts} experts, the model has {num_experts} "
                        "(TensorRT-LLM asserts that every row holds each expert): plan from this model's statistics")
    if problems:
        raise EplbError("; ".join(problems))
