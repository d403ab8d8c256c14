"""The sweep's per-cell work, as plain functions Ray runs in its workers (kdutils.sweep wraps them with ray.remote):
the grid's cells and their folders, notebooks 1-3 of a (dataset, pair) combination, the combination's shared teacher
cache, one student run per (method, seed) -- notebook 5's own distill call, into the checkpoint notebook 5 uses --
and a combination's results once its runs are in.

Called by kdutils.sweep (the driver) and benchmarks/sweep_bench.py.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from kdutils import pipeline
from kdutils.checkpoints import checkpoint_finished
from kdutils.distill import REGISTRY, distill, fill_teacher_cache, layer_arguments
from kdutils.precision import precision_for
from kdutils.precision import record as precision_record
from kdutils.presets import PAIRS, PARAMETERS, monitored, resolve_config, student_recipe
from kdutils.results import RESULTS_FILE, summarize_runs
from kdutils.rundir import NOTEBOOKS, NOTEBOOKS_DIR, series_data, teacher_config

TEACHER_NOTEBOOKS = NOTEBOOKS[:3]          # teacher, geometry, KQ: once per combination
TEACHER_ARTIFACTS = ("teacher.pt", "teacher_metrics.json", "kq_layers.json")
SWEPT_KEYS = ("dataset", "pair", "seeds")  # set by --datasets, --pairs and --seeds, not by -p


# ----------------------------------------------------------------------------------------------------------------
# the grid

def dataset_label(dataset: str) -> str:
    """A dataset's name in folders and tables: the name itself, or an .npz file's stem."""
    return Path(dataset).stem if dataset.lower().endswith(".npz") or "/" in dataset else dataset


def combination_dir(root: str | Path, dataset: str, pair: str) -> Path:
    """The run directory of one (dataset, pair) combination: ROOT/<dataset>/<pair>."""
    return Path(root) / dataset_label(dataset) / pair


def sweep_cells(root: str | Path, preset: str, datasets: Sequence[str], pairs: Sequence[str],
                seeds: Sequence[int], params: dict) -> list[dict]:
    """One cell per (dataset, pair): its label, run_dir, the notebook parameters and the resolved config."""
    clash = sorted(set(SWEPT_KEYS) & set(params))
    if clash:
        raise ValueError(f"set {', '.join(clash)} with --datasets / --pairs / --seeds, not with -p.")
    unknown = sorted(set(pair for pair in pairs) - set(PAIRS))
    if unknown:
        raise ValueError(f"unknown pair(s) {', '.join(unknown)}; choose from: {', '.join(PAIRS)}.")
    labels = [dataset_label(d) for d in datasets]
    if len(set(labels)) < len(labels) or len(set(pairs)) < len(pairs):
        raise ValueError(f"datasets {list(datasets)} or pairs {list(pairs)} repeat one; list each once.")
    cells = []
    for dataset in datasets:
        for pair in pairs:
            overrides = pipeline.absolute_paths({**params, "dataset": dataset, "pair": pair, "seeds": list(seeds)})
            config = resolve_config(preset, **{k: v for k, v in overrides.items() if k in PARAMETERS})
            cells.append({"dataset": dataset_label(dataset), "pair": pair, "key": f"{dataset_label(dataset)}/{pair}",
                          "run_dir": str(combination_dir(root, dataset, pair).resolve()),
                          "params": overrides, "config": config})
    return cells


def student_checkpoint(run_dir: str | Path, method: str, seed: int) -> Path:
    """Where notebook 5 (and the sweep) keep a student run: RUN_DIR/students/<method>-seed<seed>.pt."""
    return Path(run_dir) / "students" / f"{method}-seed{seed}.pt"


def needs_teacher_cache(method: str, config: dict) -> bool:
    """Whether a method's students read the teacher cache (features or logits, and no augmentation)."""
    spec = REGISTRY[method]
    return (spec.features or spec.kl) and not config["augment"]


