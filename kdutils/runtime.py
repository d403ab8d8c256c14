"""Runtime ESTIMATES (not measurements) of a whole series on a GPU, from model FLOPs and an assumed throughput.

estimate_runtime counts each model's forward FLOPs per image (forward_flops) and assumes a sustained training
throughput per device (ASSUMED_TRAIN_FLOPS, none of it measured by this project); runtime_estimate_text states the
result and what it rests on in one paragraph. Called by notebook 1 and the pipeline's CLI (kdutils.pipeline.main)
for the GPU presets (GPU_PRESETS), before anything trains.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from kdutils.checks import dataset_facts
from kdutils.rundir import NOTEBOOKS

# Sustained training throughput ASSUMED per device (FLOP/s; forward + backward, mixed precision), for runtime
# estimates only. None of these GPUs has been measured by this project. Basis: the vendors' peak figures (T4: 65
# TFLOPS fp16 tensor / 8.1 fp32; A100: 312 bf16; H100 SXM: 989 bf16) and the rule of thumb that ResNet training
# sustains roughly 10% (T4) to 20-25% (A100, H100) of the tensor peak; for the T4 this matches the often quoted
# ~250 images/s of mixed-precision ResNet-50 training (~25 GFLOP per training image). Small 32x32 models use a GPU
# less well, so real runs may be slower; gpu_bench.py measures the real numbers.
ASSUMED_TRAIN_FLOPS = {"t4": 6e12, "a100": 60e12, "h100": 150e12}
NOTEBOOK_OVERHEAD_S = 30.0   # assumed per notebook: kernel start, data loading, KQ statistics, plots
GPU_PRESETS = ("colab", "cifar10", "cifar100", "tinyimagenet")


@functools.cache          # a pure function of its arguments: notebook 1's table asks for the same models repeatedly
def forward_flops(model: str, num_classes: int = 10, image_size: int = 32) -> float:
    """Forward FLOPs of one image (2 x the multiply-adds of every Conv2d/Conv1d/Linear; attention products and
    element-wise work are not counted), from one CPU forward pass with hooks. The model is built on the meta device
    and given uninitialised memory (to_empty): only shapes matter, and initialising ViT-B's weights costs ~0.6 s."""
    from kdutils.models import build_model
    with torch.device("meta"):
        net = build_model(model, num_classes, image_size=image_size)
    net = net.to_empty(device="cpu").eval()
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
    times = ", ".join(f"{d.upper()} ~{_duration(e['total'])}" for d, e in est.items())   # totals >= 180 s
    return (f"Estimated time of the whole series for preset {config['preset']} (an estimate, NOT measured: no GPU "
            f"has been measured by this project): {times}. Based on {first['teacher_gflops']:.2f} / "
            f"{first['student_gflops']:.2f} GFLOP per forward image (teacher {config['teacher']} / student "
            f"{config['student']}), 3x that per training image, {config['teacher_epochs']} teacher epochs, "
            f"{first['student_runs']} student runs x {config['student_epochs']} epochs, and an assumed sustained "
            f"throughput of " + ", ".join(f"{e['assumed_flops'] / 1e12:.0f} TFLOP/s on the {d.upper()}"
                                          for d, e in est.items()) +
            " (kdutils.runtime.ASSUMED_TRAIN_FLOPS); downloads not included.")


# MEASURED per-notebook seconds of whole series (`python -m kdutils.pipeline --preset P --validate-kq`, alone on
# the machine), per preset at its default budget (quick: the median of 10 runs on a quiet host): what notebooks print
# as the expected time (notebook_runtime_text) and notebook 1 tabulates (runtime_table). Update an entry when a
# preset's budget changes; a preset without one prints that it has not been measured.
MEASURED = {
    "quick": {"machine": "2 cores of an Intel Sapphire Rapids (AMX), bf16 autocast + channels_last",
              "date": "2026-12-06", "seconds": {"01_train_teacher": 9, "02_probe_layer_geometry": 5,
                                                "03_compute_kq": 4, "04_distill_without_ce": 6,
                                                "05_compare_to_hinton_kd": 14, "06_validate_kq": 15}},
    # one resumed run (reports/cifar10-cpu/README.md): notebooks 1-4 ran beside other jobs (upper bounds), notebook 5
    # is three times its alone-timed third seed plus evaluation, notebook 6 ran alone.
    "cifar10-cpu": {"machine": "2 cores of an Intel Sapphire Rapids (AMX), bf16 autocast + channels_last; "
                               "see reports/cifar10-cpu",
                    "date": "2026-12-03", "seconds": {"01_train_teacher": 884, "02_probe_layer_geometry": 112,
                                                      "03_compute_kq": 114, "04_distill_without_ce": 274,
                                                      "05_compare_to_hinton_kd": 1750, "06_validate_kq": 1094}},
}


def _duration(seconds: float) -> str:
    """A duration as people say it: '40 s', '3 min', '1.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def notebook_runtime_text(config: dict, notebook: str) -> str:
    """One line: this notebook's expected time for config's preset, measured (MEASURED) or estimated (GPU presets),
    or that it has not been measured; overridden budgets are said to change it."""
    preset, name = config.get("preset"), notebook.removesuffix(".ipynb")
    from kdutils.presets import PRESETS
    base = PRESETS.get(preset, {})
    changed = sorted(k for k in ("dataset", "per_class", "teacher_epochs", "student_epochs", "seeds", "methods",
                                 "validation_epochs", "validation_seeds", "validation_layers", "teacher", "student")
                     if k in base and config.get(k) != base[k])
    note = f" (for the preset's defaults; this run changes {', '.join(changed)})" if changed else ""
    m = MEASURED.get(preset)
    if m and name in m["seconds"]:
        total = sum(m["seconds"].values())
        return (f"expected time: about {_duration(m['seconds'][name])} for this notebook, "
                f"{_duration(total)} for notebooks 1-6 (measured for preset {preset} on {m['machine']}, "
                f"{m['date']}){note}")
    if preset in GPU_PRESETS:
        return runtime_estimate_text(config) + note
    return f"expected time: not measured for preset {preset}{note}"


def runtime_table() -> "pandas.DataFrame":
    """Notebook 1's runtime table: per preset, the series' time, measured (MEASURED, with machine and date) or
    estimated on a T4 (estimate_runtime), and which of the two it is."""
    import pandas as pd
    from kdutils.presets import PRESETS, resolve_config
    rows = []
    for preset in PRESETS:
        if preset in MEASURED:
            m = MEASURED[preset]
            rows.append({"preset": preset, "notebooks 1-6": _duration(sum(m["seconds"].values())),
                         "where": m["machine"], "how we know": f"measured, {m['date']}"})
        elif preset in GPU_PRESETS:
            try:
                est = estimate_runtime(resolve_config(preset))["total"]
                rows.append({"preset": preset, "notebooks 1-6": _duration(est), "where": "one Colab T4",
                             "how we know": "estimate from FLOPs (kdutils.runtime.estimate_runtime), not measured"})
            except (OSError, ValueError) as err:   # a dataset whose size cannot be read offline
                rows.append({"preset": preset, "notebooks 1-6": "?", "where": "one Colab T4",
                             "how we know": f"no estimate here ({err})"})
        else:
            rows.append({"preset": preset, "notebooks 1-6": "not measured yet", "where": "", "how we know": ""})
    return pd.DataFrame(rows).set_index("preset")
