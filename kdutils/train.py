"""Training: seeding, the device, evaluation, and `fit` (AdamW + OneCycle, or the long SGD
schedule), a short driver over named steps: make the optimiser and schedule, resume, one epoch with the divergence
rule, save the epoch's checkpoint (kdutils.checkpoints writes and checks those files). Every forward pass here runs
in the precision kdutils.precision.precision_for(device, amp) chooses.

Called by notebook 1 (fit, seed_everything), notebooks 2-6 (load_model), kdutils.distill (fit runs every method),
kdutils.kq, kdutils.sweep_tasks, kdutils.presets, kdutils.rundir, kdutils.notebook and the benchmarks.
"""
from __future__ import annotations

import functools
import hashlib
import math
import platform
import random
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from kdutils.checkpoints import check_architecture, check_data, load_checkpoint, load_state, model_name, save_checkpoint
from kdutils.data import Dataset, batches, fingerprint, normalize
from kdutils.models import LONG_LR, PEAK_LR, build_model, head_parameters
from kdutils.precision import Precision, autocast, batch_to, model_to, precision_for
from kdutils.precision import record as precision_record

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def default_device() -> torch.device:
    """The CUDA device when one is present, else Apple's MPS when it works (one message if it does not), else the
    CPU. MPS is untested here (no Mac at hand); pass device="cpu" to any kdutils call to avoid it."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        try:
            torch.ones(2, 2, device="mps").sum().item()
            return torch.device("mps")
        except Exception as error:              # an MPS build that cannot run: say so once per call, use the CPU
            print(f"Apple MPS is present but failed ({type(error).__name__}: {error}); using the CPU.", flush=True)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) random number generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# OneCycle warm-up share of the steps (the paper's schedule, METHOD.md section 5).
ONE_CYCLE_PCT_START = 0.3
# The "+240E" baselines' long schedule (METHOD.md section 6): SGD with momentum 0.9, LR x0.1 at these epochs of 240.
LONG_SCHEDULE_MILESTONES = (150, 180, 210)
LONG_SCHEDULE_EPOCHS = 240
SCHEDULES = ("onecycle", "long")
# A run has diverged when a step's loss is not finite or exceeds this many times max(1, its first step's loss).
DIVERGENCE_FACTOR = 100.0
# On CUDA the divergence flag is read back every this many steps (and at the end of each epoch), not every step.
DIVERGENCE_CHECK_EVERY = 50


class TrainingDiverged(RuntimeError):
    """A training run's loss became non-finite or grew far above its start; nothing of it was saved."""


def suggested_lr(model: str, schedule: str, lr: float) -> tuple[float, str]:
    """The peak LR a divergence message suggests, and what it is: min(the presets' value for this model and
    schedule (kdutils.models.PEAK_LR / LONG_LR), lr / 10); lr / 10 for a model the presets do not know."""
    default = (LONG_LR if schedule == "long" else PEAK_LR).get(model)
    if default is not None and default < lr / 10:
        return default, f"the presets' value for {model}"
    return lr / 10, "a tenth of it"


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, mean, std, batch_size: int = 512, amp: bool = True
            ) -> torch.Tensor:
    """Logits (float32, on the model's device) of a model over uint8 images x, in eval mode, the forward pass in the
    precision of kdutils.precision.precision_for(device, amp)."""
    device = next(model.parameters()).device
    precision = precision_for(device, amp)
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i:i + batch_size].to(device, non_blocking=True), mean, std)
        with autocast(precision):
            out.append(model(batch_to(xb, precision)).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, device=device)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mean, std, batch_size: int = 512,
             amp: bool = True) -> float:
    """Top-1 accuracy in [0, 1] of a model on uint8 images x with labels y (the forward pass as `predict`'s)."""
    logits = predict(model, x, mean=mean, std=std, batch_size=batch_size, amp=amp)
    return (logits.argmax(1).cpu() == y.cpu()).float().mean().item() if len(y) else float("nan")


