"""Training throughput of the course's models: the precision rule's choice against fp32 NCHW eager, side by side.

    python benchmarks/speed_bench.py [--threads 1] [--batch 128] [--steps 4] [--models resnet18_narrow ...]
                                     [--fit-images 2048] [--fit-rounds 2] [--fit-models ...] [--fit-data PATH]
                                     [--no-fit]

For each model, one training step (forward, cross-entropy, backward, AdamW) on a random batch at 32 px is timed in
fp32 contiguous NCHW (kdutils' path with amp=False) and in what kdutils.precision.precision_for chooses for this
device (bf16 autocast + channels_last on a CPU with native bf16), in interleaved rounds within one process; the
figure per variant is the fastest round (least inflated by other processes). Beside the images/s it reports the
achieved training GFLOP/s (3 x the forward FLOPs of kdutils.runtime.forward_flops per image) against this machine's
measured fp32 and bf16 matmul peaks (1024 x 1024, same threads): how far from the physical limit each variant runs.
Prints one JSON object on stdout.

Section "models" is the bare training step with the rule applied by hand: the ceiling. Section "fit" measures what a
learner gets: kdutils.train.fit with its defaults (amp=True: the rule) against a plain fp32 eager loop written here
(AdamW, cross-entropy, kdutils.data.batches, contiguous NCHW, no autocast) over the same images, for the teacher,
the student and resnet9; and the student distilled with feature_kd from the teacher cache against ce, both through
kdutils.distill.distill (teacher layers 5-8; feature_kd's speedup is against the student's plain loop). The data
are the shared CIFAR-10 subset's first --fit-images training images (random uint8 images of 10 classes when the
file is absent), with a 64-image test split so fit's per-epoch evaluation hardly counts; batch --batch, lr 1e-3;
wall seconds of the whole call (time.perf_counter), fastest of --fit-rounds interleaved rounds after one warm-up
each (on the first 256 images; distill's on the full split, filling the teacher cache the timed calls then read).
GFLOP/s as above.
Issue 20's targets: fit >= 2.5x the plain loop for the teacher, >= 1.6x for the student; a feature_kd epoch
<= 1.25x a ce epoch ("targets": value, target, met).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from kdutils.data import Dataset, batches, load_dataset
from kdutils.models import build_model
from kdutils.precision import CPU_BF16_FLAGS, autocast, batch_to, describe, model_to, precision_for, record
from kdutils.runtime import forward_flops

MODELS = ("resnet18_narrow", "resnet10_narrow", "resnet9")
TEACHER, STUDENT = "resnet18_narrow", "resnet10_narrow"
FIT_LR = 1e-3                   # peak LR of every timed fit, plain-loop and distill epoch (speed does not depend on it)
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-subset.npz"


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


def fit_data(path: Path, images: int) -> Dataset:
    """The first `images` training images of the .npz at `path` (random ones when it is absent), 64 test images."""
    if path.exists():
        data = load_dataset(path, progress=False)
    else:
        print(f"{path} not found: timing on random images instead", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (images + 64, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.arange(images + 64) % 10
        data = Dataset("random", x[:images], y[:images], x[images:], y[images:], tuple("abcdefghij"),
                       (0.5,) * 3, (0.25,) * 3)
    return dataclasses.replace(data, x_train=data.x_train[:images], y_train=data.y_train[:images],
                               x_test=data.x_test[:64], y_test=data.y_test[:64])


def plain_fp32_epoch(name: str, data: Dataset, batch: int = 128, lr: float = FIT_LR) -> float:
    """Seconds of one epoch of a plain fp32 NCHW eager loop (AdamW, cross-entropy), no autocast, no layout change."""
    torch.manual_seed(0)
    model = build_model(name, data.num_classes, image_size=data.image_size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start = time.perf_counter()
    for xb, yb in batches(data.x_train, data.y_train, batch, shuffle=True, generator=torch.Generator().manual_seed(0),
                          mean=data.mean, std=data.std):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def fit_epoch(name: str, data: Dataset, batch: int = 128, lr: float = FIT_LR) -> float:
    """Seconds of kdutils.train.fit for one epoch with its defaults (the precision rule), evaluation included."""
    from kdutils.train import fit, seed_everything
    seed_everything(0)
    model = build_model(name, data.num_classes, image_size=data.image_size)
    start = time.perf_counter()
    fit(model, data, epochs=1, lr=lr, batch_size=batch, progress=False, device="cpu")
    return time.perf_counter() - start


def distill_epoch(teacher: torch.nn.Module, method: str, data: Dataset, cache: dict, batch: int = 128) -> float:
    """Seconds of kdutils.distill.distill for one student epoch of `method` (defaults; the teacher cache reused)."""
    from kdutils.distill import distill
    layers = {"teacher_layers": [5, 6, 7, 8]} if method == "feature_kd" else {}
    start = time.perf_counter()
    distill(teacher, STUDENT, data, method, epochs=1, lr=FIT_LR, batch_size=batch, cache=cache,
            progress=False, device="cpu", teacher_name=TEACHER, **layers)
    return time.perf_counter() - start


def fastest(timers: dict[str, Callable[[Dataset], float]], warm: Dataset, data: Dataset, rounds: int
            ) -> dict[str, float]:
    """Each timer once on `warm`, then `rounds` interleaved rounds on `data`: the fastest seconds per timer."""
    for timer in timers.values():
        timer(warm)
    best = {key: float("inf") for key in timers}
    for _ in range(rounds):
        for key, timer in timers.items():
            best[key] = min(best[key], timer(data))
    return best


def bench_fit(models: list[str], data: Dataset, rounds: int, batch: int) -> dict:
    """fit's defaults vs the plain fp32 loop per model; feature_kd vs ce through distill; the targets."""
    from contextlib import redirect_stdout
    warm = dataclasses.replace(data, x_train=data.x_train[:256], y_train=data.y_train[:256])
    n = data.num_train
    out: dict = {"images": n, "test_images": int(len(data.y_test)), "data": data.name, "models": {}}

    def rates(name: str, seconds: float) -> dict:
        """Images/s and training GFLOP/s of `name` over the n images in `seconds`."""
        return {"images_per_s": round(n / seconds, 1),
                "train_gflops": round(3 * forward_flops(name, 10, data.image_size) * n / seconds / 1e9, 1)}

    with redirect_stdout(sys.stderr):                     # fit's epoch lines: logs, not the JSON
        for name in models:
            best = fastest({"plain_fp32": lambda d, m=name: plain_fp32_epoch(m, d, batch),
                            "fit_default": lambda d, m=name: fit_epoch(m, d, batch)}, warm, data, rounds)
            out["models"][name] = {"fit_default": rates(name, best["fit_default"]),
                                   "plain_fp32": rates(name, best["plain_fp32"]),
                                   "speedup": round(best["plain_fp32"] / best["fit_default"], 2)}
        if STUDENT in models:
            torch.manual_seed(0)
            teacher = build_model(TEACHER, data.num_classes, image_size=data.image_size).eval()
            cache: dict = {}        # keyed by the data's content: the warm-up on the full split fills it
            best = fastest({m: lambda d, m=m: distill_epoch(teacher, m, d, cache, batch)
                            for m in ("ce", "feature_kd")}, data, data, rounds)
            plain = out["models"][STUDENT]["plain_fp32"]["images_per_s"]
            out["distill"] = {m: rates(STUDENT, s) for m, s in best.items()}
            out["distill"]["feature_kd_over_ce"] = round(best["feature_kd"] / best["ce"], 3)
            out["distill"]["feature_kd_speedup_over_plain_fp32"] = round(
                out["distill"]["feature_kd"]["images_per_s"] / plain, 2)
    targets = {}
    for key, name, target in (("teacher_speedup", TEACHER, 2.5), ("student_speedup", STUDENT, 1.6)):
        if name in out["models"]:
            value = out["models"][name]["speedup"]
            targets[key] = [value, target, value >= target]
    if "distill" in out:
        value = out["distill"]["feature_kd_over_ce"]
        targets["feature_kd_over_ce"] = [value, 1.25, value <= 1.25]
    out["targets"] = targets
    return out


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and its native-bf16 flags, e.g. 'AMD EPYC (avx512_bf16)' (platform's name off Linux)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in reversed(lines) if ":" in line)   # reversed: CPU 0's values win
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = [flag for flag in CPU_BF16_FLAGS if flag in fields.get("flags", "").split()]
    return f"{fields.get('model name') or platform.machine()} ({', '.join(flags) or 'no native bf16 flag'})"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128, help="batch size of both sections")
    parser.add_argument("--steps", type=int, default=4, help="steps per round (the fastest counts)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--no-fit", action="store_true", help="skip the fit section")
    parser.add_argument("--fit-images", type=int, default=2048, help="training images per fit epoch")
    parser.add_argument("--fit-rounds", type=int, default=2, help="timed fit rounds (the fastest counts)")
    parser.add_argument("--fit-models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--fit-data", type=Path, default=DEFAULT_DATA, help="dataset .npz for the fit section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = bench(args.models, args.batch, args.steps, args.rounds)
    if not args.no_fit:
        result["fit"] = bench_fit(args.fit_models, fit_data(args.fit_data, args.fit_images), args.fit_rounds,
                                  args.batch)
    result.update(threads=args.threads, batch=args.batch, torch=torch.__version__, machine=platform.processor()
                  or platform.machine(), cpu=cpu_name(), precision_text=describe(precision_for("cpu")))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