def teacher_done(run_dir: str | Path, config: dict) -> bool:
    """Whether notebooks 1-3 already ran in run_dir with the settings they read from `config` (per their manifest)."""
    run_dir = Path(run_dir)
    manifest = run_dir / "manifests" / f"{Path(TEACHER_NOTEBOOKS[-1]).stem}.json"
    if not manifest.is_file() or not all((run_dir / name).is_file() for name in TEACHER_ARTIFACTS):
        return False
    try:
        saved = json.loads(manifest.read_text())["config"]
    except (json.JSONDecodeError, KeyError, OSError):
        return False
    keys = set().union(*(pipeline.notebook_parameters(NOTEBOOKS_DIR / nb) for nb in TEACHER_NOTEBOOKS))
    keys = (keys & set(PARAMETERS)) | {"teacher", "student", "image_size"}
    for key in sorted(keys):
        if key == "seeds":       # notebooks 1-3 use the first seed only
            same = saved.get("seeds", [None])[:1] == config["seeds"][:1]
        elif key == "pretrained":
            same = saved.get("pretrained_requested", saved.get("pretrained")) == config["pretrained"]
        else:
            same = saved.get(key) == config.get(key)
        if not same:
            return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# the Ray tasks' bodies (plain functions; kdutils.sweep.run_sweep wraps them with ray.remote)

def _check_visible(run_dir: Path) -> None:
    """Refuse to run on a node that does not see the combination's run_dir (no shared filesystem)."""
    missing = [name for name in TEACHER_ARTIFACTS if not (run_dir / name).is_file()]
    if missing:
        import socket
        raise FileNotFoundError(f"{', '.join(missing)} not found in {run_dir} on node {socket.gethostname()}: the "
                                f"sweep root must be on a filesystem every Ray node mounts at the same path (NFS), "
                                f"and notebooks 1-3 must have finished there.")


def _set_threads(threads: int) -> None:
    """Limit this task's torch to `threads` intra-op threads (results depend on the thread count on the CPU)."""
    torch.set_num_threads(threads)


def prepare_combination(run_dir: str, preset: str, params: dict, threads: int) -> dict:
    """Ray task: run notebooks 1-3 (teacher, geometry, KQ) headless into run_dir; return their wall time."""
    start = time.perf_counter()
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)     # the notebooks' kernels inherit it
    try:
        pipeline.run_pipeline(run_dir, preset, params, progress=False, notebooks=TEACHER_NOTEBOOKS,
                              lock=False)   # the sweep's driver holds run_dir's lock for the whole sweep
    except FileNotFoundError as err:    # run_pipeline ends by reading results.json, which notebook 5 writes
        if RESULTS_FILE not in str(err) or not all((Path(run_dir) / n).is_file() for n in TEACHER_ARTIFACTS):
            raise
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
    return {"seconds": time.perf_counter() - start}


def _load_combination(run_dir: Path, config: dict, data_root: str, device: torch.device) -> tuple:
    """Notebook 5's inputs: kq_layers.json's selection, the dataset and the trained teacher."""
    from kdutils.train import load_model
    _check_visible(run_dir)
    selection = json.loads((run_dir / "kq_layers.json").read_text())
    data = series_data(config, data_root)     # as notebooks 1-5: without the validation split
    teacher = load_model(run_dir / "teacher.pt", device, expect_model=config["teacher"],
                         num_classes=data.num_classes, role="teacher")
    return selection, data, teacher


def _map_arrays(obj: Any, convert: Callable[[Any], Any], kind: type) -> Any:
    """`obj` with every `kind` value inside its dicts and lists replaced by convert(value)."""
    if isinstance(obj, kind):
        return convert(obj)
    if isinstance(obj, dict):
        return {k: _map_arrays(v, convert, kind) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_arrays(v, convert, kind) for v in obj]
    return obj


def build_teacher_cache(run_dir: str, config: dict, methods: Sequence[str], data_root: str, device: str,
                        threads: int, cache_mb: float | None) -> dict:
    """Ray task: one teacher pass building the feature/logit cache of `methods`, returned as numpy arrays."""
    _set_threads(threads)
    device = torch.device(device)
    selection, data, teacher = _load_combination(Path(run_dir), config, data_root, device)
    cache: dict = {}
    for method in methods:
        fill_teacher_cache(teacher, config["student"], data, method, cache=cache, seed=config["seeds"][0],
                           augment=config["augment"], cache_budget_mb=cache_mb, device=device,
                           batch_size=config["batch_size"], teacher_name=config["teacher"],
                           **layer_arguments(method, selection))
    return _map_arrays(cache, lambda t: t.cpu().numpy(), torch.Tensor)


