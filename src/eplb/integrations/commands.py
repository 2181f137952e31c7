"""CLI commands of the engine adapters (wired into ``eplb`` by ``eplb.cli``)."""

from __future__ import annotations

import shlex

import click

from eplb.errors import EplbError
from eplb.integrations import sglang
from eplb.io.placements import read_placement, read_placement_file


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
@click.option("--engine", type=click.Choice(["sglang"]), default="sglang", show_default=True)
@click.option("--model-layers", type=int, required=True, help="The model's num_hidden_layers.")
@click.option("--ep-size", type=int, required=True, help="The server's EP size.")
@click.option("--experts", type=int, help="The model's routed experts (checked when given).")
def check(path: str, engine: str, model_layers: int, ep_size: int, experts: int | None) -> None:
    """Refuse the placement file PATH when it does not fit the model and EP group of ENGINE."""
    try:
        placement = read_placement(path, num_gpus=ep_size)
    except EplbError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        sglang.check(placement, model_layers=model_layers, ep_size=ep_size, num_experts=experts)
    except EplbError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{path}: fits {engine} with {model_layers} layers on EP size {ep_size}")


COMMANDS = (sglang_args, check)
