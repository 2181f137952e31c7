"""Side-by-side timing of waterfill kernel variants against the one in the package.

A variant is a copy of ``src/eplb/runtime/waterfill/kernel.py`` with a change, kept in a file of
its own (Triton needs a kernel's source file). Each variant is loaded as a separate module,
optionally with module constants overridden (``FILE:NAME=VALUE,...``), and takes the place of the
package's ``waterfill_triton`` while WaterfillBalancer calls are captured, so every variant runs
the same balancers and inputs (``waterfill_balancers``) and timing loop (``timing.time_per_call``,
61 layers per graph). Rounds interleave the variants (``timing.interleaved_medians``), so clock
drift hits all of them alike; the table gives each variant's median over rounds. Outputs are
checked against the torch backend before timing.

    PYTHONPATH=src python benchmarks/ab_waterfill.py VARIANT.py[:NAME=VALUE,...] ... [--rounds 3]

A variant with a ``sync_size(W)`` function gets a ``sync`` buffer of its own, of that size (the
balancer's scratch is sized for the package's kernel); one without uses the balancer's.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from eplb.runtime.waterfill import kernel as package_kernel
from timing import interleaved_medians, meta, time_per_call
from waterfill_balancers import LAYERS, TOKENS, TOP_K, layer_balancers, skewed_topk

# (name, EP size, routed slots, balancer settings): the setting under the default and
# SGLang's rule, the default at other EP sizes, and the fixed-table path (no grid count) as a control.
CONFIGS = [
    ("default EP16", 16, 288, dict(recorded=True)),
    ("batch rule EP16", 16, 288, dict()),
    ("default EP8", 8, 288, dict(recorded=True)),
    ("default EP32", 32, 288, dict(recorded=True)),
    ("default EP64", 64, 320, dict(recorded=True)),
    ("fixed tables EP16", 16, 288, dict(recorded=True, estimate="recorded")),
]


def load_variant(spec: str) -> tuple[str, Callable]:
    """``(label, waterfill_triton)`` of the variant ``FILE[:NAME=VALUE,...]``."""
    path, _, overrides = spec.partition(":")
    module_name = f"waterfill_variant_{abs(hash(spec))}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    if loader is None:
        raise SystemExit(f"error: cannot load {path}: give a Python file")
    module: ModuleType = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module
    loader.loader.exec_module(module)
    for item in filter(None, overrides.split(",")):
        name, _, value = item.partition("=")
        if not hasattr(module, name):
            raise SystemExit(f"error: {path} has no constant {name}")
        setattr(module, name, ast.literal_eval(value))
    own_sync: dict[int, torch.Tensor] = {}

    def run(ids, weights, loads, shared_weight, source, rule, local_only, tables, fixed_tables=False, sync=None):
        if sync is not None and hasattr(module, "sync_size"):
            # Made at a balancer's warm-up call (layer_balancers), before any capture.
            key = sync.data_ptr()
            if key not in own_sync:
                own_sync[key] = torch.zeros(module.sync_size(rule.ep_size), dtype=torch.int64, device=sync.device)
            sync = own_sync[key]
        return module.waterfill_triton(ids, weights, loads, shared_weight, source, rule, local_only, tables,
                                       fixed_tables, sync)

    return Path(spec).name, run


def timer(fn: Callable, balancers: list, ids: torch.Tensor, weights: torch.Tensor) -> Callable[[], float]:
    """Times ``balancers`` cycled over the layers with ``fn`` as the package's kernel."""

    def run() -> float:
        package_kernel.waterfill_triton = fn
        return time_per_call(lambda i: balancers[i % LAYERS].expand_topk(ids, weights), LAYERS)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="FILE[:NAME=VALUE,...]")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    candidates = [("package", package_kernel.waterfill_triton)] + [load_variant(s) for s in args.variants]
    original = package_kernel.waterfill_triton
    results: dict[str, dict[str, float]] = {}
    for config, ep, slots, kw in CONFIGS:
        ids, weights = skewed_topk(TOKENS, slots, "cuda")
        expected = layer_balancers(ep, slots, **kw, backend="torch")[3].expand_topk(ids, weights)
        timers = []
        for label, fn in candidates:
            package_kernel.waterfill_triton = fn
            balancers = layer_balancers(ep, slots, **kw)
            if not all(map(torch.equal, balancers[3].expand_topk(ids, weights), expected)):
                raise SystemExit(f"error: {label} differs from the torch backend on {config}")
            timers.append((label, timer(fn, balancers, ids, weights)))
        results[config] = interleaved_medians(timers, args.rounds)
        package_kernel.waterfill_triton = original
        print(config, "  ".join(f"{label} {us:.3f}" for label, us in results[config].items()), flush=True)
    info = meta(tokens=TOKENS, top_k=TOP_K, rounds=args.rounds)
    print(f"\n{info['device']} (torch {info['torch']}, triton {info['triton']}), {TOKENS}x{TOP_K} tokens, "
          f"{args.rounds} rounds, median us per call")
    print("| input | " + " | ".join(label for label, _ in candidates) + " |")
    print("|---" * (len(candidates) + 1) + "|")
    for config, medians in results.items():
        print(f"| {config} | " + " | ".join(f"{us:.2f}" for us in medians.values()) + " |")


if __name__ == "__main__":
    main()
