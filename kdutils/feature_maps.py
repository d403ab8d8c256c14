"""Layer pairs, feature shapes and the teacher's targets: what every feature-loss unit shares.

Pairs student and teacher layers (in depth order, or all to all), measures a model's per-layer feature shapes,
aligns a student feature with its teacher feature (adaptive average pooling to the smaller map; ViT tokens and
vectors by their rank), and turns the teacher's features into what a loss compares with (:class:`Targets`: pooled
to their pair, L2-normalised vectors, or as they are).

Called by kdutils.feature_losses (every unit), kdutils.teacher_cache (the cached targets), kdutils.monitor (pool_to),
kdutils.distill (feature shapes) and the tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdutils.layers import extract

Shape = tuple[int, ...]


# ----------------------------------------------------------------------------------------------------------------
# layer pairs, shapes and alignment (every unit)

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


def one_to_one(student_layers: Sequence[int], teacher_layers: Sequence[int]) -> tuple[list[int], list[int]]:
    """The depth-order pairs (pair_layers) as two aligned lists, student and teacher."""
    pairs = pair_layers(student_layers, teacher_layers)
    return [s for s, _ in pairs], [t for _, t in pairs]


def all_to_all(student_layers: Sequence[int], teacher_layers: Sequence[int]) -> tuple[list[int], list[int]]:
    """Every student layer with every teacher layer (student-major), as two aligned lists."""
    pairs = pair_layers(student_layers, teacher_layers)
    pairs = [(s, t) for s, _ in pairs for _, t in pairs]
    return [s for s, _ in pairs], [t for _, t in pairs]


def feature_shapes(model: nn.Module, layers: Sequence[int], image_size: int, device: torch.device) -> list[Shape]:
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


def _rank(shape: Shape) -> int | None:
    """Spatial rank of a per-sample feature shape: 2 for (C, H, W) maps, 1 for (T, W) tokens, None for (C,) vectors."""
    return {3: 2, 2: 1, 1: None}.get(len(shape), -1)


def alignment(student_shape: Shape, teacher_shape: Shape) -> tuple[int, int, int, Shape]:
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


def pool_to_size(x: torch.Tensor, size: Shape) -> torch.Tensor:
    """Adaptive average pooling of a (B, C, *space) map to `size` (a no-op when it already has that size)."""
    space = tuple(x.shape[2:])
    if space == tuple(size):
        return x
    if all(a % b == 0 for a, b in zip(space, size)):   # the same numbers; plain pooling is faster on the CPU
        kernel = tuple(a // b for a, b in zip(space, size))
        return F.avg_pool1d(x, kernel) if len(size) == 1 else F.avg_pool2d(x, kernel)
    return F.adaptive_avg_pool1d(x, size) if len(size) == 1 else F.adaptive_avg_pool2d(x, size)


def pool_to(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A student feature as a map of the target's rank, pooled to the target's (B, C, *space) size."""
    return pool_to_size(feature_map(x, target.dim() - 2), target.shape[2:])


# ----------------------------------------------------------------------------------------------------------------
# what a unit compares with: the teacher's targets (computed per batch, or once into kdutils.teacher_cache)

@dataclass(frozen=True)
class Targets:
    """One way to turn the teacher's features into what a feature loss compares with.

    name: the kind, part of the teacher cache's key. shape: the per-sample shape of a pair's target (every pair is
    checked by alignment first). compute: (teacher features, student shapes, teacher shapes) -> the targets.
    each_layer_once: one target per distinct teacher layer (the loss pairs them itself), not one per pair.
    """
    name: str
    shape: Callable[[Shape, Shape], Shape]
    compute: Callable[[Sequence[torch.Tensor], Sequence[Shape], Sequence[Shape]], list[torch.Tensor]]
    each_layer_once: bool = False


def _aligned_shape(student_shape: Shape, teacher_shape: Shape) -> Shape:
    """(teacher channels, *common size): the teacher map pooled to the pair's size."""
    _, _, ct, size = alignment(student_shape, teacher_shape)
    return (ct, *size)


def _aligned(teacher_feats: Sequence[torch.Tensor], student_shapes: Sequence[Shape],
             teacher_shapes: Sequence[Shape]) -> list[torch.Tensor]:
    """(B, C, *space) maps, adaptive-average-pooled to the size of their pair."""
    out = []
    for f, s, t in zip(teacher_feats, student_shapes, teacher_shapes):
        rank, _, _, size = alignment(tuple(s), tuple(t))
        out.append(pool_to_size(feature_map(f, rank), size))
    return out


def _vector_shape(student_shape: Shape, teacher_shape: Shape) -> Shape:
    """(teacher features flattened,), after checking that the pair fits."""
    alignment(student_shape, teacher_shape)
    return (math.prod(teacher_shape),)


def _normalized(teacher_feats: Sequence[torch.Tensor], student_shapes: Sequence[Shape],
                teacher_shapes: Sequence[Shape]) -> list[torch.Tensor]:
    """Flattened, L2-normalised (B, D) vectors in float32."""
    return [F.normalize(f.flatten(1).float(), dim=1) for f in teacher_feats]


def _raw_shape(student_shape: Shape, teacher_shape: Shape) -> Shape:
    """The teacher feature's own shape, after checking that the pair fits."""
    alignment(student_shape, teacher_shape)
    return tuple(teacher_shape)


def _raw(teacher_feats: Sequence[torch.Tensor], student_shapes: Sequence[Shape],
         teacher_shapes: Sequence[Shape]) -> list[torch.Tensor]:
    """The features as they are."""
    return list(teacher_feats)


TARGETS: dict[str, Targets] = {
    "aligned": Targets("aligned", _aligned_shape, _aligned),
    "normalized": Targets("normalized", _vector_shape, _normalized),
    "raw": Targets("raw", _raw_shape, _raw, each_layer_once=True),
}


def teacher_targets(teacher_feats: Sequence[torch.Tensor], student_shapes: Sequence[Shape],
                    teacher_shapes: Sequence[Shape], kind: str = "aligned") -> list[torch.Tensor]:
    """What a unit compares with, from the teacher's features: "aligned" (B, C, *space) maps, adaptive-average-
    pooled to the size of their pair; "normalized" flattened L2-normalised (B, D) vectors (similarity-preserving
    KD); "raw" the features as they are (SemCKD pools them per pair itself)."""
    return TARGETS[kind].compute(teacher_feats, student_shapes, teacher_shapes)
