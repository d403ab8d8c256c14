"""The series' settings: teacher-student pairs, presets, the keys a notebook or the runner may override, and the one
rule that resolves and checks them (resolve_config); what a config means for the students (student_recipe,
monitored), and the presets as listed by --list-presets (describe_presets) or shown in a notebook (config_frame).

Every notebook's `parameters` cell holds `preset = "auto"`, `run_dir = None` and, for each preset key it lets you
change, `key = None` (None keeps the preset's value); kdutils.notebook.setup then calls

    config = resolve_config(preset, **config_overrides(globals()))

so `papermill nb.ipynb out.ipynb -p preset quick -p student_epochs 2` and the pipeline's `-p student_epochs 2` both
work. "auto" is colab on Google Colab (on_colab), else cifar10 with CUDA, else quick (preset_name).

Called by kdutils.notebook (setup), kdutils.pipeline (the runner and its CLI), kdutils.sweep and kdutils.sweep_tasks,
notebook 1 (config_frame), notebooks 4-6 (student_recipe), and the benchmarks.
"""
from __future__ import annotations

import copy
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdutils.checks import IMAGE_SIZES, NUM_CLASSES
from kdutils.data import dataset_key
from kdutils.distill import METHODS, REGISTRY  # method name -> one-line description / full entry
from kdutils.kq import kq_per_class
from kdutils.layers import generalized_layer_count, standard_layers
from kdutils.models import LONG_LR, MODELS, PEAK_LR, has_imagenet_weights
from kdutils.rundir import shown_config, shown_path
from kdutils.train import SCHEDULES

# Teacher -> student pairs: the paper's four, plus the CPU-scale pair of the `quick` and `cifar10-cpu` presets.
PAIRS = {
    "resnet34-resnet9": {"teacher": "resnet34", "student": "resnet9"},
    "vgg19-vgg11": {"teacher": "vgg19_bn", "student": "vgg11_bn"},
    "resnet34-mobilenetv2": {"teacher": "resnet34", "student": "mobilenet_v2"},
    "vitb-vitet": {"teacher": "vit_b", "student": "vit_et"},
    "resnet18_narrow-resnet10_narrow": {"teacher": "resnet18_narrow", "student": "resnet10_narrow"},
}

LONG_WEIGHT_DECAY = 5e-4

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
    "augment": "random crop + horizontal flip for every model (the paper's main runs use none)",
    "teacher_augment": "random crop + horizontal flip for the teacher only, even with augment False (the "
                       "cifar10-cpu preset's CPU choice: a from-scratch teacher on few images needs it to be clearly "
                       "better than its students; not the paper's recipe)",
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
            validation_epochs: int | None = None, teacher_augment: bool = False) -> dict:
    """One preset's full key set (teacher, student and LRs follow from the pair)."""
    teacher, student = PAIRS[pair]["teacher"], PAIRS[pair]["student"]
    return {"dataset": dataset, "per_class": per_class, "image_size": image_size, "pair": pair,
            "teacher": teacher, "student": student, "pretrained": pretrained,
            "teacher_epochs": epochs[0], "student_epochs": epochs[1],
            "teacher_lr": PEAK_LR[teacher], "backbone_lr_scale": 0.01, "student_lr": PEAK_LR[student],
            "schedule": "onecycle",
            "weight_decay": 0.01, "batch_size": 128, "augment": False, "teacher_augment": teacher_augment,
            "seeds": seeds, "methods": methods,
            "kq_samples": 5000, "kq_per_class": kq_per_class(dataset, teacher), "k": 4, "monitor": True,
            "val_fraction": val_fraction, "validation_epochs": validation_epochs or epochs[1],
            "validation_seeds": min(2, len(seeds)), "validation_layers": "all"}


