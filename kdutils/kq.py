"""Knowledge quality (KQ) of teacher layers: Q = S + sqrt(I * E) ("Quality2", METHOD.md section 3), per layer,
cached on disk, and the top-k teacher-layer selection.

- S (separation)  = mean_c AvgIntra_c - mean_{c != c'} AvgInter_{c,c'}          (absolute cosines)
- I (information) = (1 - mean_c MinIntra_c) * mean_c H_c / ln 5                  (H_c: class SVD entropy)
- E (efficiency)  = 2 * mean_c MinInterDist_c / mean_c Norm_c * (N / pi)^(1 / ID_g), ID_g = min(n_A, D)

Two deliberate differences from the upstream code (project decision 1): the class SVD entropy uses 0 * log 0 = 0
(upstream's float32 underflow zeroes the entropy of every class of a layer narrower than the class size), and
AvgIntra_c is the plain mean over distinct pairs i<j (upstream's row gathering includes self-similarities).
Further conventions: the cosine of a zero feature vector is 0; E = 0 for a layer whose features are all zero;
ED_c is capped at (largest class in B) - 1; select_layers breaks ties towards the shallower layer.

Cost: per layer one float32 Gram matrix of the n_A x D features dominates, plus the class Gram matrices (about
1/C of it) and the forward passes. Consecutive layers whose sampled features together fit in GROUP_MB, and in
the largest single layer's, share one early-stopping forward pass: a ResNet needs a few passes instead of one per
layer, and the features held at once never exceed one layer's (or GROUP_MB, if that is larger). At the
tinyimagenet preset's settings (ResNet-34 at 64x64, n_A = 5000) the widest layer, 64x64x64, alone takes 5 GiB
(see benchmarks/kq_bench.py --tinyimagenet for the measured peak).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from kdutils.data import fingerprint, normalize
from kdutils.geometry import (MAX_DIM, class_balanced_sample, collect_features, feature_geometry, layer_outputs,
                              linear_probe, pool_features)
from kdutils.precision import Precision, model_to, precision_for
from kdutils.train import state_fingerprint

KQ_VERSION = 1            # bump when a formula changes: old cache files are then recomputed
GROUP_MB = 1536.0        # sampled features of consecutive layers extracted in one forward pass, at most this size
SELECT_BY = ("quality", "separation", "information", "efficiency", "sqrt_ie")   # the paper's score and its ablations
# This course's finding, not the paper's method: on the CPU-scale teacher (notebook 6, shared CIFAR-10 subset, 2
# seeds) depth ordered the layers by their measured value far better than Q (Spearman +0.98 vs +0.16), and the
# deepest 4 beat Q's top 4 by 2.6 points (the standard layers beat both). select_layers(..., by="depth").
COURSE_SELECT_BY = ("depth",)
_LOG5 = math.log(5.0)


TINY_IMAGENET_SHAPE = (200, 64)     # (classes, image size) of Tiny ImageNet: what kq_per_class's 50 keys on


def kq_per_class(dataset: str, teacher: str, *, num_classes: int | None = None,
                 image_size: int | None = None) -> int:
    """Images per class for the class spectra (subset B): 50 for CNN teachers on Tiny ImageNet, else 500.

    METHOD.md 3.1: the authors extract CNN teachers' Tiny ImageNet features from a 10k-image subset (50 per class);
    every other case (CIFAR, ViT teachers) caps the class sample at 500. The rule keys on what the data is, not on
    what it is called: the tinyimagenet dataset by name, or any data with Tiny ImageNet's shape, 200 classes at
    64x64 (TINY_IMAGENET_SHAPE), such as the decoded .npz cache or a subset of it passed as a file. Pass the data's
    `num_classes` and `image_size` when `dataset` is an .npz path (kdutils.data.peek_npz reads them from the
    file without loading the images).
    """
    from kdutils.models import is_vit
    tiny = str(dataset).strip().lower().replace("-", "").replace("_", "") in ("tinyimagenet", "tinyimagenet200")
    tiny = tiny or (num_classes, image_size) == TINY_IMAGENET_SHAPE
    return 50 if tiny and not is_vit(teacher) else 500


def _finite(outputs: Iterator[dict[int, torch.Tensor]], names: dict[int, str]) -> Iterator[dict[int, torch.Tensor]]:
    """Pass batches {layer: features} through, refusing NaN/inf features with an error naming the layer."""
    for outs in outputs:
        for i, t in outs.items():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{names[i]}: {bad} non-finite feature value(s) (NaN/inf) in one batch, so its KQ "
                                 f"cannot be computed. A teacher that produces them has diverged or has broken "
                                 f"weights: retrain it with a lower teacher_lr.")
        yield outs


def quality_terms(geometry: dict, num_train: int) -> dict[str, float]:
    """S, I, E, sqrt(I*E) and Q (plus the margin and volume factor inside E) from one layer's geometry dict."""
    if int(num_train) < 1:
        raise ValueError(f"num_train must be the (positive) training-set size N, got {num_train}.")
    inter = np.asarray(geometry["avg_inter"], dtype=np.float64)
    off = inter[~np.eye(len(inter), dtype=bool)]
    separation = float(np.mean(geometry["avg_intra"]) - np.mean(off))
    information = float((1.0 - np.mean(geometry["min_intra"])) * geometry["entropy_mean"] / _LOG5)
    mean_norm = float(np.mean(geometry["norm"]))
    margin = float(2.0 * np.mean(geometry["min_inter_dist"]) / mean_norm) if mean_norm > 0 else 0.0
    factor = float((num_train / math.pi) ** (1.0 / geometry["id_g"]))
    efficiency = margin * factor
    sqrt_ie = math.sqrt(max(information * efficiency, 0.0))
    return {"separation": separation, "information": information, "efficiency": efficiency, "sqrt_ie": sqrt_ie,
            "quality": separation + sqrt_ie, "margin": margin, "volume_factor": factor,
            "intra_cos": float(np.mean(geometry["avg_intra"])), "inter_cos": float(np.mean(off)),
            "min_intra_cos": float(np.mean(geometry["min_intra"])), "mean_norm": mean_norm,
            "mean_min_dist": float(np.mean(geometry["min_inter_dist"]))}