def _cache_on(stored: dict, device: torch.device) -> dict:
    """A task's cache from the object store's numpy arrays: zero-copy on the CPU, on the GPU when it fits."""
    import numpy as np
    with warnings.catch_warnings():  # the object store's arrays are read-only; the cache only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        cache = _map_arrays(stored, torch.from_numpy, np.ndarray)
    if device.type == "cuda":
        mb = sum(e.get("megabytes", 0) for e in cache.values() if isinstance(e, dict))
        if mb <= 0.6 * torch.cuda.mem_get_info(device)[0] / 2**20:
            for entry in (e for e in cache.values() if isinstance(e, dict) and "tensors" in e):
                entry["tensors"] = _map_arrays(entry["tensors"], lambda t: t.to(device), torch.Tensor)
                entry["device"] = str(device)
    return cache


def train_student(run_dir: str, config: dict, method: str, seed: int, data_root: str, device: str, threads: int,
                  cache: dict | None, cache_mb: float | None) -> dict:
    """Ray task: notebook 5's distill call for one (method, seed), into its checkpoint; returns the history."""
    import ray
    _set_threads(threads)
    start = time.perf_counter()
    device = torch.device(device)
    run_dir = Path(run_dir)
    checkpoint = student_checkpoint(run_dir, method, seed)
    status = "reused" if checkpoint_finished(checkpoint, config["student_epochs"]) else \
        "resumed" if checkpoint.is_file() else "trained"
    selection, data, teacher = _load_combination(run_dir, config, data_root, device)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    history = distill(teacher, config["student"], data, method, seed=seed, batch_size=config["batch_size"],
                      augment=config["augment"], cache=_cache_on(cache, device) if cache else {},
                      cache_budget_mb=cache_mb, checkpoint=checkpoint, device=device, progress=False,
                      **student_recipe(config), **layer_arguments(method, selection),
                      monitor=monitored(config, method))
    return {"history": history, "status": status, "seconds": time.perf_counter() - start, "data_name": data.name,
            "node": ray.util.get_node_ip_address(), "threads": torch.get_num_threads(), "device": str(device),
            "precision": precision_record(precision_for(device))}     # decided on the worker's own hardware


# ----------------------------------------------------------------------------------------------------------------
# collecting

def task_error(err: BaseException) -> str:
    """A failed task's original exception as 'Type: message' (Ray wraps it in a RayTaskError)."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".strip()


def cell_results(cell: dict, runs: dict) -> dict | None:
    """summarize_runs of a cell's methods whose every seed finished (as notebook 5 writes it), else None."""
    config = cell["config"]
    histories, dataset, precision = {}, cell["dataset"], None
    for method in config["methods"]:
        done = [runs.get((cell["key"], method, seed)) for seed in config["seeds"]]
        if all(r is not None and r.get("history") for r in done):
            histories[method] = [r["history"] for r in done]
            dataset = done[0].get("data_name", dataset)
            precision = precision or done[0].get("precision")
    metrics = Path(cell["run_dir"]) / "teacher_metrics.json"
    if not histories or not metrics.is_file():
        return None
    teacher_metrics = json.loads(metrics.read_text())
    full = teacher_config(config, cell["run_dir"])
    teacher = {"model": config["teacher"], "test_acc": teacher_metrics["final_test_acc"],
               **{k: full[k] for k in ("pretrained", "pretrained_requested") if k in full}}
    results = summarize_runs(histories, teacher=teacher, preset=config["preset"], dataset=dataset,
                             precision=precision)
    results["config"] = full
    results["kq_layers"] = json.loads((Path(cell["run_dir"]) / "kq_layers.json").read_text())["kq_layers"]
    return results
