"""Training: seeding, evaluation, the AdamW + OneCycle loop, and atomic, resumable checkpoints."""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import platform
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from kdutils.data import Dataset, batches, fingerprint, normalize
from kdutils.models import build_model, head_parameters

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def default_device() -> torch.device:
    """The CUDA device when one is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    schedule (kdutils.pipeline.PEAK_LR / LONG_LR), lr / 10); lr / 10 for a model the presets do not know."""
    from kdutils.pipeline import LONG_LR, PEAK_LR   # here: kdutils.pipeline imports this module
    default = (LONG_LR if schedule == "long" else PEAK_LR).get(model)
    if default is not None and default < lr / 10:
        return default, f"the presets' value for {model}"
    return lr / 10, "a tenth of it"


def native_bf16(device: torch.device) -> bool:
    """Whether a CUDA device computes bf16 natively (compute capability 8.0+: A100, H100, L4, RTX 30xx/40xx); a
    T4 or V100 only emulates it, slowly, so mixed precision uses fp16 with a gradient scaler there."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 where native, else fp16); a no-op on the CPU or when not `enabled`."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if native_bf16(device) else torch.float16)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to the device, in channels_last memory format on CUDA."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_input(xb: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Put an image batch in the memory format the device prefers."""
    return xb.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and xb.dim() == 4 else xb


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, mean, std, batch_size: int = 512) -> torch.Tensor:
    """Logits (float32, on x's device) of a model over uint8 images x, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i:i + batch_size].to(device, non_blocking=True), mean, std)
        with autocast(device):
            out.append(model(to_input(xb, device)).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, device=device)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mean, std, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of a model on uint8 images x with labels y."""
    logits = predict(model, x, mean=mean, std=std, batch_size=batch_size)
    return (logits.argmax(1).cpu() == y.cpu()).float().mean().item() if len(y) else float("nan")


def cross_entropy_loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The default training loss: plain cross-entropy on the model's logits."""
    logits = model(xb)
    return F.cross_entropy(logits, yb), logits


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, for checkpoints and manifests."""
    import torchvision
    versions = {"python": platform.python_version(), "torch": str(torch.__version__),
                "torchvision": str(torchvision.__version__), "numpy": str(np.__version__)}
    try:
        import timm
        versions["timm"] = str(timm.__version__)
    except ImportError:  # timm is a declared dependency, but versions should never crash a run
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


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write a checkpoint atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by save_checkpoint (tensors and plain data only: weights_only=True)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train the model first (fit(..., checkpoint=path)).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated/corrupt file or a pickle that is not plain data
        detail = " ".join(str(e).split())                  # torch's message spans lines: keep it on one
        if isinstance(e, pickle.UnpicklingError) and "weights_only" in detail:
            # torch's advice (retry with weights_only=False) would unpickle an unknown file: not ours to follow
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", detail)
            if found:
                raise RuntimeError(f"could not read checkpoint {path}: it holds Python objects other than tensors "
                                   f"and plain data (such as {found.group(1)}), which are never unpickled here "
                                   f"(unpickling can run arbitrary code), so save_checkpoint did not write it: "
                                   f"delete it and train again.") from None
            reason = re.split(r"\. | Check the documentation", detail.split("WeightsUnpickler error:")[-1])[0]
            reason = reason.strip()[:200]
            raise RuntimeError(f"could not read checkpoint {path}: it is not a file save_checkpoint writes (damaged, "
                               f"or another program's; torch: {reason}): delete it and train again.") from None
        raise RuntimeError(f"could not read checkpoint {path}: delete it and train again ({type(e).__name__}: "
                           f"{detail[:400]}{'...' if len(detail) > 400 else ''})") from e


def model_name(model: nn.Module) -> str:
    """The kdutils.models name a model was built with (its class name for other models)."""
    return getattr(model, "kd_name", None) or type(model).__name__


def _check_architecture(path: str | Path, saved: dict, model: str, num_classes: int, role: str = "model") -> None:
    """Refuse a checkpoint written for another architecture or class count, naming what it holds and the fix."""
    held = (saved.get("model"), saved.get("num_classes"))
    if None in held or held == (model, num_classes):
        return
    raise ValueError(f"{path} holds a {held[0]} {role} for {held[1]} classes, not a {model} for {num_classes} "
                     f"classes; choose another run directory (--run-dir) or delete {path}.")


def _check_data(path: str | Path, recorded: dict, data: Dataset) -> None:
    """Refuse a checkpoint whose record (config or meta) holds another data fingerprint than `data`'s, or none."""
    now, source = fingerprint(data), data.source or f"this run's {data.name} data"
    fix = "Delete the checkpoint or choose another run directory (--run-dir)."
    old = recorded.get("data_fingerprint")
    if old is None:
        raise ValueError(f"{path} records no data fingerprint (it was written before kdutils recorded one), so "
                         f"nothing shows it was trained on {source} (fingerprint {now}). {fix}")
    if old != now:
        was = recorded.get("data_source") or "its data"
        what = ("its images or labels changed (the file was edited or replaced, or another subset or split of it "
                "was taken)" if was == data.source else "other data")
        raise ValueError(f"{path} was trained on data with fingerprint {old} (recorded from {was}); {source} now has "
                         f"fingerprint {now}: {what}. {fix}")


