"""Presets, run-directory artifacts (atomic JSON, manifests), result tables and the headless notebook runner.

Every notebook starts the same way: its `parameters` cell holds `preset = "auto"`, `run_dir = None` and, for each
preset key it lets you change, `key = None` (None keeps the preset's value). It then calls

    config = resolve_config(preset, **config_overrides(globals()))

so `papermill nb.ipynb out.ipynb -p preset quick -p student_epochs 2` and the pipeline's `-p student_epochs 2` both
work. Each notebook reads its inputs with `require_artifact` (a clear "run notebook N first" error), writes its outputs
into `run_dir` and records them with `write_manifest`. Notebook 5 writes `run_dir/results.json` (`summarize_runs`).

Run notebooks 1-5 (6 with --validate-kq) headless, in order, stopping at the first failing cell:

    python -m kdutils.pipeline --preset quick --run-dir runs/quick -p student_epochs 2
    python -m kdutils.pipeline --list-presets

Before the first kernel starts, the runner checks what the notebooks would refuse later (parameters, `parameters`
cells, the dataset and whether the pair takes its images, the validation split, a writable run_dir), and it holds
run_dir/run.lock for the whole run, so a second run into the same folder is refused (run_lock).

papermill, nbformat and yaml are imported only by the runner and the CLI, so notebooks need none of them.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import errno
import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from kdutils.distill import METHODS, REGISTRY  # method name -> one-line description / full entry
from kdutils.kq import kq_per_class
from kdutils.layers import generalized_layer_count, standard_layers
from kdutils.models import MODELS, has_imagenet_weights
from kdutils.train import SCHEDULES, default_device, library_versions

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = ("01_train_teacher.ipynb", "02_probe_layer_geometry.ipynb", "03_compute_kq.ipynb",
             "04_distill_without_ce.ipynb", "05_compare_to_hinton_kd.ipynb")
# Run after notebook 5 when asked (--validate-kq): does KQ pick the right layers?
VALIDATION_NOTEBOOK = "06_validate_kq.ipynb"
RESULTS_FILE = "results.json"

# Peak (OneCycle max) learning rate per model: METHOD.md decision 3 (MaxLR), for teachers and students alike.
PEAK_LR = {
    "resnet34": 0.0075, "resnet9": 0.0075, "mobilenet_v2": 0.0075,
    "vgg19_bn": 0.005, "vgg11_bn": 0.005,
    "vit_b": 0.0001, "vit_et": 0.001,
    "resnet18_narrow": 0.0075, "resnet10_narrow": 0.0075,
}

# Teacher -> student pairs: the paper's four, plus the CPU-scale pair of the `quick` and `cifar10-cpu` presets.
PAIRS = {
    "resnet34-resnet9": {"teacher": "resnet34", "student": "resnet9"},
    "vgg19-vgg11": {"teacher": "vgg19_bn", "student": "vgg11_bn"},
    "resnet34-mobilenetv2": {"teacher": "resnet34", "student": "mobilenet_v2"},
    "vitb-vitet": {"teacher": "vit_b", "student": "vit_et"},
    "resnet18_narrow-resnet10_narrow": {"teacher": "resnet18_narrow", "student": "resnet10_narrow"},
}

# Peak LR of the "+240E" long schedule (SGD, METHOD.md section 6): 0.05 for ResNet-9/MobileNetV2, 0.01 for VGG-11 and
# ViT-ET; the CPU-scale student follows the ResNets.
LONG_LR = {"resnet9": 0.05, "mobilenet_v2": 0.05, "vgg11_bn": 0.01, "vit_et": 0.01, "resnet10_narrow": 0.05,
           "resnet34": 0.05, "resnet18_narrow": 0.05, "vgg19_bn": 0.01, "vit_b": 0.01}
LONG_WEIGHT_DECAY = 5e-4

IMAGE_SIZES = {"digits": 16, "cifar10": 32, "cifar100": 32, "tinyimagenet": 64}

PARAMETERS = {
    "dataset": "dataset name (digits, cifar10, cifar100, tinyimagenet) or a path to an .npz file",
    "per_class": "keep this many training images per class (seeded subset); all = the whole train split",
    "image_size": "input height/width in pixels: the data's own (a named dataset's, or read from the .npz file), "
                  "recorded for the models; a value that differs from the data's is refused",
    "pair": "teacher-student pair (one of Pairs below); sets teacher, student and their peak LRs",
    "teacher": "teacher model name (kdutils.models)",
    "student": "student model name (kdutils.models)",
    "pretrained": "start the teacher from ImageNet weights (falls back to scratch with a message when offline)",
    "teacher_epochs": "teacher training / fine-tuning epochs",
    "student_epochs": "epochs of every student run (all methods share the budget)",
    "teacher_lr": "teacher peak LR (AdamW + OneCycle)",
    "backbone_lr_scale": "pretrained teacher only: its backbone's peak LR is this x teacher_lr (the paper: 0.01)",
    "student_lr": "student peak LR, the same for every method",
    "schedule": "student schedule: onecycle (AdamW + OneCycle, the paper's) or long (the +240E baselines: SGD "
                "momentum 0.9, weight decay 5e-4, x0.1 at epochs 150/180/210 of 240; sets student_epochs 240 and "
                "student_lr 0.05 / 0.01 unless given)",
    "weight_decay": "AdamW weight decay",
    "batch_size": "minibatch size",
    "augment": "random crop + horizontal flip (the paper's main runs use none)",
    "seeds": "student seeds, one run per method and seed (the teacher uses the first)",
    "methods": "student methods to train and compare (see Methods below)",
    "kq_samples": "class-balanced training images used for knowledge quality (KQ) statistics (subset A)",
    "kq_per_class": "images per class for KQ's class spectra (subset B): 500, but 50 for CNN teachers on Tiny "
                    "ImageNet (METHOD.md 3.1); follows dataset and teacher unless set",
    "k": "number of distilled layer pairs, 1 to the student's standard-layer count (4): the top-k teacher layers by "
         "KQ, paired with the student's k deepest standard layers",
    "monitor": "record, after each epoch of notebook 5's feature methods with 1x1 projectors, the cosine between the "
               "backbone gradients of the logit and feature terms and each distilled layer's distance to the "
               "teacher (distill(..., monitor=True); the training itself is unchanged)",
    "val_fraction": "share of the training images held out (seeded, class-balanced) as the validation split that "
                    "notebook 6 scores layers on; every notebook trains on the rest. 0 = the paper's protocol "
                    "(all training images; notebook 6 then carves its split from images the teacher saw)",
    "validation_epochs": "epochs of each student run of notebook 6 (the single-layer sweep and the selections)",
    "validation_seeds": "how many of `seeds` (the first ones) notebook 6 trains each run with",
    "validation_layers": "teacher layers of notebook 6's single-layer sweep: all (every generalized layer) or a "
                         "list such as [2,5,8] (correlations over fewer layers are weaker evidence)",
}

_CPU_PAIR = "resnet18_narrow-resnet10_narrow"
# CPU presets: small, but enough to separate the two effects: layer choice (feature_kd vs standard_layers) and CE in
# the backbone (standard_layers vs fitnets_kd_nokl, feature_kd vs feature_kd_ce).
_CPU_METHODS = ["ce", "hinton_kd", "feature_kd", "feature_kd_ce", "standard_layers", "fitnets_kd_nokl"]
# The paper's main comparison (its result figure): Ours against Van. KD, Van. KD Std., Base FKD, Base FKD+FC, Sim.
# Pres., SimKD, SemCKD and the CE student.
_PAPER_METHODS = ["ce", "feature_kd", "hinton_kd", "hinton_kd_std", "fitnets_kd", "fitnets_fc_kd", "sp_kd", "simkd",
                  "semckd"]


def _preset(dataset: str, pair: str, *, epochs: tuple[int, int], seeds: list[int], pretrained: bool,
            methods: list[str], image_size: int = 32, per_class: int | None = None, val_fraction: float = 0.1,
            validation_epochs: int | None = None) -> dict:
    """One preset's full key set (teacher, student and LRs follow from the pair)."""
    teacher, student = PAIRS[pair]["teacher"], PAIRS[pair]["student"]
    return {"dataset": dataset, "per_class": per_class, "image_size": image_size, "pair": pair,
            "teacher": teacher, "student": student, "pretrained": pretrained,
            "teacher_epochs": epochs[0], "student_epochs": epochs[1],
            "teacher_lr": PEAK_LR[teacher], "backbone_lr_scale": 0.01, "student_lr": PEAK_LR[student],
            "schedule": "onecycle",
            "weight_decay": 0.01, "batch_size": 128, "augment": False, "seeds": seeds, "methods": methods,
            "kq_samples": 5000, "kq_per_class": kq_per_class(dataset, teacher), "k": 4, "monitor": True,
            "val_fraction": val_fraction, "validation_epochs": validation_epochs or epochs[1],
            "validation_seeds": min(2, len(seeds)), "validation_layers": "all"}


