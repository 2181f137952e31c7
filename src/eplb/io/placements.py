"""Placement files: eplb's own, and the static-placement inputs of the serving engines.

Formats (``PLACEMENT_FORMATS``; without ``format=`` the extension decides):

- ``eplb`` (``.json``): ``format``, ``eplb_version``, ``created`` (UTC, ISO 8601), the fields of
  ``Placement.to_dict()``, ``layer_ids`` and the caller's ``metadata``. The only format with room
  for empty slots.
- ``sglang`` (``.pt``, or ``.json`` with ``format="sglang"``): exactly
  ``{"physical_to_logical_map": [L, P]}`` for ``--init-expert-location``. SGLang passes the keys on
  as arguments, so any other key fails there; it picks the decoder by the ``.pt`` / ``.json``
  suffix and reads row ``l`` as model layer ``l``.
- ``trtllm`` (``.yaml``, ``.yml``): TensorRT-LLM's ``moe_config.load_balancer`` file:
  ``num_slots``, ``initial_global_assignments`` {layer id (int): [logical expert of each slot]} and
  ``layer_updates_per_iter`` (0: a static placement). Its config model forbids other keys.
- ``vllm`` (``.json`` with ``format="vllm"``): ``{"num_layers", "num_physical_experts",
  "num_logical_experts", "ep_size", "layer_ids", "physical_to_logical_map": [MoE layers, P]}``. vLLM
  reads no placement file (its ``EplbState`` keeps ``physical_to_logical_map [MoE layers, P]`` in
  memory); this layout carries that map, dense layers left out, each row keyed by its model layer id.

Slots are numbered globally in every format: slot ``p`` is on rank ``p // (P / G)``. Every write
is atomic (``eplb.io.atomic``).
"""

from __future__ import annotations

import json
import operator
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Any

import torch

from eplb._version import __version__
from eplb.errors import EplbError
from eplb.io.atomic import PathLike, atomic_write
from eplb.io.decode import content_errors, import_yaml, placement_loader, require_file
from eplb.placement import EMPTY_SLOT, Placement

PLACEMENT_FORMATS = ("eplb", "sglang", "trtllm", "vllm")
EPLB_FORMAT = "eplb.placement"

_SUFFIX_FORMAT = {".json": "eplb", ".pt": "sglang", ".yaml": "trtllm", ".yml": "trtllm"}
_SGLANG_KEY = "physical_to_logical_map"
_TRTLLM_KEYS = ("num_slots", "initial_global_assignments", "layer_updates_per_iter")
_VLLM_KEYS = ("num_layers", "num_physical_experts", "num_logical_experts", "ep_size", "layer_ids", _SGLANG_KEY)


@dataclass(frozen=True, eq=False)
class PlacementFile:
    """A placement read from a file, with what the file says about it.

    Attributes:
        placement: the ``Placement``.
        layer_ids: ``[L]``: the model layer id of each row (``range(L)`` where the file has none).
        format: one of ``PLACEMENT_FORMATS``.
        metadata: the caller's metadata of an eplb file (or TensorRT-LLM's other settings).
    """

    placement: Placement
    layer_ids: list[int]
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)


