"""Grouped expert-GEMM time of one rank, measured on a CUDA GPU: the table behind the simulator's time model.

One rank runs its activated routed experts as one grouped GEMM per projection (SwiGLU expert:
``x @ w13`` ``[2I, H]``, ``silu(gate) * up``, ``@ w2`` ``[H, I]``), for DeepSeek-V3 shapes (H = 7168,
I = 2048), over a grid of (activated experts on the rank, tokens per activated expert). bf16 always; fp8
e4m3 (row-wise scales) when the device and torch support it, else the file says why not.

The kernels, best first: ``torch._grouped_mm`` / ``torch._scaled_grouped_mm`` (one launch per projection,
all experts); otherwise a batched ``bmm`` (bf16) or one ``torch._scaled_mm`` per expert (fp8). Each point
is captured in a CUDA graph and replayed, so launch overhead is paid once per graph as in a serving engine
that captures its steps; the median of several timed replays is kept.

    python benchmarks/bench_gemm_cost.py --out src/eplb/data/gemm_cost_h200.json

Writes JSON: ``device``, ``torch``, ``command``, ``date``, ``hidden``, ``intermediate``, ``experts``,
``tokens_per_expert``, and per dtype ``time_us [experts][tokens]`` with the kernel used.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

EXPERTS = [1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
FP8 = torch.float8_e4m3fn


def _act(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _offsets(experts: int, tokens: int, device: torch.device) -> torch.Tensor:
    return torch.arange(1, experts + 1, device=device, dtype=torch.int32) * tokens


def bf16_runner(experts: int, tokens: int, hidden: int, inter: int, kernel: str) -> Callable[[], torch.Tensor]:
    dev = torch.device("cuda")
    x = torch.randn(experts * tokens, hidden, device=dev, dtype=torch.bfloat16)
    # [G, K, N] views of row-major [G, N, K] weights: the layout the grouped kernels want.
    w13 = (torch.randn(experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) * 0.02).transpose(1, 2)
    w2 = (torch.randn(experts, hidden, inter, device=dev, dtype=torch.bfloat16) * 0.02).transpose(1, 2)
    offs = _offsets(experts, tokens, dev)
    if kernel == "grouped_mm":
        return lambda: torch._grouped_mm(_act(torch._grouped_mm(x, w13, offs=offs)), w2, offs=offs)
    xb = x.view(experts, tokens, hidden)
    return lambda: torch.bmm(_act(torch.bmm(xb, w13)), w2)


def _quant_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise fp8 e4m3 quantisation: ``(q, scale)`` with ``t ~ q * scale``."""
    scale = t.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(FP8).max
    return (t / scale).to(FP8), scale


def fp8_runner(experts: int, tokens: int, hidden: int, inter: int, kernel: str) -> Callable[[], torch.Tensor]:
    dev = torch.device("cuda")
    x, sx = _quant_rows(torch.randn(experts * tokens, hidden, device=dev))
    w13, s13 = _quant_rows(torch.randn(experts, 2 * inter, hidden, device=dev) * 0.02)
    w2, s2 = _quant_rows(torch.randn(experts, hidden, inter, device=dev) * 0.02)
    offs = _offsets(experts, tokens, dev)
    if kernel == "scaled_grouped_mm":
        def run() -> torch.Tensor:
            h = torch._scaled_grouped_mm(x, w13.transpose(1, 2), sx.squeeze(-1), s13.squeeze(-1), offs=offs,
                                         out_dtype=torch.bfloat16)
            a, sa = _quant_rows(_act(h))
            return torch._scaled_grouped_mm(a, w2.transpose(1, 2), sa.squeeze(-1), s2.squeeze(-1), offs=offs,
                                            out_dtype=torch.bfloat16)
        return run

    def run_loop() -> torch.Tensor:
        outs = []
        for e in range(experts):
            rows = slice(e * tokens, (e + 1) * tokens)
            h = torch._scaled_mm(x[rows], w13[e].t(), scale_a=sx[rows], scale_b=s13[e].t(), out_dtype=torch.bfloat16)
            a, sa = _quant_rows(_act(h))
            outs.append(torch._scaled_mm(a, w2[e].t(), scale_a=sa, scale_b=s2[e].t(), out_dtype=torch.bfloat16))
        return torch.cat(outs)
    return run_loop


def time_us(run: Callable[[], torch.Tensor], replays: int) -> float:
    """Median microseconds of one replay of ``run`` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    del graph
    return statistics.median(times)


def pick_kernel(make: Callable[..., Callable[[], torch.Tensor]], kernels: list[str], hidden: int,
                inter: int) -> tuple[str | None, str]:
    """The first kernel that runs, captures and matches the per-expert reference on a small case."""
    notes = []
    for kernel in kernels:
        try:
            torch.manual_seed(0)
            out = make(2, 16, hidden, inter, kernel)()
            torch.manual_seed(0)
            ref = make(2, 16, hidden, inter, kernels[-1])()
            out, ref = out.float().reshape(-1, hidden), ref.float().reshape(-1, hidden)
            err = float((out - ref).norm() / ref.norm().clamp(min=1e-12))
            if err > 0.05:
                notes.append(f"{kernel}: relative error {err:.3f} against {kernels[-1]}")
                continue
            time_us(make(2, 16, hidden, inter, kernel), 2)
            return kernel, "; ".join(notes)
        except (RuntimeError, AttributeError, TypeError, NotImplementedError) as exc:
            notes.append(f"{kernel}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return None, "; ".join(notes)


def measure(make: Callable[..., Callable[[], torch.Tensor]], kernel: str, hidden: int, inter: int,
            experts: list[int], tokens: list[int], replays: int) -> list[list[float]]:
    table = []
    for a in experts:
        row = []
        for t in tokens:
            row.append(round(time_us(make(a, t, hidden, inter, kernel), replays), 3))
            torch.cuda.empty_cache()
        table.append(row)
        print(f"  {a:3d} experts: " + " ".join(f"{v:9.1f}" for v in row), flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gemm_cost.json"))
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--experts", type=lambda s: [int(x) for x in s.split(",")], default=EXPERTS)
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=TOKENS)
    parser.add_argument("--replays", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemm_cost.py needs a CUDA GPU: it measures the GEMM times the simulator's time model uses")
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    result = {
        "device": device,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "what": "median microseconds of one rank's routed-expert SwiGLU (x@w13, silu*mul, @w2), all activated "
                "experts with the same tokens each, captured in a CUDA graph; fp8 re-quantises the activation "
                "row-wise between the GEMMs with unfused torch ops",
        "experts": args.experts,
        "tokens_per_expert": args.tokens,
        "dtypes": {},
        "skipped": {},
    }
    for dtype, make, kernels in (("bf16", bf16_runner, ["grouped_mm", "bmm"]),
                                 ("fp8", fp8_runner, ["scaled_grouped_mm", "scaled_mm_loop"])):
        kernel, notes = pick_kernel(make, kernels, args.hidden, args.intermediate)
        if kernel is None:
            result["skipped"][dtype] = notes or "no kernel ran"
            print(f"{dtype}: skipped ({result['skipped'][dtype]})", flush=True)
            continue
        print(f"{dtype}: {kernel}" + (f" (not used: {notes})" if notes else ""), flush=True)
        table = measure(make, kernel, args.hidden, args.intermediate, args.experts, args.tokens, args.replays)
        result["dtypes"][dtype] = {"kernel": kernel, "not_used": notes, "time_us": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