PRESETS = {
    "quick": _preset("digits", _CPU_PAIR, epochs=(4, 4), seeds=[0], pretrained=False, methods=_CPU_METHODS,
                     image_size=16, validation_epochs=2),
    # Sized to about 80 minutes for notebooks 1-6 on 2 cores, from measured epoch times on the shared subset (4,500
    # training images after the validation split): teacher ~65 s/epoch, students ~11-15 s/epoch; notebook 5 is 18
    # runs x 8 epochs, notebook 6 is 20 single-layer runs + 2 x (distinct selections, 5 here) of 4 epochs.
    "cifar10-cpu": _preset("cifar10", _CPU_PAIR, epochs=(10, 8), seeds=[0, 1, 2], pretrained=False,
                           methods=_CPU_METHODS, per_class=500, validation_epochs=4),
    "cifar10": _preset("cifar10", "resnet34-resnet9", epochs=(50, 50), seeds=[0, 1, 2], pretrained=True,
                       methods=_PAPER_METHODS, val_fraction=0.0),
    "cifar100": _preset("cifar100", "resnet34-resnet9", epochs=(50, 50), seeds=[0, 1, 2], pretrained=True,
                        methods=_PAPER_METHODS, val_fraction=0.0),
    "tinyimagenet": _preset("tinyimagenet", "resnet34-resnet9", epochs=(50, 50), seeds=[0, 1, 2], pretrained=True,
                            methods=_PAPER_METHODS, image_size=64, val_fraction=0.0),
    # Colab's free GPU (a T4) in about 30 minutes for the whole series: the paper's data and pair, a short budget,
    # two seeds and the six methods that separate layer choice from CE removal (see estimate_runtime).
    "colab": _preset("cifar10", "resnet34-resnet9", epochs=(3, 5), seeds=[0, 1], pretrained=True,
                     methods=_CPU_METHODS),
}

PRESET_NOTES = {
    "quick": "CPU smoke run on scikit-learn's bundled digits at 16x16 (offline); notebooks 1-5 in about "
             "3 minutes on 2 cores (about 5 with notebook 6)",
    "cifar10-cpu": "CIFAR-10 (500 train images per class, 10% of them held out for validation; the full test set) "
                   "with the CPU-scale pair, 10 + 8 epochs, 3 seeds (notebook 6: 4-epoch runs, 2 seeds); "
                   "notebooks 1-6 in 82 minutes on 2 CPU cores (measured on the shared subset, 2026-12-02)",
    "cifar10": "the paper's setting on CIFAR-10 (50 epochs, AdamW/OneCycle, no augmentation, 3 seeds); GPU",
    "cifar100": "the paper's setting on CIFAR-100 (fine labels); GPU",
    "tinyimagenet": "the paper's setting on Tiny ImageNet (64x64, 200 classes); GPU",
    "colab": "real CIFAR-10 with the paper's pair (pretrained ResNet34 -> ResNet9), 3 + 5 epochs, 2 seeds, the six "
             "methods of the CPU presets; sized for about 30 minutes on a free Colab T4 (an estimate, not "
             "measured: see estimate_runtime); what auto picks on Colab",
}

# Sustained training throughput ASSUMED per device (FLOP/s; forward + backward, mixed precision), for runtime
# estimates only. None of these GPUs has been measured by this project. Basis: the vendors' peak figures (T4: 65
# TFLOPS fp16 tensor / 8.1 fp32; A100: 312 bf16; H100 SXM: 989 bf16) and the rule of thumb that ResNet training
# sustains roughly 10% (T4) to 20-25% (A100, H100) of the tensor peak; for the T4 this matches the often quoted
# ~250 images/s of mixed-precision ResNet-50 training (~25 GFLOP per training image). Small 32x32 models use a GPU
# less well, so real runs may be slower; gpu_bench.py measures the real numbers.
ASSUMED_TRAIN_FLOPS = {"t4": 6e12, "a100": 60e12, "h100": 150e12}
NOTEBOOK_OVERHEAD_S = 30.0   # assumed per notebook: kernel start, data loading, KQ statistics, plots
GPU_PRESETS = ("colab", "cifar10", "cifar100", "tinyimagenet")
TRAIN_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "tinyimagenet": (100_000, 10_000),
               "digits": (1_437, 360)}


# ----------------------------------------------------------------------------------------------------------------
# configuration

def preset_name(preset: str = "auto", colab: bool | None = None) -> str:
    """The concrete preset for a name: 'auto' is colab on Google Colab, else cifar10 with CUDA, else quick.

    `colab` overrides the detection (kdutils.notebook.on_colab: True/False forces it, None detects)."""
    if preset == "auto":
        from kdutils.notebook import on_colab  # imported here: kdutils.notebook imports this module
        if on_colab(colab):
            return "colab"
        return "cifar10" if torch.cuda.is_available() else "quick"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: auto, {', '.join(PRESETS)}.")
    return preset


