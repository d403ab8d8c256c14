"""Accuracy study on the CPU-scale pair: every distillation method against the CE student, over seeds.

    python benchmarks/cifar10_cpu.py --data PATH.npz --seeds 0 1 2 --epochs E [--teacher-epochs E2] [--out DIR]
                                     [--per-class N] [--fitnets] [--threads 1] [--fp32]

Trains the teacher (resnet18_narrow) once, picks its top-4 layers by knowledge quality (kq.layer_qualities +
kq.select_layers), then trains the student (resnet10_narrow) with ce, hinton_kd, feature_kd, feature_kd_ce and
standard_layers (plus fitnets_kd with --fitnets) for each seed, all with the same peak LR, epochs, init and data order.
Writes DIR/results.json and DIR/results.md (final- and best-epoch test accuracy, mean +- std over seeds, teacher
accuracy, seconds per run) through kdutils.results.summarize_runs / results_markdown. Every run is checkpointed in
DIR, so a rerun resumes unfinished runs and skips finished ones. Everything (teacher, KQ, students) trains in the
device's precision (kdutils.precision, recorded in results.json); --fp32 runs it all in plain fp32 NCHW (amp=False),
for comparing the two.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from kdutils import kq
from kdutils.data import load_dataset
from kdutils.distill import distill
from kdutils.layers import standard_layers
from kdutils.models import build_model
from kdutils.models import PEAK_LR
from kdutils.precision import precision_for, record
from kdutils.results import results_markdown, summarize_runs
from kdutils.rundir import write_json_atomic
from kdutils.train import default_device, fit, seed_everything

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
TEACHER, STUDENT = "resnet18_narrow", "resnet10_narrow"
METHODS = ["ce", "hinton_kd", "feature_kd", "feature_kd_ce", "standard_layers"]
KQ_METHODS = ("feature_kd", "feature_kd_ce")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset .npz (default: the shared CIFAR-10 subset)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (one run per method each)")
    p.add_argument("--epochs", type=int, default=15, help="student epochs, every method")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: --epochs)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "cifar10_cpu", help="output and checkpoint folder")
    p.add_argument("--per-class", type=int, default=None, help="keep this many training images per class")
    p.add_argument("--fitnets", action="store_true", help="also train fitnets_kd ('Base FKD')")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 is far steadier on a busy machine")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--fp32", action="store_true", help="plain fp32 NCHW everywhere (amp=False)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train the teacher, select layers by KQ, run every method and seed, write the result table."""
    args = parse_args(argv)
    if not args.data.exists():
        raise SystemExit(f"no dataset at {args.data}; pass --data PATH.npz (x_train, y_train, x_test, y_test).")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress, device, amp = not args.no_progress, default_device(), not args.fp32
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data, per_class=args.per_class, progress=progress)
    print(f"{data!r} on {device}", flush=True)
    start = time.perf_counter()

    seed_everything(0)
    teacher = build_model(TEACHER, data.num_classes, data.image_size)
    teacher_history = fit(teacher, data, epochs=args.teacher_epochs or args.epochs, lr=PEAK_LR[TEACHER],
                          batch_size=args.batch_size, seed=0, checkpoint=args.out / "teacher.pt",
                          meta={"model": TEACHER}, device=device, progress=progress, desc="teacher", amp=amp)
    teacher.eval().requires_grad_(False)

    table = kq.layer_qualities(teacher, data, cache_dir=args.out / "kq", device=device, progress=progress, amp=amp)
    table.to_csv(args.out / "kq.csv")
    kq_layers = kq.select_layers(table, k=len(standard_layers(STUDENT)))
    print(f"teacher layers by KQ: {kq_layers} (standard: {standard_layers(TEACHER)})", flush=True)

    methods = METHODS + (["fitnets_kd"] if args.fitnets else [])
    runs: dict[str, list[list[dict]]] = {m: [] for m in methods}
    cache: dict = {}                                  # teacher features/logits, shared by every run
    for seed in args.seeds:
        for method in methods:
            runs[method].append(distill(
                teacher, STUDENT, data, method, teacher_layers=kq_layers if method in KQ_METHODS else None,
                teacher_name=TEACHER, epochs=args.epochs, lr=PEAK_LR[STUDENT], seed=seed, batch_size=args.batch_size,
                cache=cache, checkpoint=args.out / f"{method}-seed{seed}.pt", device=device, progress=progress,
                amp=amp))

    results = summarize_runs(runs, teacher={"model": TEACHER, "test_acc": teacher_history[-1]["test_acc"]},
                             preset="cifar10-cpu", dataset=data.name, precision=record(precision_for(device, amp)))
    results["setup"] = {"student": STUDENT, "num_train": data.num_train, "num_test": int(len(data.y_test)),
                        "per_class": args.per_class, "epochs": args.epochs,
                        "teacher_epochs": args.teacher_epochs or args.epochs, "seeds": args.seeds,
                        "lr": PEAK_LR[STUDENT], "teacher_lr": PEAK_LR[TEACHER], "batch_size": args.batch_size,
                        "kq_layers": kq_layers, "teacher_standard_layers": standard_layers(TEACHER),
                        "student_layers": standard_layers(STUDENT), "device": str(device),
                        "wall_seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(args.out / "results.json", results)
    table_md = results_markdown(results) + (
        f"\nTeacher layers: KQ top-4 {kq_layers} (feature_kd, feature_kd_ce), standard {standard_layers(TEACHER)} "
        f"(standard_layers, fitnets_kd); student layers {standard_layers(STUDENT)}. {data.num_train} training images, "
        f"{args.epochs} student epochs, teacher {args.teacher_epochs or args.epochs} epochs, seeds {args.seeds}.\n")
    (args.out / "results.md").write_text(table_md)
    print(table_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
