"""eplb's placement files in SGLang: the server flags a file needs, and the check that it fits.

SGLang reads ``--init-expert-location`` as one ``phy2log`` row per model layer (dense layers
included) and takes the slot count from ``--ep-num-redundant-experts`` and the EP size; it does not
compare them with the file, so a mismatch is silent. ``server_args`` gives the flags that match a
file; ``check`` refuses a file that does not fit a model and an EP group.
"""

from __future__ import annotations

from pathlib import Path

from eplb.errors import EplbError
from eplb.placement import Placement


def server_args(placement: Placement, path: str | Path) -> list[str]:
    """The SGLang server flags that load ``placement`` (written at ``path``) as it is.

    Args:
        placement: ``phy2log [L, P]`` over ``G = placement.num_gpus`` ranks.
        path: the ``--init-expert-location`` file (``.pt``, or ``.json`` in SGLang's format).

    Returns:
        ``["--init-expert-location", path, "--ep-num-redundant-experts", P - E, "--ep-size", G]`` as strings.
    """
    num_slots = placement.phy2log.shape[1]
    return ["--init-expert-location", str(path),
            "--ep-num-redundant-experts", str(num_slots - placement.num_experts),
            "--ep-size", str(placement.num_gpus)]


def check(placement: Placement, *, model_layers: int, ep_size: int, num_experts: int | None = None) -> None:
    """Refuse a placement SGLang would load wrongly for a model of ``model_layers`` layers on ``ep_size`` ranks.

    Args:
        placement: the placement read from the file.
        model_layers: the model's ``num_hidden_layers`` (SGLang keeps a row for every layer).
        ep_size: ``--ep-size`` of the server.
        num_experts: the model's routed experts, when known (checked too).

    Raises:
        EplbError: naming every mismatch and the flag or file to change.
    """
    num_layers, num_slots = placement.phy2log.shape
    problems = []
    if num_layers != model_layers:
        problems.append(f"the file has {num_layers} rows but the model has {model_layers} layers (SGLang wants one "
                        "row per model layer, dense ones included: re-plan with layer ids, or pass --model-layers)")
    if num_slots % ep_size != 0:
        problems.append(f"{num_slots} slots cannot be split over --ep-size {ep_size}: plan for {ep_size} GPUs")
    if num_experts is not None and placement.num_experts != num_experts:
        problems.append(f"the file places {placement.num_experts} experts, the model has {num_experts}")
    if problems:
        raise EplbError("; ".join(problems))