def _checked(key: str, value: Any, default: Any) -> Any:
    """`value` if it has the kind of the preset's `default` (ints -> floats, tuples -> lists), else a ValueError."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "per_class":
        value = None if value == "all" else value
        kind, ok = "a positive int, or all (the whole train split)", value is None or (
            number and isinstance(value, int) and value > 0)
    elif key == "validation_layers":
        kind, ok = "all, or a non-empty list of layer indices, e.g. [2,5,8]", value == "all" or (
            isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, int) for v in value))
        value = list(value) if ok and value != "all" else value
    elif isinstance(default, bool):
        kind, ok = "True or False", isinstance(value, bool)
    elif isinstance(default, int):
        kind, ok = "a positive int", number and isinstance(value, int) and value > 0
    elif isinstance(default, float):
        kind, ok = ("a number >= 0", number and value >= 0) if key == "weight_decay" else \
            ("a number in [0, 1)", number and 0 <= value < 1) if key == "val_fraction" else \
            ("a positive number", number and value > 0)
        value = float(value) if ok else value
    elif isinstance(default, list):
        example = "[ce,feature_kd]" if key == "methods" else "[0,1,2]"
        kind, ok = f"a non-empty list, e.g. -p {key} {example}", isinstance(value, (list, tuple)) and len(value) > 0
        value = list(value) if ok else value
    else:
        kind, ok = "a non-empty string", isinstance(value, str) and value != ""
    if not ok:
        raise ValueError(f"{key} must be {kind} (preset value: {default!r}); got {value!r}.")
    return value


def data_shape(dataset: str) -> tuple[int | None, int | None]:
    """(class count, image size) of a dataset name or an .npz file, without loading the images: a name's known
    values, a file's from its x_train header and labels (kdutils.data.peek_npz); (None, None) for an unknown name
    or a missing or unreadable file, which load_dataset refuses later with the reason."""
    from kdutils.data import peek_npz
    key = _dataset_key(dataset)
    if key in IMAGE_SIZES and key in NUM_CLASSES:
        return NUM_CLASSES[key], IMAGE_SIZES[key]
    path = Path(str(dataset)).expanduser()
    if not path.is_file():
        return None, None
    try:
        facts = peek_npz(path)
    except ValueError:
        return None, None
    return facts["num_classes"], facts["image_size"]


def resolve_config(preset: str = "auto", *, colab: bool | None = None, **overrides: Any) -> dict:
    """The preset's settings with `overrides` applied; `pair`/`teacher`/`student` bring their peak LRs along.
    `colab` is passed to preset_name (it decides what 'auto' means)."""
    name = preset_name(preset, colab)
    config = copy.deepcopy(PRESETS[name])
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(config)}.")
    overrides = {key: _checked(key, value, config[key]) for key, value in overrides.items()}

    if "pair" in overrides:
        if overrides["pair"] not in PAIRS:
            raise ValueError(f"unknown pair {overrides['pair']!r}; choose one of: {', '.join(PAIRS)}.")
        config.update(PAIRS[overrides["pair"]])
    config.update({k: overrides[k] for k in ("teacher", "student") if k in overrides})
    for role in ("teacher", "student"):
        if config[role] not in MODELS:
            raise ValueError(f"unknown {role} model {config[role]!r}; choose one of: {', '.join(MODELS)}.")
    if "schedule" in overrides:
        if overrides["schedule"] not in SCHEDULES:
            raise ValueError(f"unknown schedule {overrides['schedule']!r}; choose one of: {', '.join(SCHEDULES)}.")
        if overrides["schedule"] == "long" and "student_epochs" not in overrides:
            config["student_epochs"] = 240
    for role in ("teacher", "student"):
        if f"{role}_lr" not in overrides and {"pair", role} & set(overrides):
            if config[role] not in PEAK_LR:
                raise ValueError(f"no default peak LR for {role} {config[role]!r} (known: {', '.join(PEAK_LR)}); "
                                 f"pass {role}_lr explicitly.")
            config[f"{role}_lr"] = PEAK_LR[config[role]]
    if overrides.get("schedule") == "long" and "student_lr" not in overrides:
        config["student_lr"] = LONG_LR[config["student"]]
    dataset = overrides.get("dataset", config["dataset"])
    classes, size = data_shape(dataset)    # of the data itself, when known without loading it (else None)
    if size is not None:                   # the data decides the image size; an override must agree with it
        if overrides.get("image_size", size) != size:
            shown = dataset if _dataset_key(dataset) in IMAGE_SIZES else shown_path(dataset)
            raise ValueError(f"image_size {overrides['image_size']} does not match the data: {shown} has "
                             f"{size}x{size} images, and every model runs at the data's size. Drop -p image_size "
                             f"(or resize the images into an .npz file and pass that as dataset).")
        config["image_size"] = size
    if "kq_per_class" not in overrides and {"dataset", "pair", "teacher"} & set(overrides):
        config["kq_per_class"] = kq_per_class(dataset, config["teacher"], num_classes=classes, image_size=size)
    config.update({k: v for k, v in overrides.items() if k not in ("pair", "teacher", "student")})

    config["pair"] = next((p for p, m in PAIRS.items() if m == {"teacher": config["teacher"],
                                                                 "student": config["student"]}),
                          f"{config['teacher']}-{config['student']}")
    bad = [m for m in config["methods"] if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, bad))}; choose from: {', '.join(METHODS)}.")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in config["seeds"]):
        raise ValueError(f"seeds must be a list of ints, e.g. [0, 1, 2]; got {config['seeds']!r}.")
    if config["pretrained"] and not has_imagenet_weights(config["teacher"]):
        raise ValueError(f"pretrained=True, but the teacher {config['teacher']} has no ImageNet weights; pass "
                         f"-p pretrained False, or a teacher with weights "
                         f"({', '.join(m for m in MODELS if has_imagenet_weights(m))}).")
    repeated = sorted({s for s in config["seeds"] if config["seeds"].count(s) > 1})
    if repeated:
        raise ValueError(f"seeds {config['seeds']} repeat {repeated}: a repeated seed re-uses the same run and fakes a "
                         f"replication. Give distinct seeds, e.g. -p seeds [0,1,2].")
    repeated = sorted({m for m in config["methods"] if config["methods"].count(m) > 1})
    if repeated:
        raise ValueError(f"methods {config['methods']} repeat {repeated}; list each method once.")
    if config["validation_layers"] != "all":
        n_layers = generalized_layer_count(config["teacher"])
        bad = [t for t in config["validation_layers"] if not 0 <= t < n_layers]
        if bad:
            raise ValueError(f"validation_layers {bad} do not exist: the teacher {config['teacher']} has {n_layers} "
                             f"generalized layers (0..{n_layers - 1}).")
        if len(set(config["validation_layers"])) < config["k"]:
            raise ValueError(f"validation_layers {config['validation_layers']} has fewer than k={config['k']} layers: "
                             f"notebook 6 picks the k best of them; sweep at least k layers.")
    if config["validation_seeds"] > len(config["seeds"]):
        if "validation_seeds" not in overrides:      # the preset's min(2, its seeds): follow fewer seeds given
            config["validation_seeds"] = len(config["seeds"])
        else:
            n = len(config["seeds"])
            raise ValueError(f"validation_seeds={config['validation_seeds']} but seeds has {n}: notebook 6 trains "
                             f"with the first validation_seeds of seeds. Pass -p validation_seeds {n} (or fewer), "
                             f"or more seeds, e.g. -p seeds [{','.join(map(str, range(config['validation_seeds'])))}].")
    n_student = len(standard_layers(config["student"]))
    n_teacher = generalized_layer_count(config["teacher"])
    if not 1 <= config["k"] <= min(n_student, n_teacher):
        raise ValueError(f"k={config['k']} does not fit: the student {config['student']} has {n_student} standard "
                         f"(distillation) layers and the teacher {config['teacher']} {n_teacher} generalized layers; "
                         f"pass 1 <= k <= {min(n_student, n_teacher)} (the paper: {n_student}).")
    return {"preset": name, **config}


def forward_flops(model: str, num_classes: int = 10, image_size: int = 32) -> float:
    """Forward FLOPs of one image (2 x the multiply-adds of every Conv2d/Conv1d/Linear; attention products and
    element-wise work are not counted), from one CPU forward pass with hooks."""
    from kdutils.models import build_model
    net = build_model(model, num_classes, image_size=image_size).eval()
    macs = []

    def count(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        """Add this layer's multiply-adds."""
        weight = module.weight
        per_output = weight[0].numel() if isinstance(module, torch.nn.modules.conv._ConvNd) else weight.shape[1]
        macs.append(out.numel() * per_output)

    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)
    handles = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
    return 2.0 * sum(macs)


def estimate_runtime(config: dict, device: str = "t4") -> dict:
    """An ESTIMATE (not a measurement) of the series' seconds on `device` (t4, a100, h100) from model FLOPs.

    Training one image costs 3x its forward FLOPs (forward + backward), an evaluation 1x; the teacher trains
    teacher_epochs epochs, every (method, seed) student student_epochs epochs (evaluated each epoch), plus one
    teacher pass over the training set for the cached teacher features and the KQ sample, at the throughput
    ASSUMED_TRAIN_FLOPS[device], plus NOTEBOOK_OVERHEAD_S per notebook. Dataset downloads are not included.
    Returns seconds for teacher, kq, students and total, with the assumptions used.
    """
    if device not in ASSUMED_TRAIN_FLOPS:
        raise ValueError(f"unknown device {device!r}; choose one of: {', '.join(ASSUMED_TRAIN_FLOPS)}.")
    facts = dataset_facts(config["dataset"])       # an .npz file's real split sizes and class count
    n_train, n_test, classes = facts["num_train"], facts["num_test"], facts["num_classes"]
    if config.get("per_class"):
        n_train = sum(min(c, config["per_class"]) for c in facts["class_counts"])
    f_t = forward_flops(config["teacher"], classes, config["image_size"])
    f_s = forward_flops(config["student"], classes, config["image_size"])
    rate = ASSUMED_TRAIN_FLOPS[device]
    teacher = config["teacher_epochs"] * (3 * n_train + n_test) * f_t / rate
    kq = (config["kq_samples"] + n_test) * f_t / rate
    runs = len(config["methods"]) * len(config["seeds"])
    students = (runs * config["student_epochs"] * (3 * n_train + n_test) * f_s + n_train * f_t) / rate
    overhead = NOTEBOOK_OVERHEAD_S * len(NOTEBOOKS)
    return {"device": device, "teacher": teacher, "kq": kq, "students": students, "overhead": overhead,
            "total": teacher + kq + students + overhead, "student_runs": runs, "assumed_flops": rate,
            "teacher_gflops": f_t / 1e9, "student_gflops": f_s / 1e9}


def runtime_estimate_text(config: dict, devices: Sequence[str] = ("t4", "a100", "h100")) -> str:
    """One paragraph stating the estimated series time per device and what the estimate rests on."""
    est = {d: estimate_runtime(config, d) for d in devices}
    first = est[devices[0]]
    fmt = lambda s: f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"  # noqa: E731
    times = ", ".join(f"{d.upper()} ~{fmt(e['total'])}" for d, e in est.items())
    return (f"Estimated time of the whole series for preset {config['preset']} (an estimate, NOT measured: no GPU "
            f"has been measured by this project): {times}. Based on {first['teacher_gflops']:.2f} / "
            f"{first['student_gflops']:.2f} GFLOP per forward image (teacher {config['teacher']} / student "
            f"{config['student']}), 3x that per training image, {config['teacher_epochs']} teacher epochs, "
            f"{first['student_runs']} student runs x {config['student_epochs']} epochs, and an assumed sustained "
            f"throughput of " + ", ".join(f"{e['assumed_flops'] / 1e12:.0f} TFLOP/s on the {d.upper()}"
                                          for d, e in est.items()) +
            f" (kdutils.pipeline.ASSUMED_TRAIN_FLOPS); downloads not included.")


def monitored(config: dict, method: str) -> bool:
    """Whether notebook 5 trains `method` with distill's monitor: the config's `monitor` key, for the methods with
    paired 1x1-projector feature losses (the only ones distill can monitor)."""
    return bool(config["monitor"]) and REGISTRY[method].feature == "mse"


def student_recipe(config: dict) -> dict:
    """distill's epochs, lr, weight_decay and schedule for the students of a config (the long schedule brings its
    own weight decay, 5e-4)."""
    long = config["schedule"] == "long"
    return {"epochs": config["student_epochs"], "lr": config["student_lr"], "schedule": config["schedule"],
            "weight_decay": LONG_WEIGHT_DECAY if long else config["weight_decay"]}


def series_data(config: dict, data_root: str | Path | None = None, *, validation: bool = False):
    """The series' data: the config's dataset (per_class subset seeded by seeds[0]) without the held-out validation
    split (val_fraction of the training images), which every notebook trains on. With `validation`, returns
    (train, val) instead, val holding the held-out images as its test split (kdutils.data.split_validation); with
    val_fraction 0 (the paper's protocol) notebook 6 still needs one, so 10% of the training images are split off
    here (images the teacher trained on)."""
    from kdutils.data import load_dataset, split_validation
    seed = config["seeds"][0]
    data = load_dataset(config["dataset"], root=data_root if data_root is not None else default_data_root(),
                        per_class=config["per_class"], seed=seed)
    fraction = config.get("val_fraction", 0.0)
    if fraction > 0:
        train, val = split_validation(data, fraction, seed)
        return (train, val) if validation else train
    return split_validation(data, 0.1, seed) if validation else data


