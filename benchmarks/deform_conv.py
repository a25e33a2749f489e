"""Forward + backward time of torchvision ``deform_conv2d`` vs the native version vs a plain conv3×3.

All three run side by side in one process on the same inputs (B×C×S×S, 3×3 kernel, padding 1, DCNv2
mask), interleaved round by round so machine noise hits them alike; the median over rounds is reported,
as wall time and as process CPU time (all threads; steadier than wall time on a shared machine).

    python benchmarks/deform_conv.py [--batch 32] [--channels 64] [--sizes 22 8] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from segvlm.layers.deform_conv import deform_conv2d_native


def _fwd_bwd(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_size(batch: int, channels: int, size: int, rounds: int, warmup: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(device).requires_grad_()
    weight = (torch.randn(channels, channels, 3, 3, generator=g) * 0.05).to(device).requires_grad_()
    bias = torch.zeros(channels, device=device, requires_grad=True)
    offset = (torch.randn(batch, 18, size, size, generator=g) * 2).to(device).requires_grad_()
    mask = torch.rand(batch, 9, size, size, generator=g).to(device).requires_grad_()

    fns = {
        "torchvision": lambda: tv_deform_conv2d(x, offset, weight, bias, padding=1, mask=mask),
        "native": lambda: deform_conv2d_native(x, offset, weight, bias, padding=1, mask=mask),
        "conv3x3": lambda: F.conv2d(x, weight, bias, padding=1),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            t, c = _fwd_bwd(fn, device)
            for p in (x, weight, bias, offset, mask):
                p.grad = None
            if r >= warmup:
                times[name].append(t)
                cpu[name].append(c)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    cpu_ms = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    return {
        "batch": batch,
        "channels": channels,
        "size": size,
        "ms": {k: round(v, 3) for k, v in ms.items()},
        "cpu_ms": {k: round(v, 3) for k, v in cpu_ms.items()},
        "native_over_conv_cpu": round(cpu_ms["native"] / cpu_ms["conv3x3"], 2),
        "torchvision_over_conv_cpu": round(cpu_ms["torchvision"] / cpu_ms["conv3x3"], 2),
        "torchvision_over_conv": round(ms["torchvision"] / ms["conv3x3"], 2),
        "native_over_conv": round(ms["native"] / ms["conv3x3"], 2),
        "torchvision_over_native": round(ms["torchvision"] / ms["native"], 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[22, 8])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with all figures")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    results = []
    for size in args.sizes:
        r = bench_size(args.batch, args.channels, size, args.rounds, args.warmup, device)
        results.append(r)
        ms = r["ms"]
        print(
            f"B={r['batch']} C={r['channels']} {size}x{size} fwd+bwd ms: torchvision {ms['torchvision']:.2f}"
            f"  native {ms['native']:.2f}  conv3x3 {ms['conv3x3']:.2f}  |  torchvision/conv "
            f"{r['torchvision_over_conv']:.1f}x  native/conv {r['native_over_conv']:.1f}x  "
            f"torchvision/native {r['torchvision_over_native']:.1f}x  (CPU time: torchvision/conv "
            f"{r['torchvision_over_conv_cpu']:.1f}x  native/conv {r['native_over_conv_cpu']:.1f}x)"
        )
    if args.json:
        print(json.dumps({"device": str(device), "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
