"""Step time of the EP layer under real skewed routing: placements x dispatch x waterfill, and a replayed load
shift with the online rebalancer on and off.

    torchrun --nproc-per-node 4 -m benchmarks.multi_gpu.step_time --out $OUT/step_time.json
    torchrun --nproc-per-node 4 -m benchmarks.multi_gpu.step_time \\
        --loads ../shared/eplb_real_data/sglang-dsv3-ep-stats/prefill_in4096.json --out $OUT/step_time_4096.json
    torchrun --nproc-per-node 2 -m benchmarks.multi_gpu.step_time --small --out /tmp/s.json    # CPU, gloo

The model: ``--layers`` MoE layers of the reference ``EPMoE`` with DeepSeek-V3 expert shapes in bf16 (hidden
7168, intermediate 2048, top-8, one shared expert of 2048), ``--experts`` experts (default 64 per rank, at
most 256) on ``E * 9 / 8`` slots. Routing is real: each layer takes a MoE layer of ``--loads`` (default: the
bundled DeepSeek-V3 MMLU counts; its first ``E`` experts when ``E`` is smaller), and every token draws its 8
distinct experts with probability proportional to those counts. The draw is fed through the layer's own
router: a softmax gate whose row ``e`` is the unit vector ``e`` and an input with +4 on the drawn experts'
coordinates, so the router picks exactly them (hence ``hidden >= experts``). Expert weights are random and
not reloaded per placement: the time depends on the shapes and the routed counts, not on the values.

1. **Placements**: ``linear``, ``deepseek`` and ``eplb`` planned on the same counts, each with the plain
   dispatch (``--base-dispatch``, default ``hash``) or ``weighted``, without or with static waterfill; per
   config the median step time of the slowest rank (a step: every layer's forward on ``--tokens`` tokens per
   rank, between device syncs) and the max/mean over ranks of the expert rows each rank computed (routed
   entries plus shared-expert rows).
2. **Load shift**: ``--shift-steps`` steps start on ``--loads`` with an ``eplb`` placement planned on it;
   half way the routing switches to ``--to`` (default: each layer takes the next layer's counts). Without a
   rebalancer the placement stays; with one (``Rebalancer``, async, a decision every ``--every`` steps,
   ``--max-moves`` per layer) the weights move and each committed layer switches its tables. Per step: the
   slowest rank's time and the rows max/mean; summarised over the second half.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from benchmarks.multi_gpu.common import (
    Group,
    default_slots,
    device_experts,
    finish,
    gathered_max,
    join,
    land,
    parser,
    read_layer_loads,
)
from benchmarks.timing import timed_steps

import eplb
from eplb import ExpertLoadRecorder, WaterfillConfig
from eplb.planning.online import OnlineConfig
from eplb.runtime.migration import ExpertWeights, MigrationConfig
from eplb.runtime.moe import EPMoE, EPMoEConfig
from eplb.runtime.rebalancer import Rebalancer, RebalancerConfig

TOP_K, LIFT = 8, 4.0
VARIANTS = ("plain", "weighted", "waterfill", "weighted+waterfill")


def parse():
    p = parser(__doc__)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=None, help="default: 64 per rank, at most 256")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank and step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per config (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pool", type=int, default=4, help="input batches drawn per layer, cycled over the steps")
    p.add_argument("--loads", default=None, help="loads file (default: the bundled DeepSeek-V3 MMLU counts)")
    p.add_argument("--to", default=None, help="loads file after the shift (default: the next layer's counts)")
    p.add_argument("--placements", default="linear,deepseek,eplb")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--base-dispatch", choices=("static", "hash"), default="hash")
    p.add_argument("--shift-steps", type=int, default=60, help="0: skip the load shift")
    p.add_argument("--every", type=int, default=10, help="steps between the rebalancer's decisions")
    p.add_argument("--max-moves", type=int, default=16, help="slots the rebalancer may change per layer")
    p.add_argument("--min-gain", type=float, default=0.02, help="the rebalancer's least predicted gain to act")
    args = p.parse_args()
    if args.small:
        args.layers, args.experts, args.hidden, args.intermediate, args.tokens = 2, 16, 32, 16, 48
        args.steps, args.warmup, args.pool, args.shift_steps, args.every, args.min_gain = 2, 1, 2, 16, 3, 0.0
    return args


class Inputs:
    """Per layer, ``pool`` input batches ``[M, H]`` whose softmax-gate routing is a per-token draw from ``load``."""

    def __init__(self, load: torch.Tensor, args, group: Group, seed: int) -> None:
        gen = torch.Generator(device=group.device).manual_seed(seed * 7919 + group.rank)
        probs = (load / load.sum(1, keepdim=True)).to(group.device, torch.float32)
        self.batches = []
        for layer in range(load.shape[0]):
            pool = []
            for _ in range(args.pool):
                ids = torch.multinomial(probs[layer].repeat(args.tokens, 1), TOP_K, generator=gen)
                x = 0.1 * torch.randn(args.tokens, args.hidden, device=group.device, generator=gen)
                x.scatter_add_(1, ids, torch.full(ids.shape, LIFT, device=group.device))
                x = x.to(torch.bfloat16)
                # The identity gate's logits are x's first E coordinates: their top-k must be the draw.
                picked = x[:, : probs.shape[1]].float().topk(TOP_K).indices.sort(1).values
                if not torch.equal(picked, ids.sort(1).values):
                    raise SystemExit("the routing input does not pick the drawn experts; report this")
                pool.append(x)
            self.batches.append(pool)

    def __call__(self, layer: int, step: int) -> torch.Tensor:
        return self.batches[layer][step % len(self.batches[layer])]


class Model:
    """The benchmark's layers' weights (random, one set reused by every config) and router."""

    def __init__(self, args, group: Group, slots: int) -> None:
        dev, dtype, h, i = group.device, torch.bfloat16, args.hidden, args.intermediate
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        spr = slots // group.world
        self.weights = [{"w13": device_experts(spr, 2 * i, h, dtype, dev, gen),
                         "w2": device_experts(spr, h, i, dtype, dev, gen)} for _ in range(args.layers)]
        self.shared = {"w13": device_experts(1, 2 * i, h, dtype, dev, gen)[0],
                       "w2": device_experts(1, h, i, dtype, dev, gen)[0]}
        self.router = {"gate": torch.eye(args.experts, h, dtype=dtype, device=dev)}

    def layers(self, args, placement, load, dispatch: str, waterfill: bool, **kwargs) -> list[EPMoE]:
        config = EPMoEConfig(hidden=args.hidden, intermediate=args.intermediate, num_experts=args.experts,
                             top_k=TOP_K, router="softmax", shared_expert=True, dispatch=dispatch,
                             waterfill=waterfill, dtype=torch.bfloat16, seed=args.seed)
        wf = WaterfillConfig() if waterfill else None
        return [EPMoE(config, placement, layer, self.weights[layer], self.router, self.shared, load=load,
                      waterfill_config=wf, **kwargs) for layer in range(args.layers)]


def rows_computed(layers: list[EPMoE], tokens: int) -> torch.Tensor:
    """Expert rows this rank computed in the last step (a device scalar, no host sync): routed entries, plus
    the shared expert's rows (its own tokens without waterfill, the rows sent to its shared slot with it)."""
    local = sum(tokens for layer in layers if layer.balancer is None)
    return sum(layer.last_slot_tokens.sum() for layer in layers) + local