def config_overrides(namespace: Mapping[str, Any]) -> dict:
    """The preset keys set (not None) in a notebook's namespace, e.g. `config_overrides(globals())`."""
    return {key: namespace[key] for key in PARAMETERS if namespace.get(key) is not None}


def _project_base() -> Path:
    """The project folder for an editable install (it holds pyproject.toml), else the working directory (Colab)."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.cwd()


def default_run_dir(preset: str) -> Path:
    """Where a preset's artifacts go when no run_dir is given: runs/<preset> in the project folder."""
    return _project_base() / "runs" / preset


def shown_path(path: str | Path) -> str:
    """A path as notebooks print it: relative to the project folder when inside it or beside it (`../shared/...`),
    else as given (no machine paths in outputs)."""
    for path, base in ((Path(os.path.abspath(Path(path).expanduser())), Path(os.path.abspath(_project_base()))),
                       (Path(path).expanduser().resolve(), _project_base().resolve())):   # as given, then real
        if path.is_relative_to(base):
            return str(path.relative_to(base))
        if base.parent != Path(base.anchor) and path.is_relative_to(base.parent):
            return os.path.relpath(path, base)
    return str(path)


def shown_config(config: dict) -> dict:
    """`config` with a file-path `dataset` or `data_root` as shown_path prints it (for tables and results.json)."""
    out = dict(config)
    for key in ("dataset", "data_root"):
        value = out.get(key)
        if isinstance(value, str) and Path(value).expanduser().is_absolute():
            out[key] = shown_path(value)
    return out


def default_data_root() -> Path:
    """Where datasets live when no data_root is given: the project's data/ folder."""
    return _project_base() / "data"


def config_frame(config: dict) -> "pandas.DataFrame":
    """A config as a two-column table (key, value) for display in a notebook."""
    import pandas as pd
    config = shown_config(config)
    return pd.DataFrame({"key": list(config), "value": [str(v) for v in config.values()]}).set_index("key")


