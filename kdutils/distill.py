"""Distillation: the method registry, CE-free feature KD ("ours"), its ablations and the paper's baselines.

A method is one REGISTRY entry (:class:`Method`): its feature loss by name (a unit of kdutils.feature_losses, e.g.
paired 1x1 projectors + MSE, SimKD, SemCKD), its teacher layers (KQ top-k or standard), whether CE reaches the
backbone, and its Hinton KL. One entry point, :func:`distill`, resolves the layers, lets the unit prepare the student
(SimKD wraps it), sets up the loss with :func:`distill_loss` (the student's layers tapped, the unit's parts built
from the seed, the teacher's targets and logits from kdutils.teacher_cache) and trains through kdutils.train.fit.
The CE-free methods detach the student's last distilled layer, so the head after it learns from CE while the
backbone learns from the feature loss alone. `monitor=True` adds kdutils.monitor's measurements to the history;
:func:`gradient_flow` measures what each loss term alone sends every parameter on one batch.

Called by notebooks 4 (distill, distill_loss, gradient_flow) and 5 (REGISTRY, distill, layer_arguments),
kdutils.validation (notebook 6's runs), kdutils.sweep_tasks (distill, fill_teacher_cache, layer_arguments),
kdutils.presets, kdutils.results and kdutils.result_plots (REGISTRY, METHODS), the benchmarks and the tests.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdutils.checkpoints import load_checkpoint
from kdutils.data import Dataset, batches
from kdutils.data import fingerprint as data_fingerprint   # `fingerprint` names the teacher's weights' hash here
from kdutils.feature_losses import FEATURE_LOSSES, FeatureLoss, build_parts, check_wrapped_layers, distilled_network
from kdutils.feature_maps import feature_shapes, one_to_one
from kdutils.kq import kq_per_class, layer_qualities, select_layers
from kdutils.layers import split_at_layer, standard_layers, tap
from kdutils.models import build_model, head_parameters
from kdutils.monitor import MONITOR_BATCHES, measure
from kdutils.teacher_cache import TeacherLookup, teacher_lookup, teacher_shapes
from kdutils.precision import model_to, precision_for
from kdutils.train import LossFn, default_device, fit, seed_everything, state_fingerprint


@dataclass(frozen=True)
class Method:
    """One entry of the method registry: the paper's display name, a one-line summary, and what the method trains.

    feature: "" (none) or the name of its unit in kdutils.feature_losses.FEATURE_LOSSES: "mse" (each student layer
    -> its paired teacher layer through a 1x1 projector, MSE), "mse_all" (every student layer -> every teacher layer,
    1x1 projectors, the mean of all pair MSEs: weight 1/4 per teacher layer and 1/4 per student layer), "sp"
    (similarity-preserving: MSE between the batch cosine-Gram matrices of student and teacher features, per layer
    pair), "simkd" or "semckd" (the authors' SimKD and SemCKD). layers: the teacher layers, "standard" or a KQ score
    whose top-k layers are used ("quality" = Q, "separation", "information", "efficiency", "sqrt_ie").
    ce_backbone: False detaches the student's last distilled layer, so CE trains only the head after it.
    temperature: Hinton KL at this T with weight T^2 (None: no KL); standardize: z-score both logit vectors first.
    """
    label: str
    summary: str
    feature: str = ""
    layers: str = ""
    ce_backbone: bool = True
    temperature: float | None = None
    standardize: bool = False

    @property
    def features(self) -> bool:
        """Whether the method has a feature loss (and so teacher layers, student layers and projectors)."""
        return bool(self.feature)

    @property
    def kl(self) -> bool:
        """Whether the method has a Hinton KL term on the logits."""
        return self.temperature is not None

    @property
    def unit(self) -> FeatureLoss | None:
        """The method's feature-loss unit (kdutils.feature_losses.FEATURE_LOSSES[feature]); None without one."""
        return FEATURE_LOSSES[self.feature] if self.feature else None

    @property
    def monitorable(self) -> bool:
        """Whether distill(..., monitor=True) can measure the method (paired 1x1-projector feature losses)."""
        return self.unit is not None and self.unit.monitorable

    @property
    def wraps_student(self) -> bool:
        """Whether the method trains and evaluates the student wrapped with parts of the teacher (SimKD's tail)."""
        return self.unit is not None and self.unit.wraps_student


REGISTRY: dict[str, Method] = {
    "ce": Method("Student", "the student alone with cross-entropy: the budget-matched baseline (same init, same "
                 "data order)"),
    "hinton_kd": Method("Van. KD", "CE + 16 KL(teacher || student) on logits softened at T = 4 (Hinton et al., 2015)",
                        temperature=4.0),
    "hinton_kd_t2": Method("Van. KD T2", "CE + 4 KL at T = 2", temperature=2.0),
    "hinton_kd_std": Method("Van. KD Std.", "CE + 16 KL at T = 4 on z-scored logits (logit standardisation, Sun et "
                            "al., 2024)", temperature=4.0, standardize=True),
    "feature_kd": Method("Ours", "ours: MSE to the top-k teacher layers by KQ through 1x1 projectors; the head learns "
                         "by CE on detached features, so no logit loss reaches the backbone",
                         feature="mse", layers="quality", ce_backbone=False),
    "feature_kd_ce": Method("Ours+CE", "ours with CE into the backbone too (same layers and projectors)",
                            feature="mse", layers="quality"),
    "feature_kd_ll": Method("Ours+LL", "ours with CE + 16 KL(T = 4) into the backbone (logit losses back in)",
                            feature="mse", layers="quality", temperature=4.0),
    "standard_layers": Method("Base FKD-LL", "CE-free like ours, with the teacher's standard layers (layer-choice "
                              "ablation)", feature="mse", layers="standard", ce_backbone=False),
    "fitnets_kd": Method("Base FKD", "FitNets-style: standard layers, 1x1 projectors, MSE + CE + 16 KL(T = 4)",
                         feature="mse", layers="standard", temperature=4.0),
    "fitnets_kd_nokl": Method("Base FKD-KL", "standard layers, 1x1 projectors, MSE + CE into the backbone, no KL",
                              feature="mse", layers="standard"),
    "fitnets_fc_kd": Method("Base FKD+FC", "every student standard layer against all teacher standard layers (1x1 "
                            "projectors, weights 1/4) + CE + 16 KL(T = 4)", feature="mse_all", layers="standard",
                            temperature=4.0),
    "sp_kd": Method("Sim. Pres.", "similarity-preserving KD: MSE of the whole batch Gram matrices of L2-normalised "
                    "features at the standard layers + CE + 16 KL(T = 4) (the released code compares only row 0 of "
                    "each matrix, METHOD.md 9.6)", feature="sp", layers="standard", temperature=4.0),
    "simkd": Method("SimKD", "SimKD as the paper's code runs it: every standard layer pair one-to-one through its own "
                    "3-layer conv projector, the feature MSE averaged over the pairs; the deepest pair's projector "
                    "feeds a copy of the teacher from its deepest standard layer on (ResNet/ViT: that block "
                    "re-applied; VGG: from its ReLU), trained but kept in eval mode (the teacher's BatchNorm "
                    "statistics, no dropout), whose logits are the prediction at test time too; + CE + 16 KL (T = 4)",
                    feature="simkd", layers="standard", temperature=4.0),
    "semckd": Method("SemCKD", "SemCKD: every student standard layer against every teacher standard layer through "
                     "3-layer conv projectors, weighted per sample by attention over teacher layers (MLPs on batch "
                     "Gram rows) + CE + 16 KL (T = 4)", feature="semckd", layers="standard", temperature=4.0),
    "feature_kd_s": Method("S Only", "CE-free like ours, teacher layers = top-k by separation S alone",
                           feature="mse", layers="separation", ce_backbone=False),
    "feature_kd_i": Method("I Only", "CE-free like ours, teacher layers = top-k by information I alone",
                           feature="mse", layers="information", ce_backbone=False),
    "feature_kd_e": Method("E Only", "CE-free like ours, teacher layers = top-k by efficiency E alone",
                           feature="mse", layers="efficiency", ce_backbone=False),
    "feature_kd_sqrt_ie": Method("No S", "CE-free like ours, teacher layers = top-k by sqrt(I E) (Q without S)",
                                 feature="mse", layers="sqrt_ie", ce_backbone=False),
}
METHODS: dict[str, str] = {name: m.summary for name, m in REGISTRY.items()}   # name -> one-line description


# ----------------------------------------------------------------------------------------------------------------
# losses on the logits

def standardize_logits(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Logit standardisation (Sun et al., 2024): (z - mean(z)) / (std(z) + eps) per sample, std with Bessel's
    correction (torch's default, as their code)."""
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            standardize: bool = False) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, averaged over the batch (fp32);
    with `standardize`, both logit vectors are z-scored first (standardize_logits)."""
    t = float(temperature)
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    if standardize:
        student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (t * t)


# ----------------------------------------------------------------------------------------------------------------
# the entry point: a method from its name to fit

def distill(teacher: nn.Module, student: nn.Module | str, dataset: Dataset, method: str, *,
            teacher_layers: Sequence[int] | None = None, student_layers: Sequence[int] | None = None,
            epochs: int, lr: float, seed: int = 0, batch_size: int = 128, weight_decay: float = 0.01,
            augment: bool = False, temperature: float | None = None, teacher_name: str | None = None,
            student_name: str | None = None, cache: dict | None = None, cache_budget_mb: float | None = None,
            checkpoint: str | Path | None = None, device: torch.device | str | None = None,
            progress: bool = True, amp: bool = True, compile_model: bool = False,
            schedule: str = "onecycle", monitor: bool | int = False) -> list[dict]:
    """Train a student with one of METHODS from a frozen teacher; return fit's per-epoch history.

    `student` given by name is built after seed_everything(seed), so every method starts from the same weights.
    Teacher layers default to the KQ top-k (feature_kd, feature_kd_ce) or the standard ones (standard_layers,
    fitnets_kd); student layers to the student's standard ones. Pass one `cache` dict to reuse teacher features and
    logits across methods and seeds. The teacher is moved to the training device and put in eval mode and frozen
    while training; its mode and requires_grad flags are restored afterwards. An existing `checkpoint` of the same run
    is resumed (or, if finished, returned without running the teacher). `amp`, `compile_model` and `schedule`
    ("onecycle", or "long" for the +240E baselines' SGD recipe) are fit's; a run
    that diverges stops with kdutils.train.TrainingDiverged (lower `lr`, the pipeline's student_lr).

    Every history row gets "terms": each loss term's mean over the epoch ("ce", "feature", "kl"). `monitor` (off by
    default; True = MONITOR_BATCHES, or a number of batches) measures, after every epoch, on the first fixed training
    batches in train mode (BatchNorm statistics and RNG restored, so the run is unchanged): "feature_mse" and
    "feature_cka" (linear CKA, projector-free) of each distilled student layer against its teacher target, and, for
    methods whose logit losses reach the backbone, "grad_cosine": per backbone stage, the cosine between the
    gradients of the logit terms (CE, + KL) and of the feature term (row["monitor"]).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    spec = REGISTRY[method]
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
        kq_based = spec.layers not in ("", "standard")
        if saved is not None and kq_based and teacher_layers is None:   # resume without re-running KQ
            teacher_layers = saved.get("teacher_layers") or None
        student, s_layers, t_layers = _prepare_student(method, teacher, student, dataset, teacher_layers,
                                                       student_layers, teacher_name, student_name, cache, device,
                                                       progress, seed, amp)
        meta = {"method": method, "student": student_name, "teacher": teacher_name, "student_layers": s_layers,
                "teacher_layers": t_layers, "teacher_fingerprint": fingerprint,
                "temperature": (spec.temperature if temperature is None else temperature) if spec.kl else None}
        if saved is not None:
            checked = ("method", "student_layers", "teacher_layers", "teacher_fingerprint",
                       *(("temperature",) if spec.kl else ()))
            diff = {k: (saved.get(k), meta[k]) for k in checked if saved.get(k) != meta[k]}
            if diff:
                raise ValueError(f"checkpoint {checkpoint} belongs to another distillation run (saved vs now: {diff}); "
                                 "delete it or choose another path.")
        common = dict(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed,
                      augment=augment, checkpoint=checkpoint, meta=meta, device=device, progress=progress,
                      desc=method, amp=amp, compile_model=compile_model, lr_name="student_lr", schedule=schedule)
        if saved is not None and saved.get("epoch", 0) >= epochs:   # finished: no teacher pass needed
            extra = spec.unit.reload(checkpoint) if spec.unit is not None else None
            return fit(student, dataset, extra=extra, **common)
        with distill_loss(teacher, student, dataset, method, teacher_layers=t_layers, student_layers=s_layers,
                          seed=seed, temperature=temperature, augment=augment, cache=cache,
                          cache_budget_mb=cache_budget_mb, device=device, batch_size=batch_size,
                          progress=progress, monitor=MONITOR_BATCHES if monitor is True else int(monitor), amp=amp
                          ) as (loss_fn, projectors):
            return fit(student, dataset, loss_fn=loss_fn, extra=projectors, on_epoch_end=loss_fn.epoch_end, **common)
    finally:
        teacher.train(was_training)
        for p, flag in zip(teacher.parameters(), grad_flags):
            p.requires_grad_(flag)


def _prepare_student(method: str, teacher: nn.Module, student: nn.Module, dataset: Dataset, teacher_layers,
                     student_layers, teacher_name: str | None, student_name: str | None, cache: dict,
                     device: torch.device | str | None, progress: bool, seed: int, amp: bool
                     ) -> tuple[nn.Module, list[int], list[int]]:
    """The student as it trains (wrapped by the method's unit if it wraps, as SimKD does) and its resolved layer
    pairs."""
    spec = REGISTRY[method]
    s_layers, t_layers = _resolve_layers(method, spec, teacher, dataset, teacher_layers, student_layers,
                                         teacher_name, student_name, cache, device, progress, amp)
    if spec.wraps_student:
        student = spec.unit.wrap(teacher, student, s_layers, t_layers, dataset.image_size, seed)
    return student, s_layers, t_layers


def _resolve_layers(method: str, spec: Method, teacher: nn.Module, data: Dataset, teacher_layers, student_layers,
                    teacher_name: str | None, student_name: str | None, cache: dict, device: torch.device | str | None,
                    progress: bool, amp: bool) -> tuple[list[int], list[int]]:
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
        key = ("kq", state_fingerprint(teacher), data.name, data_fingerprint(data), amp)
        if key not in cache:
            per_class = kq_per_class(data.name, teacher_name or "", num_classes=data.num_classes,
                                     image_size=data.image_size)
            cache[key] = layer_qualities(teacher, data, per_class=per_class, probe=False, cache_dir=None,
                                         device=device, progress=progress, amp=amp)
        teacher_layers = select_layers(cache[key], k=len(student_layers), by=spec.layers)
        print(f"teacher layers by {spec.layers} (top {len(student_layers)}): {teacher_layers}", flush=True)
    return one_to_one(student_layers, teacher_layers)


def _checkpoint_meta(checkpoint: str | Path | None) -> dict | None:
    """The meta (plus the finished epoch) of an existing distillation checkpoint, else None."""
    if checkpoint is None or not Path(checkpoint).exists():
        return None
    ck = load_checkpoint(checkpoint)
    return {**ck.get("meta", {}), "epoch": ck.get("epoch", 0)}


@contextlib.contextmanager
def distill_loss(teacher: nn.Module, student: nn.Module, data: Dataset, method: str, *,
                 teacher_layers: Sequence[int] = (), student_layers: Sequence[int] = (), seed: int = 0,
                 temperature: float | None = None, augment: bool = False, cache: dict | None = None,
                 cache_budget_mb: float | None = None, device: torch.device | str | None = None,
                 batch_size: int = 128, record: dict | None = None, progress: bool = True,
                 monitor: int = 0, amp: bool = True) -> Iterator[tuple[LossFn, nn.ModuleList | None]]:
    """Set up a method's loss for `fit`: yields (loss_fn, projectors) with the student's layers tapped.

    The feature term is the method's unit's (kdutils.feature_losses): its pairs, its parts (yielded as `projectors`;
    None when it builds none) and its loss on the teacher's targets (kdutils.teacher_cache); CE and the Hinton KL
    are added here. Layers must already be resolved (see :func:`distill`). `record`, if given, receives the last
    batch's loss terms ("ce", "feature", "kl"; undetached) so a test can back-propagate one term alone.
    `temperature` None means the method's own (REGISTRY). `loss_fn.epoch_end` is an `on_epoch_end` for fit that adds
    each term's epoch mean to the history row ("terms") and, with `monitor` > 0, kdutils.monitor's measurements on
    that many fixed training batches ("monitor", see :func:`distill`). `amp` is fit's: the teacher's cached (or
    on-the-fly) forward passes and the monitor's run in kdutils.precision.precision_for(device, amp).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    spec = REGISTRY[method]
    unit = spec.unit
    temperature = spec.temperature if temperature is None else temperature
    if monitor and not spec.monitorable:
        raise ValueError(f"monitor measures methods with paired 1x1-projector feature losses (feature_kd, "
                         f"feature_kd_ce, standard_layers, fitnets_kd, ...); {method!r} has "
                         f"{'none' if not spec.feature else spec.feature + ' features'}. Pass monitor=False.")
    if student is teacher:
        raise ValueError("the student is the teacher: pass a separate student model.")
    if teacher.training or any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("the teacher must be frozen: call teacher.eval().requires_grad_(False) first "
                         "(distill does this for you).")
    check_class_counts(teacher, student, data)
    inner = distilled_network(unit, student)            # the network whose generalized layers are distilled
    device = torch.device(device) if device is not None else default_device()
    precision = precision_for(device, amp)
    s_layers, t_layers = unit.pairs(student_layers, teacher_layers) if unit is not None else ([], [])
    check_wrapped_layers(student, s_layers)
    projectors = None
    lookup: TeacherLookup | None = None
    cache = {} if cache is None else cache
    if spec.features or spec.kl:
        model_to(teacher, device, precision)
        fingerprint = state_fingerprint(teacher)
        model_to(student, device, precision)
        s_shapes = feature_shapes(inner, s_layers, data.image_size, device)
        t_shapes = teacher_shapes(teacher, t_layers, data.image_size, device, cache, fingerprint)
        if unit is not None:                             # the unit's parts (SimKD's live in its SimKDStudent)
            projectors = build_parts(unit, s_shapes, t_shapes, s_layers, t_layers, min(batch_size, data.num_train),
                                     seed, device)
        lookup = teacher_lookup(teacher, data, unit.targets if unit is not None else None, spec.kl, t_layers,
                                s_shapes, t_shapes, fingerprint=fingerprint, augment=augment, cache=cache,
                                cache_budget_mb=cache_budget_mb, device=device, batch_size=max(batch_size, 256),
                                progress=progress, precision=precision)

    with contextlib.ExitStack() as stack:
        feats: dict[int, torch.Tensor] = {}
        if unit is not None and not unit.wraps_student:   # a wrapped student extracts its own features
            feats = stack.enter_context(tap(student, s_layers, detach_at=None if spec.ce_backbone else max(s_layers)))

        def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            if unit is not None:
                logits, student_feats = unit.forward(model, xb, feats, s_layers)
            else:
                logits = model(xb)
            terms = {"ce": F.cross_entropy(logits.float(), yb)}
            if lookup is not None:
                targets, teacher_logits = lookup(xb, idx)
                if unit is not None:
                    terms["feature"] = unit.loss(student_feats, targets, projectors, s_shapes, t_shapes)
                if spec.kl:
                    terms["kl"] = kd_loss(logits, teacher_logits, temperature, spec.standardize)
            if record is not None:
                record.clear()
                record.update(terms)
            for k, v in terms.items():       # epoch sums on the device: no synchronisation per step
                sums[k] = sums.get(k, 0.0) + v.detach().float() * len(yb)
            seen[0] += len(yb)
            return sum(terms.values()), logits

        sums: dict[str, torch.Tensor] = {}
        seen = [0]
        fixed = []
        if monitor:
            n = min(monitor * batch_size, data.num_train)
            fixed = list(batches(data.x_train[:n], data.y_train[:n], batch_size, mean=data.mean, std=data.std,
                                 with_index=True))
        if fixed and record is None:
            record = {}                      # the measurements read each term from it

        def epoch_end(epoch: int, model: nn.Module, row: dict) -> None:
            row["terms"] = {k: float(v) / max(seen[0], 1) for k, v in sums.items()}
            if fixed:
                row["monitor"] = measure(model, inner, fixed, loss_fn, record, feats, lookup, spec.ce_backbone,
                                         s_layers, projectors, device, precision)
            sums.clear()                     # the next epoch starts from zero (the measurements added to them)
            seen[0] = 0

        loss_fn.epoch_end = epoch_end
        yield loss_fn, projectors


def fill_teacher_cache(teacher: nn.Module, student: str, dataset: Dataset, method: str, *, cache: dict,
                       teacher_layers: Sequence[int] | None = None, student_layers: Sequence[int] | None = None,
                       seed: int = 0, augment: bool = False, cache_budget_mb: float | None = None,
                       device: torch.device | str | None = None, batch_size: int = 128,
                       teacher_name: str | None = None, amp: bool = True) -> dict:
    """Put in `cache` what distill(teacher, student, dataset, method, cache=cache, ...) reads from the teacher (KQ
    selection, feature shapes, features and logits), without training; returns `cache`. The teacher is frozen."""
    seed_everything(seed)
    built = build_model(student, dataset.num_classes, dataset.image_size)
    teacher.eval().requires_grad_(False)
    built, s_layers, t_layers = _prepare_student(method, teacher, built, dataset, teacher_layers, student_layers,
                                                 teacher_name or getattr(teacher, "kd_name", None), student, cache,
                                                 device, False, seed, amp)
    with distill_loss(teacher, built, dataset, method, teacher_layers=t_layers, student_layers=s_layers, seed=seed,
                      augment=augment, cache=cache, cache_budget_mb=cache_budget_mb, device=device,
                      batch_size=batch_size, progress=False, amp=amp):
        pass
    return cache


# ----------------------------------------------------------------------------------------------------------------
# around it: what each loss term alone sends the student (notebook 4), the notebooks' layer arguments, class checks

_TERM_COLUMNS = {"ce": "|grad| from CE", "feature": "|grad| from feature MSE", "kl": "|grad| from KL"}


def gradient_flow(teacher: nn.Module, student: nn.Module, data: Dataset, method: str, *,
                  teacher_layers: Sequence[int] = (), student_layers: Sequence[int] = (), batch_size: int = 64,
                  seed: int = 0) -> pd.DataFrame:
    """Per student parameter: the gradient norm each loss term of `method` alone sends it on one training batch.

    Columns: one "|grad| from ..." per term, `part` ("backbone" up to and including the last distilled student
    layer, "head" after it; from the module structure, see kdutils.layers.split_at_layer) and `classifier` (the
    parameters of kdutils.models.head_parameters). The teacher is frozen for the call.
    """
    flags = [p.requires_grad for p in teacher.parameters()]
    was_training = teacher.training
    teacher.eval().requires_grad_(False)
    terms: dict[str, torch.Tensor] = {}
    grads: dict[str, dict[str, float]] = {}
    try:
        with distill_loss(teacher, student, data, method, teacher_layers=teacher_layers,
                          student_layers=student_layers, seed=seed, record=terms, device=_device_of(student),
                          batch_size=batch_size, progress=False) as (loss_fn, _):
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
    cut = REGISTRY[method].features and not REGISTRY[method].wraps_student   # a SimKD student has no CE-free cut
    _, head = split_at_layer(student, max(student_layers)) if cut else ([], [])
    flow["part"] = ["head" if n in set(head) else "backbone" for n in flow.index]
    classifier = {id(p) for p in head_parameters(student)}
    flow["classifier"] = [id(p) in classifier for _, p in student.named_parameters()]
    return flow


def _device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def layer_arguments(method: str, selection: dict) -> dict:
    """distill's teacher_layers/student_layers arguments for a method, from notebook 3's kq_layers.json: the student
    layers it chose, and for KQ-based methods the teacher layers selected by the method's score."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    spec = REGISTRY[method]
    if not spec.features:
        return {}
    out = {"student_layers": list(selection["student_layers"])}
    if spec.layers != "standard":
        out["teacher_layers"] = list(selection["kq_layers"] if spec.layers == "quality"
                                     else selection["ablations"][spec.layers])
    return out


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