def knowledge_quality(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | Sequence[int],
                      num_train: int, *, max_samples: int = 5000, per_class: int = 500, seed: int = 0,
                      max_dim: int | None = MAX_DIM) -> dict:
    """KQ of one layer's features (N, ...) with class labels (N,): S, I, E, Q and every sub-quantity.

    Float keys: separation, information, efficiency, sqrt_ie, quality, margin, volume_factor, intra_cos, inter_cos,
    min_intra_cos, mean_norm, mean_min_dist, ed_mean, entropy_mean. Arrays (per class, float64): avg_intra,
    min_intra, avg_inter (C x C, NaN diagonal), norm, min_inter_dist, ed, entropy, class_spectra (C x width).
    Ints: id_g, dim, ed_sum, truncation, num_train; sample record: seed, num_classes, n_a, n_b, count_a, count_b,
    classes. Float64 features are processed in float64, anything else in float32.
    """
    x = torch.as_tensor(features)
    y = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"features have {len(x)} rows but labels have {len(y)} entries.")
    sample = class_balanced_sample(y, max_samples, per_class, seed)
    index = torch.from_numpy(sample.index).to(x.device)
    step = 1024

    def chunks() -> Iterator[dict[int, torch.Tensor]]:
        """The sampled rows in order, in chunks, as single-layer batches."""
        for s in range(0, len(index), step):
            yield {0: x[index[s:s + step]]}

    fa, spectra, _ = collect_features(_finite(chunks(), {0: "the features given to knowledge_quality"}), sample,
                                      [0], max_dim=max_dim)[0]
    codes_a = torch.from_numpy(sample.codes[sample.rows_a])
    geometry = feature_geometry(fa, codes_a, spectra, sample.width)
    return {**quality_terms(geometry, num_train), **geometry, **sample.info(), "classes": sample.classes.tolist(),
            "num_train": int(num_train)}


# ------------------------------------------------------------------------------------------------------------------
# all layers of a model, cached