PRESETS = {
    "quick": _preset("digits", _CPU_PAIR, epochs=(4, 4), seeds=[0], pretrained=False, methods=_CPU_METHODS,
                     image_size=16, validation_epochs=2),
    # Converged on the course's CIFAR-10 subset (10,000 training images, 9,000 after the validation split): a
    # from-scratch teacher with crop + flip (teacher_augment, a CPU-preset choice, not the paper's recipe) reaches
    # about 77% in 20 epochs (~23 s each on 2 cores), clearly above any student alone (ce about 62% after 15
    # epochs, gaining under 1 point over its last quarter); students ~5-7 s per epoch alone; notebook 5 is 18 runs x 15
    # epochs, notebook 6 is 2 seeds x (7 swap runs + the distinct selections) of 6 epochs.
    "cifar10-cpu": _preset("cifar10-subset", _CPU_PAIR, epochs=(20, 15), seeds=[0, 1, 2], pretrained=False,
                           methods=_CPU_METHODS, validation_epochs=6, teacher_augment=True),
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
    "quick": "CPU smoke run on scikit-learn's bundled digits at 16x16 (offline), what CI runs; about a minute on 2 quiet "
             "cores, more on a busy host (kdutils.runtime.MEASURED)",
    "cifar10-cpu": "the course's CIFAR-10 subset (cifar10-subset: 1,000 training images per class, 10% of them held "
                   "out for validation, 200 test images per class; data/README.md) with the CPU-scale pair, a teacher "
                   "trained 20 epochs with crop + flip, students 15 epochs, 3 seeds (notebook 6: 6-epoch runs, 2 "
                   "seeds); the committed notebooks' preset; about 70 minutes on 2 cores (kdutils.runtime.MEASURED)",
    "cifar10": "the paper's setting on CIFAR-10 (50 epochs, AdamW/OneCycle, no augmentation, 3 seeds); GPU",
    "cifar100": "the paper's setting on CIFAR-100 (fine labels); GPU",
    "tinyimagenet": "the paper's setting on Tiny ImageNet (64x64, 200 classes); GPU",
    "colab": "real CIFAR-10 with the paper's pair (pretrained ResNet34 -> ResNet9), 3 + 5 epochs, 2 seeds, the six "
             "methods of the CPU presets; sized for a free Colab T4 session (an estimate, not measured: see "
             "estimate_runtime); what auto picks on Colab",
}


def on_colab(override: bool | None = None) -> bool:
    """Whether this kernel runs on Google Colab ("google.colab" imported); `override` True/False decides instead."""
    return bool(override) if override is not None else "google.colab" in sys.modules


def preset_name(preset: str = "auto", colab: bool | None = None) -> str:
    """The concrete preset for a name: 'auto' is colab on Google Colab, else cifar10 with CUDA, else quick.

    `colab` overrides the detection (on_colab: True/False forces it, None detects)."""
    if preset == "auto":
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
    key = dataset_key(dataset)
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
            shown = dataset if dataset_key(dataset) in IMAGE_SIZES else shown_path(dataset)
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


def config_overrides(namespace: Mapping[str, Any]) -> dict:
    """The preset keys set (not None) in a notebook's namespace, e.g. `config_overrides(globals())`."""
    return {key: namespace[key] for key in PARAMETERS if namespace.get(key) is not None}


def monitored(config: dict, method: str) -> bool:
    """Whether notebook 5 trains `method` with distill's monitor: the config's `monitor` key, for the methods with
    paired 1x1-projector feature losses (the only ones distill can monitor)."""
    return bool(config["monitor"]) and REGISTRY[method].monitorable


def student_recipe(config: dict) -> dict:
    """distill's epochs, lr, weight_decay and schedule for the students of a config (the long schedule brings its
    own weight decay, 5e-4)."""
    long = config["schedule"] == "long"
    return {"epochs": config["student_epochs"], "lr": config["student_lr"], "schedule": config["schedule"],
            "weight_decay": LONG_WEIGHT_DECAY if long else config["weight_decay"]}


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