def describe_presets() -> str:
    """Human-readable list of presets, their values, the pairs, methods and what every key means (for --help)."""
    lines = ['Presets (--preset NAME; "auto" = colab on Google Colab, else cifar10 when CUDA is available, '
             'else quick):']
    for name, values in PRESETS.items():
        lines.append(f"  {name}: {PRESET_NOTES[name]}")
        text = "  ".join(f"{k}={'[' + ','.join(map(str, v)) + ']' if isinstance(v, list) else v}"
                        for k, v in values.items())
        lines += textwrap.wrap(text, 110, initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False)
    lines.append("Pairs (-p pair NAME sets teacher, student and their peak LRs):")
    lines += [f"  {p}: {m['teacher']} (lr {PEAK_LR[m['teacher']]}) -> {m['student']} (lr {PEAK_LR[m['student']]})"
              for p, m in PAIRS.items()]
    lines.append("Methods (name, the paper's display name: what it trains):")
    lines += [f"  {m} ({spec.label}): {spec.summary}" for m, spec in REGISTRY.items()]
    lines.append("Parameters (-p KEY VALUE overrides any preset key; VALUE is parsed like papermill's -p, "
                 "plus lists like [0,1,2]):")
    lines += [f"  {k}: {d}" for k, d in PARAMETERS.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# run-directory artifacts

def write_atomic(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call write(file) on a temporary file beside `path`, then rename it to `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically (write_atomic)."""
    return write_atomic(path, lambda f: (json.dump(obj, f, indent=2, default=str), f.write("\n")), mode="w")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit(repo: str | Path = REPO_ROOT) -> dict | None:
    """The checked-out commit of `repo` and whether the work tree has changes, or None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, or no commit yet
        return None


def require_artifact(path: str | Path, notebook: str, preset: str | None = None) -> Path:
    """`path` if it exists, else a FileNotFoundError saying which notebook produces it (with `preset`, the preset
    the command it suggests must use)."""
    path = Path(path)
    if not path.exists():
        with_preset = f"with preset = {preset!r}, " if preset else ""
        flag = f"--preset {preset} " if preset else ""
        raise FileNotFoundError(f"missing {path}: run notebooks/{notebook} first ({with_preset}or the whole "
                                f"pipeline: python -m kdutils.pipeline {flag}--run-dir {path.parent}).")
    return path


def teacher_config(config: dict, run_dir: str | Path) -> dict:
    """`config` with `pretrained` set to what notebook 1 really used (run_dir/teacher_metrics.json), if it ran.

    A paper preset asks for an ImageNet-pretrained teacher; offline, notebook 1 trains it from scratch instead. Then
    `pretrained` becomes False and `pretrained_requested` True, so manifests and results record the real teacher.
    """
    path = Path(run_dir) / "teacher_metrics.json"
    if not path.is_file():
        return dict(config)
    used = bool(json.loads(path.read_text()).get("pretrained", config.get("pretrained")))
    out = {**config, "pretrained": used}
    if used != config.get("pretrained"):
        out["pretrained_requested"] = config.get("pretrained")
    return out


def write_manifest(run_dir: str | Path, notebook: str, config: dict, artifacts: dict[str, Path],
                   data: "kdutils.data.Dataset | None" = None) -> Path:
    """Record a notebook's config, seeds, versions, device, git commit and artifact hashes in run_dir/manifests/.

    With `data` (the dataset the notebook worked on), also what it was: name, source (shown_path of a file), content
    fingerprint (kdutils.data.fingerprint, the one checkpoints record), split sizes, classes and image size.
    """
    run_dir = Path(run_dir)
    config = teacher_config(config, run_dir)
    files = {}
    for name, path in artifacts.items():
        path = require_artifact(path, notebook)
        shown = path.resolve().relative_to(run_dir.resolve()) if path.resolve().is_relative_to(run_dir.resolve()) \
            else path.resolve()
        files[name] = {"path": str(shown), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    device = default_device()
    manifest = {
        "notebook": notebook,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "preset": config.get("preset"),
        "seeds": config.get("seeds"),
        "config": config,
        "versions": library_versions(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "git": git_commit(),
        "artifacts": files,
    }
    if data is not None:
        from kdutils.data import DATASETS, fingerprint
        source = data.source if data.source in DATASETS or not data.source else shown_path(data.source)
        manifest["data"] = {"name": data.name, "source": source, "fingerprint": fingerprint(data),
                            "num_train": data.num_train, "num_test": len(data.y_test),
                            "num_classes": data.num_classes, "image_size": data.image_size}
    return write_json_atomic(run_dir / "manifests" / f"{Path(notebook).stem}.json", manifest)


# ----------------------------------------------------------------------------------------------------------------
# results

def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarize_runs(runs: dict[str, list[list[dict]]], *, teacher: dict, preset: str, dataset: str) -> dict:
    """Per-method final/best test accuracy (mean, sample std over runs), time per run and epochs to reach CE.

    `runs[method]` holds one per-epoch history (rows with epoch, loss, train_acc, test_acc, seconds) per seed. Per
    method: final = last epoch's test_acc, best = max over epochs, `seeds` = number of runs, `seconds` = mean total
    seconds per run, plus the per-run lists `final_acc`/`best_acc`, the mean test-accuracy curve `curve` and
    `epochs_to_ce_final`: the first epoch whose mean test accuracy reaches the CE student's final mean (None if never,
    or when there is no "ce" method).
    """
    methods = {}
    for method, histories in runs.items():
        if not histories or not all(histories):
            raise ValueError(f"method {method!r} has an empty run list or an empty history; pass one list of "
                             f"per-epoch rows per seed.")
        lengths = {len(h) for h in histories}
        if len(lengths) > 1:
            raise ValueError(f"method {method!r} has runs of different lengths {sorted(lengths)}; "
                             "summarize runs with the same number of epochs.")
        final = [h[-1]["test_acc"] for h in histories]
        best = [max(row["test_acc"] for row in h) for h in histories]
        final_mean, final_std = _mean_std(final)
        best_mean, best_std = _mean_std(best)
        methods[method] = {
            "label": REGISTRY[method].label if method in REGISTRY else method,
            **({"note": "evaluated as student + projector + the teacher's trainable tail"}
               if method in REGISTRY and REGISTRY[method].feature == "simkd" else {}),
            "final_acc_mean": final_mean, "final_acc_std": final_std,
            "best_acc_mean": best_mean, "best_acc_std": best_std,
            "seeds": len(histories),
            "seconds": _mean_std([sum(row["seconds"] for row in h) for h in histories])[0],
            "final_acc": final, "best_acc": best,
            "epochs": [row["epoch"] for row in histories[0]],
            "params": histories[0][-1].get("params"),
            "curve": [_mean_std([h[i]["test_acc"] for h in histories])[0] for i in range(len(histories[0]))],
            **_training_curves(histories),
        }
    target = methods["ce"]["final_acc_mean"] if "ce" in methods else None
    for summary in methods.values():
        reached = [e for e, acc in zip(summary["epochs"], summary["curve"]) if target is not None and acc >= target]
        summary["epochs_to_ce_final"] = reached[0] if reached else None
    return {"preset": preset, "dataset": dataset,
            "teacher": {k: teacher[k] for k in ("model", "test_acc", "pretrained", "pretrained_requested")
                        if k in teacher}, "methods": methods}


def _nanmean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None/NaN (None when there are none)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else None


def _training_curves(histories: list[list[dict]]) -> dict:
    """Per-epoch means over seeds of the loss terms ("terms": {term: curve}) and, for runs recorded with
    distill(..., monitor=True), of the measurements ("monitor": grad_cosine {stage: curve}, feature_mse and
    feature_cka [pair][epoch]); epochs or seeds without them are skipped."""
    out: dict = {}
    epochs = range(len(histories[0]))
    terms = sorted({k for h in histories for row in h for k in row.get("terms", {})})
    if terms:
        out["terms"] = {k: [_nanmean([h[i].get("terms", {}).get(k) for h in histories]) for i in epochs]
                        for k in terms}
    rows = [[h[i].get("monitor") for h in histories] for i in epochs]
    if any(r is not None for per_epoch in rows for r in per_epoch):
        first = next(r for per_epoch in rows for r in per_epoch if r is not None)
        monitor: dict = {"seeds": sum(any(row.get("monitor") for row in h) for h in histories)}
        for key in ("feature_mse", "feature_cka"):
            monitor[key] = [[_nanmean([r[key][j] for r in per_epoch if r is not None]) for per_epoch in rows]
                            for j in range(len(first[key]))]
        if "grad_cosine" in first:
            monitor["grad_cosine"] = {stage: [_nanmean([r["grad_cosine"][stage] for r in per_epoch if r is not None])
                                              for per_epoch in rows] for stage in first["grad_cosine"]}
        out["monitor"] = monitor
    return out


# Pairs whose feature distances tell whether logit losses pull the features away from the teacher's: the same
# teacher layers and projectors, with and without CE (and KL) in the backbone.
CONFLICT_PAIRS = (("feature_kd", "feature_kd_ce"), ("standard_layers", "fitnets_kd_nokl"),
                  ("standard_layers", "fitnets_kd"))


def conflict_summary(results: dict) -> list[str]:
    """Sentences on the measured gradient conflict and feature distances of a run (methods trained with monitor):
    the mean cosine per stage over the second half of training, and the final-epoch distance to the teacher of
    each CE-free method against its counterpart with logit losses in the backbone."""
    m = results["methods"]
    lines = []
    for name, row in m.items():
        cos = row.get("monitor", {}).get("grad_cosine")
        if not cos:
            continue
        half = lambda c: _nanmean(c[len(c) // 2:])  # noqa: E731
        parts = ", ".join(f"{stage} {half(c):+.3f}" for stage, c in cos.items() if half(c) is not None)
        lines.append(f"- {name}: cosine between the backbone gradients of the logit terms and of the feature term, "
                     f"mean over the second half of training ({row['monitor']['seeds']} seed(s)): {parts}.")
    for free, logit in CONFLICT_PAIRS:
        a, b = m.get(free, {}).get("monitor"), m.get(logit, {}).get("monitor")
        if not a or not b:
            continue
        mse_a = [c[-1] for c in a["feature_mse"]]
        mse_b = [c[-1] for c in b["feature_mse"]]
        cka_a = [c[-1] for c in a["feature_cka"]]
        cka_b = [c[-1] for c in b["feature_cka"]]
        closer = sum(x < y for x, y in zip(mse_a, mse_b))
        lines.append(f"- {free} vs {logit} (same teacher layers), final epoch, per distilled layer: feature MSE "
                     f"{', '.join(f'{x:.3f}/{y:.3f}' for x, y in zip(mse_a, mse_b))}; linear CKA "
                     f"{', '.join(f'{x:.3f}/{y:.3f}' for x, y in zip(cka_a, cka_b))}. Without logit losses the "
                     f"student is closer to the teacher (lower MSE) at {closer} of {len(mse_a)} layers.")
    return lines or ["No run of this study was recorded with monitor=True (config key `monitor`)."]


def results_markdown(results: dict) -> str:
    """A Markdown table of summarize_runs output: accuracies in percent, gain over CE in points, teacher line."""
    methods = results["methods"]
    ce = methods.get("ce", {}).get("final_acc_mean")
    pct = lambda m, s, n: f"{100 * m:.2f} ± {100 * s:.2f}" if n > 1 else f"{100 * m:.2f} (1 seed)"  # noqa: E731
    teacher = results["teacher"]
    origin = ("" if "pretrained" not in teacher else " (ImageNet-pretrained, fine-tuned)" if teacher["pretrained"]
              else " (trained from scratch: the ImageNet weights it asked for were unavailable)"
              if teacher.get("pretrained_requested") else " (trained from scratch)")
    lines = [f"Preset `{results['preset']}`, dataset `{results['dataset']}`. Teacher `{teacher['model']}`{origin}: "
             f"{100 * teacher['test_acc']:.2f}% test accuracy.",
             "",
             "Test accuracy in %, mean ± sample std over seeds (no spread with one seed); final = last epoch "
             "(headline), best = best epoch (the paper's protocol). Gain over ce uses final accuracy, in points.",
             "",
             "| method | paper's name | final acc (%) | best acc (%) | gain over ce | epoch reaching ce final | seeds "
             "| parameters at test | seconds/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        gain = "" if ce is None or name == "ce" else f"{100 * (m['final_acc_mean'] - ce):+.2f}"
        reach = m.get("epochs_to_ce_final")
        label = m.get("label") or (REGISTRY[name].label if name in REGISTRY else name)
        lines.append(f"| {name} | {label} | {pct(m['final_acc_mean'], m['final_acc_std'], m['seeds'])} | "
                     f"{pct(m['best_acc_mean'], m['best_acc_std'], m['seeds'])} | {gain} | "
                     f"{'never' if reach is None else reach} | {m['seeds']} | "
                     f"{'' if m.get('params') is None else format(m['params'], ',')}{' *' if m.get('note') else ''} | "
                     f"{m['seconds']:.1f} |")
    notes = {m["note"] for m in methods.values() if m.get("note")}
    if notes:
        lines += ["", *(f"\\* {note}." for note in sorted(notes))]
    return "\n".join(lines) + "\n"


# The two effects the CPU study separates: which teacher layers (both CE-free), and CE in the backbone (same layers).
EFFECTS = (("feature_kd", "standard_layers", "layer choice: KQ layers instead of the standard ones (both CE-free)"),
           ("standard_layers", "fitnets_kd_nokl", "removing CE from the backbone, standard layers"),
           ("feature_kd", "feature_kd_ce", "removing CE from the backbone, KQ layers"))


def difference(results: dict, a: str, b: str) -> dict:
    """Final-accuracy difference a - b (points), the seed spread it is judged against, and a verdict.

    The spread is the larger of the two methods' sample stds; with fewer than 2 seeds on either side there is no
    spread and the verdict says so instead of judging.
    """
    ma, mb = results["methods"][a], results["methods"][b]
    diff = 100 * (ma["final_acc_mean"] - mb["final_acc_mean"])
    if min(ma["seeds"], mb["seeds"]) < 2:
        return {"points": diff, "spread": None, "verdict": "one seed: no spread to judge it against"}
    spread = 100 * max(ma["final_acc_std"], mb["final_acc_std"])
    verdict = ("within the seed spread" if abs(diff) <= spread else
               f"above {b} by more than the seed spread" if diff > 0 else f"below {b} by more than the seed spread")
    return {"points": diff, "spread": spread, "verdict": verdict}


def verdicts(results: dict, baseline: str = "ce") -> list[str]:
    """The sentences notebook 5 prints about a run: ranking, teacher vs student, each method against `baseline`
    with its seed spread, and the layer-choice and CE-removal effects where their methods ran."""
    m, teacher = results["methods"], results["teacher"]
    order = sorted(m, key=lambda k: -m[k]["final_acc_mean"])
    seeds = min(row["seeds"] for row in m.values())
    lines = [f"Teacher {teacher['model']}: {teacher['test_acc']:.2%}. Ranking by final-epoch accuracy "
             f"({seeds} seed{'s' if seeds > 1 else ''}): " + ", ".join(f"{k} {m[k]['final_acc_mean']:.2%}"
                                                                        for k in order)]
    if baseline in m and teacher["test_acc"] <= m[baseline]["final_acc_mean"]:
        lines.append(f"The teacher ({teacher['test_acc']:.2%}) is not better than the {baseline} student "
                     f"({m[baseline]['final_acc_mean']:.2%}): it has nothing to teach that the labels do not, so no "
                     f"distillation method can be expected to help in this run.")
    for k in order:
        if k != baseline and baseline in m:
            d = difference(results, k, baseline)
            spread = "" if d["spread"] is None else f", spread {d['spread']:.2f}"
            lines.append(f"- {k}: {d['points']:+.2f} points vs {baseline} ({d['verdict']}{spread})")
    for a, b, what in EFFECTS:
        if a in m and b in m:
            d = difference(results, a, b)
            spread = "" if d["spread"] is None else f"; seed spread {d['spread']:.2f}"
            lines.append(f"Effect of {what}: {a} - {b} = {d['points']:+.2f} points ({d['verdict']}{spread}).")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# headless runner

class PipelineInterrupted(KeyboardInterrupt):
    """Ctrl-C during the pipeline: which notebooks finished, which was running, and that the same command resumes."""

    def __init__(self, finished: Sequence[str], running: str | None):
        done = ", ".join(Path(n).stem for n in finished) or "none"
        super().__init__(f"interrupted{f' during {Path(running).stem}' if running else ''} (finished: {done}). "
                         f"Run the same command again to resume: finished notebooks reload their checkpoints and "
                         f"caches, and training continues after the last completed epoch.")


class NotebookFailed(RuntimeError):
    """A pipeline notebook raised: the notebook, the failing cell, the error and the executed copy's path.

    `cell_index` counts the cells of the notebook as you open it (from 0, markdown cells included);
    `executed_cell_index` is papermill's index, which also counts the injected-parameters cell.
    """

    def __init__(self, notebook: str, executed: Path, cell_index: int | None, ename: str, evalue: str,
                 source: str = "", executed_cell_index: int | None = None):
        self.notebook, self.executed, self.cell_index, self.ename, self.evalue = \
            notebook, executed, cell_index, ename, evalue
        self.executed_cell_index = executed_cell_index
        first_line = next((line for line in source.splitlines() if line.strip()), "")
        if cell_index is None:        # the runner, the kernel or a file write failed, not a cell
            where = "outside its cells (the kernel or the runner)"
        else:
            where = f"in cell {cell_index}" + (f" ({first_line[:60]!r})" if first_line else "")
        copy = f"traceback in the executed copy {executed}" if Path(executed).is_file() else \
            "no executed copy was written"
        super().__init__(f"{notebook} failed {where}: {ename}: {evalue} ({copy})")


def _source_cell_index(notebook: Path, executed: Path, fallback: int | None) -> int | None:
    """Index in `notebook` of the cell papermill marked as failed in `executed` (matched by cell id)."""
    import nbformat
    try:
        failed = next(c.get("id") for c in nbformat.read(executed, as_version=4).cells
                      if c.metadata.get("papermill", {}).get("exception"))
        ids = [c.get("id") for c in nbformat.read(notebook, as_version=4).cells]
        return ids.index(failed) if failed is not None else fallback
    except (StopIteration, ValueError, OSError):  # no marked cell, or a notebook without cell ids
        return fallback


def _launches_current_python(argv: Sequence[str]) -> bool:
    """Whether a kernel spec's command starts sys.executable (jupyter_client maps a bare 'python' to it)."""
    exe = argv[0] if argv else ""
    bare = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    return exe in bare or (Path(exe).is_absolute() and Path(exe).parent == Path(sys.executable).parent
                           and Path(exe).name.startswith("python"))


def current_kernel_name() -> str:
    """The name of a Jupyter kernel spec that runs this interpreter ('python3' when it does)."""
    from jupyter_client.kernelspec import KernelSpecManager
    manager = KernelSpecManager()
    for name in sorted(manager.find_kernel_specs(), key=lambda n: n != "python3"):
        spec = manager.get_kernel_spec(name)
        if spec.language.lower() == "python" and _launches_current_python(spec.argv):
            return name
    raise RuntimeError(f"no Jupyter kernel runs {sys.executable}. Register one with "
                       f"`{sys.executable} -m ipykernel install --user --name kd-without-ce` "
                       "and pass --kernel kd-without-ce (kernel_name='kd-without-ce').")


def notebook_parameters(path: str | Path) -> dict[str, str]:
    """The names and default values (as source text) of a notebook's `parameters` cell."""
    import nbformat
    from papermill.translators import PythonTranslator
    nb = nbformat.read(path, as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    return {} if cell is None else {p.name: p.default for p in PythonTranslator.inspect(cell)}


def absolute_paths(params: dict) -> dict:
    """`params` with a relative `data_root`, or a `dataset` given as a relative file path, made absolute (from cwd)."""
    out = dict(params)
    for key in ("dataset", "data_root"):
        value = out.get(key)
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        if key == "data_root" or value.lower().endswith(".npz") or "/" in value or Path(value).is_file():
            out[key] = os.path.abspath(Path(value).expanduser())   # symlinks kept: ../shared stays ../shared
    return out


def _kernel_manager_logging_to(log: Path) -> type:
    """A jupyter AsyncKernelManager class whose kernels write their own stderr (start-up warnings, the dying words
    of an interrupted kernel) to `log` instead of the terminal; cell outputs still reach the executed notebooks."""
    from jupyter_client import AsyncKernelManager

    class LoggingKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):  # noqa: D102 (jupyter_client's signature)
            with open(log, "ab") as stderr:  # the kernel inherits a duplicate of the descriptor
                await super().start_kernel(**{"stderr": stderr, **kw})
    return LoggingKernelManager


def _drop_unknown_parameter_warnings(record: logging.LogRecord) -> bool:
    """Logging filter for papermill's logger: drop its 'Passed unknown parameter' warnings. run_pipeline gives every
    notebook all settings on purpose (setup reads each config key from globals, so all notebooks share one config),
    after checking every name against the config keys and the notebooks' parameters."""
    return not record.getMessage().startswith("Passed unknown parameter")


# ----------------------------------------------------------------------------------------------------------------
# up-front checks: what a notebook would otherwise refuse only after its kernel has started

# Training images per class of the named datasets, for the validation-split checks (digits: the smallest class of
# its stratified 80% train split, 139 or 140 depending on the seed).
CLASS_TRAIN_COUNTS = {"cifar10": 5000, "cifar100": 500, "tinyimagenet": 500, "digits": 139}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "tinyimagenet": 200, "digits": 10}


def has_parameters_cell(path: str | Path) -> bool:
    """Whether a notebook has a cell tagged `parameters` (papermill injects its settings right after it)."""
    import nbformat
    return any("parameters" in c.metadata.get("tags", []) for c in nbformat.read(path, as_version=4).cells)


def _dataset_key(name: str) -> str:
    """A dataset name as kdutils.data.load_dataset matches it (case, '-', '_' and spaces ignored; its aliases)."""
    from kdutils.data import _ALIASES
    key = str(name).strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    return _ALIASES.get(key, key)


def dataset_facts(dataset: str) -> dict:
    """Split sizes, class count, image size and training images per class of a dataset name or .npz file, without
    a kernel: names from the tables above (nothing is downloaded), a file read and checked by kdutils.data's own
    .npz checks, so a missing, corrupt or malformed file is refused here. Messages quote `dataset` as given (a
    relative path is taken from the current directory, as absolute_paths does for the notebooks)."""
    import numpy as np
    from kdutils.data import DATASETS, _read_npz, _validate
    text = str(dataset)
    key, path = _dataset_key(text), Path(text).expanduser()
    if text.lower().endswith(".npz") or (key not in DATASETS and path.is_file()):
        if not path.is_file():
            raise FileNotFoundError(f"dataset {text!r}: no such file ({os.path.abspath(path)}: a relative path starts "
                                    f"at the current directory {os.getcwd()}). Check the path, or use a dataset name: "
                                    f"{', '.join(DATASETS)}.")
        try:
            arrays = _validate(_read_npz(path), source=text)
        except (OSError, ValueError) as err:
            raise ValueError(f"dataset {text!r}: {err}") from None
        counts = np.bincount(arrays["y_train"], minlength=len(arrays["classes"])).tolist()
        return {"given": text, "name": path.stem, "num_train": len(arrays["y_train"]),
                "num_test": len(arrays["y_test"]), "num_classes": len(arrays["classes"]),
                "image_size": int(arrays["x_train"].shape[1]), "class_counts": counts}
    if key in DATASETS:
        return {"given": text, "name": key, "num_train": TRAIN_SIZES[key][0], "num_test": TRAIN_SIZES[key][1],
                "num_classes": NUM_CLASSES[key], "image_size": IMAGE_SIZES[key],
                "class_counts": [CLASS_TRAIN_COUNTS[key]] * NUM_CLASSES[key]}
    if "/" in text or os.sep in text or path.suffix:
        raise FileNotFoundError(f"dataset {text!r}: no such file ({os.path.abspath(path)}: a relative path starts at "
                                f"the current directory {os.getcwd()}). Check the path (an .npz with x_train, "
                                f"y_train, x_test, y_test), or use a dataset name: {', '.join(DATASETS)}.")
    raise ValueError(f"dataset {text!r} is neither a dataset name ({', '.join(DATASETS)}; case, '-' and '_' do not "
                     f"matter) nor an existing file; check the spelling, or pass the path of an .npz file.")


def check_models(config: dict, facts: dict) -> None:
    """Refuse a teacher or student that cannot take the dataset's images (a ViT needs 32 or 64 px, VGG at least
    32): both are built on the meta device, which allocates nothing."""
    from kdutils.models import build_model
    size = facts["image_size"]
    for role in ("teacher", "student"):
        try:
            with torch.device("meta"):
                build_model(config[role], max(2, facts["num_classes"]), image_size=size)
        except ValueError as err:
            raise ValueError(f"the {role} {config[role]} (pair {config['pair']}) cannot take the {size}x{size} images "
                             f"of dataset {facts['given']!r}: {err}. Choose another pair (-p pair NAME, see "
                             f"--list-presets) or a dataset whose images it takes.") from None


def check_kq_samples(config: dict, facts: dict) -> None:
    """Refuse a kq_samples that leaves KQ's statistics fewer than 2 images per class (notebooks 2, 3 and 6)."""
    n, classes = config["kq_samples"], facts["num_classes"]
    if n // classes < 2:
        raise ValueError(f"kq_samples={n} leaves {n // classes} image(s) per class for the {classes} classes of "
                         f"dataset {facts['given']!r}; KQ's statistics need at least 2 per class: pass -p kq_samples "
                         f"{2 * classes} or more.")


def check_validation_split(config: dict, facts: dict, *, notebook6: bool) -> None:
    """Refuse a validation split the notebooks would refuse late: every class must hold out at least 1 image (2 when
    notebook 6 runs: its KQ statistics on the validation images need pairs within a class) and keep 2 for training.
    With val_fraction 0 only notebook 6 splits, 10% of the training images (series_data)."""
    fraction = config["val_fraction"] or (0.1 if notebook6 else 0.0)
    if not fraction:
        return
    need = 2 if notebook6 else 1
    counts = [min(c, config["per_class"]) if config["per_class"] else c for c in facts["class_counts"]]

    def fits(n: int, f: float) -> bool:
        held = int(round(f * n))               # as kdutils.data.split_validation rounds
        return held >= need and n - held >= 2

    bad = [c for c in counts if not fits(c, fraction)]
    if not bad:
        return
    c = min(bad)
    held = int(round(fraction * c))
    why = ("notebook 6 needs at least 2 validation images per class (its KQ statistics on them use pairs within a "
           "class)" if notebook6 else "every class needs at least 1 validation image") + " and 2 training images"
    fixes = []
    if 0 < config["val_fraction"] or not notebook6:
        fractions = [f / 100 for f in range(5, 100, 5) if all(fits(n, f / 100) for n in counts)]
        fixes += [f"-p val_fraction {fractions[0]:g}"] if fractions else []
    n_needed = next(n for n in range(1, 10**6) if fits(n, fraction))
    if n_needed <= min(facts["class_counts"]):
        fixes.insert(0, f"-p per_class {n_needed} or more")
    of = f"per_class {config['per_class']}" if config["per_class"] and config["per_class"] <= c else "the dataset's"
    raise ValueError(f"the validation split does not fit: {fraction:g} of {c} training images per class ({of}) "
                     f"holds out {held} and keeps {c - held}, but {why}. "
                     + (f"Pass {' or '.join(fixes)}." if fixes else "Use a dataset with more images per class."))


def pretrained_fallback(config: dict, run_dir: str | Path) -> str | None:
    """Why notebook 1 will train the teacher from scratch although `pretrained` asks for ImageNet weights (they
    cannot be loaded, e.g. offline), or None: not asked, loadable (they are in the torch hub cache afterwards), or
    notebook 1 already finished in run_dir (its teacher_metrics.json records what it used)."""
    if not config["pretrained"] or (Path(run_dir) / "teacher_metrics.json").is_file():
        return None
    from kdutils import models
    try:
        models.download_weights(models._WEIGHTS[config["teacher"]])
    except RuntimeError as err:
        return str(err)
    return None


def _write_hint(err: OSError) -> str:
    """What a failed write means and its fix, by errno (full disk, read-only or foreign folder), else ''."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk (or quota) holding it is full: free space, or choose another --run-dir"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "it is not writable (a read-only filesystem or another user's folder): choose another --run-dir"
    return ""


def _check_writable(folder: Path) -> None:
    """Refuse a run directory this process cannot write into (read-only, full), before any kernel starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        hint = _write_hint(err) or "choose another --run-dir (run_dir=)"
        raise RuntimeError(f"cannot write into the run directory {folder} ({err.strerror or err}): {hint}.") from None


# ----------------------------------------------------------------------------------------------------------------
# one run at a time per folder

LOCK_FILE = "run.lock"


class RunDirBusy(RuntimeError):
    """Another live process holds a folder's lock (run.lock): two runs must not share a run directory."""


def _process_token(pid: int) -> str | None:
    """Boot id and start time of a running process (Linux /proc), to tell a reused pid from a lock's holder; None
    where /proc does not say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # another user's live process
        return True
    try:                            # a zombie (ended, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _ancestors() -> set[int]:
    """This process and its parents' pids (from /proc; this process and its parent where /proc is missing)."""
    pids, pid = {os.getpid(), os.getppid()}, os.getppid()
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        pids.add(pid)
    return pids


def _read_lock(lock: Path) -> dict | None:
    """A lock file's record; None when it vanished; {} when it stays unreadable (being written, or damaged)."""
    for _ in range(20):
        try:
            record = json.loads(lock.read_text())
            if isinstance(record, dict) and "pid" in record:
                return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        time.sleep(0.05)              # its writer created it an instant ago and is writing it
    return {}


def _lock_state(record: dict) -> str:
    """'ours' (held by this process or an ancestor on this host), 'live', or 'stale' (its process has ended)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return "live"                 # another machine (a shared filesystem), or unreadable: cannot tell
    pid = record["pid"]
    if not _pid_alive(pid):
        return "stale"
    token = _process_token(pid)
    if record.get("token") and token and token != record["token"]:
        return "stale"                # the pid now belongs to another process
    return "ours" if pid in _ancestors() else "live"


@contextlib.contextmanager
def run_lock(folder: str | Path, what: str = "run directory") -> Iterator[Path]:
    """Hold folder/run.lock for the block, so two runs never share a folder.

    The lock file records pid, host, start time and command, created atomically (O_CREAT | O_EXCL). A folder locked
    by a live process raises RunDirBusy naming it and since when; a lock left by a process that has ended on this
    machine is taken over (with a line saying so); a lock of this process or of an ancestor is re-entered (a
    notebook that runs earlier notebooks inside a pipeline run). The lock is removed on exit, Ctrl-C included.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": _process_token(os.getpid()),
          "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else ""}
    owned = False
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            record = _read_lock(lock)
            if record is None:
                continue                                    # released meanwhile: try again
            state = _lock_state(record) if record else "unreadable"
            if state == "ours":
                break
            if state == "stale":
                if _read_lock(lock) == record:              # still the same dead holder
                    lock.unlink(missing_ok=True)
                    print(f"{what} {shown_path(folder)}: taking over the lock of process {record['pid']} "
                          f"(started {record.get('started', '?')}), which has ended.", flush=True)
                continue
            holder = (f"process {record['pid']} on {record.get('host', '?')}"
                      f" ({record.get('command') or 'no command recorded'}), since {record.get('started', '?')}"
                      if record else "a lock file that cannot be read")
            raise RunDirBusy(f"{what} {folder} is in use by another run: {holder}. Wait for it to finish, or choose "
                             f"another folder (--run-dir); if that run is gone (a crash on another machine, say), "
                             f"delete {lock}.") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            owned = True
            break
    else:
        raise RunDirBusy(f"could not take the lock {lock}: it keeps changing hands; is another run starting there?")
    try:
        yield lock
    finally:
        if owned and (_read_lock(lock) or {}).get("pid") == me["pid"]:
            lock.unlink(missing_ok=True)


def run_pipeline(run_dir: str | Path, preset: str = "auto", params: dict | None = None,
                 notebooks_dir: str | Path = NOTEBOOKS_DIR, kernel_name: str | None = None,
                 log_output: bool = False, progress: bool = True, notebooks: Sequence[str] = NOTEBOOKS,
                 lock: bool = True) -> dict:
    """Execute the notebooks in order with papermill into run_dir/executed/, then tabulate run_dir/results.json.

    Everything that can be checked without a kernel is checked first: parameters, notebooks (names with or without
    .ipynb; each needs a `parameters` cell), the dataset (name, or an .npz file's contents), whether the pair takes
    its images, the validation split, and whether run_dir is writable. run_dir is locked for the whole run
    (run_lock: a second run into it is refused); `lock=False` when the caller already holds it (the sweep).
    """
    params = dict(params or {})
    reserved = sorted({"preset", "run_dir"} & set(params))
    if reserved:
        raise ValueError(f"pass {' and '.join(reserved)} as arguments of run_pipeline (--preset/--run-dir), "
                         "not as notebook parameters.")
    given = dict(params)             # as the user spelt them, for the messages of the checks below
    params = absolute_paths(params)  # the notebooks run with cwd=notebooks_dir, not the caller's directory
    config = resolve_config(preset, **{k: v for k, v in params.items() if k in PARAMETERS})
    notebooks_dir = Path(notebooks_dir).resolve()
    names = [n if Path(n).suffix == ".ipynb" else f"{n}.ipynb" for n in map(str, notebooks)]  # 01_train_teacher
    paths = [notebooks_dir / name for name in names]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        held = sorted(p.name for p in notebooks_dir.glob("*.ipynb")) if notebooks_dir.is_dir() else []
        raise FileNotFoundError(f"notebook(s) {', '.join(missing)} not found in {notebooks_dir} (it holds: "
                                f"{', '.join(held) or 'no notebooks'}); name them as listed (.ipynb may be left "
                                f"out), or pass notebooks_dir= (--notebooks-dir) if they live elsewhere.")
    untagged = [p.name for p in paths if not has_parameters_cell(p)]
    if untagged:
        raise ValueError(f"{', '.join(untagged)} has no cell tagged `parameters`: papermill would put --run-dir and "
                         f"every -p at its top, above the notebook's own settings, which would then win (it would "
                         f"write into its default run directory and ignore every setting given). Tag the cell that "
                         f"sets preset and run_dir with `parameters` (Jupyter: the cell's Tags; nbformat: "
                         f"cell.metadata['tags'] = ['parameters']).")
    declared_by = {p.name: notebook_parameters(p) for p in paths}
    declared = set().union(*declared_by.values())
    unknown = sorted(set(params) - set(PARAMETERS) - declared)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}: neither a config key ({', '.join(PARAMETERS)}) "
                         f"nor a parameter of the notebooks ({', '.join(sorted(declared)) or 'none'}).")
    if any("dataset" in d for d in declared_by.values()):     # notebooks that load the data
        facts = dataset_facts(given.get("dataset", config["dataset"]))
        check_models(config, facts)
        check_validation_split(config, facts, notebook6=VALIDATION_NOTEBOOK in names)
        if any("kq_samples" in d for d in declared_by.values()):
            check_kq_samples(config, facts)

    run_dir = Path(run_dir).resolve()  # absolute: the notebooks run with cwd=notebooks_dir
    taken = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if taken is not None and not taken.is_dir():
        raise ValueError(f"the run directory {run_dir} cannot be created: {taken} is a file. Pass a folder to "
                         f"--run-dir (run_dir=).")
    _check_writable(run_dir / "executed")
    kernel_name = kernel_name or current_kernel_name()
    parameters = {"preset": config["preset"], "run_dir": str(run_dir),
                  **({"progress": False} if "progress" in declared else {}), **params}  # one log line per epoch
    with run_lock(run_dir) if lock else contextlib.nullcontext():
        return _run_notebooks(run_dir, config, paths, parameters, notebooks_dir, kernel_name, log_output, progress)


def _run_notebooks(run_dir: Path, config: dict, paths: list[Path], parameters: dict, notebooks_dir: Path,
                   kernel_name: str, log_output: bool, progress: bool) -> dict:
    """run_pipeline's work once its checks passed: each notebook through papermill, then the results table."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    log = print if progress else (lambda *a, **k: None)
    log(f"pipeline: preset {config['preset']}, run dir {run_dir}, kernel {kernel_name} ({sys.executable})")
    why = pretrained_fallback(config, run_dir) if NOTEBOOKS[0] in {p.name for p in paths} else None
    if why:
        print(f"pipeline: the teacher's ImageNet weights cannot be loaded ({why}); notebook 1 trains "
              f"{config['teacher']} from scratch instead (recorded as pretrained False, pretrained_requested True).",
              file=sys.stderr, flush=True)
    finished: list[str] = []
    kernel_log = run_dir / "executed" / "kernel.log"
    kernel_manager = _kernel_manager_logging_to(kernel_log)
    papermill_log = logging.getLogger("papermill")
    papermill_log.addFilter(_drop_unknown_parameter_warnings)
    try:
        for i, path in enumerate(paths, 1):
            executed = run_dir / "executed" / path.name
            log(f"[{i}/{len(paths)}] {path.name}: started", flush=True)
            start = time.perf_counter()
            try:
                papermill.execute_notebook(path, executed, parameters=parameters, kernel_name=kernel_name,
                                           language="python", cwd=str(notebooks_dir), log_output=log_output,
                                           progress_bar=progress, kernel_manager_class=kernel_manager)
            except KeyboardInterrupt:
                raise PipelineInterrupted(finished, path.name) from None
            except PapermillExecutionError as err:
                if err.ename == "KeyboardInterrupt":      # the kernel got the same Ctrl-C
                    raise PipelineInterrupted(finished, path.name) from None
                index = _source_cell_index(path, executed, fallback=err.cell_index)
                raise NotebookFailed(path.name, executed, index, err.ename, err.evalue, err.source,
                                     executed_cell_index=err.cell_index) from err
            except OSError as err:    # a file the runner could not write: the executed copy, the kernel's log
                hint = _write_hint(err)
                raise NotebookFailed(path.name, executed, None, type(err).__name__,
                                     f"{err}" + (f": {hint}" if hint else "")) from err
            except Exception as err:  # kernel death, timeouts: still name the notebook and the kernel's own log
                logged = kernel_log.is_file() and kernel_log.stat().st_size > 0
                raise NotebookFailed(path.name, executed, None, type(err).__name__,
                                     f"{err}" + (f" (the kernel's log: {kernel_log})" if logged else "")) from err
            log(f"[{i}/{len(paths)}] {path.name}: finished in {time.perf_counter() - start:.1f} s", flush=True)
            finished.append(path.name)
    finally:
        papermill_log.removeFilter(_drop_unknown_parameter_warnings)

    if NOTEBOOKS[4] not in {p.name for p in paths} and not (run_dir / RESULTS_FILE).exists():
        return {}                         # a partial series (e.g. notebooks 1-3): no results table yet
    results = json.loads(require_artifact(run_dir / RESULTS_FILE, paths[-1].name, config["preset"]).read_text())
    table = results_markdown(results)
    (run_dir / "results.md").write_text(table)
    print(table)
    return results


# ----------------------------------------------------------------------------------------------------------------
# command line

def parse_value(text: str) -> Any:
    """A -p value as papermill reads it (True/False/None/int/float, else str), plus [lists] and {dicts}."""
    literals = {"True": True, "False": False, "None": None}
    if text in literals:
        return literals[text]
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text.strip()[:1] in ("[", "{"):
        import yaml  # a papermill dependency; YAML also reads JSON and unquoted lists like [ce, hinton_kd]
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"could not parse {text!r} as a list/dict: {err}") from err
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m kdutils.pipeline`."""
    parser = argparse.ArgumentParser(
        prog="python -m kdutils.pipeline", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run notebooks 1-5 (and 6 with --validate-kq) headless with papermill, in order, stopping at "
                    "the first failing cell; executed copies go to RUN_DIR/executed/, the result table to "
                    "RUN_DIR/results.md.",
        epilog=describe_presets())
    parser.add_argument("--preset", default="auto", choices=["auto", *PRESETS], help="settings preset (default auto)")
    parser.add_argument("--run-dir", type=Path, help="where artifacts go (default runs/<preset>)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override a preset key or pass a notebook parameter (repeatable)")
    parser.add_argument("--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help="folder holding the notebooks")
    parser.add_argument("--validate-kq", action="store_true",
                        help=f"also run {VALIDATION_NOTEBOOK} after the five (the single-layer sweep that tests KQ)")
    parser.add_argument("--notebooks", nargs="+", default=None, metavar="NAME",
                        help="run only these notebooks, in this order (default: notebooks 1-5)")
    parser.add_argument("--kernel", help="Jupyter kernel name (default: the one that runs this Python)")
    parser.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the terminal")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines or bars")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and parameters and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 a notebook or input failed, 2 bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        print(describe_presets())
        return 0
    try:
        params = {name: parse_value(value) for name, value in args.parameter}
        run_dir = args.run_dir or default_run_dir(preset_name(args.preset))
        if preset_name(args.preset) in GPU_PRESETS:     # from the dataset's real sizes (an .npz file is read)
            print(runtime_estimate_text(resolve_config(args.preset, **{k: v for k, v in params.items()
                                                                       if k in PARAMETERS})), flush=True)
        run_pipeline(run_dir, args.preset, params, notebooks_dir=args.notebooks_dir, kernel_name=args.kernel,
                     log_output=args.log_output, progress=not args.no_progress,
                     notebooks=args.notebooks or [*NOTEBOOKS, *([VALIDATION_NOTEBOOK] if args.validate_kq else [])])
    except ValueError as err:
        parser.error(str(err))
    except (NotebookFailed, OSError, RuntimeError) as err:     # OSError: FileNotFoundError, a failed write
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:      # one line, not a traceback through papermill's event loop
        # papermill's event loop may still hold a task that the interrupt cancelled mid-way; when it is collected,
        # asyncio would log a 5-line "Task exception was never retrieved" traceback after this line
        logging.getLogger("asyncio").disabled = True
        print(str(err) if isinstance(err, PipelineInterrupted) else
              "interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
