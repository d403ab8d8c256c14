"""Training throughput of the paper's models on a GPU (images/s), KQ seconds per teacher, and optionally the seconds
of each notebook for the `cifar10` preset. Prints one JSON object on stdout; every log line goes to stderr.

What it measures, per image size (32 px: CIFAR shapes; 64 px: Tiny ImageNet shapes, 200 classes, synthetic):
- every paper teacher (resnet34, vgg19_bn, vit_b) trained with CE through `kdutils.train.fit`;
- every paper student (resnet9, vgg11_bn, mobilenet_v2, vit_et) through `kdutils.distill.distill` from its paper
  teacher (`kdutils.presets.PAIRS`) with the methods ce, hinton_kd and feature_kd (the teacher's standard layers; one
  shared `cache` dict, so teacher logits/features are computed once, before the first epoch and outside the timing);
- each in bf16 autocast (`amp=True`) and fp32 (`amp=False`), eager and with `compile_model=True`;
- `kdutils.kq.layer_qualities` of each teacher on 5000 samples (probe off, disk cache off).

How: a run trains for `--epochs` epochs and reads fit's per-epoch seconds (training loop + test evaluation). The
first epoch holds the warm-up (and, compiled, the compilation), so the steady epoch is the median of the later ones:
`images_per_s` = training images per epoch / steady epoch seconds (evaluation INCLUDED). Then
`kdutils.train.evaluate` is timed alone on the trained model (median of 3 after one warm-up call), and
`train_images_per_s` = training images / (steady epoch - eval seconds) (evaluation EXCLUDED).
`first_epoch_extra_seconds` = first epoch - steady epoch; with compile on it is reported as `compile_seconds`
(compilation plus warm-up; torch.compiler.reset() runs before each compiled run, so each one compiles again, though
inductor's on-disk cache can shorten repeats), and `compile_fell_back` says whether fit fell back to eager mode. On
CUDA the data is device-resident: the shared CIFAR-10 subset (10k train / 2k test) when `--data` points to it, else
synthetic uint8 images (10k / 2k; class templates plus noise, see `synthetic`). Model weights are random: they do not
change the timing. KQ's time does depend on the data (its exact closest-pair step), so a KQ figure on synthetic
images is indicative only; the resnet34 KQ target wants the real CIFAR-10 subset (`--data`). Each entry records device,
torch version, batch size, precision and compile flag.

Targets on one H100 (the `targets` block of the JSON; judged on the default training configuration, bf16 eager,
batch 128, with the best measured configuration beside it; "not measured" where the run cannot tell):
- resnet9 student, method ce, 32 px: >= 40,000 training images/s (evaluation excluded);
- resnet9 feature_kd: >= 0.8 x resnet9 ce's training images/s;
- resnet34 teacher (CE), 32 px: >= 12,000 training images/s;
- KQ of resnet34 (5000 samples, 32 px): <= 15 s;
- one 50-epoch resnet9 run on full CIFAR-10 (50k train + 10k test images per epoch; extrapolated from the slowest of
  ce/hinton_kd/feature_kd's measured training and evaluation rates; teacher cache and checkpoints not included):
  <= 90 s.

On a CPU it always runs the tiny mode (`--tiny`): the CPU-scale pair resnet18_narrow -> resnet10_narrow plus resnet9
(as a student of resnet18_narrow) at 16 px on 256 synthetic images, 2 epochs, fp32, eager (`--compile-on-cpu` adds
compiled runs), one thread; about 15 s on 2 cores. It checks the machinery; the targets then say "not measured".

    python benchmarks/gpu_bench.py --data ../shared/data/cifar10-subset.npz --out gpu_bench.json    # GPU, all
    python benchmarks/gpu_bench.py --sizes 32 --models resnet34 resnet9 --no-compile             # GPU, a slice
    python benchmarks/gpu_bench.py --notebooks --data ../shared/data/cifar10-subset.npz -p seeds [0]  # + notebooks
    python benchmarks/gpu_bench.py --tiny                                                         # CPU

The full GPU series is 120 training runs (2 sizes x 15 model/method pairs x 4 configurations) of 4 epochs on 10k
images, plus 6 KQ passes; --sizes, --models and --no-compile split it over several calls.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdutils.data import Dataset, load_dataset
from kdutils.distill import distill
from kdutils.kq import kq_per_class, layer_qualities
from kdutils.layers import standard_layers
from kdutils.models import build_model
from kdutils.models import PEAK_LR
from kdutils.presets import PAIRS
from kdutils.precision import precision_for
from kdutils.train import default_device, evaluate, fit, seed_everything

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
CPU_PAIR = "resnet18_narrow-resnet10_narrow"
GPU_PAIRS = [(m["teacher"], m["student"]) for name, m in PAIRS.items() if name != CPU_PAIR]
TINY_PAIRS = [("resnet18_narrow", "resnet10_narrow"), ("resnet18_narrow", "resnet9")]
METHODS = ("ce", "hinton_kd", "feature_kd")
# name -> (comparison, threshold, what is compared)
TARGETS = {
    "resnet9_ce_train_images_per_s": (">=", 40_000, "resnet9 student, ce, 32 px: training images/s, eval excluded"),
    "resnet9_feature_kd_over_ce": (">=", 0.8, "resnet9 feature_kd / ce training images/s, 32 px"),
    "resnet34_teacher_train_images_per_s": (">=", 12_000, "resnet34 teacher, CE, 32 px: training images/s, eval "
                                                          "excluded"),
    "resnet34_kq_seconds": ("<=", 15.0, "kq.layer_qualities(resnet34), 5000 samples of --data, 32 px, probe off"),
    "resnet9_50_epoch_run_seconds": ("<=", 90.0, "50 epochs x (50k train + 10k test images) at the slowest measured "
                                                 "rates of resnet9 ce/hinton_kd/feature_kd, 32 px"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny CPU configuration (forced when there is no GPU)")
    p.add_argument("--models", nargs="+", help="time only these models (teachers as teachers, students as students)")
    p.add_argument("--sizes", type=int, nargs="+", help="image sizes (default: 32 64 on a GPU, 16 in tiny mode)")
    p.add_argument("--batch-size", type=int, help="default: 128 (the presets'), 64 in tiny mode")
    p.add_argument("--epochs", type=int, help="epochs per run, >= 2 (default: 4, 2 in tiny mode)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="32 px dataset .npz on a GPU (default: the shared CIFAR-10 subset; synthetic if missing)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    p.add_argument("--compile-on-cpu", action="store_true", help="tiny mode: also time compile_model=True")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: 1 in tiny mode, torch's otherwise)")
    p.add_argument("--notebooks", action="store_true",
                   help="GPU only: also time the five notebooks of the cifar10 preset (on --data when it exists)")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="with --notebooks: a pipeline parameter, e.g. -p seeds [0] (repeatable)")
    p.add_argument("--out", type=Path, help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 2:
        p.error("--epochs must be >= 2: the first epoch is warm-up, throughput comes from the later ones")
    return args


def synthetic(name: str, n_train: int, n_test: int, size: int, num_classes: int, seed: int = 0) -> Dataset:
    """uint8 images shaped like a real dataset: a smooth random template per class plus 30% noise, balanced labels.

    Plain uniform noise would do for training speed, but not for KQ: its features are all nearly equidistant, so
    KQ's exact closest-pair step re-checks almost every pair (63 s instead of 3 s for one 64 px layer on a CPU).
    """
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=(size, size), mode="bilinear",
                              align_corners=False)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        x = 0.7 * templates[y] + 0.3 * torch.rand(n, 3, size, size, generator=g)
        return x.mul_(255).round_().to(torch.uint8), y

    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    return Dataset(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                   classes=tuple(str(c) for c in range(num_classes)), mean=(0.5,) * 3, std=(0.25,) * 3)


def dataset_for(size: int, args: argparse.Namespace, tiny: bool) -> tuple[Dataset, str]:
    """The benchmark data at one image size and its source: --data at 32 px when it exists (not in tiny mode), else
    synthetic images (200 classes at 64 px, the Tiny ImageNet shape)."""
    if tiny:
        return synthetic(f"synthetic{size}", 256, 128, size, 10), "synthetic"
    if size == 32 and args.data is not None and args.data.exists():
        return load_dataset(args.data, progress=False), str(args.data)
    return synthetic(f"synthetic{size}", 10_000, 2_000, size, 200 if size == 64 else 10), "synthetic"


def device_name(device: torch.device) -> str:
    """The accelerator's name, or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def timed_eval(model: nn.Module, data: Dataset) -> float:
    """Median seconds of kdutils.train.evaluate over the test split (3 timed calls after one warm-up call)."""
    evaluate(model, data.x_test, data.y_test, mean=data.mean, std=data.std)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        evaluate(model, data.x_test, data.y_test, mean=data.mean, std=data.std)   # ends with .cpu(): synchronised
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(train: Callable[[], list[dict]], model: nn.Module, data: Dataset, batch_size: int,
            device: torch.device, entry: dict) -> dict:
    """Run one training call and turn its per-epoch seconds into images/s; failures become an 'error' field."""
    log = io.StringIO()
    if entry["compile"]:    # compile from scratch: honest compile_seconds, and no graph reused from a hook-free
        torch.compiler.reset()  # instance (torch then skips the feature taps' hooks and fit falls back to eager)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with contextlib.redirect_stdout(log):
            t0 = time.perf_counter()
            history = train()
            wall = time.perf_counter() - t0
            eval_s = timed_eval(model, data)
    except Exception as err:  # one model failing (OOM, compiler error) must not lose the other measurements
        sys.stderr.write(log.getvalue() + traceback.format_exc())
        return {**entry, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    sys.stderr.write(log.getvalue())
    seconds = [row["seconds"] for row in history]
    steady = statistics.median(seconds[1:])
    images = (data.num_train // batch_size) * batch_size if data.num_train > batch_size else data.num_train
    train_s = steady - eval_s
    out = {**entry,
           "compile_fell_back": entry["compile"] and "training eagerly" in log.getvalue(),
           "epochs": len(history), "train_images_per_epoch": images, "test_images": int(len(data.y_test)),
           "epoch_seconds": [round(s, 4) for s in seconds], "steady_epoch_seconds": round(steady, 4),
           "eval_seconds": round(eval_s, 4),
           "images_per_s": round(images / steady, 1),
           "train_images_per_s": round(images / train_s, 1) if train_s > 0 else None,
           "eval_images_per_s": round(len(data.y_test) / eval_s, 1),
           "first_epoch_extra_seconds": round(seconds[0] - steady, 3),
           "compile_seconds": round(seconds[0] - steady, 3) if entry["compile"] else None,
           "call_seconds": round(wall, 3), "final_test_acc": history[-1]["test_acc"]}
    if device.type == "cuda":
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(f"{entry['role']} {entry['model']} {entry['method']} {entry['image_size']}px {entry['precision']} "
          f"compile={entry['compile']}: {out['images_per_s']} img/s with eval, {out['train_images_per_s']} without",
          file=sys.stderr, flush=True)
    return out


def run_teacher(name: str, data: Dataset, amp: bool, compile_model: bool, common: dict, entry: dict) -> dict:
    """Images/s of a teacher trained with CE through fit."""
    seed_everything(0)
    model = build_model(name, data.num_classes, data.image_size)
    return measure(lambda: fit(model, data, lr=PEAK_LR[name], amp=amp, compile_model=compile_model, desc=name,
                               **common),
                   model, data, common["batch_size"], common["device"], entry)


def run_student(teacher: nn.Module, teacher_name: str, name: str, method: str, data: Dataset, amp: bool,
                compile_model: bool, cache: dict, common: dict, entry: dict) -> dict:
    """Images/s of a student trained by distill with one method (teacher outputs from the shared cache)."""
    seed_everything(0)
    student = build_model(name, data.num_classes, data.image_size)
    layers = standard_layers(teacher_name) if method == "feature_kd" else None
    return measure(lambda: distill(teacher, student, data, method, teacher_layers=layers, teacher_name=teacher_name,
                                   student_name=name, lr=PEAK_LR[name], cache=cache, amp=amp,
                                   compile_model=compile_model, **common),
                   student, data, common["batch_size"], common["device"], entry)


def time_kq(teacher: nn.Module, name: str, data: Dataset, source: str, samples: int, device: torch.device) -> dict:
    """Seconds of kq.layer_qualities over every generalized layer of a teacher (probe and disk cache off), with the
    pipeline's class-spectra sample size (64 px counts as Tiny ImageNet)."""
    per_class = kq_per_class("tinyimagenet" if data.image_size == 64 else "cifar10", name)
    entry = {"model": name, "image_size": data.image_size, "num_classes": data.num_classes, "data": source,
             "samples": samples, "per_class": per_class}
    try:
        with contextlib.redirect_stdout(sys.stderr):
            t0 = time.perf_counter()
            table = layer_qualities(teacher, data, max_samples=samples, per_class=per_class, cache_dir=None,
                                    probe=False, device=device, progress=False)
            seconds = time.perf_counter() - t0
    except Exception as err:
        traceback.print_exc()
        return {**entry, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    print(f"kq {name} {data.image_size}px: {seconds:.2f}s", file=sys.stderr, flush=True)
    return {**entry, "layers": len(table), "seconds": round(seconds, 3)}


def time_notebooks(data: Path | None, params: list[tuple[str, str]]) -> dict:
    """Seconds of each notebook of the cifar10 preset, run by kdutils.pipeline into a temporary run directory."""
    import nbformat
    from kdutils.pipeline import parse_value, run_pipeline
    from kdutils.rundir import NOTEBOOKS
    values = {**({"dataset": str(data.resolve())} if data is not None and data.exists() else {}),
              **{k: parse_value(v) for k, v in params}}
    out: dict = {"preset": "cifar10", "parameters": values}
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(sys.stderr):
        t0 = time.perf_counter()
        try:
            run_pipeline(run_dir, "cifar10", values)
        except Exception as err:
            traceback.print_exc()
            out["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        out["total_seconds"] = round(time.perf_counter() - t0, 1)
        out["seconds"] = {}
        for name in NOTEBOOKS:
            path = Path(run_dir) / "executed" / name
            if path.exists():
                duration = nbformat.read(path, as_version=4).metadata.get("papermill", {}).get("duration")
                out["seconds"][name] = None if duration is None else round(float(duration), 1)
    return out


def find(entries: list[dict], **match) -> dict | None:
    """The first entry without an error whose fields equal `match`."""
    return next((e for e in entries if "error" not in e and all(e.get(k) == v for k, v in match.items())), None)


def target_values(entries: list[dict], kq: list[dict], precision: str, compiled: bool) -> dict[str, float | None]:
    """Each target's measured value in one configuration (None where it was not measured)."""
    def rate(role: str, model: str, method: str) -> dict | None:
        e = find(entries, role=role, model=model, method=method, image_size=32, precision=precision,
                 compile=compiled)
        return e if e is not None and e["train_images_per_s"] else None

    ce, fkd, teacher = rate("student", "resnet9", "ce"), rate("student", "resnet9", "feature_kd"), \
        rate("teacher", "resnet34", "ce")
    runs = [e for e in (rate("student", "resnet9", m) for m in METHODS) if e is not None]
    kq34 = next((k for k in kq if k["model"] == "resnet34" and k["image_size"] == 32 and "seconds" in k
                 and k["data"] != "synthetic"), None)                 # KQ's time depends on the data: real only
    epoch = (max(50_000 / e["train_images_per_s"] + 10_000 / e["eval_images_per_s"] for e in runs)
             if len(runs) == len(METHODS) else None)      # the slowest method, once all of them were measured
    return {"resnet9_ce_train_images_per_s": ce and ce["train_images_per_s"],
            "resnet9_feature_kd_over_ce": fkd and ce and round(fkd["train_images_per_s"] / ce["train_images_per_s"], 3),
            "resnet34_teacher_train_images_per_s": teacher and teacher["train_images_per_s"],
            "resnet34_kq_seconds": kq34 and kq34["seconds"],
            "resnet9_50_epoch_run_seconds": None if epoch is None else round(50 * epoch, 1)}


def targets_block(entries: list[dict], kq: list[dict], configs: list[tuple[str, bool]], device: torch.device) -> dict:
    """Targets with met / not met on the default configuration (configs[0]: bf16 eager) and the best measured one."""
    if device.type != "cuda":
        return {name: {"target": f"{op} {limit:g}", "what": what, "value": None, "met": None,
                       "status": "not measured on CPU (tiny mode checks the machinery only)"}
                for name, (op, limit, what) in TARGETS.items()}
    values = {cfg: target_values(entries, kq, *cfg) for cfg in configs}
    default = values.get(configs[0], {})      # the first configuration is the default one: bf16 (amp=True), eager
    out = {}
    for name, (op, limit, what) in TARGETS.items():
        better = max if op == ">=" else min
        measured = {cfg: v[name] for cfg, v in values.items() if v[name] is not None}
        best_cfg = better(measured, key=measured.get) if measured else None
        ok = lambda v: None if v is None else (v >= limit if op == ">=" else v <= limit)  # noqa: E731
        value = default.get(name)
        out[name] = {"target": f"{op} {limit:g}", "what": what, "value": value, "met": ok(value),
                     "status": "met" if ok(value) else "not met" if value is not None else "not measured",
                     "best_value": measured.get(best_cfg), "best_met": ok(measured.get(best_cfg)),
                     "best_config": None if best_cfg is None else {"precision": best_cfg[0], "compile": best_cfg[1]}}
    return out


def run(args: argparse.Namespace) -> dict:
    """Time every selected model in every configuration; return the report."""
    device = default_device()
    tiny = args.tiny or device.type != "cuda"
    if args.threads or tiny:
        torch.set_num_threads(args.threads or 1)
    batch_size = args.batch_size or (64 if tiny else 128)
    epochs = args.epochs or (2 if tiny else 4)
    sizes = args.sizes or ([16] if tiny else [32, 64])
    pairs = TINY_PAIRS if tiny else GPU_PAIRS
    known = {name for pair in pairs for name in pair}
    if args.models and not set(args.models) <= known:
        raise SystemExit(f"--models: {sorted(set(args.models) - known)} not among this mode's models {sorted(known)}")
    wanted = lambda name: args.models is None or name in args.models  # noqa: E731
    half = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(precision_for(device).dtype, "fp32")
    precisions = [("fp32", False)] if tiny else [(half, True), ("fp32", False)]
    compiles = [False] + ([True] if (args.compile_on_cpu if tiny else not args.no_compile) else [])
    configs = [(p, amp, c) for c in compiles for p, amp in precisions]
    common = dict(epochs=epochs, batch_size=batch_size, seed=0, device=device, progress=False)
    base = {"device": device_name(device), "torch": torch.__version__, "batch_size": batch_size}
    entries: list[dict] = []
    kq: list[dict] = []
    datasets = {}
    for size in sizes:
        data, source = dataset_for(size, args, tiny)
        data = data.to(device)
        datasets[size] = {"name": data.name, "source": source,
                          "num_train": data.num_train, "num_test": int(len(data.y_test)),
                          "num_classes": data.num_classes, "image_size": data.image_size}
        shape = {"image_size": size, "num_classes": data.num_classes, "dataset": data.name}
        teachers = list(dict.fromkeys(t for t, _ in pairs))
        for name in filter(wanted, teachers):
            for precision, amp, compiled in configs:
                entries.append(run_teacher(name, data, amp, compiled, common, {
                    "role": "teacher", "model": name, "method": "ce", "teacher": None, **shape,
                    "precision": precision, "compile": compiled, **base}))
        for teacher_name in teachers:
            students = [s for t, s in pairs if t == teacher_name and wanted(s)]
            if not students and not wanted(teacher_name):
                continue
            seed_everything(0)
            teacher = build_model(teacher_name, data.num_classes, size)
            cache: dict = {}    # one per teacher: its logits/features are computed once for all students and runs
            for name in students:
                for precision, amp, compiled in configs:
                    for method in METHODS:
                        entry = {"role": "student", "model": name, "method": method, "teacher": teacher_name, **shape,
                                 "teacher_layers": standard_layers(teacher_name) if method == "feature_kd" else None,
                                 "precision": precision, "compile": compiled, **base}
                        entries.append(run_student(teacher, teacher_name, name, method, data, amp, compiled, cache,
                                                   common, entry))
            if wanted(teacher_name):
                kq.append(time_kq(teacher.to(device), teacher_name, data, source, min(5000, data.num_train), device))
            del teacher, cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
    notebooks = None
    if args.notebooks:
        notebooks = (time_notebooks(args.data, args.param) if device.type == "cuda"
                     else {"error": "not run: --notebooks needs a GPU (the cifar10 preset trains 50-epoch runs)"})
    return {
        "benchmark": "gpu_bench", "device": device_name(device), "device_type": device.type,
        "torch": torch.__version__, "torch_cuda_build": torch.version.cuda, "tiny": tiny,
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size, "epochs": epochs, "sizes": sizes,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "data": datasets,
        "definitions": {
            "images_per_s": "training images per epoch / steady epoch seconds; fit's epoch seconds INCLUDE the "
                            "test-set evaluation",
            "train_images_per_s": "training images per epoch / (steady epoch seconds - eval_seconds): evaluation "
                                  "EXCLUDED",
            "steady_epoch_seconds": "median epoch seconds over epochs 2..N",
            "eval_seconds": "kdutils.train.evaluate on the test split, timed alone after training (median of 3)",
            "first_epoch_extra_seconds": "first epoch - steady epoch (warm-up; with compile, compile_seconds)",
            "precision": "bf16 = fit/distill amp=True (kdutils.precision's rule); fp32 = amp=False",
            "student runs": "distill from an untrained paper teacher; feature_kd uses the teacher's standard layers; "
                            "teacher outputs are cached before the first epoch (not timed)"},
        "entries": entries, "kq": kq, "notebooks": notebooks,
        "targets_device": "one NVIDIA H100" + ("" if "H100" in device_name(device) else
                                               f" (this run: {device_name(device)})"),
        "targets": targets_block(entries, kq, [(p, c) for p, _, c in configs], device),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its JSON object on stdout (and write it to --out)."""
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
