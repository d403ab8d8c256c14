"""One prepared check of the whole project on one GPU (an H200), in at most 8 minutes: one JSON file and its logs.

    python benchmarks/prepare_gpu_check.py                   # here: fills gpu_carry/ (data, wheels), prints the call
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc   # here: the same code on the CPU at toy sizes (< 1 min)

The device call (the device tool's `run`; prepare_gpu_check.py prints the same), exactly:

    command:   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site gpu_carry/wheels/*.whl && export PYTHONPATH=/tmp/site || exit; python3 -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=/tmp/site:$PWD; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --data gpu_carry/cifar10-subset.npz --out $OUT --work /tmp/gpu_check
    carry:     ["gpu_carry"]
    timeout_s: 540

The wheels are what the GPU machine's image lacks for the pipeline (papermill, nbformat, nbclient, ipykernel and
their needs); the editable install falls back to PYTHONPATH if the image's setuptools refuses it. The stages' budget
(--budget, 420 s) plus the installs and start-up keep the command near 8 minutes; timeout_s leaves a minute over it.
A rerun of a failed stage fits only with a smaller budget: e.g. `--stages pipeline --budget 240`.

Stages, run in this order (the targets' measurements first, so a slow notebook cannot crowd them out); each one is
time-boxed (min(its cap, the budget left)), skipped with a reason when less of the budget is left than it needs,
and recorded as ok / error / timeout / skipped, every failure with its traceback; the check carries on past any:

1. environment: python, torch, CUDA, cuDNN, the GPU's name, memory and driver, and the precision rule's choice
   (what kdutils.precision.precision_for chooses, and the dtype a matmul gets under its autocast).
2. throughput (eager, bf16 autocast, 32 px, batch 128 and 512; benchmarks/gpu_bench.py's measurement: evaluation
   excluded): resnet9 ce and feature_kd (from a resnet34 teacher, its standard layers), the resnet34 teacher (CE),
   and kq.layer_qualities of resnet34 on 5,000 real images (probe off).
3. fifty_epochs: one resnet9 feature_kd run with the paper's recipe (50 epochs, AdamW + OneCycle, batch 128, no
   augmentation) on the subset's 10,000 images, from a resnet34 teacher trained 10 epochs here and the KQ top-4
   layers; its epoch seconds and accuracy curve, extrapolated to full CIFAR-10 (50,000 + 10,000 images per epoch).
4. pipeline: notebooks 1-5 end to end (kdutils.pipeline.run_pipeline, preset cifar10: resnet34 -> resnet9) on the
   shared CIFAR-10 subset, 1 + 1 epochs, methods ce, hinton_kd, feature_kd, simkd, one seed. The teacher is
   "ImageNet-pretrained" from a stand-in weights file this check writes into a torch hub folder of its own
   (TORCH_HOME, set for this stage only), read by kdutils.models through torchvision exactly as the real file
   would be; teacher_metrics.json must then say pretrained: true. The executed notebooks come back as a .tar.gz.
5. pairs: the other pairs (vgg19-vgg11, resnet34-mobilenetv2, vitb-vitet) at 32 px and resnet34-resnet9 at 64 px
   with 200 classes (Tiny ImageNet's shape), on small synthetic data, through the notebooks' calls: fit, layer
   geometry (kq.layer_analysis), KQ (kq.layer_qualities, from the same disk cache), kq.select_layers, and
   distill(feature_kd) with the teacher cache (distill.fill_teacher_cache), 1 epoch each.
6. profiles: for each target missed, a torch.profiler summary of its case (top ops) in profiles.txt.
7. compiled: the stage-2 cases with torch.compile, only with the budget left (compile time reported).

Targets (the JSON's `targets`, judged on batch 128, bf16, eager; the best measured configuration beside it):
resnet9 ce >= 40,000 training images/s; resnet9 feature_kd >= 0.8 x ce; resnet34 teacher >= 12,000 images/s; KQ of
resnet34 on 5,000 images <= 15 s; the 50-epoch resnet9 run extrapolated to full CIFAR-10 <= 90 s.

Files in --out (at most 8 come back from the device, flat): gpu_check.json (rewritten after every stage),
gpu_check.log (everything the stages print), profiles.txt, pipeline_notebooks.tar.gz. Bulky files (the pipeline's
run folder, the stand-in weights, KQ caches) go to --work. --dry-run: CPU, toy sizes (8 px images, tens of them, 1-2
epochs), notebook 1 only, no compiled runs, targets not judged; every skip is recorded with its reason.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

if str(Path(__file__).resolve().parent) not in sys.path:   # benchmarks/ is no package: gpu_bench sits beside us
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402

from kdutils.data import Dataset, load_dataset  # noqa: E402
from kdutils.distill import distill, fill_teacher_cache  # noqa: E402
from kdutils.kq import kq_per_class, layer_analysis, layer_qualities, select_layers  # noqa: E402
from kdutils.layers import distillation_layers, generalized_layer_count, layer_table, standard_layers  # noqa: E402
from kdutils.models import build_model  # noqa: E402
from kdutils.models import PEAK_LR  # noqa: E402
from kdutils.presets import PAIRS, resolve_config, student_recipe  # noqa: E402
from kdutils.rundir import write_atomic  # noqa: E402
from kdutils.train import fit, seed_everything  # noqa: E402

DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
    "gpu_carry/wheels/*.whl && export PYTHONPATH=/tmp/site || exit; "
    "python3 -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=/tmp/site:$PWD; "
    "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --data gpu_carry/cifar10-subset.npz --out $OUT "
    "--work /tmp/gpu_check")
CARRY_DIR = "gpu_carry"                     # git-ignored; prepare_gpu_check.py fills it
CARRY_DATA = f"{CARRY_DIR}/cifar10-subset.npz"
CARRY_WHEELS = f"{CARRY_DIR}/wheels"
DEVICE_CARRY = [CARRY_DIR]
DEVICE_TIMEOUT_S = 540
DEFAULT_BUDGET_S = 420.0

JSON_NAME, LOG_NAME, PROFILES_NAME, NOTEBOOKS_TAR = \
    "gpu_check.json", "gpu_check.log", "profiles.txt", "pipeline_notebooks.tar.gz"
FILE_LIMIT_BYTES = 16 * 2**20               # the device returns files up to this size
PIPELINE_METHODS = ["ce", "hinton_kd", "feature_kd", "simkd"]
OTHER_PAIRS = [("vgg19-vgg11", False), ("resnet34-mobilenetv2", False), ("vitb-vitet", False),
               ("resnet34-resnet9", True)]   # (pair, Tiny ImageNet's shape: 64 px, 200 classes)
FULL_CIFAR10 = (50_000, 10_000)             # training and test images of one full CIFAR-10 epoch
PAPER_EPOCHS = 50
STATUSES = ("ok", "error", "timeout", "skipped")

# Sizes of the GPU run and of the dry run (CPU, toy): the same code runs with either.
GPU_SCALE = {
    "image_size": 32, "train": None, "test": None, "classes": 10,      # None: the whole shared CIFAR-10 subset
    "batch_sizes": (128, 512), "throughput_epochs": 3, "kq_samples": 5000,
    "fifty_teacher_epochs": 10, "fifty_epochs": PAPER_EPOCHS, "fifty_batch": 128,
    "notebooks": 5, "pipeline": {},                                     # the cifar10 preset's own sizes
    "pairs": {"size": 32, "classes": 10, "train": 500, "test": 200, "batch": 128},
    "tiny_imagenet": {"size": 64, "classes": 200, "train": 1000, "test": 400, "batch": 128},
    "profile_images": 2560, "profile_kq_samples": 1000, "profile_kq_layers": None, "compiled": True,
}
DRY_SCALE = {
    "image_size": 8, "train": 32, "test": 16, "classes": 10,
    "batch_sizes": (8, 16), "throughput_epochs": 2, "kq_samples": 32,
    "fifty_teacher_epochs": 1, "fifty_epochs": 2, "fifty_batch": 8,
    "notebooks": 1, "pipeline": {"train": 40, "test": 20, "kq_samples": 40, "kq_per_class": 4, "batch_size": 16},
    "pairs": {"size": 32, "classes": 2, "train": 4, "test": 2, "batch": 4},   # VGG, MobileNetV2, ViT need 32 px
    "tiny_imagenet": {"size": 8, "classes": 10, "train": 20, "test": 10, "batch": 10},
    "profile_images": 16, "profile_kq_samples": 20, "profile_kq_layers": 2, "compiled": False,
}
# What the JSON's targets compare (thresholds from gpu_bench.TARGETS): name -> what is measured here.
TARGET_WHAT = {
    "resnet9_ce_train_images_per_s": "resnet9 ce, 32 px, bf16 eager, batch 128: training images/s, eval excluded",
    "resnet9_feature_kd_over_ce": "resnet9 feature_kd / ce training images/s, same configuration",
    "resnet34_teacher_train_images_per_s": "resnet34 teacher (CE), same configuration: training images/s",
    "resnet34_kq_seconds": "kq.layer_qualities(resnet34), 5000 real CIFAR-10 images, probe off",
    "resnet9_50_epoch_run_seconds": "the measured 50-epoch resnet9 feature_kd run, extrapolated to full CIFAR-10",
}


class StageTimeout(BaseException):
    """A stage ran past its time box (a BaseException, so no `except Exception` inside a stage swallows it)."""


class Skipped(Exception):
    """A stage or case that does not run in this mode; its message is the recorded reason."""


# ----------------------------------------------------------------------------------------------------------------
# the runner: time boxes, cases, the report

@contextlib.contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise StageTimeout in the main thread once `seconds` have passed (SIGALRM; Unix only)."""
    def expire(signum: int, frame: Any) -> None:
        raise StageTimeout(f"ran past its time box of {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def scoped_env(**values: str) -> Iterator[None]:
    """Set environment variables (inherited by child processes such as notebook kernels) and restore them after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def say(ctx: dict, message: str) -> None:
    """One progress line on the console and in the log."""
    line = f"[gpu_check {time.perf_counter() - ctx['t0']:6.1f}s] {message}"
    print(line, file=ctx["console"], flush=True)
    print(line, file=ctx["log"], flush=True)


def stage_left(ctx: dict) -> float:
    """Seconds left in the running stage's time box."""
    return ctx["stage_deadline"] - time.perf_counter()


def failure(err: BaseException) -> dict:
    """An error and its traceback, as recorded in the JSON."""
    return {"error": f"{type(err).__name__}: {str(err)[:500]}",
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))}


