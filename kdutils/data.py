"""Datasets as in-memory uint8 tensors: the Dataset, load_dataset (a named dataset, whose arrays kdutils.datasets
gets, or an .npz file), checks of the loaded arrays, the content fingerprint, a validation split, normalisation,
and a fast batch iterator with on-device crop + flip augmentation.

Every dataset is a :class:`Dataset` holding the whole train and test splits as uint8 NCHW tensors, so batches
are plain tensor indexing (no DataLoader workers). Images are normalised on the fly by :func:`batches`.
Called by notebook 1 (load_dataset), notebook 4 (batches), kdutils.train, kdutils.distill, kdutils.kq,
kdutils.geometry, kdutils.validation, kdutils.checkpoints, kdutils.rundir (which loads each notebook's data),
kdutils.presets and kdutils.checks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kdutils.datasets import DATASETS, NPZ_FORMAT, dataset_arrays, read_npz

# Keys after lower-casing and dropping '-', '_' and spaces.
_ALIASES = {"tinyimagenet200": "tinyimagenet", "cifar10subset": "cifar10-subset"}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset held in memory: uint8 NCHW images, int64 labels, class names and train-split channel stats.

    `source` says where it was loaded from (the .npz path as given, or the dataset's name), for messages.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = ""
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # see fingerprint()

    @property
    def num_classes(self) -> int:
        """Number of classes (length of `classes`)."""
        return len(self.classes)

    @property
    def image_size(self) -> int:
        """Image height in pixels."""
        return int(self.x_train.shape[2])

    @property
    def num_train(self) -> int:
        """Number of training images."""
        return int(self.x_train.shape[0])

    def to(self, device: str | torch.device) -> Dataset:
        """A copy with all tensors on `device` (pinned, non-blocking copies when moving from CPU to CUDA)."""
        device = torch.device(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda" and t.device.type == "cpu":
                return t.pin_memory().to(device, non_blocking=True)
            return t.to(device)

        known = _memoised_fingerprint(self)
        moved = dataclasses.replace(self, x_train=move(self.x_train), y_train=move(self.y_train),
                                    x_test=move(self.x_test), y_test=move(self.y_test))
        if known is not None:                      # the same content: no second pass over the images
            moved._memo.update(fingerprint=known, state=_content_state(moved))
        return moved

    def __repr__(self) -> str:
        """A one-line summary instead of the tensors' contents."""
        fmt = lambda v: "(" + ", ".join(f"{x:.4f}" for x in v) + ")"  # noqa: E731
        return (f"Dataset(name={self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
                f"num_classes={self.num_classes}, mean={fmt(self.mean)}, std={fmt(self.std)}, "
                f"device={self.x_train.device})")


_SPLITS = ("x_train", "y_train", "x_test", "y_test")
_HASH_CHUNK = 1 << 24    # bytes per hash update (16 MiB): a split on the GPU is hashed without a whole host copy


