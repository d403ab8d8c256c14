"""Speed and memory of the KQ analysis: every generalized layer of a (randomly initialised) model on a sample.

Prints one JSON object: model, layers, samples, seconds (kq.layer_qualities end to end, feature extraction
included, cache off), gram_seconds (one float32 F @ F.T per layer with F of that layer's sample shape, summed,
measured in the same process), ratio = seconds / gram_seconds, peak_rss_mb (resource.getrusage ru_maxrss), and
the same ratio in process CPU time (cpu_ratio: less sensitive to other processes sharing the cores).

Run from the project root (or anywhere once the package is installed with `pip install -e .`):

    .venv/bin/python -m benchmarks.kq_bench                       # resnet18_narrow on the shared CIFAR-10 subset
    .venv/bin/python -m benchmarks.kq_bench --model resnet34 --image-size 32
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdutils import kq
from kdutils.data import load_dataset
from kdutils.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18_narrow")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-subset.npz"),
                   help="dataset name or .npz path (default: ../shared/data/cifar10-subset.npz from the project root)")
    p.add_argument("--samples", type=int, default=5000, help="subset A size (max_samples)")
    p.add_argument("--per-class", type=int, default=500, help="subset B size per class (class spectra)")
    p.add_argument("--image-size", type=int, default=None, help="resize the images (default: the dataset's size)")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="only these generalized layers")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--group-mb", type=float, default=kq.GROUP_MB,
                   help="feature memory per forward pass in MiB (0: strictly one layer per pass)")
    p.add_argument("--probe", action="store_true", help="include the linear probe (extra test-split passes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    return p.parse_args()


def resized(data, size: int):
    """The dataset with both splits bilinearly resized to size x size (uint8)."""
    def rs(x: torch.Tensor) -> torch.Tensor:
        out = [F.interpolate(x[i:i + 1000].float(), size=(size, size), mode="bilinear", align_corners=False)
               for i in range(0, len(x), 1000)]
        return torch.cat(out).round().clamp(0, 255).to(torch.uint8)
    return dataclasses.replace(data, x_train=rs(data.x_train), x_test=rs(data.x_test))


def gram_seconds(n: int, dims: list[int]) -> tuple[float, float]:
    """Sum over layers of the wall and CPU time of one float32 F @ F.T with F of shape (n, D)."""
    wall = cpu = 0.0
    gen = torch.Generator().manual_seed(0)
    for d in dims:
        f = torch.randn(n, d, generator=gen)
        t0, c0 = time.perf_counter(), time.process_time()
        g = f @ f.T
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        del f, g
    return wall, cpu


def main() -> None:
    """Run the benchmark and print the JSON line."""
    args = parse_args()
    data = load_dataset(args.data)
    if args.image_size and args.image_size != data.image_size:
        data = resized(data, args.image_size)
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.num_classes, image_size=data.image_size)
    t0, c0 = time.perf_counter(), time.process_time()
    table = kq.layer_qualities(model, data, args.layers, max_samples=args.samples, per_class=args.per_class,
                               seed=args.seed, probe=args.probe, batch_size=args.batch_size, cache_dir=None,
                               group_mb=args.group_mb or None, progress=not args.quiet)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    gram, gram_cpu = gram_seconds(int(table.attrs["n_a"]), [int(d) for d in table["dim"]])
    print(json.dumps({
        "model": args.model, "layers": len(table), "samples": int(table.attrs["n_a"]),
        "image_size": data.image_size, "threads": torch.get_num_threads(), "probe": args.probe,
        "group_mb": args.group_mb,
        "seconds": round(seconds, 2), "gram_seconds": round(gram, 2), "ratio": round(seconds / gram, 3),
        "cpu_seconds": round(cpu_seconds, 2), "gram_cpu_seconds": round(gram_cpu, 2),
        "cpu_ratio": round(cpu_seconds / gram_cpu, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "layer_seconds": [round(float(s), 2) for s in table["seconds"]],
        "quality": [round(float(q), 4) for q in table["quality"]],
    }))


if __name__ == "__main__":
    main()
