"""A few steps of the reference EP MoE layer, before and after an EPLB placement, checked against the dense layer.

    torchrun --nproc-per-node 2 examples/ep_moe.py            # CPU: gloo
    torchrun --nproc-per-node 4 examples/ep_moe.py --waterfill --dispatch weighted

On GPUs (one per rank) it uses NCCL. Every rank builds the same random checkpoint of a small
DeepSeek-style model (grouped router with a skewed correction bias, so a few experts are hot; a
shared expert), serves its own uneven batch with the ``linear`` placement while recording the
expert load, plans an ``eplb`` placement from the recorded load, loads the new local expert
weights, switches the layers to it and serves again. Per step it prints the routed entries each
rank computed (their max/mean: what the placement balances) and the largest difference to
``dense_moe`` over all ranks.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import eplb
from eplb import ExpertLoadRecorder, WaterfillConfig
from eplb.runtime.moe import EPMoE, EPMoEConfig, dense_moe, local_slot_weights, random_checkpoint

Weights = dict[str, torch.Tensor]


def add_model_args(parser: argparse.ArgumentParser, tokens: int) -> None:
    """The model and batch sizes, shared with the other examples."""
    parser.add_argument("--layers", type=int, default=2, help="MoE layers")
    parser.add_argument("--experts", type=int, default=16, help="logical routed experts")
    parser.add_argument("--slots-per-rank", type=int, default=None,
                        help="physical slots per rank (default: the experts over the ranks, rounded up, plus 2)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=tokens, help="tokens per rank and step (mean)")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, tokens=512)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per placement")
    # Static dispatch keeps a token on its own GPU's replica, so the load follows each rank's batch size.
    parser.add_argument("--dispatch", choices=("static", "hash", "weighted"), default="hash")
    parser.add_argument("--waterfill", action="store_true", help="run the shared expert on less loaded ranks")
    return parser.parse_args()


def num_slots(args: argparse.Namespace, world: int) -> int:
    """All physical slots of the group: ``--slots-per-rank`` on each of ``world`` ranks."""
    per_rank = args.slots_per_rank or -(-args.experts // world) + 2
    return per_rank * world


def init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's group: NCCL with one GPU per rank where CUDA is available, gloo on the CPU otherwise.
    Returns this rank, the group size and the device to compute on."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def main() -> None:
    args = parse()
    rank, world, device = init_distributed()
    config = EPMoEConfig(
        hidden=args.hidden, intermediate=args.intermediate, num_experts=args.experts, top_k=args.top_k,
        router="grouped", num_groups=4, topk_groups=2, routed_scaling_factor=2.5, shared_expert=True,
        dispatch=args.dispatch, waterfill=args.waterfill,
    )
    slots = num_slots(args, world)
    checkpoints = []
    for layer in range(args.layers):
        router, experts, shared = random_checkpoint(config, seed=layer)
        # A skewed correction bias makes a few experts hot, so the placement has something to balance.
        router["bias"] = 0.3 * torch.linspace(1, -1, args.experts)[torch.randperm(args.experts)]
        checkpoints.append(tuple(to_device(part, device) for part in (router, experts, shared)))

    placement = eplb.plan(torch.ones(args.layers, args.experts), num_gpus=world, num_slots=slots,
                          algorithm="linear")
    recorder = ExpertLoadRecorder(args.layers, slots, window=args.steps, device=device)
    # Weighted dispatch needs recorded loads even for the first placement: start from a uniform guess.
    load = torch.ones(args.layers, args.experts)
    waterfill = WaterfillConfig(min_batch=0) if args.waterfill else None
    layers = [
        EPMoE(config, placement, layer, local_slot_weights(experts, placement, rank, layer), router, shared,
              load=load, recorder=recorder, waterfill_config=waterfill)
        for layer, (router, experts, shared) in enumerate(checkpoints)
    ]
    _serve(layers, checkpoints, recorder, args, "linear", rank, world, device)

    load = recorder.logical_loads(placement, recorder.global_loads())  # [T, L, E], summed over the ranks
    new = eplb.plan(load, num_gpus=world, num_slots=slots, algorithm="eplb", current=placement)
    for layer, (_, experts, _) in zip(layers, checkpoints, strict=True):
        # In an engine the migration code moves the weights in place and commits; then the tables follow.
        layer.set_placement(new, load, weights=local_slot_weights(experts, new, rank, layer.layer))
    recorder.reset()
    _serve(layers, checkpoints, recorder, args, "eplb", rank, world, device)
    dist.destroy_process_group()


def _serve(
    layers: list[EPMoE],
    checkpoints: list[tuple[Weights, Weights, Weights | None]],
    recorder: ExpertLoadRecorder,
    args: argparse.Namespace,
    name: str,
    rank: int,
    world: int,
    device: torch.device,
) -> None:
    """``args.steps`` steps of every layer on this rank's batch; rank 0 prints the group's numbers."""
    for step in range(args.steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        # Uneven batches: data-parallel ranks rarely hold the same number of tokens.
        m = int(args.tokens * (0.5 + torch.rand((), generator=gen)))
        x = torch.randn(m, args.hidden, generator=gen).to(device)
        entries = torch.zeros(world, len(layers), dtype=torch.int64, device=device)
        diff = torch.zeros((), device=device)
        for layer, (router, experts, shared) in zip(layers, checkpoints, strict=True):
            out = layer(x)
            entries[rank, layer.layer] = layer.last_slot_tokens.sum()
            want = dense_moe(x, router, experts, shared, layer.config, layer=layer.layer)
            diff = torch.maximum(diff, (out - want).abs().max() if m else diff)
        recorder.step()
        dist.all_reduce(entries)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if rank == 0:
            per_rank = entries.sum(1).float()
            print(f"[{name}] step {step}: entries computed per rank {entries.sum(1).tolist()} "
                  f"(max/mean {float(per_rank.max() / per_rank.mean()):.3f}), max |EP - dense| {float(diff):.2e}",
                  flush=True)


def to_device(part: Weights | None, device: torch.device) -> Weights | None:
    return None if part is None else {name: tensor.to(device) for name, tensor in part.items()}


if __name__ == "__main__":
    main()