def fingerprint(data: Dataset) -> str:
    """A short SHA-256 (16 hex digits) of the whole content of both splits: images and labels, with their dtypes and
    shapes, on whatever device they are. Checkpoints, caches and manifests record it, so that a dataset file whose
    content changed under the same name is noticed (about 0.1 s per 100 MB of images on one core).

    Memoised on the Dataset object (Dataset.to carries it over) and recomputed when one of its tensors was changed
    in place through torch (tensor version counters); a change made through a NumPy view of a tensor goes unseen:
    build a new Dataset after such an edit.
    """
    known = _memoised_fingerprint(data)
    if known is not None:
        return known
    h = hashlib.sha256()
    for name in _SPLITS:
        t = getattr(data, name).detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1)
        step = max(1, _HASH_CHUNK // t.element_size())
        for s in range(0, flat.numel(), step):
            h.update(flat[s:s + step].cpu().contiguous().view(torch.uint8).numpy())
    value = h.hexdigest()[:16]
    state = _content_state(data)
    if state is not None:
        data._memo.update(fingerprint=value, state=state)
    return value


def _content_state(data: Dataset) -> tuple | None:
    """What identifies the splits' current content cheaply: each tensor's device, address, shape, strides and
    in-place version counter (None for tensors without one, e.g. made under torch.inference_mode)."""
    try:
        return tuple((str(t.device), t.data_ptr(), tuple(t.shape), t.stride(), t._version)
                     for t in (getattr(data, name) for name in _SPLITS))
    except RuntimeError:
        return None


def _memoised_fingerprint(data: Dataset) -> str | None:
    """The memoised fingerprint if the splits are unchanged since it was computed, else None."""
    state = _content_state(data)
    if state is None or data._memo.get("state") != state:
        return None
    return data._memo.get("fingerprint")


# ----------------------------------------------------------------------------------------------------------------
# public API

def dataset_key(name: str | Path) -> str:
    """A dataset name as load_dataset matches it: lower-cased, '-', '_' and spaces dropped, aliases resolved."""
    key = str(name).strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    return _ALIASES.get(key, key)


def load_dataset(name: str | Path, root: str | Path = "data", download: bool = True, per_class: int | None = None,
                 seed: int = 0, *, progress: bool = True) -> Dataset:
    """Load a named dataset (see DATASETS; case-insensitive, 'cifar-10' style aliases work) or an .npz file path.

    `per_class` keeps a seeded, class-balanced subset of the train split (every sample of a class with fewer).
    `seed` drives that subset and the digits train/test split. Grayscale .npz images ((N,H,W) or (N,H,W,1)) are
    replicated to 3 channels. `progress` shows a bar while Tiny ImageNet's JPEGs are decoded (first load only).
    """
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer))
                                  or per_class < 1):
        raise ValueError(f"per_class must be a positive int (samples kept per class) or None for the whole train "
                         f"split; got {per_class!r}.")
    root = Path(root).expanduser()
    path = Path(name).expanduser()
    key = dataset_key(name)
    looks_like_path = isinstance(name, Path) or "/" in str(name) or os.sep in str(name) or bool(path.suffix)
    if isinstance(name, Path) or str(name).lower().endswith(".npz") or (key not in DATASETS and path.is_file()):
        arrays, ds_name, source = read_npz(path), path.stem, str(path)
    elif key not in DATASETS and looks_like_path:
        raise FileNotFoundError(f"No dataset file at {path.resolve()} (relative paths start at the current directory "
                                f"{Path.cwd()}). Check the path (an .npz with x_train, y_train, x_test, y_test), or use "
                                f"a dataset name: {', '.join(DATASETS)}.")
    else:
        if key not in DATASETS:
            raise ValueError(f"Unknown dataset {name!r}. Valid names: {', '.join(DATASETS)} (case-insensitive), "
                             f"or a path to an .npz file with x_train, y_train, x_test, y_test (uint8 NHWC images).")
        arrays = dataset_arrays(key, root, download=download, seed=seed, progress=progress)
        ds_name = source = key
    return _make_dataset(ds_name, validate_arrays(arrays, source=ds_name), per_class, seed, source)


def split_validation(data: Dataset, fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Hold out a seeded, class-balanced `fraction` of the training images: returns (train, validation).

    `train` keeps the remaining training images and the test split; `validation` has the same training images and
    the held-out images as its *test* split, so a model fitted on it is scored on the validation split and never on
    the test split. Both carry the channel statistics of the remaining training images.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}.")
    y = data.y_train.cpu().numpy()
    rng = np.random.default_rng(seed)
    held = []
    for c in range(data.num_classes):
        members = np.flatnonzero(y == c)
        n = int(round(fraction * len(members)))
        if len(members) and not 1 <= n < len(members):
            raise ValueError(f"class {data.classes[c]!r} has {len(members)} training images: a {fraction:g} "
                             f"validation split would leave {len(members) - n} for training and hold out {n}; "
                             f"use more images per class (per_class) or another fraction.")
        held.append(rng.choice(members, n, replace=False))
    held = np.sort(np.concatenate(held))
    keep = np.setdiff1d(np.arange(len(y)), held)
    to = lambda rows: torch.from_numpy(rows).to(data.x_train.device)  # noqa: E731
    x_train, y_train = data.x_train[to(keep)], data.y_train[to(keep)]
    mean, std = _channel_stats(x_train.cpu())
    train = dataclasses.replace(data, x_train=x_train, y_train=y_train, mean=mean, std=std)
    val = dataclasses.replace(train, x_test=data.x_train[to(held)], y_test=data.y_train[to(held)])
    return train, val