def cross_entropy_loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The default training loss: plain cross-entropy on the model's logits."""
    logits = model(xb)
    return F.cross_entropy(logits.float(), yb), logits


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, for checkpoints and manifests."""
    import torchvision
    versions = {"python": platform.python_version(), "torch": str(torch.__version__),
                "torchvision": str(torchvision.__version__), "numpy": str(np.__version__)}
    try:  # from the installed metadata: importing timm only for its version would cost ~1 s per process
        versions["timm"] = metadata.version("timm")
    except metadata.PackageNotFoundError:  # timm is a declared dependency, but versions should never crash a run
        versions["timm"] = "missing"
    return versions


def hash_tensor(h: Any, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and raw bytes to a hashlib object."""
    h.update(f"{t.dtype}|{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def state_fingerprint(model: nn.Module) -> str:
    """A short SHA-256 of a model's state_dict (names, dtypes, shapes and values): the key of caches built from it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        hash_tensor(h, t)
    return h.hexdigest()[:16]


def _maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile(model) when asked and available (it shares the model's parameters), else the model itself."""
    if not enabled:
        return model
    if not hasattr(torch, "compile"):
        print("compile_model: this torch has no torch.compile; training eagerly", flush=True)
        return model
    # Dynamo's cache is keyed by code, not by hooks: a graph compiled for a hook-free model of the same class would
    # be reused for a student whose layers are tapped (distill), and its hooks would silently never fire.
    torch.compiler.reset()
    return torch.compile(model)


def _short(path: str | Path) -> str:
    """A checkpoint as progress lines name it: its folder and file name (no machine path in notebook outputs)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _check_fit_args(epochs: int, backbone_lr_scale: float, schedule: str) -> None:
    """Refuse an epoch count below 1, a backbone LR scale outside (0, 1] or an unknown schedule."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 < backbone_lr_scale <= 1:
        raise ValueError(f"backbone_lr_scale must be in (0, 1], got {backbone_lr_scale}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def param_groups(model: nn.Module, extra: nn.Module | None, lr: float, backbone_lr_scale: float
                 ) -> tuple[list[dict], list[float]]:
    """The optimiser's parameter groups and their peak LRs: every parameter (the model's, then extra's) at lr, or
    with backbone_lr_scale < 1 the backbone at lr x backbone_lr_scale, then head (head_parameters) and extra at lr."""
    extra_params = list(extra.parameters()) if extra is not None else []
    if backbone_lr_scale == 1.0:
        return [{"params": list(model.parameters()) + extra_params}], [lr]
    head = head_parameters(model)
    in_head = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in in_head]
    return [{"params": backbone}, {"params": head + extra_params}], [lr * backbone_lr_scale, lr]