def serve(layers: list[EPMoE], inputs: Callable[[int, int], torch.Tensor], steps: int, group: Group, tokens: int,
          after: Callable[[int], bool] | None = None) -> list[dict]:
    """``steps`` steps; per step the slowest rank's milliseconds and the max/mean over ranks of the rows computed.
    ``inputs(layer, step)`` is a layer's input; ``after(i)`` runs after each step's forwards and returns
    whether a migration was in flight. The "on" run moves the (random stand-in) weights in place; only
    which slot holds which expert matters for the time."""
    rows = torch.zeros(steps, group.world, dtype=torch.float64, device=group.device)

    def step(i: int) -> bool:
        for index, layer in enumerate(layers):
            layer(inputs(index, i))
        rows[i, group.rank] = rows_computed(layers, tokens)
        return after(i) if after is not None else False

    timed = timed_steps(step, steps, group.sync)
    dist.all_reduce(rows)
    ms = gathered_max([t * 1e3 for t, _ in timed], group)
    balance = (rows.max(1).values / rows.mean(1)).tolist()
    return [{"ms": m, "rows_max_over_mean": b, "migrating": busy} for m, b, (_, busy) in zip(ms, balance, timed,
                                                                                          strict=True)]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def placements_part(args, group: Group, model: Model, load: torch.Tensor, slots: int) -> list[dict]:
    inputs = Inputs(load, args, group, seed=1)
    out = []
    for name in args.placements.split(","):
        placement = eplb.plan(load, num_gpus=group.world, num_slots=slots, algorithm=name)
        for variant in args.variants.split(","):
            dispatch = "weighted" if "weighted" in variant else args.base_dispatch
            layers = model.layers(args, placement, load, dispatch, "waterfill" in variant)
            steps = serve(layers, inputs, args.warmup + args.steps, group, args.tokens)[args.warmup :]
            out.append({"placement": name, "variant": variant, "dispatch": dispatch,
                        "step_ms": median([s["ms"] for s in steps]),
                        "rows_max_over_mean": sum(s["rows_max_over_mean"] for s in steps) / len(steps),
                        "planned_max_over_mean": eplb.evaluate(placement, load).summary()["max_over_mean"]})
    return out


