"""Speed and memory of the KQ analysis: every generalized layer of a (randomly initialised) model on a sample.

Prints one JSON object: model, layers, samples, seconds (kq.layer_qualities end to end, feature extraction
included, cache off), gram_seconds (one float32 F @ F.T per layer with F of that layer's sample shape, summed,
measured in the same process), ratio = seconds / gram_seconds, peak_rss_mb (resource.getrusage ru_maxrss), and
the same ratio in process CPU time (cpu_ratio: less sensitive to other processes sharing the cores).

Run from the project root (or anywhere once the package is installed with `pip install -e .`):

    .venv/bin/python -m benchmarks.kq_bench                       # resnet18_narrow on the shared CIFAR-10 subset
    .venv/bin/python -m benchmarks.kq_bench --model resnet34 --image-size 32
    .venv/bin/python -m benchmarks.kq_bench --tinyimagenet --no-gram --quiet    # the tinyimagenet preset's KQ

--tinyimagenet measures the tinyimagenet preset's KQ settings (ResNet-34 at 64x64, 200 classes, subset A of 5000,
50 images per class for the class spectra, as presets.resolve_config("tinyimagenet") gives) on generated 64x64
images (Tiny ImageNet itself is not downloaded here; the peak memory depends on the shapes, not on the pixels).
The JSON then adds rss_before_mb (after the data and the model were made), peak_growth_mb and widest_layer_mb (the
largest layer's sampled float32 features, what KQ must hold at once). --samples / --per-class / --layers shrink it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from typing import Any
from pathlib import Path

import torch
import torch.nn.functional as F

from kdutils import kq
from kdutils.data import Dataset, load_dataset
from kdutils.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name (default resnet18_narrow; resnet34 with --tinyimagenet)")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-subset.npz"),
                   help="dataset name or .npz path (default: ../shared/data/cifar10-subset.npz from the project root)")
    p.add_argument("--samples", type=int, default=5000, help="subset A size (max_samples)")
    p.add_argument("--per-class", type=int, default=None,
                   help="subset B size per class (class spectra; default 500, the preset's 50 with --tinyimagenet)")
    p.add_argument("--tinyimagenet", action="store_true",
                   help="the tinyimagenet preset's settings on generated 200-class 64x64 data (see above)")
    p.add_argument("--no-gram", action="store_true",
                   help="skip the separate F @ F.T timing (it would need the widest layer's features a second time)")
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


def tinyimagenet_like(per_class: int, seed: int = 0) -> Dataset:
    """Generated uint8 images shaped like Tiny ImageNet (200 classes, 64x64 RGB): per_class training images per
    class and 2 test images per class, each a random image of its class plus noise (std 40). Classes that differ
    keep KQ's exact closest-pair search small; on pure noise nearly every pair of a wide layer is a candidate."""
    classes, size = 200, 64
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (classes, 3, size, size), generator=g).float()

    def draw(y: torch.Tensor) -> torch.Tensor:
        return (base[y] + 40 * torch.randn(len(y), 3, size, size, generator=g)).clamp_(0, 255).to(torch.uint8)

    y = torch.arange(classes * per_class) % classes
    y_test = torch.arange(2 * classes) % classes
    x, x_test = draw(y), draw(y_test)
    return Dataset("tinyimagenet-like", x, y, x_test, y_test, tuple(map(str, range(classes))), (0.48, 0.45, 0.40),
                   (0.28, 0.27, 0.28), source="generated")


def rss_mb() -> float:
    """This process's current resident memory in MiB (Linux /proc; the peak so far elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    per_class = args.per_class or (50 if args.tinyimagenet else 500)
    model_name = args.model or ("resnet34" if args.tinyimagenet else "resnet18_narrow")
    if args.tinyimagenet:           # as many training images per class as the KQ sample draws (A and B nested)
        data = tinyimagenet_like(max(per_class, args.samples // 200), args.seed)
    else:
        data = load_dataset(args.data)
    if args.image_size and args.image_size != data.image_size:
        data = resized(data, args.image_size)
    torch.manual_seed(args.seed)
    model = build_model(model_name, data.num_classes, image_size=data.image_size)
    before = rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    table = kq.layer_qualities(model, data, args.layers, max_samples=args.samples, per_class=per_class,
                               seed=args.seed, probe=args.probe, batch_size=args.batch_size, cache_dir=None,
                               group_mb=args.group_mb or None, progress=not args.quiet)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_a = int(table.attrs["n_a"])
    out: dict[str, Any] = {
        "model": model_name, "data": data.name, "layers": len(table), "samples": n_a, "n_b": int(table.attrs["n_b"]),
        "per_class": per_class, "image_size": data.image_size, "threads": torch.get_num_threads(),
        "probe": args.probe, "group_mb": args.group_mb, "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2)}
    if not args.no_gram:
        gram, gram_cpu = gram_seconds(n_a, [int(d) for d in table["dim"]])
        out.update({"gram_seconds": round(gram, 2), "ratio": round(seconds / gram, 3),
                    "gram_cpu_seconds": round(gram_cpu, 2), "cpu_ratio": round(cpu_seconds / gram_cpu, 3)})
    print(json.dumps({
        **out,
        "peak_rss_mb": round(peak, 1), "rss_before_mb": round(before, 1), "peak_growth_mb": round(peak - before, 1),
        "widest_layer_mb": round(int(table["dim"].max()) * n_a * 4 / 2**20, 1),
        "layer_seconds": [round(float(s), 2) for s in table["seconds"]],
        "quality": [round(float(q), 4) for q in table["quality"]],
    }))


if __name__ == "__main__":
    main()