def make_optimizer(model: nn.Module, extra: nn.Module | None, *, lr: float, backbone_lr_scale: float,
                   weight_decay: float, schedule: str, epochs: int, steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a per-step OneCycle schedule to the groups' peaks, or for schedule="long" SGD (momentum 0.9) at the
    peaks, x0.1 per step at LONG_SCHEDULE_MILESTONES scaled from LONG_SCHEDULE_EPOCHS to `epochs`. Both update all
    tensors per op (foreach; CUDA's default, not the CPU's): the same numbers as one tensor at a time, a quarter
    faster on a CPU (a resnet10_narrow AdamW step at 16 px: 3.6 -> 2.7 ms)."""
    groups, peaks = param_groups(model, extra, lr, backbone_lr_scale)
    if schedule == "long":
        for group, peak in zip(groups, peaks):
            group["lr"] = peak
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay, foreach=True)
        milestones = [steps * max(1, round(m * epochs / LONG_SCHEDULE_EPOCHS)) for m in LONG_SCHEDULE_MILESTONES]
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)  # stepped per batch
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=True)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks, epochs=epochs, steps_per_epoch=steps,
                                                    pct_start=ONE_CYCLE_PCT_START)


def run_config(model: nn.Module, data: Dataset, *, epochs: int, lr: float, batch_size: int, weight_decay: float,
               seed: int, augment: bool, backbone_lr_scale: float, schedule: str) -> dict:
    """The settings a run's checkpoint records and a resume must match (model, class count and data fingerprint are
    checked on their own)."""
    config = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed,
              "augment": augment, "num_train": data.num_train, "dataset": data.name,
              "model": model_name(model), "num_classes": data.num_classes, "data_fingerprint": fingerprint(data)}
    if backbone_lr_scale != 1.0:  # only then, so checkpoints of plain runs keep their config
        config["backbone_lr_scale"] = backbone_lr_scale
    if schedule != "onecycle":
        config["schedule"] = schedule
    return config


def resume(checkpoint: str | Path, model: nn.Module, extra: nn.Module | None, opt: torch.optim.Optimizer,
           sched: torch.optim.lr_scheduler.LRScheduler, *, config: dict, data: Dataset, epochs: int, desc: str,
           device: torch.device) -> tuple[list[dict], float | None, bool]:
    """Load a run's checkpoint once it shows this architecture, settings and data; returns the history so far, the
    divergence reference and whether the run had finished (then it is reused: optimiser and schedule stay as built)."""
    ck = load_checkpoint(checkpoint, map_location=device)
    check_architecture(checkpoint, ck["config"], config["model"], config["num_classes"],
                        role=desc if desc in ("teacher", "student") else "model")
    diff = {k: (ck["config"].get(k), v) for k, v in config.items()
            if k not in ("model", "num_classes", "data_fingerprint") and ck["config"].get(k) != v}
    if diff:
        raise ValueError(f"checkpoint {checkpoint} was written by a different run (saved vs now: {diff}); "
                         "delete it or choose another run directory.")
    check_data(checkpoint, {**ck.get("meta", {}), **ck["config"]}, data)
    load_state(model, ck["model"], checkpoint)
    if extra is not None and ck.get("extra") is not None:
        extra.load_state_dict(ck["extra"])
    history = list(ck["history"])
    if ck["epoch"] >= epochs:
        print(f"{desc}: reusing finished checkpoint {_short(checkpoint)} "
              f"({epochs} epochs, test acc {history[-1]['test_acc']:.4f})")
        return history, ck.get("loss_reference"), True
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    print(f"{desc}: resuming {_short(checkpoint)} after epoch {ck['epoch']} of {epochs}")
    return history, ck.get("loss_reference"), False


def _with_eager_fallback(net: nn.Module, model: nn.Module, loss_fn: LossFn
                         ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """loss_fn on `net` (the model or its torch.compile); if compilation fails on the first step, a message and the
    eager model from then on (after one good compiled step, errors are the model's, not the compiler's)."""
    compiled_ran = False

    def step_loss(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's (loss, logits)."""
        nonlocal net, compiled_ran
        try:
            loss, logits = loss_fn(net, xb, yb, idx)
        except Exception as err:  # torch.compile failed on its first step: train eagerly instead
            if net is model or compiled_ran:
                raise
            print(f"compile_model: torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                  "training eagerly", flush=True)
            net = model
            loss, logits = loss_fn(net, xb, yb, idx)
        compiled_ran = True
        return loss, logits
    return step_loss


def loss_reference(reference: float | None, value: torch.Tensor) -> float:
    """The divergence rule's yardstick: max(1, the first step's loss) (1 if that is not finite), kept once set."""
    if reference is None:
        reference = max(1.0, value.item()) if math.isfinite(value.item()) else 1.0
    return reference


def flag_divergence(value: torch.Tensor, reference: float, step: int, first_bad: torch.Tensor,
                    bad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The divergence rule on one step's loss, on its device (no sync): a loss that is not finite or exceeds
    DIVERGENCE_FACTOR x reference marks the epoch's first bad step (first_bad, -1 while none) and its loss."""
    bad = ~torch.isfinite(value) | (value > DIVERGENCE_FACTOR * reference)
    first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
    bad_loss = torch.where(bad & (first_bad == step), value, bad_loss)
    return first_bad, bad_loss


def divergence_error(epoch: int, step: int, value: float, reference: float, *, checkpoint: str | Path | None,
                     desc: str, steps: int, model: str, schedule: str, lr: float, lr_name: str) -> TrainingDiverged:
    """The TrainingDiverged naming the epoch, step and LR to lower, once the run's partial checkpoint is removed."""
    removed = ""
    if checkpoint is not None and Path(checkpoint).exists():
        Path(checkpoint).unlink()
        removed = f" Its partial checkpoint {checkpoint} was removed."
    why = "is not finite" if not math.isfinite(value) else \
        f"exceeds {DIVERGENCE_FACTOR:g} x its start ({reference:.4g})"
    lower, what = suggested_lr(model, schedule, lr)
    return TrainingDiverged(
        f"{desc} diverged in epoch {epoch}, step {step} of {steps}: the loss {value:.4g} {why}. Lower the peak "
        f"learning rate ({lr_name}, now {lr:g}; e.g. -p {lr_name} {lower:g}, {what}) and run again.{removed}")


def _optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Backpropagate a step's loss through the gradient scaler, then step the optimiser and the per-step schedule."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()


def train_epoch(step_loss: Callable, model: nn.Module, data: Dataset, epoch: int, *, epochs: int, seed: int,
                batch_size: int, drop_last: bool, steps: int, augment: bool, precision: Precision,
                device: torch.device,
                opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                scaler: torch.amp.GradScaler, desc: str, progress: bool, reference: float | None,
                on_diverge: Callable[..., TrainingDiverged]) -> tuple[float, float, float | None]:
    """One epoch's steps in the data order of (seed, epoch), the divergence rule checked every step (on CUDA every
    DIVERGENCE_CHECK_EVERY and the last); returns the mean loss, the train accuracy and the divergence reference."""
    model.train()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # data order depends only on (seed, epoch)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)   # first diverged step, read back rarely
    bad_loss = torch.zeros((), device=device)
    seen = 0
    it = batches(data.x_train, data.y_train, batch_size, shuffle=True, generator=gen, drop_last=drop_last,
                 mean=data.mean, std=data.std, augment=augment, with_index=True)
    bar = tqdm(it, total=steps, desc=f"{desc} {epoch}/{epochs}", leave=False, disable=not progress)
    for step, (xb, yb, idx) in enumerate(bar, 1):
        xb = batch_to(xb, precision)
        with autocast(precision):
            loss, logits = step_loss(xb, yb, idx)
        value = loss.detach().float()
        reference = loss_reference(reference, value)
        first_bad, bad_loss = flag_divergence(value, reference, step, first_bad, bad_loss)
        if device.type != "cuda" or step % DIVERGENCE_CHECK_EVERY == 0 or step == steps:
            if first_bad.item() >= 0:
                raise on_diverge(epoch, int(first_bad.item()), bad_loss.item(), reference)
        _optimizer_step(loss, opt, scaler, sched)
        loss_sum += value * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += len(yb)
    if first_bad.item() >= 0:
        raise on_diverge(epoch, int(first_bad.item()), bad_loss.item(), reference)
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), reference


def epoch_row(model: nn.Module, data: Dataset, epoch: int, *, loss: float, train_acc: float,
              sched: torch.optim.lr_scheduler.LRScheduler, started: float, amp: bool) -> dict:
    """An epoch's history row: train loss and accuracy, test accuracy now, seconds since `started`, LR, size."""
    test_acc = evaluate(model, data.x_test, data.y_test, mean=data.mean, std=data.std, amp=amp)
    return {"epoch": epoch, "loss": loss, "train_acc": train_acc, "test_acc": test_acc,
            "seconds": time.perf_counter() - started, "lr": sched.get_last_lr()[0],
            "params": sum(p.numel() for p in model.parameters())}     # of the network that predicts


def save_epoch(checkpoint: str | Path, *, model: nn.Module, extra: nn.Module | None, opt: torch.optim.Optimizer,
               sched: torch.optim.lr_scheduler.LRScheduler, epoch: int, history: list[dict], config: dict,
               reference: float | None, meta: dict, accuracy: float) -> None:
    """Checkpoint a run after `epoch`: weights, optimiser and schedule state, history, settings and meta."""
    save_checkpoint(checkpoint, {
        "model": model.state_dict(), "extra": extra.state_dict() if extra is not None else None,
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
        "history": history, "config": config, "loss_reference": reference,
        "meta": {**meta, "epoch": epoch, "accuracy": accuracy, "versions": library_versions()}})


def fit(model: nn.Module, data: Dataset, *, epochs: int, lr: float, batch_size: int = 128,
        weight_decay: float = 0.01, seed: int = 0, augment: bool = False, loss_fn: LossFn | None = None,
        extra: nn.Module | None = None, checkpoint: str | Path | None = None, meta: dict | None = None,
        device: torch.device | str | None = None, progress: bool = True, desc: str = "train",
        backbone_lr_scale: float = 1.0, amp: bool = True, compile_model: bool = False,
        lr_name: str = "lr", schedule: str = "onecycle",
        on_epoch_end: Callable[[int, nn.Module, dict], None] | None = None) -> list[dict]:
    """Train with AdamW + per-step OneCycle; resume from (or reuse) `checkpoint`; return per-epoch history.

    `backbone_lr_scale` < 1 gives everything but the classifier (models.head_parameters) that fraction of the peak
    LR, as the paper does when it fine-tunes an ImageNet-pretrained teacher (0.01). `amp` applies the device's
    precision rule (kdutils.precision.precision_for: bf16 autocast + channels_last on CUDA 8.0+ and on CPUs with
    native bf16, fp16 + grad scaler on older CUDA; losses in fp32); amp=False trains in plain fp32 NCHW on every
    device. The choice is recorded in the checkpoint's meta ("precision"). `compile_model` trains through
    torch.compile(model), falling back to eager mode with a message if compilation fails. A run whose loss turns
    non-finite or exceeds DIVERGENCE_FACTOR x max(1, first-step loss) stops with TrainingDiverged naming the epoch,
    the step and the learning rate to lower (`lr_name`, e.g. "teacher_lr"); its partial checkpoint is removed, so
    no diverged state is ever saved. `schedule="long"` is the "+240E" baselines' recipe instead: SGD (momentum
    0.9) at `lr`, x0.1 at epochs 150, 180 and 210 of 240 (scaled to `epochs`); pass weight_decay=5e-4 for theirs.
    `on_epoch_end(epoch, model, row)`, if given, runs after each epoch's evaluation and may add entries to that
    epoch's history row before it is checkpointed (distill records its loss terms and optional measurements this way).

    Checkpoints record the content fingerprint of `data` (kdutils.data.fingerprint: both splits' images and labels)
    and where it came from (data.source). An existing checkpoint is resumed or reused only if it records the same
    fingerprint: one trained on data whose content differs (e.g. an .npz relabelled in place) is refused with a
    message naming both fingerprints, and so is one that records none (written by an older kdutils): nothing shows
    which data it saw, so it is safer to delete it (or choose another run directory) and train again.
    """
    _check_fit_args(epochs, backbone_lr_scale, schedule)
    device = torch.device(device) if device is not None else default_device()
    loss_fn = loss_fn or cross_entropy_loss
    precision = precision_for(device, amp)
    model = model_to(model, device, precision)
    if extra is not None:
        extra.to(device)
    fingerprint(data)            # once, before the move: Dataset.to carries it over to the device copy
    data = data.to(device)
    drop_last = data.num_train > batch_size
    steps = data.num_train // batch_size if drop_last else -(-data.num_train // batch_size)
    opt, sched = make_optimizer(model, extra, lr=lr, backbone_lr_scale=backbone_lr_scale, weight_decay=weight_decay,
                                schedule=schedule, epochs=epochs, steps=steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaler)
    config = run_config(model, data, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                        seed=seed, augment=augment, backbone_lr_scale=backbone_lr_scale, schedule=schedule)
    meta = {**(meta or {}), "dataset": data.name, "num_classes": data.num_classes, "seed": seed,
            "data_fingerprint": config["data_fingerprint"], "data_source": data.source,
            "precision": precision_record(precision)}
    history: list[dict] = []
    reference: float | None = None     # max(1, first-step loss): the divergence rule's yardstick
    if checkpoint is not None and Path(checkpoint).exists():
        history, reference, finished = resume(checkpoint, model, extra, opt, sched, config=config, data=data,
                                              epochs=epochs, desc=desc, device=device)
        if finished:
            return history
    step_loss = _with_eager_fallback(_maybe_compile(model, compile_model), model, loss_fn)
    on_diverge = functools.partial(divergence_error, checkpoint=checkpoint, desc=desc, steps=steps,
                                   model=config["model"], schedule=schedule, lr=lr, lr_name=lr_name)
    for epoch in range(len(history) + 1, epochs + 1):
        started = time.perf_counter()
        loss, train_acc, reference = train_epoch(
            step_loss, model, data, epoch, epochs=epochs, seed=seed, batch_size=batch_size, drop_last=drop_last,
            steps=steps, augment=augment, precision=precision, device=device, opt=opt, sched=sched, scaler=scaler,
            desc=desc, progress=progress, reference=reference, on_diverge=on_diverge)
        row = epoch_row(model, data, epoch, loss=loss, train_acc=train_acc, sched=sched, started=started, amp=amp)
        test_acc = row["test_acc"]     # as evaluated, whatever on_epoch_end does to the row
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, row)
        history.append(row)
        print(f"{desc} epoch {epoch}/{epochs}: loss {row['loss']:.4f}  train acc {row['train_acc']:.4f}  "
              f"test acc {test_acc:.4f}  ({row['seconds']:.1f}s)", flush=True)
        if checkpoint is not None:
            save_epoch(checkpoint, model=model, extra=extra, opt=opt, sched=sched, epoch=epoch, history=history,
                       config=config, reference=reference, meta=meta, accuracy=test_acc)
    return history


