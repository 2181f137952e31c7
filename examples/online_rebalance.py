"""The closed loop: EP MoE layers serve a shifting workload while the async rebalancer moves their weights.

    torchrun --nproc-per-node 2 examples/online_rebalance.py                 # CPU: gloo
    torchrun --nproc-per-node 4 examples/online_rebalance.py --steps 120     # GPUs: NCCL, one per rank

Every rank builds the same random checkpoint (a grouped router with a skewed correction bias, so a few
experts are hot), starts from the ``linear`` placement, and serves. Half way through, the bias changes
(a workload switch: other experts get hot). The ``Rebalancer`` records, decides every ``--every`` steps,
and moves at most ``--max-moves`` slots per layer, one layer per step, while serving goes on; each
committed layer switches its dispatch tables in the same step. Rank 0 prints the routed entries per
rank (max/mean: what the placement balances) and the largest difference to the dense layer, which
stays at rounding level throughout, and the rebalancer logs one line per rebalance.
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.distributed as dist
from ep_moe import (  # the sibling example (the script's folder is on sys.path)
    add_model_args,
    init_distributed,
    num_slots,
    to_device,
)

import eplb
from eplb import ExpertLoadRecorder
from eplb.planning.online import OnlineConfig
from eplb.runtime.migration import ExpertWeights
from eplb.runtime.moe import EPMoE, EPMoEConfig, dense_moe, local_slot_weights, random_checkpoint
from eplb.runtime.rebalancer import Rebalancer, RebalancerConfig


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, tokens=256)
    parser.add_argument("--steps", type=int, default=60, help="steps in all (the workload switches half way)")
    parser.add_argument("--every", type=int, default=10, help="steps between rebalancing decisions")
    parser.add_argument("--max-moves", type=int, default=4, help="changed slots per layer per rebalance")
    return parser.parse_args()


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    rank, world, device = init_distributed()
    config = EPMoEConfig(hidden=args.hidden, intermediate=args.intermediate, num_experts=args.experts, top_k=4,
                         router="grouped", num_groups=4, topk_groups=2, routed_scaling_factor=2.5,
                         shared_expert=True, dispatch="hash")
    gen = torch.Generator().manual_seed(0)
    # Two workloads: the correction bias that makes some experts hot, before and after the switch.
    biases = [0.6 * torch.linspace(1, -1, args.experts)[torch.randperm(args.experts, generator=gen)] for _ in "ab"]
    checkpoints = [random_checkpoint(config, seed=layer) for layer in range(args.layers)]
    checkpoints = [tuple(to_device(part, device) for part in parts) for parts in checkpoints]

    slots = num_slots(args, world)
    start = eplb.plan(torch.ones(args.layers, args.experts), num_gpus=world, num_slots=slots, algorithm="linear")
    weights = ExpertWeights([local_slot_weights(e, start, rank, layer) for layer, (_, e, _) in enumerate(checkpoints)])
    recorder = ExpertLoadRecorder(args.layers, slots, window=args.every, device=device)
    layers = [EPMoE(config, start, layer, weights.tensors(layer), router, shared, recorder=recorder)
              for layer, (router, _, shared) in enumerate(checkpoints)]
    rebalancer = Rebalancer(
        recorder, start, weights,
        config=RebalancerConfig(every=args.every, plan_lag=2, policy=OnlineConfig(window=2, max_moves=args.max_moves)),
        on_commit=lambda layer, placement: layers[layer].set_placement(placement),
    )
    for step in range(args.steps):
        bias = biases[int(step >= args.steps // 2)].to(device)
        x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(step * world + rank))
        x = x.to(device)
        entries = torch.zeros(world, dtype=torch.int64, device=device)
        diff = torch.zeros((), device=device)
        for layer, (router, experts, shared) in zip(layers, checkpoints, strict=True):
            router["bias"].copy_(bias)
            out = layer(x)
            entries[rank] += layer.last_slot_tokens.sum()
            want = dense_moe(x, router, experts, shared, config, layer=layer.layer)
            diff = torch.maximum(diff, (out - want).abs().max())
        recorder.step()
        rebalancer.step()
        dist.all_reduce(entries)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if rank == 0 and step % 5 == 4:
            per_rank = entries.float()
            print(f"step {step + 1}: routed entries per rank max/mean {float(per_rank.max() / per_rank.mean()):.3f}, "
                  f"max |EP - dense| {float(diff):.1e}", flush=True)
    rebalancer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