def case(ctx: dict, rec: dict, name: str, fn: Callable[[], Any], min_s: float = 5.0) -> Any:
    """Run one independent case of a stage into rec["cases"]: ok / error (with traceback) / skipped; returns its
    result (None unless ok). Failures reported by gpu_bench's measurements (an "error" field) count as errors."""
    row: dict = {"name": name}
    rec.setdefault("cases", []).append(row)
    if stage_left(ctx) < min_s:
        row.update(status="skipped", reason=f"{stage_left(ctx):.0f} s left in the stage's time box; the case needs "
                                            f"about {min_s:.0f} s")
        return None
    buffer = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            result = fn()
    except Skipped as why:
        row.update(status="skipped", reason=str(why))
        return None
    except StageTimeout as err:
        row.update(status="timeout", **failure(err))
        raise
    except Exception as err:   # one case failing must not lose the others
        row.update(status="error", **failure(err))
        return None
    finally:
        row["seconds"] = round(time.perf_counter() - t0, 3)
        ctx["log"].write(buffer.getvalue())
        ctx["log"].flush()
    if isinstance(result, dict) and "error" in result:      # gpu_bench.measure / time_kq caught it and printed it
        text = buffer.getvalue()
        start = text.rfind("Traceback (most recent call last)")
        row.update(status="error", error=result["error"], traceback=text[start:] if start >= 0 else text[-4000:],
                   result=result)
        return None
    row.update(status="ok", result=result)
    return result