def layer_analysis(model: nn.Module, dataset, layers: Sequence[int] | None = None, *, max_samples: int = 5000,
                   per_class: int = 500, seed: int = 0, probe: bool = True, batch_size: int = 128,
                   device: str | torch.device | None = None, cache_dir: str | Path | None = "cache/kq",
                   max_dim: int | None = MAX_DIM, group_mb: float | None = GROUP_MB,
                   progress: bool = True, amp: bool = True) -> dict[int, dict]:
    """Geometry, KQ terms, 2-D PCA and probe accuracy of each generalized layer (all, or `layers`) of a model.

    Features are the layer outputs on a seeded class-balanced sample of dataset's train split (normalised with
    dataset.mean/std, eval mode, inference_mode), from early-stopping forward passes batch by batch. Consecutive
    layers whose sampled features together fit in `group_mb` MiB, and in the largest single layer's features,
    share one pass (fewer forward passes, no more memory than the widest layer needs); each layer is then analysed
    and freed in turn. group_mb=None extracts strictly one layer per pass.
    The probe is a logistic regression on globally average-pooled features (train: subset A, score: the test
    split). Results are cached in `cache_dir` by (model state_dict hash, the data's content fingerprint
    kdutils.data.fingerprint, seed) plus the settings; a cache whose key differs is ignored and rewritten.
    The forward passes run in kdutils.precision.precision_for(device, amp) (amp=False: fp32 NCHW); the features are
    cast to fp32 and every statistic (Gram, SVD, eigh, probe) is computed in fp32/fp64 either way. The precision is
    part of the cache key. Returns {layer index: result dict}.
    """
    from kdutils.layers import generalized_layers
    from kdutils.train import default_device

    gen = generalized_layers(model)
    device = torch.device(device) if device is not None else default_device()
    precision = precision_for(device, amp)
    layers = list(range(len(gen))) if layers is None else [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < len(gen)]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {len(gen)} generalized layers "
                         f"(0..{len(gen) - 1}); see kdutils.layers.layer_table(model, image_size).")
    class_balanced_sample(dataset.y_train, max_samples, per_class, seed)   # fails early on impossible sample sizes
    model_hash, data_hash = state_fingerprint(model), fingerprint(dataset)
    key = {"version": KQ_VERSION, "model": model_hash, "data_fingerprint": data_hash, "seed": int(seed),
           "max_samples": int(max_samples), "per_class": int(per_class), "num_train": int(dataset.num_train),
           "max_dim": -1 if max_dim is None else int(max_dim),
           "precision": str(precision.dtype or torch.float32).replace("torch.", "")}
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"kq-{model_hash}-{dataset.name}-{data_hash}-seed{seed}.pt"
    cached = _read_cache(path, key)
    todo = [i for i in layers if i not in cached or (probe and math.isnan(cached[i]["probe_acc"]))]
    if todo:
        _compute_layers(model, dataset, todo, cached, key, path, probe=probe, batch_size=batch_size,
                        device=device, group_mb=group_mb, progress=progress, precision=precision)
    return {i: cached[i] for i in layers}


def layer_qualities(model: nn.Module, dataset, layers: Sequence[int] | None = None, *, max_samples: int = 5000,
                    per_class: int = 500, seed: int = 0, probe: bool = True, batch_size: int = 128,
                    device: str | torch.device | None = None, cache_dir: str | Path | None = "cache/kq",
                    max_dim: int | None = MAX_DIM, group_mb: float | None = GROUP_MB,
                    progress: bool = True, amp: bool = True) -> pd.DataFrame:
    """Q and its parts for every generalized layer (or `layers`) as a DataFrame indexed by layer (see layer_analysis).

    Columns: path, kind, shape, dim, separation, information, efficiency, sqrt_ie, quality, intra_cos, inter_cos,
    min_intra_cos, mean_norm, mean_min_dist, margin, volume_factor, ed_mean, ed_sum, truncation, entropy, id_g,
    probe_acc (NaN when probe=False), seconds. attrs: model hash, dataset, data fingerprint, seed and sample sizes.
    """
    analysis = layer_analysis(model, dataset, layers, max_samples=max_samples, per_class=per_class, seed=seed,
                              probe=probe, batch_size=batch_size, device=device, cache_dir=cache_dir,
                              max_dim=max_dim, group_mb=group_mb, progress=progress, amp=amp)
    return quality_table(analysis)


