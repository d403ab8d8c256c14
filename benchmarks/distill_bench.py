"""Seconds per epoch of ce, hinton_kd and feature_kd on the CPU-scale pair, with the teacher cache built first.

    python benchmarks/distill_bench.py [--data PATH.npz] [--repeats 3] [--threads 1] [--teacher-layers 5 6 7 8]

Teacher resnet18_narrow, student resnet10_narrow, the shared CIFAR-10 subset (../shared/data/cifar10-subset.npz
relative to the project root). The teacher's features and logits are cached before timing (build time reported
separately), every method is warmed up on a small slice, then the methods are timed in interleaved rounds within one
process; the per-method figure is the fastest epoch over the rounds (fit's epoch seconds: the training loop plus the
test-set evaluation, which is the same for every method). The minimum is the figure least inflated by other
processes on a shared machine; the medians are reported beside it. Prints one JSON object on stdout (logs go to stderr).
Targets: feature_kd / ce <= 1.25 and hinton_kd / ce <= 1.10; with `--methods all` (every registered method), every
method <= 2 x ce. The teacher's weights do not change the timing, so it
is left untrained; the teacher layers default to deep ones, as KQ picks them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from kdutils.data import load_dataset
from kdutils.distill import REGISTRY, distill, distill_loss
from kdutils.layers import standard_layers
from kdutils.models import build_model
from kdutils.train import default_device, seed_everything

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
TEACHER, STUDENT = "resnet18_narrow", "resnet10_narrow"
METHODS = ("ce", "hinton_kd", "feature_kd")
TARGETS = {"ratio_feature_kd": 1.25, "ratio_hinton_kd": 1.10}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset .npz (default: the shared CIFAR-10 subset)")
    p.add_argument("--per-class", type=int, default=None, help="keep this many training images per class")
    p.add_argument("--teacher-layers", type=int, nargs=4, default=[5, 6, 7, 8], help="teacher layers of feature_kd")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (interleaved over the methods)")
    p.add_argument("--warmup-images", type=int, default=512, help="size of the warm-up slice")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="methods to time (default: ce hinton_kd feature_kd); 'all' = every registered method")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 is far steadier on a busy machine")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Build the caches, warm up, time the methods; return the report."""
    if not args.data.exists():
        raise SystemExit(f"no dataset at {args.data}; pass --data PATH.npz (x_train, y_train, x_test, y_test).")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    data = load_dataset(args.data, per_class=args.per_class, progress=False)
    seed_everything(0)
    teacher = build_model(TEACHER, data.num_classes, data.image_size).eval().requires_grad_(False)
    common = dict(teacher_name=TEACHER, lr=0.0075, epochs=1, seed=0, batch_size=args.batch_size, progress=False,
                  device=device)
    methods = list(REGISTRY) if args.methods == ["all"] else args.methods
    if "ce" not in methods:
        methods = ["ce", *methods]
    layers = {m: list(args.teacher_layers) if REGISTRY[m].layers not in ("", "standard") else None for m in methods}
    cache: dict = {}

    # 1. teacher cache for the full train split (features for feature_kd, logits for hinton_kd), timed separately
    cache_report = {}
    for method in ("feature_kd", "hinton_kd"):
        t0 = time.perf_counter()
        with distill_loss(teacher, build_model(STUDENT, data.num_classes, data.image_size), data, method,
                          teacher_layers=layers[method] or [], cache=cache, device=device,
                          student_layers=standard_layers(STUDENT) if layers[method] else [],
                          batch_size=args.batch_size, progress=False):
            pass
        entries = [v for k, v in cache.items() if isinstance(v, dict) and "tensors" in v and
                   (k[-1] == "logits") == (method == "hinton_kd")]     # one entry per target (built in one pass)
        cache_report["features" if method == "feature_kd" else "logits"] = {
            "seconds": round(entries[0]["seconds"], 2), "megabytes": round(sum(e["megabytes"] for e in entries), 1),
            "device": entries[0]["device"], "wall_seconds": round(time.perf_counter() - t0, 2)}

    # 2. warm-up on a slice (its own small cache), so first-call costs land outside the timed rounds
    n = min(args.warmup_images, data.num_train)
    warm = dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n], x_test=data.x_test[:256],
                               y_test=data.y_test[:256])
    for method in methods:
        distill(teacher, STUDENT, warm, method, teacher_layers=layers[method], cache=cache, **common)

    # 3. interleaved timed rounds on the full split
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for method in methods:
            t0 = time.perf_counter()
            history = distill(teacher, STUDENT, data, method, teacher_layers=layers[method], cache=cache, **common)
            runs[method].append({"epoch_seconds": round(history[0]["seconds"], 3),
                                 "call_seconds": round(time.perf_counter() - t0, 3)})
    per_epoch = {m: min(r["epoch_seconds"] for r in runs[m]) for m in methods}
    medians = {m: round(statistics.median(r["epoch_seconds"] for r in runs[m]), 3) for m in methods}
    ratios = {f"ratio_{m}": per_epoch[m] / per_epoch["ce"] for m in ("feature_kd", "hinton_kd") if m in methods}
    return {
        "device": str(device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "data": str(args.data), "num_train": data.num_train, "num_test": int(len(data.y_test)),
        "batch_size": args.batch_size, "teacher": TEACHER, "student": STUDENT,
        "teacher_layers": list(args.teacher_layers), "student_layers": standard_layers(STUDENT),
        "teacher_cache": cache_report,
        "seconds_per_epoch": {m: round(v, 3) for m, v in per_epoch.items()},
        "median_seconds_per_epoch": medians,
        "ratio_to_ce": {m: round(per_epoch[m] / per_epoch["ce"], 3) for m in methods},
        "median_ratio_to_ce": {m: round(medians[m] / medians["ce"], 3) for m in methods},
        "rounds": runs,
        **{k: round(v, 3) for k, v in ratios.items()},
        "targets": {**{k: v for k, v in TARGETS.items() if k in ratios}, "every_method_ratio_to_ce": 2.0},
        "meets_targets": all(ratios[k] <= v for k, v in TARGETS.items() if k in ratios)
        and all(per_epoch[m] <= 2.0 * per_epoch["ce"] for m in methods),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON report on stdout."""
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):    # training logs go to stderr; stdout is the JSON object only
        report = run(args)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
