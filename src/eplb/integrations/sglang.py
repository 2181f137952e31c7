"""eplb's placement files in SGLang: the server flags a file needs, and the check that it fits.

SGLang reads ``--init-expert-location`` as one ``phy2log`` row per model layer (dense layers
included) and takes the slot count from ``--ep-num-redundant-experts`` and the EP size; it does not
compare them with the file, so a mismatch is silent. ``server_args`` gives the flags that match a
file; ``check`` refuses a file that does not fit a model and an EP group.

``install()`` lets SGLang's online rebalancing (``--enable-eplb``) plan with eplb: ``--eplb-algorithm
eplb`` runs eplb's own algorithm, ``--eplb-algorithm eplb:NAME`` any eplb algorithm (``eplb:auto``
picks the most balanced); every other value keeps SGLang's own algorithms. SGLang plans in its
scheduler processes, so ``install()`` has to run in each of them: put
``import eplb.integrations.sglang as e; e.install()`` in a ``sitecustomize.py`` on the server's
``PYTHONPATH`` (Python runs it at the start of every process, spawned ones included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.planning.planner import plan

PREFIX = "eplb"


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


def check(placement: Placement, *, model_layers: int, ep_size: int, num_experts: int | None = None,
          redundant_experts: int | None = None) -> None:
    """Refuse a placement SGLang would load wrongly for a model of ``model_layers`` layers on ``ep_size`` ranks.

    Args:
        placement: the placement read from the file.
        model_layers: the model's ``num_hidden_layers`` (SGLang keeps a row for every layer).
        ep_size: ``--ep-size`` of the server.
        num_experts: the model's routed experts, when known (checked too).
        redundant_experts: ``--ep-num-redundant-experts`` of the server, when known (SGLang takes the slot
            count from it, not from the file).

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
    spare = num_slots - placement.num_experts
    if redundant_experts is not None and spare != redundant_experts:
        problems.append(f"the file has {spare} redundant slots but --ep-num-redundant-experts is {redundant_experts}: "
                        f"pass --ep-num-redundant-experts {spare}")
    if problems:
        raise EplbError("; ".join(problems))


class EplbChoice(str):
    """An eplb algorithm name, standing in SGLang for one of its ``EplbAlgorithm`` members."""


def algorithm_name(raw_algorithm: str) -> str | None:
    """The eplb algorithm an ``--eplb-algorithm`` value names (``eplb`` -> ``eplb``, ``eplb:X`` -> ``X``), or None."""
    if raw_algorithm == PREFIX:
        return PREFIX
    if raw_algorithm.startswith(PREFIX + ":"):
        return raw_algorithm[len(PREFIX) + 1:]
    return None


def rebalance(
    tokens_per_expert: torch.Tensor, num_physical_experts: int, num_local_physical_experts: int,
    num_groups: int | None, num_nodes: int, algorithm: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGLang's ``eplb_algorithms.rebalance_experts`` contract, planned by eplb.

    Args:
        tokens_per_expert: ``[T, L, E]`` (or ``[L, E]``) tokens per logical expert, any device.
        num_physical_experts: ``P``.
        num_local_physical_experts: slots per GPU; ``G = P / this``.
        num_groups: the router's groups, or None; with ``num_nodes`` dividing both it and ``G`` the
            group-aware algorithms may run, else the cluster is planned as one node.
        num_nodes: ``N``.
        algorithm: an eplb algorithm name or ``"auto"``.

    Returns:
        ``(phy2log [L, P], log2phy [L, E, X] (-1 padded), logcnt [L, E])``, int64 on the CPU.
    """
    num_gpus = num_physical_experts // num_local_physical_experts
    grouped = num_groups is not None and num_groups % num_nodes == 0 and num_gpus % num_nodes == 0
    placement = plan(torch.as_tensor(tokens_per_expert).detach().cpu().to(torch.float64), num_gpus=num_gpus,
                     num_slots=num_physical_experts, num_nodes=num_nodes if grouped else 1,
                     num_groups=num_groups if grouped else None, algorithm=algorithm)
    return placement.phy2log, placement.log2phy, placement.logcnt


def install() -> None:
    """Make ``--eplb-algorithm eplb`` / ``eplb:NAME`` plan with eplb in this process (idempotent)."""
    try:
        from sglang.srt.eplb import eplb_algorithms as algorithms
    except ImportError as exc:
        raise EplbError(f"cannot import SGLang's EPLB ({exc}); install SGLang before calling install()") from exc
    if getattr(algorithms.rebalance_experts, "eplb_installed", False):
        return
    # SGLang looks both functions up on the module at each rebalance, so replacing them suffices.
    own_choice, own_rebalance = algorithms.compute_algorithm, algorithms.rebalance_experts

    def compute_algorithm(raw_algorithm: str, num_groups: int | None, num_nodes: int) -> Any:
        name = algorithm_name(raw_algorithm)
        return own_choice(raw_algorithm, num_groups, num_nodes) if name is None else EplbChoice(name)

    def rebalance_experts(tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups,
                          num_nodes, algorithm):
        if not isinstance(algorithm, EplbChoice):
            return own_rebalance(tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups,
                                 num_nodes, algorithm)
        return rebalance(tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups,
                         num_nodes, str(algorithm))

    rebalance_experts.eplb_installed = True
    algorithms.compute_algorithm, algorithms.rebalance_experts = compute_algorithm, rebalance_experts