def case_result(report: dict, stage: str, name: str) -> dict | None:
    """The result of an ok case of a stage, or None."""
    row = next((c for c in report["stages"].get(stage, {}).get("cases", []) if c["name"] == name), None)
    return row["result"] if row is not None and row["status"] == "ok" else None


def write_report(ctx: dict, report: dict) -> None:
    """Write the JSON atomically into --out (after every stage, so a killed run keeps what it measured)."""
    report["elapsed_s"] = round(time.perf_counter() - ctx["t0"], 1)
    report["errors"] = collect_errors(report)
    report["targets"] = targets_block(report)
    write_atomic(ctx["out"] / JSON_NAME, lambda f: json.dump(report, f, indent=2, default=str), mode="w")


def collect_errors(report: dict) -> list[dict]:
    """Every failure of the run, flat: stage, case (None for the stage itself) and error."""
    errors = []
    for name, rec in report["stages"].items():
        if rec.get("status") in ("error", "timeout") and "error" in rec:
            errors.append({"stage": name, "case": None, "error": rec["error"]})
        errors += [{"stage": name, "case": c["name"], "error": c["error"]} for c in rec.get("cases", [])
                   if c["status"] in ("error", "timeout")]
    return errors


def run_stages(stages: list[tuple[str, Callable[[dict, dict], None], float, float]], ctx: dict,
               report: dict) -> None:
    """Run each (name, function, min seconds, cap seconds) stage into report["stages"][name], time-boxed to
    min(cap, budget left), skipped when less than its minimum is left or when not selected; never raises."""
    for name, _, _, _ in stages:
        report["stages"].setdefault(name, {"status": "pending"})
    for name, fn, min_s, cap_s in stages:
        rec = report["stages"][name] = {"status": "running"}
        left = ctx["deadline"] - time.perf_counter()
        if ctx["selected"] is not None and name not in ctx["selected"]:
            rec.update(status="skipped", reason="not selected (--stages)")
        elif left < min_s:
            rec.update(status="skipped", reason=f"{max(left, 0):.0f} s of the budget left; the stage needs at "
                                                f"least {min_s:.0f} s")
        else:
            box = min(cap_s, left)
            rec["time_box_s"] = round(box, 1)
            say(ctx, f"{name}: started (time box {box:.0f} s)")
            ctx["stage_deadline"] = time.perf_counter() + box
            t0 = time.perf_counter()
            try:
                with time_box(box), contextlib.redirect_stdout(ctx["log"]), contextlib.redirect_stderr(ctx["log"]):
                    fn(ctx, rec)
                bad = [c["name"] for c in rec.get("cases", []) if c["status"] in ("error", "timeout")]
                rec["status"] = "error" if bad else "ok"
                if bad:
                    rec["failed_cases"] = bad
            except Skipped as why:
                rec.update(status="skipped", reason=str(why))
            except StageTimeout as err:
                rec.update(status="timeout", **failure(err))
            except Exception as err:   # the check carries on past any failure
                rec.update(status="error", **failure(err))
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        say(ctx, f"{name}: {rec['status']}" + (f" ({rec['reason']})" if "reason" in rec else "")
            + (f": {rec['error']}" if "error" in rec else "")
            + (f", failed cases: {rec['failed_cases']}" if "failed_cases" in rec else ""))
        write_report(ctx, report)


# ----------------------------------------------------------------------------------------------------------------
# data

def head(data: Dataset, n_train: int | None, n_test: int | None) -> Dataset:
    """The first n_train training and n_test test images of a dataset (all for None); classes and stats kept."""
    return Dataset(name=data.name, x_train=data.x_train[:n_train], y_train=data.y_train[:n_train],
                   x_test=data.x_test[:n_test], y_test=data.y_test[:n_test], classes=data.classes,
                   mean=data.mean, std=data.std)


def main_data(ctx: dict) -> tuple[Dataset, str]:
    """The 32 px data of the throughput and 50-epoch stages, on the device (loaded once): the shared CIFAR-10 subset
    (--data), or in a dry run synthetic toy images."""
    if "main_data" not in ctx["memo"]:
        s = ctx["scale"]
        if ctx["dry"]:
            data = gpu_bench.synthetic(f"synthetic{s['image_size']}", s["train"], s["test"], s["image_size"],
                                       s["classes"])
            source = "synthetic (dry run)"
        else:
            if not ctx["data_path"].exists():
                raise FileNotFoundError(f"no dataset at {ctx['data_path']}: pass --data (the shared "
                                        f"cifar10-subset.npz; benchmarks/prepare_gpu_check.py copies it into "
                                        f"{CARRY_DATA})")
            data, source = head(load_dataset(ctx["data_path"], progress=False), s["train"], s["test"]), \
                str(ctx["data_path"])
        ctx["memo"]["main_data"] = (data.to(ctx["device"]), source)
    return ctx["memo"]["main_data"]


def describe(data: Dataset, source: str) -> dict:
    """A dataset's shape as the JSON records it."""
    return {"name": data.name, "source": source, "num_train": data.num_train, "num_test": int(len(data.y_test)),
            "num_classes": data.num_classes, "image_size": data.image_size}


