"""Readers of recorded expert loads: every supported file becomes one ``LoadFile``.

Formats are picked by extension (``.json .csv .npy .npz .pt .pth .safetensors``; other names by
content), then by what the file holds. ``LoadFile.source`` names the layout found:

- ``sglang``: SGLang's expert-distribution recorder dump, ``{"logical_count": [T, L, E] or [L, E], ...}``
  as ``.pt`` (``--expert-distribution-recorder-mode stat``) or JSON (the statistics form of
  ``--init-expert-location``). One row per model layer, dense layers all zero. eplb's own recorder
  dumps (``eplb.io.dumps.save_eplb``) carry their loads under the same key and read the same way; their
  format version is checked.
- ``trtllm``: TensorRT-LLM expert statistics, one ``[E]`` tensor per ``"{iteration}_{layer}"`` key
  (``rank*.safetensors`` of ``EXPERT_STATISTIC_PATH``); a folder of them is summed over ranks.
- ``layers``: ``{"layer_3": {"activations": [E], ...}, ...}`` (DeepSeek-V3 MMLU counts); layers without
  an entry (the dense ones) become zero rows, so row ``l`` is model layer ``l``.
- ``domains``: ``{"layers": [0, 7, 15], "domains": {name: {"topk_counts": [L][E]}}}`` (OLMoE and
  Mixtral routing counts); each domain is one step of the history, in sorted order.
- ``array``: a bare ``[L, E]`` or ``[T, L, E]`` array: a JSON list, a CSV (one row per layer, one
  column per expert, optional header), an ``.npy``, or one entry of a JSON or ``.pt`` dict, an
  ``.npz`` or a safetensors file (the only entry, a known key such as ``load``, or the one selected).

A file with several parts (the domains of an OLMoE file, the entries of a dict or archive) takes
a selector: ``read_load("olmoe_expert_counts.json#c4")`` is ``read_load(..., domain="c4")``. ``#`` is
used because ``:`` appears in Windows paths; a file whose real name contains ``#`` is read as is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eplb.cluster import MAX_LAYERS, is_count
from eplb.errors import EplbError
from eplb.io.atomic import PathLike
from eplb.io.decode import LOADERS, content_errors, load_safetensors, sniff
from eplb.io.dumps import DUMP_FORMAT, DUMP_VERSION
from eplb.loads import as_history, dense_layers

# Keys taken as the load when a dict or archive holds several entries and none is selected.
LOAD_KEYS = ("load", "loads", "expert_load", "expert_loads", "counts", "expert_counts", "tokens_per_expert")

_LAYER_KEY = re.compile(r"layer_(\d+)")
_ITERATION_LAYER_KEY = re.compile(r"(\d+)_(\d+)")
_RANK_FILE = re.compile(r"rank\d+\.safetensors")


@dataclass(frozen=True, eq=False)
class LoadFile:
    """Expert loads read from a file.

    Attributes:
        load: float64 ``[T, L, E]``: tokens routed to each logical expert, per step (recorder
            window, iteration or domain; ``T = 1`` for a single total), layer row and expert.
        layer_ids: ``[L]``: the model's layer id of each row.
        dense: rows with no load in any step (dense layers, e.g. DeepSeek-V3's layers 0-2).
        source: the layout found (see the module docstring).
        path: the file read.
        domains: ``[T]``: the workload of each step, when the file names them (OLMoE domains).
        metadata: scalar facts the file records besides the counts (model, top_k, rank, ...).
        has_layer_ids: whether the file says which model layer each row is (SGLang dumps, per-layer
            and per-domain JSON with ``layers``, TensorRT-LLM statistics); without them ``layer_ids``
            is ``range(L)``, which is wrong when the rows leave out dense or MTP layers.
    """

    load: torch.Tensor
    layer_ids: list[int]
    dense: list[int]
    source: str
    path: str = ""
    domains: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    has_layer_ids: bool = False

    @property
    def num_steps(self) -> int:
        return self.load.shape[0]

    @property
    def num_layers(self) -> int:
        return self.load.shape[1]

    @property
    def num_experts(self) -> int:
        return self.load.shape[2]


@dataclass
class _Parsed:
    load: Any  # anything as_history accepts
    source: str
    layer_ids: list[int] | None = None
    domains: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    # Row l is model layer l by the layout itself (SGLang dumps, layer_N keys), without a list of ids.
    rows_are_layers: bool = False


def read_load(path: PathLike, *, domain: str | None = None) -> LoadFile:
    """Read recorded expert loads from a statistics file (or a TensorRT-LLM statistics folder).

    Args:
        path: the file; ``FILE#NAME`` selects part ``NAME`` of it, like ``domain``.
        domain: the part to read of a file with several: an OLMoE/Mixtral domain (default: all
            of them, one step each), or an entry of a dict, ``.npz`` or safetensors file.

    Returns:
        A ``LoadFile`` whose ``load`` is validated float64 ``[T, L, E]``.

    Raises EplbError for a missing or unreadable file, an unknown layout, an unknown part, or
    loads that are not a finite, non-negative ``[L, E]`` / ``[T, L, E]`` array.
    """
    file, part = _split_part(path, domain)
    if not file.exists():
        raise EplbError(f"statistics file {file} does not exist; check the path")
    with content_errors(file, "statistics file", "pass expert loads in one of the layouts of eplb.io.read_load"):
        try:
            if file.is_dir():
                parsed = _from_folder(file, part)
            else:
                suffix = file.suffix.lower()
                loader = LOADERS[suffix if suffix in LOADERS else sniff(file)]
                parsed = _from_data(loader(file), file, part)
        except OSError as exc:
            raise EplbError(f"cannot read {file} ({exc.strerror or exc}); check it is readable") from None
        history = as_history(parsed.load, what=str(file))
    layer_ids = list(range(history.shape[1])) if parsed.layer_ids is None else parsed.layer_ids
    if len(layer_ids) != history.shape[1]:
        raise EplbError(
            f"{file} lists {len(layer_ids)} layer ids for {history.shape[1]} rows of counts; "
            "give one layer id per row"
        )
    return LoadFile(
        load=history,
        layer_ids=layer_ids,
        dense=dense_layers(history).nonzero().flatten().tolist(),
        source=parsed.source,
        path=str(file),
        domains=parsed.domains,
        metadata=parsed.metadata,
        has_layer_ids=parsed.layer_ids is not None or parsed.rows_are_layers,
    )


def _split_part(path: PathLike, domain: str | None) -> tuple[Path, str | None]:
    text = os.fspath(path)
    if "#" not in text or Path(text).exists():
        return Path(text), domain
    head, _, name = text.rpartition("#")
    if "/" in name or os.sep in name:  # the '#' belongs to a folder name
        return Path(text), domain
    if not name:
        raise EplbError(f"{text} ends with '#' but names no part; write FILE#NAME or drop the '#'")
    if domain is not None and domain != name:
        raise EplbError(f"{text} selects {name!r} but domain={domain!r}; select the part one way only")
    return Path(head), name


def _from_folder(folder: Path, part: str | None) -> _Parsed:
    # rank{r}.safetensors only: TensorRT-LLM may write other rank* files (raw per-token data) beside them.
    files = sorted(f for f in folder.glob("rank*.safetensors") if _RANK_FILE.fullmatch(f.name))
    if not files:
        raise EplbError(
            f"{folder} is a folder without TensorRT-LLM statistics (rank*.safetensors); pass a statistics file"
        )
    # Each rank counts the tokens it routed; the sum over ranks is the global load.
    total: dict[str, torch.Tensor] = {}
    for file in files:
        for key, counts in load_safetensors(file).items():
            counts = counts.to(torch.float64)
            if key in total and total[key].shape != counts.shape:
                raise EplbError(
                    f"{file.name} in {folder} counts {counts.numel()} experts for {key} but an earlier rank "
                    f"{total[key].numel()}; pass the statistics of one run"
                )
            total[key] = total[key] + counts if key in total else counts
    return _from_data(total, folder, part)


def _from_data(data: Any, file: Path, part: str | None) -> _Parsed:
    if isinstance(data, Mapping):
        return _from_mapping(data, file, part)
    _no_part(part, file)
    return _Parsed(data, "array")


def _from_mapping(data: Mapping[str, Any], file: Path, part: str | None) -> _Parsed:
    keys = [str(k) for k in data]
    if isinstance(data.get("format"), str) and data["format"] == DUMP_FORMAT:
        _check_dump(data, file)
    if "logical_count" in data:
        return _sglang(data, file, part)
    if "domains" in data:
        return _domains(data, file, part)
    if keys and all(_LAYER_KEY.fullmatch(k) for k in keys):
        return _per_layer(data, file, part)
    if keys and all(_ITERATION_LAYER_KEY.fullmatch(k) for k in keys):
        return _iterations(data, file, part)
    if "physical_count" in data:
        raise EplbError(
            f"{file} holds slot loads only (physical_count, an eplb dump written without phy2log); convert them "
            "with eplb.runtime.recorder.to_logical(physical_count, phy2log) or dump again with phy2log="
        )
    if "physical_to_logical_map" in data or "phy2log" in data:
        raise EplbError(f"{file} holds a placement, not expert loads; read it with eplb.io.read_placement")
    if "records" in data:
        raise EplbError(
            f"{file} is an SGLang per-pass dump (records); record with --expert-distribution-recorder-mode stat, "
            "whose dump holds logical_count"
        )
    return _entry(data, file, part)


def _check_dump(data: Mapping[str, Any], file: Path) -> None:
    """What the keys of an eplb recorder dump do not say: its version, and whether it is whole."""
    if data.get("version") != DUMP_VERSION:
        raise EplbError(
            f"{file} is eplb dump version {data.get('version')}, this eplb reads version {DUMP_VERSION}; "
            "upgrade eplb or dump again"
        )
    if "logical_count" not in data and "physical_count" not in data:
        raise EplbError(f"{file} lacks physical_count; it is truncated or not written by eplb, dump again")


def _no_part(part: str | None, file: Path) -> None:
    if part is not None:
        raise EplbError(f"{file} holds a single load, so there is no part {part!r} to select; drop '#{part}'")


def _entry(data: Mapping[str, Any], file: Path, part: str | None) -> _Parsed:
    names = ", ".join(map(str, data)) or "nothing"
    if part is not None:
        if part not in data:
            raise EplbError(f"{file} has no entry {part!r}; choose one of: {names}")
        key = part
    elif len(data) == 1:
        key = next(iter(data))
    else:
        known = [k for k in LOAD_KEYS if k in data]
        if not known:
            raise EplbError(
                f"{file} holds {names}, none of them a known load key ({', '.join(LOAD_KEYS)}); "
                f"select one with {file}#NAME"
            )
        key = known[0]
    # The entry may itself be any layout (e.g. {"prefill": {"logical_count": ...}, "decode": ...}).
    parsed = _from_data(data[key], file, None)
    parsed.metadata = {"entry": str(key), **parsed.metadata}
    return parsed


def _sglang(data: Mapping[str, Any], file: Path, part: str | None) -> _Parsed:
    _no_part(part, file)
    history = as_history(data["logical_count"], what=f"logical_count of {file}")
    # SGLang dumps its whole zero-filled circular buffer: an all-zero step is a slot never written,
    # not a window without traffic.
    recorded = history.sum(dim=(1, 2)) > 0
    if not recorded.any():
        raise EplbError(f"{file} recorded no expert activations; record while the server handles traffic")
    facts = {k: v for k, v in data.items() if k != "logical_count" and isinstance(v, (int, float, str))}
    # SGLang records a row per model layer; eplb's own dumps count the EP layers' rows only.
    return _Parsed(history if recorded.all() else history[recorded], "sglang", metadata=facts,
                   rows_are_layers=data.get("format") != DUMP_FORMAT)


def _domains(data: Mapping[str, Any], file: Path, part: str | None) -> _Parsed:
    if "layer_pairs" in data:
        raise EplbError(
            f"{file} holds cross-layer expert pairs, not per-expert loads; read the matching *_expert_counts.json"
        )
    domains = data["domains"]
    if not isinstance(domains, Mapping) or not domains:
        raise EplbError(f"'domains' of {file} must map each domain name to its counts; fix the file")
    if part is not None and part not in domains:
        raise EplbError(f"{file} has no domain {part!r}; choose one of: {', '.join(sorted(domains))}")
    names = sorted(domains) if part is None else [part]
    steps = []
    for name in names:
        entry = domains[name]
        if not isinstance(entry, Mapping) or "topk_counts" not in entry:
            raise EplbError(
                f"domain {name!r} of {file} has no topk_counts; give each domain topk_counts [layers][experts]"
            )
        step = as_history(entry["topk_counts"], what=f"topk_counts of domain {name!r} in {file}")
        if steps and step.shape != steps[0].shape:
            raise EplbError(
                f"domain {name!r} of {file} has shape {tuple(step.shape[1:])} but {names[0]!r} has "
                f"{tuple(steps[0].shape[1:])}; every domain must count the same layers and experts"
            )
        steps.append(step)
    layers = data.get("layers")
    facts = {k: data[k] for k in ("model", "num_experts", "top_k") if k in data}
    return _Parsed(torch.cat(steps), "domains", None if layers is None else _layer_ids(layers, file), names, facts)


def _layer_ids(value: Any, file: Path) -> list[int]:
    """A file's list of model layer ids, validated: distinct integers in ``[0, MAX_LAYERS)``."""
    if not isinstance(value, (list, tuple)) or not all(_is_layer_id(i) for i in value) or len(set(value)) < len(value):
        raise EplbError(f"the layer ids of {file} must be a list of distinct integers in [0, {MAX_LAYERS}), "
                        f"got {str(value)[:80]}; give one model layer id per row")
    return [int(i) for i in value]


def _is_layer_id(value: Any) -> bool:
    return is_count(value, minimum=0) and int(value) < MAX_LAYERS


def _per_layer(data: Mapping[str, Any], file: Path, part: str | None) -> _Parsed:
    _no_part(part, file)
    rows = {}
    for key, entry in data.items():
        counts = entry.get("activations") if isinstance(entry, Mapping) else entry
        if counts is None:
            raise EplbError(f"{key} of {file} has no activations; give each layer_N entry activations [experts]")
        row = as_history([counts], what=f"{key} of {file}")
        if np.ndim(counts) != 1:
            raise EplbError(f"{key} of {file} has nested activations; give each layer_N entry one flat list [experts]")
        layer = int(_LAYER_KEY.fullmatch(str(key)).group(1))
        if not _is_layer_id(layer):
            raise EplbError(f"{key} of {file} is above the size guard of {MAX_LAYERS} layers; "
                            "key each entry by its model layer id")
        rows[layer] = row[0, 0]
    widths = sorted({row.numel() for row in rows.values()})
    if len(widths) > 1:
        raise EplbError(f"the layers of {file} count {widths} experts; record every layer with the same experts")
    ids = sorted(rows)
    # Engines index layers by model layer id: layers without an entry (the dense ones) get zero rows.
    load = torch.zeros(ids[-1] + 1, widths[0], dtype=torch.float64)
    load[ids] = torch.stack([rows[i] for i in ids])
    return _Parsed(load, "layers", rows_are_layers=True)


def _iterations(data: Mapping[str, Any], file: Path, part: str | None) -> _Parsed:
    _no_part(part, file)
    counts = {tuple(int(x) for x in _ITERATION_LAYER_KEY.fullmatch(k).groups()): v for k, v in data.items()}
    big = [layer for _, layer in counts if not _is_layer_id(layer)]
    if big:
        raise EplbError(f"{file} has layer id {big[0]}, above the size guard of {MAX_LAYERS} layers; "
                        "key each entry iteration_layer by its model layer id")
    iterations = sorted({i for i, _ in counts})
    layers = sorted({layer for _, layer in counts})
    missing = [(i, layer) for i in iterations for layer in layers if (i, layer) not in counts]
    if missing:
        raise EplbError(
            f"{file} lacks {len(missing)} iteration_layer entries (e.g. {missing[0][0]}_{missing[0][1]}); "
            "pass statistics that cover every layer in every recorded iteration"
        )
    try:
        load = torch.stack([
            torch.stack([torch.as_tensor(counts[i, layer], dtype=torch.float64) for layer in layers])
            for i in iterations
        ])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EplbError(f"{file} has per-layer counts of different lengths ({exc}); record every layer alike") from None
    return _Parsed(load, "trtllm", layers, metadata={"iterations": [iterations[0], iterations[-1]]})
