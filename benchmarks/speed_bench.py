"""Training throughput of the course's models: the precision rule's choice against fp32 NCHW eager, side by side.

    python benchmarks/speed_bench.py [--threads 1] [--batch 128] [--steps 8] [--models resnet18_narrow ...]

For each model, one training step (forward, cross-entropy, backward, AdamW) on a random batch at 32 px is timed in
fp32 contiguous NCHW (kdutils' path with amp=False) and in what kdutils.precision.precision_for chooses for this
device (bf16 autocast + channels_last on a CPU with native bf16), in interleaved rounds within one process; the
figure per variant is the fastest round (least inflated by other processes). Beside the images/s it reports the
achieved training GFLOP/s (3 x the forward FLOPs of kdutils.runtime.forward_flops per image) against this machine's
measured fp32 and bf16 matmul peaks (1024 x 1024, same threads): how far from the physical limit each variant runs.
Prints one JSON object on stdout.

This measures the bare training step with the precision rule applied by hand. Issue 20's targets are stated for
`fit` with its defaults (>= 2.5x a plain fp32 eager loop for the teacher, >= 1.6x for the student); until `fit`
applies the rule itself, `speedup` here is the ceiling those targets are measured against.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from kdutils.models import build_model
from kdutils.precision import autocast, batch_to, describe, model_to, precision_for, record
from kdutils.runtime import forward_flops

MODELS = ("resnet18_narrow", "resnet10_narrow", "resnet9")


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 20) -> float:
    """Best-of-repeats GFLOP/s of an n x n matmul in `dtype` on the CPU."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def step_timer(name: str, precision, batch: int, seed: int = 0):
    """A closure running one training step of `name` under `precision`, returning its seconds."""
    torch.manual_seed(seed)
    device = torch.device(precision.device_type)
    model = model_to(build_model(name, 10, image_size=32), device, precision).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = batch_to(torch.randn(batch, 3, 32, 32, device=device), precision)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> float:
        """One forward-backward-update; its wall seconds."""
        start = time.perf_counter()
        with autocast(precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def bench(models: list[str], batch: int, steps: int, rounds: int) -> dict:
    """Images/s and GFLOP/s per model for fp32 NCHW and the precision rule's choice, with their ratio."""
    plain, chosen = precision_for("cpu", amp=False), precision_for("cpu")
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    out = {}
    for name in models:
        timers = {"fp32_nchw": step_timer(name, plain, batch), "default": step_timer(name, chosen, batch)}
        for timer in timers.values():       # warm-up: oneDNN primitive creation, allocator
            timer(), timer()
        best = {key: float("inf") for key in timers}
        for _ in range(rounds):
            for key, timer in timers.items():
                best[key] = min(best[key], min(timer() for _ in range(steps)))
        train_flops = 3 * forward_flops(name, 10, 32) * batch
        row = {key: {"images_per_s": round(batch / s, 1), "train_gflops": round(train_flops / s / 1e9, 1)}
               for key, s in best.items()}
        row["fp32_nchw"]["of_fp32_peak"] = round(row["fp32_nchw"]["train_gflops"] / peaks["fp32"], 3)
        peak = peaks["bf16"] if chosen.dtype == torch.bfloat16 else peaks["fp32"]
        row["default"]["of_its_peak"] = round(row["default"]["train_gflops"] / peak, 3)
        row["speedup"] = round(best["fp32_nchw"] / best["default"], 2)
        out[name] = row
    return {"matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()}, "models": out,
            "default_precision": record(chosen)}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="steps per round (the fastest counts)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = bench(args.models, args.batch, args.steps, args.rounds)
    result.update(threads=args.threads, batch=args.batch, torch=torch.__version__, machine=platform.processor()
                  or platform.machine(), precision_text=describe(precision_for("cpu")))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