def save_npz(data: Dataset, path: Path) -> Path:
    """Write a dataset as the .npz kdutils.data.load_dataset reads (uint8 NHWC images, int64 labels, names)."""
    nhwc = lambda x: x.cpu().permute(0, 2, 3, 1).numpy()  # noqa: E731
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=nhwc(data.x_train), y_train=data.y_train.cpu().numpy(), x_test=nhwc(data.x_test),
             y_test=data.y_test.cpu().numpy(), classes=np.array(data.classes, dtype=str))
    return path


# ----------------------------------------------------------------------------------------------------------------
# stage 1: the environment

def precision_rule(device: torch.device) -> dict:
    """What the precision rule (kdutils.precision.precision_for) chooses on this device, and the dtype a matmul
    really gets under its autocast."""
    from kdutils.precision import autocast, precision_for, record
    precision = precision_for(device)
    a = torch.ones(8, 8, device=device)
    with autocast(precision):
        dtype = str((a @ a).dtype)
    return {"precision.precision_for": record(precision), "autocast_dtype": dtype}


def nvidia_smi() -> str | None:
    """nvidia-smi's name, driver, memory and clocks line, or None where it is missing."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw"
    done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=15)
    return (done.stdout or done.stderr).strip()


def stage_environment(ctx: dict, rec: dict) -> None:
    """Versions, the device and the precision rule's choice."""
    from kdutils.train import library_versions
    device = ctx["device"]
    rec.update(python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
               torch_cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               libraries=library_versions(), device=gpu_bench.device_name(device), device_type=device.type,
               torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
               fp32_matmul_precision=torch.get_float32_matmul_precision(),
               cudnn_benchmark=torch.backends.cudnn.benchmark, precision_rule=precision_rule(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=[props.major, props.minor],
                   multiprocessors=props.multi_processor_count, nvidia_smi=nvidia_smi())


# ----------------------------------------------------------------------------------------------------------------
# stage 2: throughput (and the compiled variants, stage 7)

def precision_text(device: torch.device) -> str:
    """The precision rule's choice on `device` in words (kdutils.precision.describe)."""
    from kdutils.precision import describe, precision_for
    return describe(precision_for(device))


def throughput_entry(ctx: dict, data: Dataset, role: str, model: str, method: str, batch: int,
                     compiled: bool) -> dict:
    """The fields gpu_bench.measure records for one run (amp=True: the precision rule's choice)."""
    return {"role": role, "model": model, "method": method, "teacher": "resnet34" if role == "student" else None,
            "image_size": data.image_size, "num_classes": data.num_classes, "dataset": data.name,
            "precision": precision_text(ctx["device"]), "compile": compiled,
            "device": gpu_bench.device_name(ctx["device"]), "torch": torch.__version__, "batch_size": batch}


def throughput_cases(ctx: dict, rec: dict, batches: tuple[int, ...], compiled: bool, min_s: float) -> None:
    """resnet9 ce and feature_kd and the resnet34 teacher at each batch size, through gpu_bench's measurement."""
    data, source = main_data(ctx)
    rec["data"] = describe(data, source)
    epochs = ctx["scale"]["throughput_epochs"]
    seed_everything(0)
    teacher = build_model("resnet34", data.num_classes, data.image_size)
    cache: dict = {}           # teacher features and logits computed once, before the first timed epoch
    suffix = " compiled" if compiled else ""
    for batch in batches:
        common = dict(epochs=epochs, batch_size=batch, seed=0, device=ctx["device"], progress=False)
        for method in ("ce", "feature_kd"):
            case(ctx, rec, f"resnet9 {method} b{batch}{suffix}", lambda: gpu_bench.run_student(
                teacher, "resnet34", "resnet9", method, data, True, compiled, cache, common,
                {**throughput_entry(ctx, data, "student", "resnet9", method, batch, compiled),
                 "teacher_layers": standard_layers("resnet34") if method == "feature_kd" else None}), min_s)
        case(ctx, rec, f"resnet34 teacher b{batch}{suffix}", lambda: gpu_bench.run_teacher(
            "resnet34", data, True, compiled, common,
            throughput_entry(ctx, data, "teacher", "resnet34", "ce", batch, compiled)), min_s)
        if not compiled and batch == batches[0]:
            case(ctx, rec, "kq resnet34", lambda: gpu_bench.time_kq(
                teacher.to(ctx["device"]), "resnet34", data, source, min(ctx["scale"]["kq_samples"], data.num_train),
                ctx["device"]))


def stage_throughput(ctx: dict, rec: dict) -> None:
    """Training images/s (eval excluded) at batch 128 and 512, and KQ seconds."""
    rec["definitions"] = {"train_images_per_s": "training images per epoch / (median epoch seconds over epochs "
                                                "2..N - the test evaluation's seconds): gpu_bench.measure",
                          "epochs": ctx["scale"]["throughput_epochs"]}
    throughput_cases(ctx, rec, ctx["scale"]["batch_sizes"], compiled=False, min_s=5.0)


def stage_compiled(ctx: dict, rec: dict) -> None:
    """The throughput cases at the first batch size through torch.compile, while the budget lasts."""
    if not ctx["scale"]["compiled"]:
        raise Skipped("dry run: torch.compile is timed on the GPU only (inductor on a CPU needs minutes)")
    throughput_cases(ctx, rec, ctx["scale"]["batch_sizes"][:1], compiled=True, min_s=60.0)


# ----------------------------------------------------------------------------------------------------------------
# stage 3: the 50-epoch run

def extrapolate(epoch_seconds: list[float], eval_seconds: float, train_images: int, test_images: int,
                epochs: int = PAPER_EPOCHS, full: tuple[int, int] = FULL_CIFAR10) -> dict:
    """Seconds of an `epochs`-epoch run on the full dataset from a measured run: the first epoch's extra (warm-up)
    once, plus `epochs` x (steady training seconds x full/measured training images + evaluation seconds x
    full/measured test images); steady = median of epochs 2..N (epoch 1 alone when there is one)."""
    steady = statistics.median(epoch_seconds[1:] or epoch_seconds)
    train_s = max(steady - eval_seconds, 0.0)
    full_epoch = train_s * full[0] / train_images + eval_seconds * full[1] / test_images
    warmup = max(epoch_seconds[0] - steady, 0.0)
    return {"steady_epoch_seconds": round(steady, 4), "eval_seconds": round(eval_seconds, 4),
            "train_images_per_s": round(train_images / train_s, 1) if train_s > 0 else None,
            "warmup_seconds": round(warmup, 3), "full_epoch_seconds": round(full_epoch, 4),
            "extrapolated_seconds": round(warmup + epochs * full_epoch, 1),
            "formula": f"warmup + {epochs} x (steady train s x {full[0]}/{train_images} + eval s x "
                       f"{full[1]}/{test_images})"}


def stage_fifty_epochs(ctx: dict, rec: dict) -> None:
    """A resnet9 feature_kd run with the paper's recipe from a briefly trained resnet34 and its KQ top-4 layers."""
    data, source = main_data(ctx)
    device, s = ctx["device"], ctx["scale"]
    recipe = {**student_recipe(resolve_config("cifar10")), "epochs": s["fifty_epochs"]}
    batch = s["fifty_batch"]
    rec.update(data=describe(data, source), recipe={**recipe, "batch_size": batch, "augment": False})
    seed_everything(0)
    teacher = build_model("resnet34", data.num_classes, data.image_size)
    t0 = time.perf_counter()
    history = fit(teacher, data, epochs=s["fifty_teacher_epochs"], lr=PEAK_LR["resnet34"], batch_size=batch,
                  device=device, progress=False, desc="teacher")
    rec["teacher"] = {"model": "resnet34", "epochs": len(history), "test_acc": history[-1]["test_acc"],
                      "seconds": round(time.perf_counter() - t0, 2)}
    t0 = time.perf_counter()
    qualities = layer_qualities(teacher, data, max_samples=min(s["kq_samples"], data.num_train),
                                per_class=kq_per_class("cifar10", "resnet34"), probe=False, cache_dir=None,
                                device=device, progress=False)
    layers = select_layers(qualities, k=4)
    rec["kq"] = {"teacher_layers": layers, "student_layers": distillation_layers("resnet9", 4),
                 "seconds": round(time.perf_counter() - t0, 2)}
    cache: dict = {}
    t0 = time.perf_counter()
    fill_teacher_cache(teacher, "resnet9", data, "feature_kd", cache=cache, teacher_layers=layers, device=device,
                       batch_size=batch)
    rec["teacher_cache_seconds"] = round(time.perf_counter() - t0, 2)
    seed_everything(0)
    student = build_model("resnet9", data.num_classes, data.image_size)
    t0 = time.perf_counter()
    history = distill(teacher, student, data, "feature_kd", teacher_layers=layers, seed=0, batch_size=batch,
                      cache=cache, device=device, progress=False, **recipe)
    rec["run_seconds"] = round(time.perf_counter() - t0, 2)
    rec["epoch_seconds"] = [round(row["seconds"], 4) for row in history]
    rec["test_acc"] = [round(row["test_acc"], 4) for row in history]
    rec["final_test_acc"], rec["best_test_acc"] = rec["test_acc"][-1], max(rec["test_acc"])
    images = (data.num_train // batch) * batch if data.num_train > batch else data.num_train
    rec["extrapolation"] = extrapolate(rec["epoch_seconds"], gpu_bench.timed_eval(student, data), images,
                                       int(len(data.y_test)))


# ----------------------------------------------------------------------------------------------------------------
# stage 4: the pipeline

def save_standin_weights(arch: str, hub_dir: Path, seed: int = 0) -> dict:
    """Write seeded random weights of a torchvision architecture under the name of its ImageNet weights file into
    `hub_dir`/checkpoints, where torchvision (and so kdutils.models.build_model(pretrained=True)) reads them
    without downloading: torch hub checks a file's hash only when it downloads it."""
    import torchvision.models as tvm
    weights = tvm.get_model_weights(arch).IMAGENET1K_V1
    torch.manual_seed(seed)
    state = tvm.get_model(arch).state_dict()
    path = hub_dir / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return {"file": path.name, "weights": str(weights), "bytes": path.stat().st_size,
            "probe_key": "layer1.0.conv1.weight", "probe_sum": float(state["layer1.0.conv1.weight"].sum())}


def notebook_seconds(executed: Path) -> dict[str, float | None]:
    """Each executed notebook's duration as papermill recorded it."""
    import nbformat
    out = {}
    for path in sorted(executed.glob("*.ipynb")):
        duration = nbformat.read(path, as_version=4).metadata.get("papermill", {}).get("duration")
        out[path.name] = None if duration is None else round(float(duration), 1)
    return out


def pack_notebooks(executed: Path, target: Path) -> dict:
    """The executed notebooks and the kernels' log in one .tar.gz (dropped again when over the device's file
    limit)."""
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted(executed.iterdir()):
            tar.add(path, arcname=f"executed/{path.name}")
    size = target.stat().st_size
    if size > FILE_LIMIT_BYTES:
        target.unlink()
        return {"file": None, "bytes": size, "note": "over the device's 16 MiB file limit: not kept"}
    return {"file": target.name, "bytes": size}


def stage_pipeline(ctx: dict, rec: dict) -> None:
    """Notebooks 1-5 (the dry run: notebook 1) on the preset cifar10 with a stand-in ImageNet-pretrained teacher."""
    from kdutils.pipeline import run_pipeline
    from kdutils.rundir import NOTEBOOKS
    s, work = ctx["scale"], ctx["work"] / "pipeline"
    if ctx["dry"]:
        toy = gpu_bench.synthetic("toy", s["pipeline"]["train"], s["pipeline"]["test"], s["image_size"],
                                  s["classes"])
        dataset = save_npz(toy, work / f"toy{s['image_size']}.npz")
    else:
        dataset = ctx["data_path"].resolve()
        if not dataset.exists():
            raise FileNotFoundError(f"no dataset at {dataset}: pass --data (see {CARRY_DATA})")
    params = {"dataset": str(dataset), "teacher_epochs": 1, "student_epochs": 1, "seeds": [0], "validation_seeds": 1,
              "methods": PIPELINE_METHODS,
              **{k: v for k, v in s["pipeline"].items() if k in ("kq_samples", "kq_per_class", "batch_size")}}
    count = ctx["notebooks"]
    rec.update(preset="cifar10", params=params, notebooks=list(NOTEBOOKS[:count]))
    if count < len(NOTEBOOKS):
        rec["notebooks_skipped"] = {"notebooks": list(NOTEBOOKS[count:]),
                                    "reason": f"--notebooks {count}" + (" (the dry run's default: each notebook "
                                                                        "costs 10-30 s of kernel start, imports and "
                                                                        "plots on a CPU)" if ctx["dry"] else "")}
    config = resolve_config("cifar10", **{k: v for k, v in params.items() if k != "dataset"})
    rec["pair"] = f"{config['teacher']}-{config['student']}"
    env = {"TORCH_HOME": str(work / "torch_home")}
    if ctx["threads"] is not None:
        env["OMP_NUM_THREADS"] = str(ctx["threads"])     # the kernels' torch threads, like this process's
    with scoped_env(**env):
        hub = Path(torch.hub.get_dir())
        rec["standin_weights"] = save_standin_weights(config["teacher"], hub)
        probe = build_model(config["teacher"], 10, 32, pretrained=True)   # the same loading code, in-process
        loaded, saved = float(probe.get_parameter(rec["standin_weights"]["probe_key"]).sum()), \
            rec["standin_weights"]["probe_sum"]
        if abs(loaded - saved) > 1e-3 * max(1.0, abs(loaded)):
            raise RuntimeError(f"build_model({config['teacher']!r}, pretrained=True) did not load the stand-in "
                               f"weights from {hub}/checkpoints (sum {loaded} vs {saved})")
        rec["standin_weights"]["loaded_in_process"] = True
        run_dir = work / "run"
        t0 = time.perf_counter()
        try:
            results = run_pipeline(run_dir, "cifar10", params, progress=False, notebooks=NOTEBOOKS[:count])
        finally:
            rec["seconds_pipeline"] = round(time.perf_counter() - t0, 1)
            if (run_dir / "executed").exists():
                rec["notebook_seconds"] = notebook_seconds(run_dir / "executed")
                rec["executed"] = pack_notebooks(run_dir / "executed", ctx["out"] / NOTEBOOKS_TAR)
    teacher = json.loads((run_dir / "teacher_metrics.json").read_text())
    rec["teacher"] = {k: teacher.get(k) for k in ("model", "pretrained", "epochs", "final_test_acc", "seconds")}
    if teacher.get("pretrained") is not True:
        raise RuntimeError("notebook 1 did not use the stand-in ImageNet weights (teacher_metrics.json says "
                           f"pretrained={teacher.get('pretrained')!r}); see its output in {NOTEBOOKS_TAR}")
    if results:
        rec["methods"] = {m: {"final_acc": row.get("final_acc"), "seconds": row.get("seconds")}
                          for m, row in results.get("methods", {}).items()}
        missing = sorted(set(PIPELINE_METHODS) - set(rec["methods"]))
        if missing:
            raise RuntimeError(f"results.json lacks the method(s) {missing}")


# ----------------------------------------------------------------------------------------------------------------
# stage 5: the other pairs

def run_pair(ctx: dict, pair: str, data: Dataset, batch: int, kq_dataset: str) -> dict:
    """One pair through the notebooks' calls: fit the teacher, layer geometry, KQ, selection, distill(feature_kd)
    with the teacher cache; seconds and results of each step."""
    device = ctx["device"]
    teacher_name, student_name = PAIRS[pair]["teacher"], PAIRS[pair]["student"]
    out: dict = {"teacher": teacher_name, "student": student_name, "data": describe(data, "synthetic")}
    clock = time.perf_counter()

    def lap(key: str) -> None:
        nonlocal clock
        out.setdefault("seconds", {})[key] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    seed_everything(0)
    teacher = build_model(teacher_name, data.num_classes, data.image_size)
    history = fit(teacher, data, epochs=1, lr=PEAK_LR[teacher_name], batch_size=batch, device=device,
                  progress=False, desc=teacher_name)
    out["teacher_test_acc"] = history[-1]["test_acc"]
    lap("fit")
    out["teacher_layers"] = len(layer_table(teacher, data.image_size))
    kq_args = dict(max_samples=min(5000, data.num_train), per_class=kq_per_class(kq_dataset, teacher_name), seed=0,
                   cache_dir=ctx["work"] / "kq" / f"{pair}-{data.image_size}", device=device, progress=False)
    analysis = layer_analysis(teacher, data, **kq_args)
    out["probe_acc"] = {i: round(float(r["probe_acc"]), 4) for i, r in analysis.items()}
    lap("layer_analysis")
    qualities = layer_qualities(teacher, data, **kq_args)      # from the cache layer_analysis wrote
    chosen = select_layers(qualities, k=4)
    out.update(kq_layers=chosen, student_layers=distillation_layers(student_name, 4))
    lap("layer_qualities")
    cache: dict = {}
    fill_teacher_cache(teacher, student_name, data, "feature_kd", cache=cache, teacher_layers=chosen,
                       device=device, batch_size=batch)
    lap("teacher_cache")
    history = distill(teacher, student_name, data, "feature_kd", teacher_layers=chosen, epochs=1,
                      lr=PEAK_LR[student_name], batch_size=batch, cache=cache, device=device, progress=False)
    out["student_test_acc"] = history[-1]["test_acc"]
    lap("distill")
    return out


def stage_pairs(ctx: dict, rec: dict) -> None:
    """vgg19-vgg11, resnet34-mobilenetv2, vitb-vitet at 32 px; resnet34-resnet9 in Tiny ImageNet's shape."""
    for pair, tiny in OTHER_PAIRS:
        size = ctx["scale"]["tiny_imagenet" if tiny else "pairs"]
        key = f"pairs-{size['size']}-{size['classes']}"
        if key not in ctx["memo"]:
            ctx["memo"][key] = gpu_bench.synthetic(f"synthetic{size['size']}", size["train"], size["test"],
                                                   size["size"], size["classes"]).to(ctx["device"])
        data = ctx["memo"][key]
        case(ctx, rec, f"{pair} {size['size']}px {size['classes']} classes",
             lambda: run_pair(ctx, pair, data, size["batch"], "tinyimagenet" if tiny else "cifar10"))


# ----------------------------------------------------------------------------------------------------------------
# the targets and stage 6: profiles of the missed ones

def targets_block(report: dict) -> dict:
    """Each target's value (batch 128, bf16, eager), verdict and best measured configuration; not judged in a dry
    run (toy sizes on a CPU)."""
    dry, first = report["dry_run"], report["scale"]["batch_sizes"][0]

    def rate(name: str) -> float | None:
        result = case_result(report, "compiled" if name.endswith("compiled") else "throughput", name)
        return result.get("train_images_per_s") if result else None

    def configs(model: str) -> dict[str, float | None]:
        names = [f"{model} b{b}" for b in report["scale"]["batch_sizes"]] + [f"{model} b{first} compiled"]
        return {n.split(" ", 2)[-1]: rate(n) for n in names}

    ce, fkd, teacher = configs("resnet9 ce"), configs("resnet9 feature_kd"), configs("resnet34 teacher")
    ratio = {k: round(fkd[k] / ce[k], 3) if fkd[k] and ce[k] else None for k in ce}
    kq = case_result(report, "throughput", "kq resnet34")
    fifty = report["stages"].get("fifty_epochs", {}).get("extrapolation")
    values = {"resnet9_ce_train_images_per_s": ce, "resnet9_feature_kd_over_ce": ratio,
              "resnet34_teacher_train_images_per_s": teacher,
              "resnet34_kq_seconds": {f"b{first}": kq.get("seconds") if kq else None},
              "resnet9_50_epoch_run_seconds": {f"b{report['scale']['fifty_batch']}":
                                               fifty["extrapolated_seconds"] if fifty else None}}
    out = {}
    for name, (op, limit, _) in gpu_bench.TARGETS.items():
        measured = {k: v for k, v in values[name].items() if v is not None}
        value = next(iter(values[name].values()))      # the default configuration comes first
        best = (max if op == ">=" else min)(measured, key=measured.get) if measured else None
        ok = (lambda v: None if v is None or dry else (v >= limit if op == ">=" else v <= limit))  # noqa: E731
        out[name] = {"target": f"{op} {limit:g}", "what": TARGET_WHAT[name], "value": value, "met": ok(value),
                     "status": ("dry run: not judged (toy sizes on a CPU)" if dry else "not measured" if value is None
                                else "met" if ok(value) else "not met"),
                     "configs": values[name], "best_config": best,
                     "best_value": measured.get(best) if best else None}
    return out


def profile(fn: Callable[[], Any], cuda: bool, title: str, path: Path, rows: int = 15) -> dict:
    """Run fn under torch.profiler; append the table of its top ops (by self device time on CUDA, self CPU time on a
    CPU) to `path`; return the top 8 as data."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    averages = prof.key_averages()
    with path.open("a") as f:
        f.write(f"=== {title} ({seconds:.2f} s under the profiler, sorted by {key})\n")
        f.write(averages.table(sort_by=key, row_limit=rows) + "\n\n")
    top = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:8]
    return {"file": path.name, "sort_by": key, "seconds": round(seconds, 3),
            "top_ops": [{"name": e.key, "self_ms": round(getattr(e, key) / 1000, 3), "calls": e.count} for e in top]}


# target -> the workload its case runs (feature_kd's two targets share one)
PROFILED_WORKLOAD = {"resnet9_ce_train_images_per_s": "resnet9 ce fit",
                     "resnet9_feature_kd_over_ce": "resnet9 feature_kd distill",
                     "resnet34_teacher_train_images_per_s": "resnet34 ce fit",
                     "resnet34_kq_seconds": "kq resnet34",
                     "resnet9_50_epoch_run_seconds": "resnet9 feature_kd distill"}


def profile_workload(ctx: dict, workload: str) -> Callable[[], Any]:
    """A PROFILED_WORKLOAD case, shortened for the profiler (its set-up, e.g. the teacher cache, done here)."""
    data, _ = main_data(ctx)
    s, device = ctx["scale"], ctx["device"]
    batch = s["batch_sizes"][0]
    short = head(data, s["profile_images"], 256)
    train = dict(epochs=1, batch_size=batch, device=device, progress=False)
    if workload == "kq resnet34":
        seed_everything(0)
        model = build_model("resnet34", data.num_classes, data.image_size)
        # every layer, or (dry run) the deepest few: the profiler's own bookkeeping grows with the op count
        count, deepest = generalized_layer_count("resnet34"), s["profile_kq_layers"]
        layers = None if deepest is None else list(range(count - deepest, count))
        return lambda: layer_qualities(model, data, layers, max_samples=min(s["profile_kq_samples"], data.num_train),
                                       probe=False, cache_dir=None, device=device, progress=False)
    if workload.endswith(" ce fit"):
        name = workload.split()[0]
        seed_everything(0)
        model = build_model(name, data.num_classes, data.image_size)
        return lambda: fit(model, short, lr=PEAK_LR[name], **train)
    seed_everything(0)
    teacher = build_model("resnet34", data.num_classes, data.image_size)
    cache: dict = {}
    layers = standard_layers("resnet34")
    fill_teacher_cache(teacher, "resnet9", short, "feature_kd", cache=cache, teacher_layers=layers, device=device,
                       batch_size=batch)                                       # outside the profile, as in timing
    return lambda: distill(teacher, "resnet9", short, "feature_kd", teacher_layers=layers, cache=cache,
                           lr=PEAK_LR["resnet9"], **train)


def stage_profiles(ctx: dict, rec: dict) -> None:
    """A torch.profiler summary of each missed target's case (the dry run profiles every case, to prove the path)."""
    targets = targets_block(ctx["report"])
    wanted = [n for n, t in targets.items() if ctx["dry"] or t["met"] is False]
    rec["targets_profiled"] = wanted
    if not wanted:
        raise Skipped("no target missed")
    done: dict[str, dict] = {}
    for name in wanted:
        def run(name: str = name) -> dict:
            workload = PROFILED_WORKLOAD[name]
            if workload not in done:
                done[workload] = {"workload": workload, **profile(profile_workload(ctx, workload),
                                                                  ctx["device"].type == "cuda", workload,
                                                                  ctx["out"] / PROFILES_NAME)}
            return {"target": name, **done[workload]}
        case(ctx, rec, name, run, min_s=10.0)


# ----------------------------------------------------------------------------------------------------------------
# entry point

STAGES: list[tuple[str, Callable[[dict, dict], None], float, float]] = [   # name, function, min s, cap s
    ("environment", stage_environment, 0.0, 60.0),
    ("throughput", stage_throughput, 30.0, 150.0),
    ("fifty_epochs", stage_fifty_epochs, 30.0, 150.0),
    ("pipeline", stage_pipeline, 60.0, 240.0),
    ("pairs", stage_pairs, 30.0, 150.0),
    ("profiles", stage_profiles, 10.0, 90.0),
    ("compiled", stage_compiled, 60.0, 300.0),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help=f"folder for {JSON_NAME}, {LOG_NAME}, {PROFILES_NAME} "
                                                           f"and {NOTEBOOKS_TAR}")
    p.add_argument("--work", type=Path, help="folder for bulky intermediate files (default: a new temporary folder, "
                                             "removed at the end; a given one is kept)")
    p.add_argument("--data", type=Path, default=gpu_bench.DEFAULT_DATA,
                   help="the shared CIFAR-10 subset .npz (default: ../shared/data/cifar10-subset.npz)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, under a minute: proves the code")
    p.add_argument("--budget", type=float, help=f"seconds for all stages (default {DEFAULT_BUDGET_S:g})")
    p.add_argument("--stages", nargs="+", choices=[s[0] for s in STAGES], help="run only these stages")
    p.add_argument("--notebooks", type=int, choices=range(1, 6), metavar="{1..5}",
                   help="how many of notebooks 1-5 the pipeline stage runs (default 5; 1 in a dry run)")
    p.add_argument("--threads", type=int, help="torch threads here and in the notebook kernels (OMP_NUM_THREADS); "
                                               "default: torch's own, 1 in a dry run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the stages; write the JSON and logs into --out; 0 when nothing failed, 1 when something did."""
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; pass --dry-run for the CPU run at toy sizes", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else (1 if args.dry_run else None)
    if threads is not None:
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / PROFILES_NAME).unlink(missing_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    scale = DRY_SCALE if args.dry_run else GPU_SCALE
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET_S
    report: dict = {"check": "gpu_check", "dry_run": args.dry_run, "argv": sys.argv[1:] if argv is None else argv,
                    "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "budget_s": budget,
                    "device": None, "scale": {k: v for k, v in scale.items()}, "stages": {}}
    with (args.out / LOG_NAME).open("w", buffering=1) as log:
        t0 = time.perf_counter()
        ctx = {"dry": args.dry_run, "scale": scale, "device": torch.device("cpu" if args.dry_run else "cuda"),
               "data_path": args.data, "work": work, "out": args.out, "log": log, "console": sys.stderr,
               "t0": t0, "deadline": t0 + budget, "stage_deadline": t0 + budget, "memo": {}, "report": report,
               "selected": set(args.stages) if args.stages else None, "threads": threads,
               "notebooks": args.notebooks or scale["notebooks"]}
        report["device"] = gpu_bench.device_name(ctx["device"])
        try:
            run_stages(STAGES, ctx, report)
        finally:
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
    for name, rec in report["stages"].items():
        print(f"{name:13s} {rec['status']:8s} {rec.get('seconds', 0):7.1f} s  {rec.get('reason', '')}")
    for name, t in report["targets"].items():
        print(f"{name:38s} {t['target']:>10s}  value {t['value']}  {t['status']}")
    print(f"{len(report['errors'])} error(s); {report['elapsed_s']} s; {args.out / JSON_NAME}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
