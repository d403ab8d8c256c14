"""Checkpoints: atomic save, safe load (tensors and plain data only), and the checks that a checkpoint belongs to
the model and data about to use it.

Called by kdutils.train (fit's resume and per-epoch checkpoint, load_model), kdutils.distill (a student's saved
extra modules), kdutils.kq (its caches), kdutils.validation, kdutils.sweep_tasks and kdutils.sweep (which runs are
finished: checkpoint_finished), and the tests that read checkpoints back.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from kdutils.data import Dataset, fingerprint


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


def checkpoint_finished(path: str | Path | None, epochs: int) -> bool:
    """Whether a checkpoint exists and has trained all `epochs` (an unreadable one counts as unfinished), for callers
    that only need that answer (the sweep, notebook 6's shared teacher pass); fit and distill apply the same rule
    (saved epoch >= epochs) to the checkpoint they load anyway."""
    if path is None or not Path(path).is_file():
        return False
    try:
        return int(load_checkpoint(path).get("epoch", 0)) >= epochs
    except (RuntimeError, OSError):
        return False


def model_name(model: nn.Module) -> str:
    """The kdutils.models name a model was built with (its class name for other models)."""
    return getattr(model, "kd_name", None) or type(model).__name__


def check_architecture(path: str | Path, saved: dict, model: str, num_classes: int, role: str = "model") -> None:
    """Refuse a checkpoint written for another architecture or class count, naming what it holds and the fix."""
    held = (saved.get("model"), saved.get("num_classes"))
    if None in held or held == (model, num_classes):
        return
    raise ValueError(f"{path} holds a {held[0]} {role} for {held[1]} classes, not a {model} for {num_classes} "
                     f"classes; choose another run directory (--run-dir) or delete {path}.")


def check_data(path: str | Path, recorded: dict, data: Dataset) -> None:
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


def load_state(model: nn.Module, state: dict, path: str | Path) -> None:
    """load_state_dict with a one-line error (not a page of size mismatches) when the weights do not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))[:160]
        raise ValueError(f"the weights in {path} do not fit a {model_name(model)} ({first} ...); it was written for "
                         f"another model or class count: choose another run directory or delete it.") from None
