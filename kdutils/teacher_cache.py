"""The teacher's side of distillation: its layer shapes, its forward passes and the feature/logit cache.

Teacher targets (kdutils.feature_maps.Targets) and logits are computed once over the un-augmented train split and
kept in a dict the caller may share between runs and methods (keys hold the teacher's weights' fingerprint and the
data's content fingerprint, so sharing is safe); with augmentation on, or when the cache would exceed its memory
budget, the teacher runs on the fly on the student's batch.

Called by kdutils.distill (distill_loss sets up a run's teacher_lookup; fill_teacher_cache fills it ahead of the
runs), kdutils.validation (fill_targets: one pass for the targets of all of notebook 6's runs) and, through the lookup
it returns, kdutils.monitor.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from kdutils.data import Dataset, batches
from kdutils.data import fingerprint as data_fingerprint   # `fingerprint` names the teacher's weights' hash here
from kdutils.feature_maps import Shape, Targets, feature_shapes
from kdutils.layers import extract, tap
from kdutils.precision import Precision, autocast, batch_to, model_to, precision_for
from kdutils.train import default_device, state_fingerprint

TeacherLookup = Callable[[torch.Tensor, torch.Tensor], tuple[list[torch.Tensor], torch.Tensor | None]]


def teacher_shapes(teacher: nn.Module, layers: Sequence[int], image_size: int, device: torch.device, cache: dict,
                   fingerprint: str) -> list[Shape]:
    """Per-sample shapes of the teacher's layers, kept in `cache` so a cached run never runs the teacher, not even
    to probe shapes."""
    key = ("shapes", fingerprint, tuple(layers), image_size)
    if key not in cache:
        cache[key] = feature_shapes(teacher, layers, image_size, device)
    return cache[key]


def _teacher_forward(teacher: nn.Module, xb: torch.Tensor, layers: Sequence[int], with_logits: bool
                     ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """The teacher's features at `layers` and (if asked) its logits, from one no-grad forward pass."""
    with torch.no_grad():
        if not with_logits:
            return extract(teacher, xb, list(layers), stop_early=True), None
        if not layers:
            return {}, teacher(xb)
        with tap(teacher, list(layers)) as feats:
            logits = teacher(xb)
            return dict(feats), logits


def _cache_budget_mb(device: torch.device, budget_mb: float | None) -> float:
    """The cache's size limit: the given one, else 4096 MB on the CPU and 60% of free memory on CUDA."""
    if budget_mb is not None:
        return float(budget_mb)
    if device.type == "cuda":
        return 0.6 * torch.cuda.mem_get_info(device)[0] / 2**20
    return 4096.0


def _cache_mb(data: Dataset, target_shapes: Sequence[Shape], logits: bool) -> float:
    """Megabytes the cache needs for these targets (fp16) over the train split, plus its logits (fp32) if asked."""
    n = data.num_train
    return (sum(n * 2 * torch.Size(shape).numel() for shape in target_shapes)
            + (n * 4 * data.num_classes if logits else 0)) / 2**20