def normalize(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float32 `(x / 255 - mean) / std` per channel for uint8 images (N,C,H,W) or (C,H,W), on x's device."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images in 0..255, got {x_uint8.dtype}; pass the raw Dataset tensors "
                        f"(x_train / x_test), not already-normalised ones.")
    m = torch.as_tensor(mean, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    return x_uint8.float().div_(255).sub_(m).div_(s)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """Random crop after `padding`-px zero padding plus random horizontal flip, per image, on x's device.

    Randomness is drawn on the CPU from `generator` (3 draws of len(x) values: row offset, column offset, flip).
    """
    n, _, h, w = x.shape
    k = 2 * padding + 1
    dy = torch.randint(0, k, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, k, (n,), generator=generator).to(x.device)
    flip = torch.randint(0, 2, (n,), generator=generator).bool().to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = dy[:, None] + torch.arange(h, device=x.device)                     # (N, H) rows of the padded image
    cols = dx[:, None] + torch.arange(w, device=x.device)                     # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None, drop_last: bool = False, *,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None, augment: bool = False,
            with_index: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield (float32 normalised images, labels[, int64 row indices]) batches on x's device.

    Without mean/std the images are only scaled to [0, 1]. `generator` (CPU) drives the permutation and the
    augmentation (random 4-px crop + horizontal flip, see random_crop_flip), so a seeded generator is deterministic.
    """
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise TypeError(f"batches expects uint8 images (N, C, H, W); got {x.dtype} {tuple(x.shape)}.")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} images but y has {len(y)} labels.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if (mean is None) != (std is None):
        raise ValueError("Pass both mean and std (e.g. data.mean, data.std) or neither.")
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(x.device)
    if mean is not None:      # on x's device once, not one host-to-device copy (and stall) per batch
        mean, std = (torch.as_tensor(v, dtype=torch.float32, device=x.device) for v in (mean, std))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        xb = x[idx]
        if augment:
            xb = random_crop_flip(xb, generator)
        xb = normalize(xb, mean, std) if mean is not None else xb.float().div_(255)
        yb = y[idx.to(y.device)]
        yield (xb, yb, idx) if with_index else (xb, yb)


# ----------------------------------------------------------------------------------------------------------------
# .npz files, validation, Dataset assembly

def peek_npz(path: str | Path) -> dict[str, int]:
    """Image size and class count of an .npz dataset file without loading its images: the height from x_train's
    .npy header, the count from `classes` if present, else from the largest label + 1 (as load_dataset counts).

    Raises ValueError naming the file when it is not such an .npz (load_dataset then explains what is wrong).
    """
    path = Path(path).expanduser()
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x_train.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape = read(f)[0]
        with np.load(path, allow_pickle=False) as arrays:
            if "classes" in arrays.files:
                num_classes = len(arrays["classes"])
            else:
                num_classes = 1 + int(max(arrays["y_train"].max(), arrays["y_test"].max()))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable dataset .npz with x_train, y_train, x_test, y_test ({e}). "
                         f"{NPZ_FORMAT}") from e
    if len(shape) not in (3, 4):
        raise ValueError(f"{path}: x_train has shape {shape}; expected channels-last (N, H, W, 3). {NPZ_FORMAT}")
    return {"image_size": int(shape[1]), "num_classes": num_classes}


def validate_arrays(a: dict, source: str) -> dict:
    """Check dtypes, shapes, counts and label ranges; return NHWC uint8 RGB images, int64 labels, class names."""
    out = {}
    for split in ("train", "test"):
        x, y = np.asarray(a[f"x_{split}"]), np.asarray(a[f"y_{split}"])
        if x.dtype != np.uint8:
            raise ValueError(f"{source}: x_{split} has dtype {x.dtype}; images must be uint8 in 0..255. Fix: convert, "
                             f"e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1].")
        if x.ndim == 3:  # grayscale (N, H, W)
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            hint = (" It looks channels-first: use x.transpose(0, 2, 3, 1)." if x.ndim == 4 and x.shape[1] in (1, 3)
                    else "")
            raise ValueError(f"{source}: x_{split} has shape {x.shape}; expected channels-last (N, H, W, 3) "
                             f"(or grayscale (N, H, W) / (N, H, W, 1)).{hint}")
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        if len(x) == 0:
            raise ValueError(f"{source}: x_{split} is empty; both splits need at least one image.")
        if y.ndim == 2 and 1 in y.shape and y.size == len(x):
            raise ValueError(f"{source}: y_{split} has shape {y.shape}; labels must be 1-D (N,). Fix: "
                             f"y_{split}.reshape(-1).")
        if y.ndim != 1:
            raise ValueError(f"{source}: y_{split} must be a 1-D array of class indices (N,); got shape {y.shape}. "
                             f"One-hot labels: y.argmax(1).")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{source}: y_{split} must hold integer class indices; got dtype {y.dtype}. Fix: "
                             f"y.astype(np.int64) (if the values are whole numbers).")
        if len(y) != len(x):
            raise ValueError(f"{source}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels; they must "
                             f"match one label per image.")
        if y.min() < 0:
            raise ValueError(f"{source}: y_{split} has negative labels (min {y.min()}); labels must be 0..C-1.")
        out[f"x_{split}"], out[f"y_{split}"] = x, y.astype(np.int64)
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise ValueError(f"{source}: train images are {out['x_train'].shape[1:]} but test images are "
                         f"{out['x_test'].shape[1:]}; resize one split so both have the same (H, W, 3).")
    top = int(max(out["y_train"].max(), out["y_test"].max()))
    if a.get("classes") is None:
        classes = tuple(str(i) for i in range(top + 1))
    else:
        c = np.asarray(a["classes"])
        if c.ndim != 1 or c.dtype.kind not in "US" or len(c) == 0:
            raise ValueError(f"{source}: classes must be a non-empty 1-D array of names (np.array(names, dtype=str)); "
                             f"got dtype {c.dtype}, shape {c.shape}.")
        classes = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in c.tolist())
        if top >= len(classes):
            raise ValueError(f"{source}: labels go up to {top} but only {len(classes)} class names are given; labels "
                             f"must be 0..{len(classes) - 1}. Fix the labels or list every class in 'classes'.")
    empty = sorted(set(range(len(classes))) - set(np.unique(out["y_train"]).tolist()))
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        given = "the listed classes" if a.get("classes") is not None else f"labels 0..{top}"
        raise ValueError(f"{source}: {given} include {len(empty)} class(es) with no training image ({shown}); a model "
                         f"would get dead outputs and a wrong class count. Fix: relabel to 0..C-1, e.g. "
                         f"uniq, y = np.unique(y, return_inverse=True) on both splits together, or drop the unused "
                         f"names from 'classes'.")
    out["classes"] = classes
    return out


def _channel_stats(x: torch.Tensor, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 NCHW images in [0, 1] units (exact integer sums, chunked)."""
    s = [0] * x.shape[1]
    ss = [0] * x.shape[1]
    for part in x.split(chunk):
        p = part.to(torch.int64)
        s = [a + int(b) for a, b in zip(s, p.sum(dim=(0, 2, 3)).tolist())]
        ss = [a + int(b) for a, b in zip(ss, (p * p).sum(dim=(0, 2, 3)).tolist())]
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = tuple(a / (n * 255) for a in s)
    std = tuple(float(np.sqrt((n * b - a * a) / (n * n))) / 255 for a, b in zip(s, ss))
    return mean, std


def _make_dataset(name: str, a: dict, per_class: int | None, seed: int, source: str = "") -> Dataset:
    """Subset the train split (per_class), convert to NCHW tensors and compute the train channel stats."""
    x_train, y_train = a["x_train"], a["y_train"]
    if per_class is not None:
        rng = np.random.default_rng(seed)
        keep = [rng.choice(np.flatnonzero(y_train == c), min(per_class, int((y_train == c).sum())), replace=False)
                for c in range(len(a["classes"]))]
        keep = np.sort(np.concatenate(keep))
        x_train, y_train = x_train[keep], y_train[keep]
    to_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    xt = to_nchw(x_train)
    mean, std = _channel_stats(xt)
    return Dataset(name=name, x_train=xt, y_train=torch.from_numpy(y_train), x_test=to_nchw(a["x_test"]),
                   y_test=torch.from_numpy(a["y_test"]), classes=a["classes"], mean=mean, std=std, source=source)