def write_placement(
    placement: Placement,
    path: PathLike,
    format: str | None = None,
    *,
    layer_ids: Sequence[int] | None = None,
    metadata: Mapping[str, Any] | None = None,
    model_layers: int | None = None,
    updates_per_iter: int = 0,
    dense_rows: Sequence[int] = (),
) -> Path:
    """Write ``placement`` for an engine (or for eplb) atomically; return the path written.

    Args:
        placement: the placement, ``phy2log [L, P]``.
        path: the destination; its directory must exist.
        format: one of ``PLACEMENT_FORMATS``; by default inferred from the extension
            (``.json``: eplb, ``.pt``: sglang, ``.yaml``/``.yml``: trtllm).
        layer_ids: ``[L]``: the model layer id of each row, default ``range(L)``. TensorRT-LLM keys
            its assignments by them, eplb and vllm files record them; SGLang takes row ``l`` as
            layer ``l``, so it accepts only ``range(L)``.
            Without them an engine file is written with a warning: its rows are taken as layers
            ``0..L-1``, which is wrong when the statistics left out dense layers.
        metadata: JSON-ready facts to keep in an eplb file (e.g. the statistics file and the
            cluster spec); the engines' formats have no room for it and leave it out.
        model_layers: the model's layer count, MTP layers included, when known. SGLang wants one
            row per model layer, so a different row count is refused. TensorRT-LLM looks up every MoE
            layer id, so the layers after the last row (MTP) get the linear placement (slot ``p``
            holds expert ``p mod E``, the engines' own start).
        updates_per_iter: TensorRT-LLM's ``layer_updates_per_iter``: 0 keeps the placement static,
            ``n > 0`` lets its online balancer update ``n`` layers per iteration from it.
        dense_rows: rows of layers without routed experts (``LoadFile.dense``). The vllm format
            leaves them out: vLLM's map has one row per MoE layer. Other formats keep every row.
    """
    path = Path(path)
    fmt = _resolve_format(path, format)
    if layer_ids is None and fmt != "eplb":
        warnings.warn(
            f"no layer ids: {path.name} ({fmt}) takes its {placement.num_layers} rows as model layers "
            f"0..{placement.num_layers - 1}, wrong if the statistics left out dense or MTP layers (the engine "
            "loads them without a word); use statistics with layer ids (layer_ids=)",
            UserWarning, stacklevel=2,
        )
    ids = _check_layer_ids(layer_ids, placement.num_layers)
    if fmt == "vllm" and len(dense_rows):
        dense = set(dense_rows)
        keep = [row for row in range(placement.num_layers) if row not in dense]
        if not keep:
            raise EplbError("every row is a dense layer (no load); plan on statistics that record the MoE layers")
        placement = Placement(placement.phy2log[keep], placement.num_experts, placement.num_gpus,
                              placement.num_nodes, algorithm=placement.algorithm)
        ids = [ids[row] for row in keep]
    if model_layers is not None:
        placement, ids = _fit_model_layers(placement, ids, fmt, model_layers)
    if not (isinstance(updates_per_iter, int) and 0 <= updates_per_iter <= placement.num_layers):
        raise EplbError(f"updates_per_iter must be an integer in [0, {placement.num_layers}] (the MoE layers), "
                        f"got {updates_per_iter!r}; 0 keeps the placement static")
    if updates_per_iter and fmt != "trtllm":
        raise EplbError(f"updates_per_iter is a TensorRT-LLM setting; the {fmt} format has no room for it: drop it")
    metadata = dict(metadata or {}, **({"updates_per_iter": updates_per_iter} if fmt == "trtllm" else {}))
    data = _ENCODERS[fmt](placement, path, ids, metadata)
    return atomic_write(path, data)


def _fit_model_layers(placement: Placement, ids: list[int], fmt: str, model_layers: int) -> tuple[Placement, list[int]]:
    """The placement and layer ids to write for a model of ``model_layers`` layers (see ``write_placement``)."""
    if not (isinstance(model_layers, int) and model_layers >= 1):
        raise EplbError(f"model_layers must be a positive integer, got {model_layers!r}; pass num_hidden_layers")
    if max(ids) >= model_layers:
        raise EplbError(f"layer id {max(ids)} is beyond a model of {model_layers} layers; pass the model's "
                        "layer count (MTP layers included)")
    if fmt == "sglang" and placement.num_layers != model_layers:
        raise EplbError(
            f"SGLang wants one row per model layer: {model_layers} rows, these are {placement.num_layers}; plan on "
            "statistics with a row per model layer (SGLang's own dumps), or write the trtllm or eplb format"
        )
    extra = list(range(max(ids) + 1, model_layers))
    if fmt != "trtllm" or not extra:
        return placement, ids
    linear = (torch.arange(placement.num_slots) % placement.num_experts).expand(len(extra), -1)
    phy2log = torch.cat([placement.phy2log, linear])
    return Placement(phy2log, placement.num_experts, placement.num_gpus, placement.num_nodes,
                     algorithm=placement.algorithm), ids + extra


def read_placement(path: PathLike, *, num_gpus: int | None = None, num_nodes: int | None = None) -> Placement:
    """Read a placement file of any of ``PLACEMENT_FORMATS`` (see ``read_placement_file``)."""
    return read_placement_file(path, num_gpus=num_gpus, num_nodes=num_nodes).placement