def load_model(path: str | Path, device: torch.device | str | None = None, *, expect_model: str | None = None,
               num_classes: int | None = None, role: str = "model", data: Dataset | None = None,
               amp: bool = True) -> nn.Module:
    """Rebuild a model saved by fit (its meta names model, num_classes, image_size) in eval mode, in the memory
    layout of kdutils.precision.precision_for(device, amp).

    With `expect_model` / `num_classes`, a checkpoint of another architecture or class count is refused with a
    message naming what it holds (`role` words it, e.g. "teacher"). With `data`, the dataset the model is about to
    be used with as the one it was trained on, a checkpoint whose recorded data fingerprint differs from
    kdutils.data.fingerprint(data), or that records none (an older kdutils), is refused as fit refuses it.
    """
    ck = load_checkpoint(path)
    meta = ck.get("meta", {})
    missing = [k for k in ("model", "num_classes") if k not in meta]
    if missing:
        raise ValueError(f"checkpoint {path} has no {missing} in its meta; train it with "
                         "fit(..., meta={'model': name, 'image_size': size}).")
    check_architecture(path, meta, expect_model or meta["model"],
                        meta["num_classes"] if num_classes is None else num_classes, role)
    if data is not None:
        check_data(path, meta, data)
    model = build_model(meta["model"], meta["num_classes"], image_size=meta.get("image_size", 32))
    load_state(model, ck["model"], path)
    device = torch.device(device) if device is not None else default_device()
    return model_to(model, device, precision_for(device, amp)).eval()