_TABLE_COLUMNS = ("path", "kind", "shape", "dim", "separation", "information", "efficiency", "sqrt_ie", "quality",
                  "intra_cos", "inter_cos", "min_intra_cos", "mean_norm", "mean_min_dist", "margin", "volume_factor",
                  "ed_mean", "ed_sum", "truncation", "entropy_mean", "id_g", "probe_acc", "seconds")


def quality_table(analysis: dict[int, dict]) -> pd.DataFrame:
    """The per-layer scalar results of layer_analysis as a DataFrame indexed by layer index."""
    rows = {i: {c: r[c] for c in _TABLE_COLUMNS} for i, r in sorted(analysis.items())}
    df = pd.DataFrame.from_dict(rows, orient="index").rename(columns={"entropy_mean": "entropy"})
    df.index.name = "layer"
    if analysis:
        first = next(iter(analysis.values()))
        df.attrs = {k: first[k] for k in ("model_hash", "dataset", "data_fingerprint", "seed", "n_a", "n_b")
                    if k in first}
    return df


def top_k(scores: pd.Series, k: int) -> list[int]:
    """The k layers (index labels) with the largest score, in depth order; ties go to the shallower layer and layers
    with a NaN score are never chosen."""
    valid = [(float(s), int(i)) for i, s in scores.astype(float).items() if not math.isnan(s)]
    if not 1 <= k <= len(valid):
        raise ValueError(f"cannot pick k={k} layers from {len(valid)} layers with a finite score; pass 1 <= k <= "
                         f"{len(valid)} or score more layers.")
    return sorted(i for _, i in sorted(valid, key=lambda t: (-t[0], t[1]))[:k])


def select_layers(qualities: pd.DataFrame, k: int = 4, by: str = "quality") -> list[int]:
    """The k layers with the largest score `by` (quality, separation, information, efficiency or sqrt_ie), in
    depth order; by="depth" (this course's finding, COURSE_SELECT_BY) takes the k deepest layers of the table. Ties
    go to the shallower layer; layers with a NaN score are never chosen."""
    if by not in SELECT_BY + COURSE_SELECT_BY:
        raise ValueError(f"unknown by={by!r}; choose one of {', '.join(SELECT_BY + COURSE_SELECT_BY)}.")
    if by == "depth":
        qualities = qualities.assign(depth=qualities.index.to_numpy(dtype=float))
    if by not in qualities.columns:
        raise ValueError(f"the table has no column {by!r}; pass the DataFrame from layer_qualities.")
    return top_k(qualities[by], k)


# ------------------------------------------------------------------------------------------------------------------
# internals

def _group_layers(layers: list[int], nbytes: dict[int, int], budget: float | None) -> list[list[int]]:
    """Consecutive groups of layers whose stored features fit in `budget` bytes (a larger layer stands alone)."""
    groups: list[list[int]] = []
    total = 0
    for i in layers:
        if groups and budget is not None and total + nbytes[i] <= budget:
            groups[-1].append(i)
            total += nbytes[i]
        else:
            groups.append([i])
            total = nbytes[i]
    return groups