def read_placement_file(
    path: PathLike, *, num_gpus: int | None = None, num_nodes: int | None = None
) -> PlacementFile:
    """Read a placement file: eplb or vLLM JSON, SGLang init file (JSON or ``.pt``), TensorRT-LLM YAML.

    Args:
        path: the file, read by its content (a torch save, JSON, else YAML) whatever its extension.
        num_gpus: ``G``. SGLang and TensorRT-LLM files do not record it, so it is required for
            them; for eplb and vLLM files it is checked against the file when given.
        num_nodes: ``N``, likewise (default: the eplb file's, else 1).

    The number of logical experts of an SGLang or TensorRT-LLM file is the largest id plus one
    (every expert has a replica in a valid placement).
    """
    path = Path(path)
    require_file(path, "placement file")
    with content_errors(path, "placement file", "write it with eplb.io.write_placement"):
        return _decode(path, num_gpus, num_nodes)


def _decode(path: Path, num_gpus: int | None, num_nodes: int | None) -> PlacementFile:
    try:
        data = placement_loader(path)(path)
    except OSError as exc:
        raise EplbError(f"cannot read {path} ({exc.strerror or exc}); check it is readable") from None
    other = isinstance(data, Mapping) and ("phy2log" in data or _SGLANG_KEY in data)  # eplb/SGLang/vLLM content
    if (isinstance(data, Mapping) and "initial_global_assignments" in data) or (
            path.suffix.lower() in (".yaml", ".yml") and not other):
        return _decode_trtllm(data, path, num_gpus, num_nodes)
    if isinstance(data, Mapping):
        if "phy2log" in data:
            return _decode_eplb(data, path, num_gpus, num_nodes)
        if _SGLANG_KEY in data:
            decode = _decode_vllm if "num_logical_experts" in data else _decode_sglang
            return decode(data, path, num_gpus, num_nodes)
        if "logical_count" in data:
            raise EplbError(
                f"{path} holds expert loads (logical_count), not a placement; read it with eplb.io.read_load"
            )
    found = ", ".join(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
    raise EplbError(
        f"{path} is not a placement file (found {found}); expected phy2log (eplb), physical_to_logical_map "
        "(SGLang, vLLM) or a TensorRT-LLM .yaml with initial_global_assignments"
    )


# Writing -------------------------------------------------------------------------------------


def _resolve_format(path: Path, fmt: str | None) -> str:
    if fmt is None:
        fmt = _SUFFIX_FORMAT.get(path.suffix.lower())
        if fmt is None:
            raise EplbError(
                f"cannot infer the placement format of {path} from its extension; pass format= one of "
                f"{', '.join(PLACEMENT_FORMATS)}, or name it .json (eplb), .pt (sglang) or .yaml (trtllm)"
            )
    if fmt not in PLACEMENT_FORMATS:
        raise EplbError(f"unknown placement format {fmt!r}; choose one of: {', '.join(PLACEMENT_FORMATS)}")
    return fmt


def _check_layer_ids(layer_ids: Sequence[int] | None, num_layers: int) -> list[int]:
    if layer_ids is None:
        return list(range(num_layers))
    try:
        ids = [operator.index(i) for i in layer_ids]
    except TypeError:
        raise EplbError(f"layer ids must be integers, got {list(layer_ids)!r}; pass the model's layer ids") from None
    if len(ids) != num_layers:
        raise EplbError(f"{len(ids)} layer ids for a placement of {num_layers} layers; pass one id per row")
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise EplbError(
            f"layer ids must be distinct and non-negative, got {brief_ids(ids)}; pass the model's layer ids"
        )
    return ids


def _require_full(placement: Placement, engine: str) -> None:
    empty = int((placement.phy2log == EMPTY_SLOT).sum())
    if empty:
        raise EplbError(
            f"{engine} cannot load a placement with empty slots ({empty} here); use an algorithm that fills "
            "every slot, or for round_robin a slot count that is a multiple of the expert count"
        )


def _encode_eplb(placement: Placement, path: Path, ids: list[int], metadata: dict[str, Any]) -> bytes:
    body = placement.to_dict()
    phy2log = body.pop("phy2log")
    return _dump_json({
        "format": EPLB_FORMAT,
        "eplb_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **body,
        "layer_ids": ids,
        "metadata": metadata,
        "phy2log": phy2log,
    })


def _encode_sglang(placement: Placement, path: Path, ids: list[int], metadata: dict[str, Any]) -> bytes:
    _require_full(placement, "SGLang")
    if ids != list(range(placement.num_layers)):
        raise EplbError(
            f"SGLang reads row l as model layer l, but these rows are layers {brief_ids(ids)}; plan on statistics "
            "with one row per model layer (as SGLang records them), or write the trtllm or eplb format"
        )
    suffix = path.suffix.lower()
    if suffix == ".pt":
        buffer = BytesIO()
        torch.save({_SGLANG_KEY: placement.phy2log.clone()}, buffer)
        return buffer.getvalue()
    if suffix == ".json":
        return _dump_json({_SGLANG_KEY: placement.phy2log.tolist()})
    raise EplbError(
        f"SGLang reads --init-expert-location from a .json or .pt file (it parses any other value as inline "
        f"JSON); name {path.name} *.json or *.pt"
    )


def _encode_trtllm(placement: Placement, path: Path, ids: list[int], metadata: dict[str, Any]) -> bytes:
    yaml = import_yaml()
    _require_full(placement, "TensorRT-LLM")

    class FlowListDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # libyaml's emitter is ~10x faster
        """Lists in flow style: one line per layer, as TensorRT-LLM's own generator writes them."""

    FlowListDumper.add_representer(
        list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
    )
    config = {
        "num_slots": placement.num_slots,
        "initial_global_assignments": dict(zip(ids, placement.phy2log.tolist(), strict=False)),
        "layer_updates_per_iter": metadata["updates_per_iter"],
    }
    # A width no row reaches: one line per layer (libyaml takes a C int, not infinity).
    return yaml.dump(config, Dumper=FlowListDumper, sort_keys=False, width=1 << 30).encode("utf-8")


def _encode_vllm(placement: Placement, path: Path, ids: list[int], metadata: dict[str, Any]) -> bytes:
    _require_full(placement, "vLLM")
    return _dump_json({
        "num_layers": placement.num_layers,
        "num_physical_experts": placement.num_slots,
        "num_logical_experts": placement.num_experts,
        "ep_size": placement.num_gpus,
        "layer_ids": ids,
        _SGLANG_KEY: placement.phy2log.tolist(),
    })


_ENCODERS: dict[str, Callable[[Placement, Path, list[int], dict[str, Any]], bytes]] = {
    "eplb": _encode_eplb,
    "sglang": _encode_sglang,
    "trtllm": _encode_trtllm,
    "vllm": _encode_vllm,
}


def _dump_json(data: Mapping[str, Any]) -> bytes:
    """JSON with one line per key and one line per row of a matrix: readable, and small diffs."""

    def encode(value: Any) -> str:
        if isinstance(value, list) and value and all(isinstance(row, list) for row in value):
            return "[\n" + ",\n".join(f"    {json.dumps(row)}" for row in value) + "\n  ]"
        return json.dumps(value, default=_jsonable, allow_nan=False)

    try:
        body = ",\n".join(f"  {json.dumps(key)}: {encode(value)}" for key, value in data.items())
    except (TypeError, ValueError) as exc:
        raise EplbError(
            f"metadata cannot be written as JSON ({exc}); pass strings, finite numbers, lists and dicts"
        ) from None
    return ("{\n" + body + "\n}\n").encode("utf-8")


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # tensors, numpy arrays and numpy scalars
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serializable")


def brief_ids(ids: list[int]) -> str:
    """Layer ids for a message: all of them up to 8, else the first four and the last."""
    return str(ids) if len(ids) <= 8 else f"[{', '.join(map(str, ids[:4]))}, ..., {ids[-1]}]"


# Reading -------------------------------------------------------------------------------------


def _decode_eplb(
    data: Mapping[str, Any], path: Path, num_gpus: int | None, num_nodes: int | None
) -> PlacementFile:
    placement = Placement.from_dict(dict(data))
    _check_matches(path, "num_gpus", num_gpus, placement.num_gpus)
    _check_matches(path, "num_nodes", num_nodes, placement.num_nodes)
    ids = _check_layer_ids(data.get("layer_ids"), placement.num_layers)
    return PlacementFile(placement, ids, "eplb", dict(data.get("metadata") or {}))


def _decode_sglang(
    data: Mapping[str, Any], path: Path, num_gpus: int | None, num_nodes: int | None
) -> PlacementFile:
    extra = [str(k) for k in data if k != _SGLANG_KEY]
    if extra:
        raise EplbError(
            f"{path} has keys besides {_SGLANG_KEY} ({', '.join(extra)}), which SGLang rejects; remove them"
        )
    placement = _from_map(data[_SGLANG_KEY], path, "SGLang", num_gpus, num_nodes)
    return PlacementFile(placement, list(range(placement.num_layers)), "sglang")


def _decode_trtllm(data: Any, path: Path, num_gpus: int | None, num_nodes: int | None) -> PlacementFile:
    if not isinstance(data, Mapping) or not isinstance(data.get("initial_global_assignments"), Mapping):
        raise EplbError(
            f"{path} has no initial_global_assignments mapping; a TensorRT-LLM load-balancer file maps each "
            "layer id to the expert of every slot"
        )
    extra = [str(k) for k in data if k not in _TRTLLM_KEYS]
    if extra:
        raise EplbError(
            f"{path} has keys TensorRT-LLM's MoeLoadBalancerConfig rejects ({', '.join(extra)}); "
            f"keep only {', '.join(_TRTLLM_KEYS)}"
        )
    try:
        assignments = {int(k): v for k, v in data["initial_global_assignments"].items()}
    except (TypeError, ValueError):
        raise EplbError(f"{path} has layer keys that are not integers; key each assignment by its layer id") from None
    ids = sorted(assignments)
    num_slots = data.get("num_slots")
    for layer in ids:
        if num_slots is not None and len(assignments[layer]) != num_slots:
            raise EplbError(
                f"layer {layer} of {path} assigns {len(assignments[layer])} slots but num_slots is {num_slots}; "
                "give every layer one expert per slot"
            )
    placement = _from_map([assignments[layer] for layer in ids], path, "TensorRT-LLM", num_gpus, num_nodes)
    return PlacementFile(placement, ids, "trtllm", {"layer_updates_per_iter": data.get("layer_updates_per_iter", 0)})


def _decode_vllm(
    data: Mapping[str, Any], path: Path, num_gpus: int | None, num_nodes: int | None
) -> PlacementFile:
    missing = [k for k in _VLLM_KEYS if k not in data]
    if missing:
        raise EplbError(
            f"{path} lacks {', '.join(missing)} of the vllm placement layout; write it with write_placement"
        )
    _check_matches(path, "num_gpus", num_gpus, int(data["ep_size"]))
    placement = _from_map(
        data[_SGLANG_KEY], path, "vLLM", int(data["ep_size"]), num_nodes, num_experts=int(data["num_logical_experts"])
    )
    for key, actual in (("num_layers", placement.num_layers), ("num_physical_experts", placement.num_slots)):
        if int(data[key]) != actual:
            raise EplbError(f"{path} says {key}={data[key]} but its map gives {actual}; fix the file")
    return PlacementFile(placement, _check_layer_ids(data["layer_ids"], placement.num_layers), "vllm")


def _from_map(
    phy2log: Any,
    path: Path,
    engine: str,
    num_gpus: int | None,
    num_nodes: int | None,
    num_experts: int | None = None,
) -> Placement:
    if num_gpus is None:
        raise EplbError(f"{path} ({engine} format) does not record the GPU count; pass num_gpus")
    try:
        table = torch.as_tensor(phy2log)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EplbError(
            f"the map of {path} is not a [layers, slots] table of expert ids ({exc}); fix the file"
        ) from None
    if table.numel() and int(table.min()) < 0:
        raise EplbError(f"{path} has negative expert ids; {engine} needs a logical expert in every slot")
    if num_experts is None:
        num_experts = int(table.max()) + 1 if table.numel() else 0
    return Placement(table, num_experts=num_experts, num_gpus=num_gpus, num_nodes=num_nodes or 1)


def _check_matches(path: Path, name: str, given: int | None, stored: int) -> None:
    if given is not None and given != stored:
        raise EplbError(f"{path} was written for {name}={stored}, not {given}; plan again for {given}, or use it with "
                        f"{stored}")