def _load_state(model: nn.Module, state: dict, path: str | Path) -> None:
    """load_state_dict with a one-line error (not a page of size mismatches) when the weights do not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))[:160]
        raise ValueError(f"the weights in {path} do not fit a {model_name(model)} ({first} ...); it was written for "
                         f"another model or class count: choose another run directory or delete it.") from None


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


def fit(model: nn.Module, data: Dataset, *, epochs: int, lr: float, batch_size: int = 128,
        weight_decay: float = 0.01, seed: int = 0, augment: bool = False, loss_fn: LossFn | None = None,
        extra: nn.Module | None = None, checkpoint: str | Path | None = None, meta: dict | None = None,
        device: torch.device | str | None = None, progress: bool = True, desc: str = "train",
        backbone_lr_scale: float = 1.0, amp: bool = True, compile_model: bool = False,
        lr_name: str = "lr", schedule: str = "onecycle",
        on_epoch_end: Callable[[int, nn.Module, dict], None] | None = None) -> list[dict]:
    """Train with AdamW + per-step OneCycle; resume from (or reuse) `checkpoint`; return per-epoch history.

    `backbone_lr_scale` < 1 gives everything but the classifier (models.head_parameters) that fraction of the peak
    LR, as the paper does when it fine-tunes an ImageNet-pretrained teacher (0.01). `amp` turns on bf16 autocast on
    CUDA (fp32 when False; the CPU always runs fp32); `compile_model` trains through torch.compile(model), falling
    back to eager mode with a message if compilation fails. A run whose loss turns non-finite or exceeds
    DIVERGENCE_FACTOR x max(1, first-step loss) stops with TrainingDiverged naming the epoch, the step and the
    learning rate to lower (`lr_name`, e.g. "teacher_lr"); its partial checkpoint is removed, so no diverged state
    is ever saved. `schedule="long"` is the "+240E" baselines' recipe instead: SGD (momentum 0.9) at `lr`, x0.1 at
    epochs 150, 180 and 210 of 240 (scaled to `epochs`); pass weight_decay=5e-4 for theirs. `on_epoch_end(epoch,
    model, row)`, if given, runs after each epoch's evaluation and may add entries to that epoch's history row
    before it is checkpointed (distill records its loss terms and optional measurements this way).

    Checkpoints record the content fingerprint of `data` (kdutils.data.fingerprint: both splits' images and labels)
    and where it came from (data.source). An existing checkpoint is resumed or reused only if it records the same
    fingerprint: one trained on data whose content differs (e.g. an .npz relabelled in place) is refused with a
    message naming both fingerprints, and so is one that records none (written by an older kdutils): nothing shows
    which data it saw, so it is safer to delete it (or choose another run directory) and train again.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 < backbone_lr_scale <= 1:
        raise ValueError(f"backbone_lr_scale must be in (0, 1], got {backbone_lr_scale}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    device = torch.device(device) if device is not None else default_device()
    loss_fn = loss_fn or cross_entropy_loss
    model = prepare_model(model, device)
    if extra is not None:
        extra.to(device)
    fingerprint(data)            # once, before the move: Dataset.to carries it over to the device copy
    data = data.to(device)
    drop_last = data.num_train > batch_size
    steps = data.num_train // batch_size if drop_last else -(-data.num_train // batch_size)
    extra_params = list(extra.parameters()) if extra is not None else []
    if backbone_lr_scale == 1.0:
        groups, peaks = [{"params": list(model.parameters()) + extra_params}], [lr]
    else:
        head = head_parameters(model)
        in_head = {id(p) for p in head}
        backbone = [p for p in model.parameters() if id(p) not in in_head]
        groups, peaks = [{"params": backbone}, {"params": head + extra_params}], [lr * backbone_lr_scale, lr]
    if schedule == "long":
        for group, peak in zip(groups, peaks):
            group["lr"] = peak
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
        milestones = [steps * max(1, round(m * epochs / LONG_SCHEDULE_EPOCHS)) for m in LONG_SCHEDULE_MILESTONES]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)   # stepped per batch
    else:
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks, epochs=epochs, steps_per_epoch=steps,
                                                    pct_start=ONE_CYCLE_PCT_START)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda" and not native_bf16(device))
    config = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed,
              "augment": augment, "num_train": data.num_train, "dataset": data.name,
              "model": model_name(model), "num_classes": data.num_classes, "data_fingerprint": fingerprint(data)}
    if backbone_lr_scale != 1.0:  # only then, so checkpoints of plain runs keep their config
        config["backbone_lr_scale"] = backbone_lr_scale
    if schedule != "onecycle":
        config["schedule"] = schedule
    meta = {**(meta or {}), "dataset": data.name, "num_classes": data.num_classes, "seed": seed,
            "data_fingerprint": config["data_fingerprint"], "data_source": data.source}
    history: list[dict] = []
    reference: float | None = None     # max(1, first-step loss): the divergence rule's yardstick

    if checkpoint is not None and Path(checkpoint).exists():
        ck = load_checkpoint(checkpoint, map_location=device)
        _check_architecture(checkpoint, ck["config"], config["model"], config["num_classes"],
                            role=desc if desc in ("teacher", "student") else "model")
        diff = {k: (ck["config"].get(k), v) for k, v in config.items()
                if k not in ("model", "num_classes", "data_fingerprint") and ck["config"].get(k) != v}
        if diff:
            raise ValueError(f"checkpoint {checkpoint} was written by a different run (saved vs now: {diff}); "
                             "delete it or choose another run directory.")
        _check_data(checkpoint, {**ck.get("meta", {}), **ck["config"]}, data)
        _load_state(model, ck["model"], checkpoint)
        if extra is not None and ck.get("extra") is not None:
            extra.load_state_dict(ck["extra"])
        history = list(ck["history"])
        reference = ck.get("loss_reference")
        if ck["epoch"] >= epochs:
            print(f"{desc}: reusing finished checkpoint {_short(checkpoint)} "
                  f"({epochs} epochs, test acc {history[-1]['test_acc']:.4f})")
            return history
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        print(f"{desc}: resuming {_short(checkpoint)} after epoch {ck['epoch']} of {epochs}")

    net = _maybe_compile(model, compile_model)
    compiled_ran = False      # after one good compiled step, errors are the model's, not the compiler's

    def diverged(epoch: int, step: int, value: float) -> TrainingDiverged:
        removed = ""
        if checkpoint is not None and Path(checkpoint).exists():
            Path(checkpoint).unlink()
            removed = f" Its partial checkpoint {checkpoint} was removed."
        why = "is not finite" if not math.isfinite(value) else \
            f"exceeds {DIVERGENCE_FACTOR:g} x its start ({reference:.4g})"
        lower, what = suggested_lr(config["model"], schedule, lr)
        return TrainingDiverged(
            f"{desc} diverged in epoch {epoch}, step {step} of {steps}: the loss {value:.4g} {why}. Lower the peak "
            f"learning rate ({lr_name}, now {lr:g}; e.g. -p {lr_name} {lower:g}, {what}) and run again.{removed}")

    for epoch in range(len(history) + 1, epochs + 1):
        model.train()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # data order depends only on (seed, epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        first_bad = torch.full((), -1, device=device, dtype=torch.long)   # first diverged step, read back rarely
        bad_loss = torch.zeros((), device=device)
        seen = 0
        it = batches(data.x_train, data.y_train, batch_size, shuffle=True, generator=gen, drop_last=drop_last,
                     mean=data.mean, std=data.std, augment=augment, with_index=True)
        bar = tqdm(it, total=steps, desc=f"{desc} {epoch}/{epochs}", leave=False, disable=not progress)
        for step, (xb, yb, idx) in enumerate(bar, 1):
            xb = to_input(xb, device)
            with autocast(device, amp):
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
            value = loss.detach().float()
            if reference is None:
                reference = max(1.0, value.item()) if math.isfinite(value.item()) else 1.0
            bad = ~torch.isfinite(value) | (value > DIVERGENCE_FACTOR * reference)
            first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
            bad_loss = torch.where(bad & (first_bad == step), value, bad_loss)
            if device.type != "cuda" or step % DIVERGENCE_CHECK_EVERY == 0 or step == steps:
                if first_bad.item() >= 0:
                    raise diverged(epoch, int(first_bad.item()), bad_loss.item())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += value * len(yb)
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += len(yb)
        if first_bad.item() >= 0:
            raise diverged(epoch, int(first_bad.item()), bad_loss.item())
        test_acc = evaluate(model, data.x_test, data.y_test, mean=data.mean, std=data.std)
        row = {"epoch": epoch, "loss": loss_sum.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1),
               "test_acc": test_acc, "seconds": time.perf_counter() - t0, "lr": sched.get_last_lr()[0],
               "params": sum(p.numel() for p in model.parameters())}     # of the network that predicts
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, row)
        history.append(row)
        print(f"{desc} epoch {epoch}/{epochs}: loss {row['loss']:.4f}  train acc {row['train_acc']:.4f}  "
              f"test acc {test_acc:.4f}  ({row['seconds']:.1f}s)", flush=True)
        if checkpoint is not None:
            save_checkpoint(checkpoint, {
                "model": model.state_dict(), "extra": extra.state_dict() if extra is not None else None,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
                "history": history, "config": config, "loss_reference": reference,
                "meta": {**meta, "epoch": epoch, "accuracy": test_acc, "versions": library_versions()}})
    return history


def load_model(path: str | Path, device: torch.device | str | None = None, *, expect_model: str | None = None,
               num_classes: int | None = None, role: str = "model", data: Dataset | None = None) -> nn.Module:
    """Rebuild a model saved by fit (its meta names model, num_classes, image_size) in eval mode.

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
    _check_architecture(path, meta, expect_model or meta["model"],
                        meta["num_classes"] if num_classes is None else num_classes, role)
    if data is not None:
        _check_data(path, meta, data)
    model = build_model(meta["model"], meta["num_classes"], image_size=meta.get("image_size", 32))
    _load_state(model, ck["model"], path)
    return prepare_model(model, torch.device(device) if device is not None else default_device()).eval()
