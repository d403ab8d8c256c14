"""Distillation: CE-free feature KD ("ours"), its ablations, and the Hinton KD / FitNets baselines.

One entry point, :func:`distill`, trains a student with one of :data:`METHODS` through :func:`kdutils.train.fit`.
Feature methods tap the student's distillation layers (:func:`kdutils.layers.tap`), project each student feature to
the paired teacher layer's channels with a bias-free 1x1 convolution (:func:`make_projectors`) and add the MSE
(:func:`feature_loss`). The CE-free methods detach the student's last distilled layer, so the head after it learns
from CE while the backbone learns from the feature MSE alone. Teacher features (and logits) are computed once over
the un-augmented train split and cached in a dict the caller may share between runs; with augmentation on, or when
the cache would exceed its memory budget, the teacher runs on the fly on the student's batch.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from kdutils.data import Dataset, batches
from kdutils.layers import extract, standard_layers, tap
from kdutils.models import build_model
from kdutils.train import (LossFn, autocast, default_device, fit, load_checkpoint, prepare_model, seed_everything,
                           state_fingerprint, to_input)

METHODS: dict[str, str] = {
    "ce": "student alone with cross-entropy (the budget-matched baseline: same init, same data order)",
    "hinton_kd": "CE + T^2 KL(teacher || student) on logits softened at T = 4 (Hinton et al., 2015)",
    "feature_kd": "ours: MSE to the KQ-selected teacher layers through 1x1 projectors; the head learns by CE on "
                  "detached features, so no logit loss reaches the backbone",
    "feature_kd_ce": "ours + CE: the same layers and projectors, but CE also trains the backbone (ablation 'Ours+CE')",
    "standard_layers": "CE-free like feature_kd, with the teacher's standard layers (layer-choice ablation)",
    "fitnets_kd": "'Base FKD' (FitNets-style): standard layers, 1x1 projectors, MSE + CE + T^2 KL",
}


@dataclass(frozen=True)
class _Spec:
    """What a method uses: feature MSE, whose layers, whether CE reaches the backbone, Hinton KL."""
    features: bool
    layers: str          # "kq" | "standard" | ""
    ce_backbone: bool
    kl: bool


_SPECS = {
    "ce": _Spec(False, "", True, False),
    "hinton_kd": _Spec(False, "", True, True),
    "feature_kd": _Spec(True, "kq", False, False),
    "feature_kd_ce": _Spec(True, "kq", True, False),
    "standard_layers": _Spec(True, "standard", False, False),
    "fitnets_kd": _Spec(True, "standard", True, True),
}

Shape = tuple[int, ...]


# ----------------------------------------------------------------------------------------------------------------
# losses and projectors

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, averaged over the batch (fp32)."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (t * t)


def pair_layers(student_layers: Sequence[int], teacher_layers: Sequence[int]) -> list[tuple[int, int]]:
    """Pair student and teacher layers in depth order: the i-th shallowest student layer with the i-th teacher layer."""
    s, t = sorted(student_layers), sorted(teacher_layers)
    if len(s) != len(t) or not s:
        raise ValueError(f"need as many teacher layers as student layers (one teacher layer per student layer); got "
                         f"student {s} and teacher {t}. Pass teacher_layers with {len(s)} entries (e.g. "
                         f"kq.select_layers(df, k={len(s)})).")
    if len(set(s)) != len(s) or len(set(t)) != len(t):
        raise ValueError(f"layer lists must not repeat a layer; got student {s} and teacher {t}.")
    return list(zip(s, t))


def _rank(shape: Shape) -> int | None:
    """Spatial rank of a per-sample feature shape: 2 for (C, H, W) maps, 1 for (T, W) tokens, None for (C,) vectors."""
    return {3: 2, 2: 1, 1: None}.get(len(shape), -1)


def _alignment(student_shape: Shape, teacher_shape: Shape) -> tuple[int, int, int, Shape]:
    """(rank, student channels, teacher channels, common spatial size) of a student/teacher layer pair.

    The common size is the student's when it is no larger than the teacher's in every dimension (the teacher map is
    pooled down to it), else the teacher's (the student map is pooled down to it), as in the paper's PoolMode.
    """
    rs, rt = _rank(student_shape), _rank(teacher_shape)
    if -1 in (rs, rt):
        raise ValueError(f"cannot distil features of shape {student_shape} from {teacher_shape}: expected (C, H, W) "
                         f"maps, (tokens, width) ViT features or (C,) vectors.")
    if rs is not None and rt is not None and rs != rt:
        raise ValueError(f"cannot pair a {'token' if rs == 1 else 'map'} feature {student_shape} with a "
                         f"{'token' if rt == 1 else 'map'} feature {teacher_shape}: pair CNNs with CNNs and ViTs "
                         f"with ViTs (pooled vectors pair with either).")
    rank = rs or rt or 2

    def split(shape: Shape) -> tuple[int, Shape]:
        if len(shape) == 1:
            return shape[0], (1,) * rank
        if len(shape) == 2:                    # tokens (T, W): channels W, 1-D "space" T
            return shape[1], (shape[0],)
        return shape[0], tuple(shape[1:])

    (cs, ss), (ct, st) = split(student_shape), split(teacher_shape)
    size = ss if all(a <= b for a, b in zip(ss, st)) else st
    return rank, cs, ct, size


def feature_map(x: torch.Tensor, rank: int) -> torch.Tensor:
    """A batch of features as a (B, C, *space) map: tokens (B, T, W) -> (B, W, T); vectors (B, C) -> (B, C, 1[, 1])."""
    if x.dim() == 2:
        return x.reshape(*x.shape, *(1,) * rank)
    if x.dim() == 3 and rank == 1:
        return x.transpose(1, 2)
    if x.dim() == 4 and rank == 2:
        return x
    raise ValueError(f"feature of shape {tuple(x.shape)} does not fit a rank-{rank} pair.")


def _pool(x: torch.Tensor, size: Shape) -> torch.Tensor:
    """Adaptive average pooling of a (B, C, *space) map to `size` (a no-op when it already has that size)."""
    space = tuple(x.shape[2:])
    if space == tuple(size):
        return x
    if all(a % b == 0 for a, b in zip(space, size)):   # the same numbers; plain pooling is faster on the CPU
        kernel = tuple(a // b for a, b in zip(space, size))
        return F.avg_pool1d(x, kernel) if len(size) == 1 else F.avg_pool2d(x, kernel)
    return F.adaptive_avg_pool1d(x, size) if len(size) == 1 else F.adaptive_avg_pool2d(x, size)


def make_projectors(student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> nn.ModuleList:
    """One bias-free 1x1 convolution per layer pair, student channels -> teacher channels (Conv1d for ViT tokens)."""
    if len(student_shapes) != len(teacher_shapes):
        raise ValueError(f"{len(student_shapes)} student shapes but {len(teacher_shapes)} teacher shapes.")
    convs = []
    for s, t in zip(student_shapes, teacher_shapes):
        rank, cs, ct, _ = _alignment(tuple(s), tuple(t))
        conv = nn.Conv1d if rank == 1 else nn.Conv2d
        convs.append(conv(cs, ct, kernel_size=1, bias=False))
    return nn.ModuleList(convs)


def teacher_targets(teacher_feats: Sequence[torch.Tensor], student_shapes: Sequence[Shape],
                    teacher_shapes: Sequence[Shape]) -> list[torch.Tensor]:
    """Teacher features as (B, C, *space) maps, adaptive-average-pooled to the size they are compared at."""
    out = []
    for f, s, t in zip(teacher_feats, student_shapes, teacher_shapes):
        rank, _, _, size = _alignment(tuple(s), tuple(t))
        out.append(_pool(feature_map(f, rank), size))
    return out


def feature_loss(student_feats: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                 projectors: nn.ModuleList) -> torch.Tensor:
    """Mean over pairs of MSE(projector(student feature, pooled to the target's size), target), in float32.

    `targets` are teacher features already in map form and pooled (see :func:`teacher_targets`).
    """
    if not (len(student_feats) == len(targets) == len(projectors)):
        raise ValueError(f"got {len(student_feats)} student features, {len(targets)} targets and "
                         f"{len(projectors)} projectors; they must match one per layer pair.")
    losses = []
    for s, t, proj in zip(student_feats, targets, projectors):
        s = _pool(feature_map(s, t.dim() - 2), t.shape[2:])   # pool first: the 1x1 conv commutes with avg-pooling
        with torch.autocast(s.device.type, enabled=False):
            losses.append(F.mse_loss(proj(s.float()), t.float()))
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------------------------
# the teacher: shapes, forward passes, the feature/logit cache

def _feature_shapes(model: nn.Module, layers: Sequence[int], image_size: int,
                    device: torch.device) -> list[Shape]:
    """Per-sample output shapes of a model's generalized layers, from one eval-mode forward of a blank batch."""
    if not layers:
        return []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = extract(model, torch.zeros(2, 3, image_size, image_size, device=device), list(layers),
                            stop_early=True)
    finally:
        model.train(was_training)
    return [tuple(feats[i].shape[1:]) for i in layers]


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


def _data_digest(data: Dataset) -> str:
    """A cheap content digest of the train split (shape, labels, a strided sample of images) for cache keys."""
    h = hashlib.sha256(str((data.name, tuple(data.x_train.shape))).encode())
    step = max(1, data.num_train // 256)
    h.update(data.x_train[::step].cpu().contiguous().numpy().tobytes())
    h.update(data.y_train.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_budget_mb(device: torch.device, budget_mb: float | None) -> float:
    """The cache's size limit: the given one, else 4096 MB on the CPU and 60% of free memory on CUDA."""
    if budget_mb is not None:
        return float(budget_mb)
    if device.type == "cuda":
        return 0.6 * torch.cuda.mem_get_info(device)[0] / 2**20
    return 4096.0


def _build_cache(teacher: nn.Module, data: Dataset, layers: Sequence[int], s_shapes: Sequence[Shape],
                 t_shapes: Sequence[Shape], want: dict[str, tuple], store: torch.device, device: torch.device,
                 batch_size: int, progress: bool) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """One pass of the teacher over the un-augmented train split: fp16 pooled features and/or fp32 logits."""
    n = data.num_train
    pin = store.type == "cpu" and device.type == "cuda"
    out: dict = {}
    if "features" in want:
        out["features"] = [torch.empty((n, *shape), dtype=torch.float16, device=store, pin_memory=pin)
                           for shape in want["features"]]
    if "logits" in want:
        out["logits"] = torch.empty((n, data.num_classes), dtype=torch.float32, device=store, pin_memory=pin)
    it = batches(data.x_train, data.y_train, batch_size, mean=data.mean, std=data.std, with_index=True)
    for xb, _, idx in tqdm(it, total=-(-n // batch_size), desc="teacher cache", leave=False, disable=not progress):
        with autocast(device):
            feats, logits = _teacher_forward(teacher, to_input(xb, device), layers if "features" in want else [],
                                             "logits" in want)
        idx = idx.to(store)
        if "features" in want:
            targets = teacher_targets([feats[i] for i in layers], s_shapes, t_shapes)
            for buf, t in zip(out["features"], targets):
                buf[idx] = t.to(store, torch.float16)
        if "logits" in want:
            out["logits"][idx] = logits.float().to(store)
    return out


TeacherLookup = Callable[[torch.Tensor, torch.Tensor], tuple[list[torch.Tensor], torch.Tensor | None]]


def _teacher_lookup(teacher: nn.Module, data: Dataset, spec: _Spec, t_layers: Sequence[int],
                    s_shapes: Sequence[Shape], t_shapes: Sequence[Shape], *, fingerprint: str, augment: bool,
                    cache: dict, cache_budget_mb: float | None, device: torch.device, batch_size: int,
                    progress: bool) -> TeacherLookup:
    """A function (xb, idx) -> (teacher targets, teacher logits) reading the cache, or running the teacher."""
    layers = list(t_layers) if spec.features else []
    targets_shapes = []
    for s, t in zip(s_shapes, t_shapes):
        _, _, ct, size = _alignment(s, t)
        targets_shapes.append((ct, *size))
    what = " and ".join(w for w, on in (("features", spec.features), ("logits", spec.kl)) if on)

    def on_the_fly(reason: str) -> TeacherLookup:
        print(f"teacher {what}: on the fly ({reason})", flush=True)

        def lookup(xb: torch.Tensor, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            feats, logits = _teacher_forward(teacher, xb, layers, spec.kl)
            return teacher_targets([feats[i] for i in layers], s_shapes, t_shapes), logits
        return lookup

    if augment:
        return on_the_fly("augmentation on: the teacher sees the student's augmented batch")
    base = (fingerprint, data.name, data.num_train, _data_digest(data))
    keys = {}
    if spec.features:
        keys["features"] = (*base, tuple(layers), tuple(targets_shapes))
    if spec.kl:
        keys["logits"] = (*base, "logits")
    missing = {k: (targets_shapes if k == "features" else ()) for k, key in keys.items() if key not in cache}
    if missing:
        n = data.num_train
        mb = (sum(n * 2 * torch.Size(s).numel() for s in targets_shapes) if "features" in missing else 0) / 2**20
        mb += (n * 4 * data.num_classes if "logits" in missing else 0) / 2**20
        budget = _cache_budget_mb(device, cache_budget_mb)
        if mb > budget:
            return on_the_fly(f"the cache would need {mb:.0f} MB > budget {budget:.0f} MB; raise cache_budget_mb "
                              f"to cache it")
        store = device
        if device.type == "cuda" and mb > 0.6 * torch.cuda.mem_get_info(device)[0] / 2**20:
            store = torch.device("cpu")     # pinned host memory, copied per batch
        t0 = time.perf_counter()
        built = _build_cache(teacher, data.to(device), layers, s_shapes, t_shapes, missing, store, device,
                             batch_size, progress)
        seconds = time.perf_counter() - t0
        for k, tensors in built.items():
            size = (sum(t.numel() * t.element_size() for t in tensors) if isinstance(tensors, list)
                    else tensors.numel() * tensors.element_size()) / 2**20
            cache[keys[k]] = {"tensors": tensors, "device": str(store), "megabytes": size, "seconds": seconds}
        print(f"teacher {what}: cached on {store} ({mb:.1f} MB, {seconds:.1f}s)", flush=True)
    else:
        entries = [cache[key] for key in keys.values()]
        mb = sum(e["megabytes"] for e in entries)
        print(f"teacher {what}: reusing the cache on {entries[0]['device']} ({mb:.1f} MB)", flush=True)
    feats_cached = cache[keys["features"]]["tensors"] if spec.features else []
    logits_cached = cache[keys["logits"]]["tensors"] if spec.kl else None

    def lookup(xb: torch.Tensor, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        rows = idx.to(feats_cached[0].device if feats_cached else logits_cached.device)
        targets = [f[rows].to(xb.device, non_blocking=True) for f in feats_cached]
        logits = logits_cached[rows].to(xb.device, non_blocking=True) if logits_cached is not None else None
        return targets, logits
    return lookup


# ----------------------------------------------------------------------------------------------------------------
# the entry point

def _resolve_layers(method: str, spec: _Spec, teacher: nn.Module, data: Dataset, teacher_layers, student_layers,
                    teacher_name: str | None, student_name: str | None, cache: dict, device: torch.device | str | None,
                    progress: bool) -> tuple[list[int], list[int]]:
    """Student layers (standard by default) and teacher layers (KQ top-k or standard, by method)."""
    if not spec.features:
        if teacher_layers is not None or student_layers is not None:
            raise ValueError(f"method {method!r} uses no features; drop teacher_layers/student_layers.")
        return [], []
    if student_layers is None:
        if student_name is None:
            raise ValueError("cannot tell the student's standard layers: pass student_name= (a kdutils.models name) "
                             "or student_layers=[...].")
        student_layers = standard_layers(student_name)
    if spec.layers == "standard":
        if teacher_name is None:
            raise ValueError(f"method {method!r} uses the teacher's standard layers: pass teacher_name= (a "
                             f"kdutils.models name), or build the teacher with kdutils.models.build_model.")
        standard = standard_layers(teacher_name)[-len(student_layers):]   # as many as student layers, deepest
        if teacher_layers is not None and sorted(teacher_layers) != sorted(standard):
            raise ValueError(f"method {method!r} always uses the teacher's standard layers {standard}; got "
                             f"teacher_layers={list(teacher_layers)}. Use feature_kd / feature_kd_ce for other layers.")
        teacher_layers = standard
    elif teacher_layers is None:
        from kdutils.kq import layer_qualities, select_layers
        key = ("kq", state_fingerprint(teacher), data.name, data.num_train, _data_digest(data), len(student_layers))
        if key not in cache:
            table = layer_qualities(teacher, data, probe=False, cache_dir=None, device=device, progress=progress)
            cache[key] = select_layers(table, k=len(student_layers), by="quality")
        teacher_layers = cache[key]
        print(f"teacher layers by knowledge quality (top {len(student_layers)}): {teacher_layers}", flush=True)
    pairs = pair_layers(student_layers, teacher_layers)
    return [s for s, _ in pairs], [t for _, t in pairs]


@contextlib.contextmanager
def distill_loss(teacher: nn.Module, student: nn.Module, data: Dataset, method: str, *,
                 teacher_layers: Sequence[int] = (), student_layers: Sequence[int] = (), seed: int = 0,
                 temperature: float = 4.0, augment: bool = False, cache: dict | None = None,
                 cache_budget_mb: float | None = None, device: torch.device | str | None = None,
                 batch_size: int = 128, record: dict | None = None, progress: bool = True
                 ) -> Iterator[tuple[LossFn, nn.ModuleList | None]]:
    """Set up a method's loss for `fit`: yields (loss_fn, projectors) with the student's layers tapped.

    Layers must already be resolved (see :func:`distill`). `record`, if given, receives the last batch's loss terms
    ("ce", "feature", "kl"; undetached) so a test can back-propagate one term alone.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    spec = _SPECS[method]
    if student is teacher:
        raise ValueError("the student is the teacher: pass a separate student model.")
    if teacher.training or any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("the teacher must be frozen: call teacher.eval().requires_grad_(False) first "
                         "(distill does this for you).")
    check_class_counts(teacher, student, data)
    device = torch.device(device) if device is not None else default_device()
    pairs = pair_layers(student_layers, teacher_layers) if spec.features else []
    s_layers, t_layers = [s for s, _ in pairs], [t for _, t in pairs]
    projectors = None
    lookup: TeacherLookup | None = None
    cache = {} if cache is None else cache
    if spec.features or spec.kl:
        prepare_model(teacher, device)
        fingerprint = state_fingerprint(teacher)
        s_shapes = _feature_shapes(prepare_model(student, device), s_layers, data.image_size, device)
        shapes_key = ("shapes", fingerprint, tuple(t_layers), data.image_size)
        if shapes_key not in cache:        # so a cached run never runs the teacher, not even to probe shapes
            cache[shapes_key] = _feature_shapes(teacher, t_layers, data.image_size, device)
        t_shapes = cache[shapes_key]
        if spec.features:
            with torch.random.fork_rng(devices=[]):      # deterministic projectors, global RNG untouched
                torch.manual_seed(seed)
                projectors = make_projectors(s_shapes, t_shapes).to(device)
        lookup = _teacher_lookup(teacher, data, spec, t_layers, s_shapes, t_shapes, fingerprint=fingerprint,
                                 augment=augment, cache=cache, cache_budget_mb=cache_budget_mb, device=device,
                                 batch_size=max(batch_size, 256), progress=progress)

    with contextlib.ExitStack() as stack:
        feats: dict[int, torch.Tensor] = {}
        if spec.features:
            feats = stack.enter_context(tap(student, s_layers, detach_at=None if spec.ce_backbone else s_layers[-1]))

        def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(xb)
            terms = {"ce": F.cross_entropy(logits.float(), yb)}
            if lookup is not None:
                targets, teacher_logits = lookup(xb, idx)
                if spec.features:
                    terms["feature"] = feature_loss([feats[i] for i in s_layers], targets, projectors)
                if spec.kl:
                    terms["kl"] = kd_loss(logits, teacher_logits, temperature)
            if record is not None:
                record.clear()
                record.update(terms)
            return sum(terms.values()), logits

        yield loss_fn, projectors


def distill(teacher: nn.Module, student: nn.Module | str, dataset: Dataset, method: str, *,
            teacher_layers: Sequence[int] | None = None, student_layers: Sequence[int] | None = None,
            epochs: int, lr: float, seed: int = 0, batch_size: int = 128, weight_decay: float = 0.01,
            augment: bool = False, temperature: float = 4.0, teacher_name: str | None = None,
            student_name: str | None = None, cache: dict | None = None, cache_budget_mb: float | None = None,
            checkpoint: str | Path | None = None, device: torch.device | str | None = None,
            progress: bool = True, amp: bool = True, compile_model: bool = False) -> list[dict]:
    """Train a student with one of METHODS from a frozen teacher; return fit's per-epoch history.

    `student` given by name is built after seed_everything(seed), so every method starts from the same weights.
    Teacher layers default to the KQ top-k (feature_kd, feature_kd_ce) or the standard ones (standard_layers,
    fitnets_kd); student layers to the student's standard ones. Pass one `cache` dict to reuse teacher features and
    logits across methods and seeds. The teacher is moved to the training device and put in eval mode and frozen
    while training; its mode and requires_grad flags are restored afterwards. An existing `checkpoint` of the same run
    is resumed (or, if finished, returned without running the teacher). `amp` and `compile_model` are fit's; a run
    that diverges stops with kdutils.train.TrainingDiverged (lower `lr`, the pipeline's student_lr).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    spec = _SPECS[method]
    if student is teacher:
        raise ValueError("the student is the teacher: pass a separate student model (or its name).")
    if isinstance(student, str):
        student_name = student
        seed_everything(seed)
        student = build_model(student_name, dataset.num_classes, dataset.image_size)
    student_name = student_name or getattr(student, "kd_name", None)
    teacher_name = teacher_name or getattr(teacher, "kd_name", None)
    check_class_counts(teacher, student, dataset)
    if {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}:
        raise ValueError("the student shares parameters with the teacher: build a fresh student.")
    cache = {} if cache is None else cache

    was_training = teacher.training
    grad_flags = [p.requires_grad for p in teacher.parameters()]
    teacher.eval().requires_grad_(False)
    try:
        fingerprint = state_fingerprint(teacher) if (spec.features or spec.kl) else None
        saved = _checkpoint_meta(checkpoint)
        if saved is not None and spec.layers == "kq" and teacher_layers is None:   # resume without re-running KQ
            teacher_layers = saved.get("teacher_layers") or None
        s_layers, t_layers = _resolve_layers(method, spec, teacher, dataset, teacher_layers, student_layers,
                                             teacher_name, student_name, cache, device, progress)
        meta = {"method": method, "student": student_name, "teacher": teacher_name, "student_layers": s_layers,
                "teacher_layers": t_layers, "teacher_fingerprint": fingerprint, "temperature": temperature}
        if saved is not None:
            checked = ("method", "student_layers", "teacher_layers", "teacher_fingerprint", "temperature")
            diff = {k: (saved.get(k), meta[k]) for k in checked if saved.get(k) != meta[k]}
            if diff:
                raise ValueError(f"checkpoint {checkpoint} belongs to another distillation run (saved vs now: {diff}); "
                                 "delete it or choose another path.")
        common = dict(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed,
                      augment=augment, checkpoint=checkpoint, meta=meta, device=device, progress=progress,
                      desc=method, amp=amp, compile_model=compile_model, lr_name="student_lr")
        if saved is not None and saved.get("epoch", 0) >= epochs:   # finished: no teacher pass needed
            extra = _projectors_like(checkpoint) if spec.features else None
            return fit(student, dataset, extra=extra, **common)
        with distill_loss(teacher, student, dataset, method, teacher_layers=t_layers, student_layers=s_layers,
                          seed=seed, temperature=temperature, augment=augment, cache=cache,
                          cache_budget_mb=cache_budget_mb, device=device, batch_size=batch_size,
                          progress=progress) as (loss_fn, projectors):
            return fit(student, dataset, loss_fn=loss_fn, extra=projectors, **common)
    finally:
        teacher.train(was_training)
        for p, flag in zip(teacher.parameters(), grad_flags):
            p.requires_grad_(flag)


_TERM_COLUMNS = {"ce": "|grad| from CE", "feature": "|grad| from feature MSE", "kl": "|grad| from KL"}


def gradient_flow(teacher: nn.Module, student: nn.Module, data: Dataset, method: str, *,
                  teacher_layers: Sequence[int] = (), student_layers: Sequence[int] = (), batch_size: int = 64,
                  seed: int = 0) -> "pd.DataFrame":
    """Per student parameter: the gradient norm each loss term of `method` alone sends it on one training batch.

    Columns: one "|grad| from ..." per term, `part` ("backbone" up to and including the last distilled student
    layer, "head" after it; from the module structure, see kdutils.layers.split_at_layer) and `classifier` (the
    parameters of kdutils.models.head_parameters). The teacher is frozen for the call.
    """
    import pandas as pd
    from kdutils.layers import split_at_layer
    from kdutils.models import head_parameters

    flags = [p.requires_grad for p in teacher.parameters()]
    was_training = teacher.training
    teacher.eval().requires_grad_(False)
    terms: dict[str, torch.Tensor] = {}
    grads: dict[str, dict[str, float]] = {}
    try:
        with distill_loss(teacher, student, data, method, teacher_layers=teacher_layers,
                          student_layers=student_layers, seed=seed, record=terms, device=_device_of(student),
                          progress=False) as (loss_fn, _):
            xb, yb, idx = next(batches(data.x_train, data.y_train, batch_size, mean=data.mean, std=data.std,
                                       with_index=True))
            device = _device_of(student)
            loss_fn(student, xb.to(device), yb.to(device), idx)
            for term, loss in terms.items():
                student.zero_grad(set_to_none=True)
                loss.backward(retain_graph=True)
                grads[_TERM_COLUMNS[term]] = {n: 0.0 if p.grad is None else p.grad.norm().item()
                                              for n, p in student.named_parameters()}
            student.zero_grad(set_to_none=True)
    finally:
        teacher.train(was_training)
        for p, flag in zip(teacher.parameters(), flags):
            p.requires_grad_(flag)
    flow = pd.DataFrame(grads)
    _, head = split_at_layer(student, max(student_layers)) if _SPECS[method].features else ([], [])
    flow["part"] = ["head" if n in set(head) else "backbone" for n in flow.index]
    classifier = {id(p) for p in head_parameters(student)}
    flow["classifier"] = [id(p) in classifier for _, p in student.named_parameters()]
    return flow


def _device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def layer_arguments(method: str, kq_layers: Sequence[int], student_layers: Sequence[int]) -> dict:
    """distill's teacher_layers/student_layers arguments for a method, from notebook 3's selection (kq_layers.json)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    spec = _SPECS[method]
    if not spec.features:
        return {}
    if spec.layers == "kq":
        return {"teacher_layers": list(kq_layers), "student_layers": list(student_layers)}
    return {"student_layers": list(student_layers)}


def _output_classes(model: nn.Module) -> int | None:
    """The number of classes a model's classifier outputs (its last Linear layer's out_features), if it has one."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def check_class_counts(teacher: nn.Module, student: nn.Module, data: Dataset) -> None:
    """Refuse a teacher or student whose classifier does not output one logit per class of the data."""
    for role, model in (("teacher", teacher), ("student", student)):
        n = _output_classes(model)
        if n is not None and n != data.num_classes:
            raise ValueError(f"the {role} ({getattr(model, 'kd_name', type(model).__name__)}) outputs {n} classes but "
                             f"{data.name} has {data.num_classes}: train the {role} on this dataset (or load the "
                             f"dataset it was trained on).")


def _checkpoint_meta(checkpoint: str | Path | None) -> dict | None:
    """The meta (plus the finished epoch) of an existing distillation checkpoint, else None."""
    if checkpoint is None or not Path(checkpoint).exists():
        return None
    ck = load_checkpoint(checkpoint)
    return {**ck.get("meta", {}), "epoch": ck.get("epoch", 0)}


def _projectors_like(checkpoint: str | Path) -> nn.ModuleList:
    """Empty projectors with the shapes stored in a checkpoint (to reload a finished run without the teacher)."""
    state = load_checkpoint(checkpoint).get("extra") or {}
    convs = []
    for i in range(len(state)):
        w = state[f"{i}.weight"]
        conv = nn.Conv1d if w.dim() == 3 else nn.Conv2d
        convs.append(conv(w.shape[1], w.shape[0], kernel_size=1, bias=False))
    return nn.ModuleList(convs)