def _build_cache(teacher: nn.Module, data: Dataset, layers: Sequence[int], s_shapes: Sequence[Shape],
                 t_shapes: Sequence[Shape], want: dict[str, tuple], store: torch.device, device: torch.device,
                 batch_size: int, progress: bool, targets: Targets | None, precision: Precision
                 ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """One pass of the teacher over the un-augmented train split (forward in `precision`): fp16 targets (maps in
    channels_last when `precision` uses it, so the loss reads both sides in one layout) and/or fp32 logits."""
    n = data.num_train
    pin = store.type == "cpu" and device.type == "cuda"
    out: dict = {}
    if "features" in want:                              # maps stored in the layout the student's features use
        out["features"] = [torch.empty((n, *shape), dtype=torch.float16, device=store, pin_memory=pin,
                                       memory_format=torch.channels_last if precision.channels_last and len(shape) == 3
                                       else torch.contiguous_format) for shape in want["features"]]
    if "logits" in want:
        out["logits"] = torch.empty((n, data.num_classes), dtype=torch.float32, device=store, pin_memory=pin)
    it = batches(data.x_train, data.y_train, batch_size, mean=data.mean, std=data.std, with_index=True)
    for xb, _, idx in tqdm(it, total=-(-n // batch_size), desc="teacher cache", leave=False, disable=not progress):
        with autocast(precision):
            feats, logits = _teacher_forward(teacher, batch_to(xb, precision), layers if "features" in want else [],
                                             "logits" in want)
        idx = idx.to(store)
        if "features" in want:
            computed = targets.compute([feats[i] for i in layers], s_shapes, t_shapes)
            for buf, t in zip(out["features"], computed):
                buf[idx] = t.to(store, torch.float16)
        if "logits" in want:
            out["logits"][idx] = logits.float().to(store)
    return out


def teacher_lookup(teacher: nn.Module, data: Dataset, targets: Targets | None, logits: bool, t_layers: Sequence[int],
                   s_shapes: Sequence[Shape], t_shapes: Sequence[Shape], *, fingerprint: str, augment: bool,
                   cache: dict, cache_budget_mb: float | None, device: torch.device, batch_size: int,
                   progress: bool, precision: Precision) -> TeacherLookup:
    """A function (xb, idx) -> (teacher targets, teacher logits) reading the cache, or running the teacher.

    `targets` None: no features (a logits-only method); `logits`: whether the method needs the teacher's logits.
    The cache holds one entry per target (teacher layer, target shape, kind), so runs whose layer sets overlap share
    what they have in common, and one teacher pass fills every target that is missing.
    """
    features = targets is not None
    layers = list(t_layers) if features else []
    if features and targets.each_layer_once:            # each teacher layer once, as it is
        unique = list(dict.fromkeys(layers))
        t_shapes = [t_shapes[layers.index(i)] for i in unique]
        layers = unique
    targets_shapes = [targets.shape(s, t) for s, t in zip(s_shapes, t_shapes)] if features else []
    what = " and ".join(w for w, on in (("features", features), ("logits", logits)) if on)

    def on_the_fly(reason: str) -> TeacherLookup:
        print(f"teacher {what}: on the fly ({reason})", flush=True)

        def lookup(xb: torch.Tensor, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            feats, teacher_logits = _teacher_forward(teacher, xb, layers, logits)
            computed = targets.compute([feats[i] for i in layers], s_shapes, t_shapes) if features else []
            return computed, teacher_logits
        return lookup

    if augment:
        return on_the_fly("augmentation on: the teacher sees the student's augmented batch")
    keys = target_keys(fingerprint, data, precision, targets, layers, targets_shapes) if features else []
    logits_key = (*cache_base(fingerprint, data, precision), "logits") if logits else None
    todo = [i for i, key in enumerate(keys) if key not in cache and keys.index(key) == i]   # first pair of each key
    reused = len(set(keys)) - len(todo)
    want_logits = logits_key is not None and logits_key not in cache
    if todo or want_logits:
        mb = _cache_mb(data, [targets_shapes[i] for i in todo], want_logits)
        budget = _cache_budget_mb(device, cache_budget_mb)
        if mb > budget:
            return on_the_fly(f"the cache would need {mb:.0f} MB > budget {budget:.0f} MB; raise cache_budget_mb "
                              f"to cache it")
        store = device
        if device.type == "cuda" and mb > 0.6 * torch.cuda.mem_get_info(device)[0] / 2**20:
            store = torch.device("cpu")     # pinned host memory, copied per batch
        t0 = time.perf_counter()
        want = {**({"features": [targets_shapes[i] for i in todo]} if todo else {}),
                **({"logits": ()} if want_logits else {})}
        built = _build_cache(teacher, data.to(device), [layers[i] for i in todo], [s_shapes[i] for i in todo],
                             [t_shapes[i] for i in todo], want, store, device, batch_size, progress, targets,
                             precision)
        seconds = time.perf_counter() - t0
        new = dict(zip([keys[i] for i in todo], built.get("features", [])))
        if want_logits:
            new[logits_key] = built["logits"]
        for key, tensor in new.items():
            cache[key] = {"tensors": tensor, "device": str(store), "seconds": seconds,
                          "megabytes": tensor.numel() * tensor.element_size() / 2**20}
        print(f"teacher {what}: cached on {store} ({mb:.1f} MB, {seconds:.1f}s"
              f"{f'; {reused} of {len(set(keys))} targets reused' if reused else ''})", flush=True)
    else:
        entries = [cache[key] for key in dict.fromkeys([*keys, *([logits_key] if logits_key else [])])]
        mb = sum(e["megabytes"] for e in entries)
        print(f"teacher {what}: reusing the cache on {entries[0]['device']} ({mb:.1f} MB)", flush=True)
    feats_cached = [cache[key]["tensors"] for key in keys]
    logits_cached = cache[logits_key]["tensors"] if logits_key else None

    def lookup(xb: torch.Tensor, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        rows = idx.to(feats_cached[0].device if feats_cached else logits_cached.device)
        cached = [f[rows].to(xb.device, non_blocking=True) for f in feats_cached]
        teacher_logits = logits_cached[rows].to(xb.device, non_blocking=True) if logits_cached is not None else None
        return cached, teacher_logits
    return lookup


def cache_base(fingerprint: str, data: Dataset, precision: Precision) -> tuple:
    """What every cache entry of a teacher on a dataset shares: the teacher's weights, the data's name and content,
    and the precision its forward passes ran in."""
    return (fingerprint, data.name, data_fingerprint(data), precision.dtype)


def target_keys(fingerprint: str, data: Dataset, precision: Precision, targets: Targets, layers: Sequence[int],
                targets_shapes: Sequence[Shape]) -> list[tuple]:
    """The cache key of each target: cache_base, the teacher layer, the target's shape and kind."""
    base = cache_base(fingerprint, data, precision)
    return [(*base, layer, tuple(shape), targets.name) for layer, shape in zip(layers, targets_shapes)]


def fill_targets(teacher: nn.Module, student: nn.Module, data: Dataset, targets: Targets, s_layers: Sequence[int],
                 t_layers: Sequence[int], *, cache: dict, device: torch.device | str | None = None, amp: bool = True,
                 batch_size: int = 256, cache_budget_mb: float | None = None) -> bool:
    """Put in `cache`, with one teacher pass, the targets of many (student layer, teacher layer) pairs, e.g. those of
    several runs whose layer sets differ (notebook 6), so that each run then reads them instead of running the teacher
    over the data once more. `student` gives the student layers' shapes (the network whose layers are distilled);
    `device` and `amp` must be the runs'. Returns False, doing nothing, when nothing is missing or the missing
    targets would not fit the cache budget together (then each run caches its own)."""
    device = torch.device(device) if device is not None else default_device()
    precision = precision_for(device, amp)
    was_training = teacher.training
    teacher.eval()
    try:
        model_to(teacher, device, precision)
        model_to(student, device, precision)
        fingerprint = state_fingerprint(teacher)
        s_shapes = feature_shapes(student, s_layers, data.image_size, device)
        t_shapes = teacher_shapes(teacher, t_layers, data.image_size, device, cache, fingerprint)
        shapes = [targets.shape(s, t) for s, t in zip(s_shapes, t_shapes)]
        missing = {key: shape for key, shape in zip(target_keys(fingerprint, data, precision, targets, t_layers,
                                                                shapes), shapes) if key not in cache}
        if not missing or _cache_mb(data, list(missing.values()), False) > _cache_budget_mb(device, cache_budget_mb):
            return False
        teacher_lookup(teacher, data, targets, False, t_layers, s_shapes, t_shapes, fingerprint=fingerprint,
                       augment=False, cache=cache, cache_budget_mb=cache_budget_mb, device=device,
                       batch_size=max(batch_size, 256), progress=False, precision=precision)
        return True
    finally:
        teacher.train(was_training)
