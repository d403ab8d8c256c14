"""Cost of distill's `monitor` (gradient conflict and feature distances recorded after every epoch).

Method: the CPU-scale pair (resnet18_narrow -> resnet10_narrow) on the shared CIFAR-10 subset at the `cifar10-cpu`
preset's size (500 images per class minus the 10% validation split: 4,500 training images), `feature_kd_ce` (the
method with the most to measure: distances and the gradient cosine per stage). The teacher cache is built first and
shared. Runs with and without monitoring alternate (`--repeats` rounds of one epoch each), and the figure per
setting is the fastest epoch (fit's epoch seconds: training, test evaluation and, when on, the measurements), the
one least inflated by other processes. Prints one JSON object on stdout (logs go to stderr).
Target: monitor on / off <= 1.10 at the default MONITOR_BATCHES.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from kdutils.data import load_dataset, split_validation
from kdutils.distill import distill
from kdutils.models import build_model
from kdutils.monitor import MONITOR_BATCHES
from kdutils.train import seed_everything

ROOT = Path(__file__).resolve().parents[1]
TEACHER, STUDENT, METHOD = "resnet18_narrow", "resnet10_narrow", "feature_kd_ce"
TARGET = 1.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-subset.npz"))
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=MONITOR_BATCHES, help="fixed batches measured per epoch")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Time one epoch of METHOD with and without monitoring, interleaved."""
    if args.threads:
        torch.set_num_threads(args.threads)
    data, _ = split_validation(load_dataset(args.data, per_class=args.per_class, seed=0), 0.1, 0)
    seed_everything(0)
    teacher = build_model(TEACHER, data.num_classes, data.image_size).eval().requires_grad_(False)
    cache: dict = {}
    common = dict(teacher_layers=[5, 6, 7, 8], teacher_name=TEACHER, epochs=1, lr=0.0075, seed=0, cache=cache,
                  progress=False, device="cpu")
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    with contextlib.redirect_stdout(sys.stderr):
        distill(teacher, STUDENT, data, METHOD, **common)            # builds the cache; warms up
        for _ in range(args.repeats):
            for mode in ("off", "on"):
                history = distill(teacher, STUDENT, data, METHOD, monitor=args.batches if mode == "on" else 0,
                                  **common)
                seconds[mode].append(round(history[0]["seconds"], 3))
    best = {k: min(v) for k, v in seconds.items()}
    ratio = best["on"] / best["off"]
    return {"device": "cpu", "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2), "teacher": TEACHER, "student": STUDENT,
            "method": METHOD, "train_images": data.num_train, "test_images": len(data.y_test),
            "monitor_batches": args.batches, "epoch_seconds": seconds, "fastest_epoch_seconds": best,
            "ratio_on_to_off": round(ratio, 3), "target": TARGET, "meets_target": ratio <= TARGET}


if __name__ == "__main__":
    print(json.dumps(run(parse_args()), indent=2))