def shift_part(args, group: Group, model: Model, before: torch.Tensor, after: torch.Tensor, slots: int) -> dict:
    inputs = [Inputs(before, args, group, seed=2), Inputs(after, args, group, seed=3)]
    half = args.shift_steps // 2

    def shifted(layer: int, step: int) -> torch.Tensor:
        return inputs[int(step >= half)](layer, step)

    start = eplb.plan(before, num_gpus=group.world, num_slots=slots, algorithm="eplb")
    out = {mode: shift_run(args, group, model, start, shifted, rebalance=mode == "on") for mode in ("off", "on")}
    for run in out.values():
        second = run["steps"][half:]
        run["second_half_step_ms"] = median([s["ms"] for s in second])
        run["second_half_rows_max_over_mean"] = sum(s["rows_max_over_mean"] for s in second) / len(second)
    return out


def shift_run(args, group: Group, model: Model, start, inputs: Callable[[int, int], torch.Tensor],
              rebalance: bool) -> dict:
    """The load-shift steps from placement ``start``, with or without the online rebalancer."""
    slots = start.num_slots
    recorder = ExpertLoadRecorder(args.layers, slots, window=args.every, device=group.device)
    layers = model.layers(args, start, None, "hash", False, recorder=recorder)
    rb = None
    if rebalance:
        rb = Rebalancer(recorder, start, ExpertWeights(model.weights), config=RebalancerConfig(
            every=args.every, plan_lag=min(2, args.every - 1),
            policy=OnlineConfig(window=2, max_moves=args.max_moves, min_gain=args.min_gain),
            migration=MigrationConfig(timeout_s=args.timeout_s)),
            on_commit=lambda layer, placement: layers[layer].set_placement(placement))

    def after_step(i: int) -> bool:
        recorder.step()
        if rb is None:
            return False
        busy = rb.migrating
        rb.step()
        return busy or rb.migrating

    steps = serve(layers, inputs, args.shift_steps, group, args.tokens, after_step)
    if rb is not None:
        land(rb)
        rb.close()
    return {"steps": steps, "rebalances": [] if rb is None else [
        {"step": r.step, "moves": r.report.moves, "predicted": [r.decision.before, r.decision.after],
         "realised": r.realised, "error": r.error} for r in rb.rebalances]}


def main() -> None:
    args = parse()
    group = join(args)
    args.experts = args.experts or min(256, 64 * group.world)
    if args.hidden < args.experts:
        raise SystemExit(f"--hidden {args.hidden} < --experts {args.experts}: the routing input needs a "
                         "coordinate per expert; raise --hidden")
    slots = default_slots(args.experts, group.world)
    model = Model(args, group, slots)
    load = read_layer_loads(args.loads, args.layers, args.experts)
    row = {"rank": group.rank, "placements": placements_part(args, group, model, load, slots)}
    if args.shift_steps:
        if args.to is None:
            after = torch.roll(read_layer_loads(args.loads, args.layers + 1, args.experts), -1, 0)[: args.layers]
        else:
            after = read_layer_loads(args.to, args.layers, args.experts)
        row["shift"] = shift_part(args, group, model, load, after, slots)
    finish(group, args, row, summarize, experts=args.experts, slots=slots)


def summarize(rows: list[dict]) -> dict:
    """Every rank holds the same numbers (gathered per step): rank 0's, without the per-step lists."""
    out = {"placements": rows[0]["placements"]}
    if "shift" in rows[0]:
        out["shift"] = {mode: {k: v for k, v in run.items() if k != "steps"} for mode, run in rows[0]["shift"].items()}
    return out


if __name__ == "__main__":
    main()