def _compute_layers(model: nn.Module, dataset, todo: list[int], cached: dict[int, dict], key: dict,
                    path: Path | None, *, probe: bool, batch_size: int, device: torch.device, group_mb: float | None,
                    progress: bool, precision: Precision) -> None:
    """Analyse the layers in `todo`, adding them to `cached` and to the cache file after each layer.

    Layers are extracted in groups: one early-stopping forward pass over the sample per group, where a group is a
    run of consecutive layers whose sampled features fit in group_mb and in the largest layer's features (None:
    one layer per pass).
    """
    from kdutils.layers import extract, generalized_layers

    gen = generalized_layers(model)
    sample = class_balanced_sample(dataset.y_train, key["max_samples"], key["per_class"], key["seed"])
    index = torch.from_numpy(sample.index)
    x_sample = dataset.x_train[index.to(dataset.x_train.device)]
    codes_a = torch.from_numpy(sample.codes[sample.rows_a])
    labels_a = dataset.y_train.cpu()[index[torch.from_numpy(sample.rows_a)]]
    max_dim = None if key["max_dim"] < 0 else key["max_dim"]
    passes = {"mean": dataset.mean, "std": dataset.std, "batch_size": batch_size, "device": device,
              "precision": precision}
    first_param = next(model.parameters(), None)
    home = first_param.device if first_param is not None else torch.device("cpu")
    was_training = model.training
    model_to(model, device, precision).eval()
    try:
        with torch.inference_mode():
            xb = normalize(x_sample[:1].to(device), dataset.mean, dataset.std)
            shapes = {i: tuple(o.shape[1:]) for i, o in extract(model, xb, todo, stop_early=True).items()}
        nbytes = {i: 4 * sample.n_a * math.prod(shapes[i]) for i in todo}
        budget = None if group_mb is None else min(group_mb * 2 ** 20, max(nbytes.values()))   # one layer's worth
        groups = _group_layers(sorted(todo), nbytes, budget)
        bar = tqdm(total=len(todo), desc="KQ layers", disable=not progress)
        for group in groups:
            t0 = time.perf_counter()
            names = {i: f"teacher layer {i} ({gen[i].path})" for i in group}
            features = collect_features(_finite(layer_outputs(model, x_sample, group, **passes), names), sample,
                                        group, max_dim=max_dim, pooled=probe)
            tests: dict[int, torch.Tensor] = {}
            if probe:
                pooled = [{i: pool_features(o) for i, o in outs.items()}
                          for outs in layer_outputs(model, dataset.x_test, group, **passes)]
                tests = {i: torch.cat([p[i] for p in pooled]) for i in group}
                del pooled
            shared = (time.perf_counter() - t0) / len(group)
            for i in group:
                t1 = time.perf_counter()
                fa, spectra, pool_a = features.pop(i)
                geometry = feature_geometry(fa, codes_a, spectra, sample.width, pca_seed=key["seed"])
                del fa
                acc = linear_probe(pool_a, labels_a, tests.pop(i), dataset.y_test) if probe else float("nan")
                cached[i] = {**quality_terms(geometry, key["num_train"]), **geometry, **sample.info(),
                             "classes": sample.classes.tolist(), "labels": codes_a.numpy(),
                             "num_train": key["num_train"], "layer": i, "path": gen[i].path, "kind": gen[i].kind,
                             "shape": "x".join(map(str, shapes[i])), "probe_acc": acc, "model_hash": key["model"],
                             "dataset": dataset.name, "data_fingerprint": key["data_fingerprint"],
                             "seconds": shared + time.perf_counter() - t1}
                if path is not None:
                    _write_cache(path, key, cached)
                bar.update(1)
        bar.close()
    finally:
        model.to(home).train(was_training)


def _to_storable(value: object) -> object:
    """numpy values -> torch tensors / Python scalars, so the cache loads with weights_only=True."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_storable(value: object) -> object:
    """Inverse of _to_storable: tensors back to numpy arrays."""
    return value.numpy() if isinstance(value, torch.Tensor) else value


def _write_cache(path: Path, key: dict, results: dict[int, dict]) -> None:
    """Write the cache file atomically (temporary file in the same folder, then os.replace)."""
    from kdutils.checkpoints import save_checkpoint

    payload = {"key": key, "layers": {i: {k: _to_storable(v) for k, v in r.items()} for i, r in results.items()}}
    save_checkpoint(path, payload)


def _read_cache(path: Path | None, key: dict) -> dict[int, dict]:
    """Cached per-layer results if the file exists, loads and has exactly this key; else an empty dict."""
    if path is None or not path.is_file():
        return {}
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated / foreign file: recompute and overwrite
        return {}
    if not isinstance(payload, dict) or payload.get("key") != key:
        return {}
    return {int(i): {k: _from_storable(v) for k, v in r.items()} for i, r in payload["layers"].items()}
