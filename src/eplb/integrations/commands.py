"""CLI commands of the engine adapters (wired into ``eplb`` by ``eplb.cli``)."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import TypeVar

import click

from eplb.integrations import sglang, trtllm, vllm
from eplb.io.placements import read_placement_file
from eplb.placement import Placement

T = TypeVar("T")


def output_options(fn: Callable[..., T]) -> Callable[..., T]:
    """The engine options of ``eplb plan -o``: ``--model-layers`` and ``--updates-per-iter``."""
    fn = click.option("--updates-per-iter", type=click.IntRange(min=0), default=0, show_default=True,
                      help="TensorRT-LLM layer_updates_per_iter (0: static placement).")(fn)
    return click.option("--model-layers", type=click.IntRange(min=1),
                        help="The model's layer count, MTP included: SGLang files must have this many rows; "
                             "TensorRT-LLM files get every MoE layer up to it.")(fn)


def after_write(path: str, file_format: str, placement: Placement) -> str | None:
    """What to print after writing a placement file: for SGLang, the server flags that load it as written."""
    if file_format != "sglang":
        return None
    return "SGLang flags: " + shlex.join(sglang.server_args(placement, path))


@click.command("sglang-args")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--ep-size", type=int, help="EP size; required for SGLang files (they do not record it).")
def sglang_args(path: str, ep_size: int | None) -> None:
    """Print the SGLang server flags that load the placement file PATH as it is."""
    file = read_placement_file(path, num_gpus=ep_size)
    if file.format != "sglang":
        raise click.ClickException(f"{path} is a {file.format} file, which SGLang rejects; write it with "
                                   "`eplb plan ... -o FILE.pt` (or --format sglang)")
    click.echo(shlex.join(sglang.server_args(file.placement, path)))


@click.command("check")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--engine", type=click.Choice(["sglang", "trtllm", "vllm"]), default="sglang", show_default=True)
@click.option("--model-layers", type=click.IntRange(min=1), required=True,
              help="The model's num_hidden_layers (TensorRT-LLM: plus its MTP layers).")
@click.option("--ep-size", type=click.IntRange(min=1), required=True, help="The server's EP size.")
@click.option("--dense-layers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Leading layers without routed experts (DeepSeek-V3: 3); trtllm and vllm have no map for them.")
@click.option("--experts", type=click.IntRange(min=1), help="The model's routed experts (checked when given).")
@click.option("--redundant-experts", type=click.IntRange(min=0),
              help="sglang --ep-num-redundant-experts / vllm num_redundant_experts (checked when given).")
def check(path: str, engine: str, model_layers: int, ep_size: int, dense_layers: int, experts: int | None,
          redundant_experts: int | None) -> None:
    """Refuse the placement file PATH when ENGINE would reject it or apply it to the wrong layers or slots."""
    file = read_placement_file(path, num_gpus=ep_size)
    if engine == "sglang":
        sglang.check(file.placement, model_layers=model_layers, ep_size=ep_size, num_experts=experts,
                     redundant_experts=redundant_experts)
    elif engine == "trtllm":
        trtllm.check(file, model_layers=model_layers, ep_size=ep_size, dense_layers=dense_layers, num_experts=experts)
    else:
        vllm.check(file, model_layers=model_layers, ep_size=ep_size, dense_layers=dense_layers, num_experts=experts,
                   redundant_experts=redundant_experts)
    spare = file.placement.num_slots - file.placement.num_experts
    click.echo(f"{path}: fits {engine} with {model_layers} layers on EP size {ep_size} ({spare} redundant slots)")


COMMANDS = (sglang_args, check)
