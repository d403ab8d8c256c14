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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from kdutils.data import Dataset, batches
from kdutils.data import fingerprint as data_fingerprint   # `fingerprint` names the teacher's weights' hash here
from kdutils.layers import extract, standard_layers, tap
from kdutils.models import build_model
from kdutils.train import (LossFn, autocast, default_device, fit, load_checkpoint, prepare_model, seed_everything,
                           state_fingerprint, to_input)

@dataclass(frozen=True)
class Method:
    """One entry of the method registry: the paper's display name, a one-line summary, and what the method trains.

    feature: "" (none), "mse" (each student layer -> its paired teacher layer through a 1x1 projector, MSE),
    "mse_all" (every student layer -> every teacher layer, 1x1 projectors, the mean of all pair MSEs: weight 1/4 per
    teacher layer and 1/4 per student layer) or "sp" (similarity-preserving: MSE between the batch cosine-Gram
    matrices of student and teacher features, per layer pair). layers: the teacher layers, "standard" or a KQ score
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

Shape = tuple[int, ...]


# ----------------------------------------------------------------------------------------------------------------
# losses and projectors

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
    if standardize:
        student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
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
                    teacher_shapes: Sequence[Shape], kind: str = "aligned") -> list[torch.Tensor]:
    """What a method compares with, from the teacher's features: "aligned" (B, C, *space) maps, adaptive-average-
    pooled to the size of their pair; "normalized" flattened L2-normalised (B, D) vectors (similarity-preserving
    KD); "raw" the features as they are (SemCKD pools them per pair itself)."""
    if kind == "raw":
        return list(teacher_feats)
    if kind == "normalized":
        return [F.normalize(f.flatten(1).float(), dim=1) for f in teacher_feats]
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


def similarity_loss(student_feats: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, 2019, as the paper's baseline): per layer pair, the MSE between the
    B x B cosine-similarity (Gram) matrices of the student's and the teacher's flattened features, averaged over the
    whole matrix and then over the pairs, in float32. `targets` are L2-normalised teacher vectors (teacher_targets
    with normalized=True)."""
    if len(student_feats) != len(targets):
        raise ValueError(f"got {len(student_feats)} student features but {len(targets)} targets; one per layer pair.")
    losses = []
    for s, t in zip(student_feats, targets):
        with torch.autocast(s.device.type, enabled=False):
            s = F.normalize(s.flatten(1).float(), dim=1)
            t = t.float()
            losses.append(F.mse_loss(s @ s.T, t @ t.T))
    return torch.stack(losses).mean()


def expand_pairs(method: str, student_layers: Sequence[int], teacher_layers: Sequence[int]
                 ) -> tuple[list[int], list[int]]:
    """The (student, teacher) layer pairs a method compares, as two aligned lists: depth-order one-to-one pairs
    (SimKD included), or every student layer with every teacher layer for the "mse_all" methods (Base FKD+FC) and
    SemCKD."""
    pairs = pair_layers(student_layers, teacher_layers)
    if REGISTRY[method].feature in ("mse_all", "semckd"):
        pairs = [(s, t) for s, _ in pairs for _, t in pairs]
    return [s for s, _ in pairs], [t for _, t in pairs]


def three_layer_projector(c_in: int, c_out: int, rank: int = 2) -> nn.Sequential:
    """SimKD's (and SemCKD's) projector: 1x1 conv -> BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv, hidden width
    2 x c_out, no biases; Conv1d over the tokens for ViT features (rank 1)."""
    conv, norm = (nn.Conv1d, nn.BatchNorm1d) if rank == 1 else (nn.Conv2d, nn.BatchNorm2d)
    hidden = 2 * c_out
    return nn.Sequential(conv(c_in, hidden, 1, bias=False), norm(hidden), nn.ReLU(inplace=True),
                         conv(hidden, hidden, 3, padding=1, bias=False), norm(hidden), nn.ReLU(inplace=True),
                         conv(hidden, c_out, 1, bias=False))


def _embedding_mlp(n: int) -> nn.Sequential:
    """SemCKD's attention embedding, as the paper's code builds it: a batch Gram row (n values) -> Linear 256 ->
    LeakyReLU(0.01) -> Linear 128 -> LeakyReLU(0.01) (L2-normalised by semckd_attention)."""
    return nn.Sequential(nn.Linear(n, 256), nn.LeakyReLU(0.01), nn.Linear(256, 128), nn.LeakyReLU(0.01))


def semckd_modules(s_shapes: Sequence[Shape], t_shapes: Sequence[Shape], n_student: int, n_teacher: int,
                   batch_size: int) -> nn.ModuleDict:
    """SemCKD's trainable parts: a 3-layer projector per (student, teacher) pair (all-to-all, student-major) and one
    query MLP per student layer and one key MLP per teacher layer on rows of the batch Gram matrix (so the batch
    size is fixed: the paper's runs drop the last, smaller batch)."""
    projectors = []
    for s, t in zip(s_shapes, t_shapes):
        rank, cs, ct, _ = _alignment(tuple(s), tuple(t))
        projectors.append(three_layer_projector(cs, ct, rank))
    return nn.ModuleDict({"projectors": nn.ModuleList(projectors),
                          "query": nn.ModuleList(_embedding_mlp(batch_size) for _ in range(n_student)),
                          "key": nn.ModuleList(_embedding_mlp(batch_size) for _ in range(n_teacher))})


def semckd_attention(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
                     modules: nn.ModuleDict) -> torch.Tensor:
    """SemCKD's attention weights, (S, B, T): per layer the B x B dot-product Gram matrix of the flattened features,
    each row through the layer's query (student) or key (teacher) MLP and L2-normalised; for student layer s and
    sample b, softmax over teacher layers t of query_s(b) . key_t(b). In float32."""
    def embed(f: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        flat = f.flatten(1).float()
        return F.normalize(mlp(flat @ flat.T), dim=1)
    queries = torch.stack([embed(f, m) for f, m in zip(student_feats, modules["query"])])           # (S, B, 128)
    keys = torch.stack([embed(f, m) for f, m in zip(teacher_feats, modules["key"])])               # (T, B, 128)
    return torch.einsum("sbd,tbd->sbt", queries, keys).softmax(dim=-1)


def semckd_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
                s_shapes: Sequence[Shape], t_shapes: Sequence[Shape], modules: nn.ModuleDict) -> torch.Tensor:
    """SemCKD's feature loss on unique student and teacher layers (all-to-all pairs, student-major order).

    With w_st(b) the attention weights of :func:`semckd_attention` (per sample b, a softmax over teacher layers t of
    query-key products of batch Gram rows), loss = mean over samples of sum_t w_st(b) * MSE_b(projector_st(f_s), f_t),
    averaged over the student layers (feature weight 1, as in the paper's runs), in float32.
    """
    n_s, n_t = len(student_feats), len(teacher_feats)
    if len(modules["projectors"]) != n_s * n_t:
        raise ValueError(f"{len(modules['projectors'])} projectors for {n_s} x {n_t} layer pairs.")
    with torch.autocast(student_feats[0].device.type, enabled=False):
        weights = semckd_attention(student_feats, teacher_feats, modules)                         # (S, B, T)
        total = 0.0
        for i, f_s in enumerate(student_feats):
            for j, f_t in enumerate(teacher_feats):
                k = i * n_t + j
                rank, _, _, size = _alignment(tuple(s_shapes[k]), tuple(t_shapes[k]))
                target = _pool(feature_map(f_t.float(), rank), size)
                projected = modules["projectors"][k](_pool(feature_map(f_s.float(), rank), size))
                per_sample = (projected - target).pow(2).flatten(1).mean(dim=1)                      # (B,)
                total = total + (weights[i, :, j] * per_sample).mean()
    return total / n_s


class SimKDStudent(nn.Module):
    """SimKD's network, for training and inference alike, as the paper's code builds it: the student, one 3-layer
    projector per distilled layer pair (depth order, each onto its teacher layer's feature, compared by MSE), and a
    copy of the teacher from its deepest distilled layer on (kdutils.layers.model_tail) that turns the deepest
    pair's projected feature into the logits, the prediction. The tail is trained but always runs in eval mode
    (BatchNorm on the teacher's running statistics, dropout off): train() switches only the student and projectors."""

    def __init__(self, student: nn.Module, student_layers: Sequence[int], projectors: nn.ModuleList,
                 tail: nn.Module, ranks: Sequence[int], sizes: Sequence[Shape]):
        super().__init__()
        if not (len(student_layers) == len(projectors) == len(ranks) == len(sizes)) or not projectors:
            raise ValueError(f"SimKD needs one projector, rank and size per student layer; got {len(student_layers)} "
                             f"layers, {len(projectors)} projectors, {len(ranks)} ranks and {len(sizes)} sizes.")
        self.student, self.projectors, self.tail = student, projectors, tail
        self.student_layers = list(student_layers)
        self.ranks, self.sizes = list(ranks), [tuple(s) for s in sizes]
        self.kd_name = f"simkd({getattr(student, 'kd_name', type(student).__name__)})"
        self.tail.eval()

    def train(self, mode: bool = True) -> "SimKDStudent":
        """Set the student's and projectors' mode; the teacher's tail stays in eval mode (as in the authors' code)."""
        super().train(mode)
        self.tail.eval()
        return self

    def _projected(self, feature: torch.Tensor, i: int) -> torch.Tensor:
        """Pair i's projector on the student's feature, pooled to the pair's size: (B, C_teacher, *space)."""
        return self.projectors[i](_pool(feature_map(feature, self.ranks[i]), self.sizes[i]))

    def project(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The projected student features, one per layer pair (deepest last), compared with the teacher's by MSE."""
        feats = extract(self.student, x, self.student_layers, stop_early=True)
        return [self._projected(feats[layer], i) for i, layer in enumerate(self.student_layers)]

    def classify(self, projected: torch.Tensor) -> torch.Tensor:
        """Logits of the teacher's tail on the deepest pair's projected feature (tokens back to (B, T, W) first)."""
        return self.tail(projected.transpose(1, 2) if self.ranks[-1] == 1 else projected)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Student -> the deepest pair's projector -> teacher tail (the other projectors serve only the MSE)."""
        layer = self.student_layers[-1]
        feature = extract(self.student, x, [layer], stop_early=True)[layer]
        return self.classify(self._projected(feature, len(self.student_layers) - 1))


def simkd_student(teacher: nn.Module, student: nn.Module, student_layers: Sequence[int],
                  teacher_layers: Sequence[int], image_size: int, seed: int = 0) -> SimKDStudent:
    """Wrap a student for SimKD: the layers paired in depth order, one seeded 3-layer projector per pair, and a
    trainable, eval-mode copy of the teacher's tail from its deepest paired layer on."""
    from kdutils.layers import model_tail
    pairs = pair_layers(student_layers, teacher_layers)
    s_layers, t_layers = [s for s, _ in pairs], [t for _, t in pairs]
    device = next(teacher.parameters()).device
    s_shapes = _feature_shapes(student.to(device), s_layers, image_size, device)
    t_shapes = _feature_shapes(teacher, t_layers, image_size, device)
    aligned = [_alignment(s, t) for s, t in zip(s_shapes, t_shapes)]  # a smaller student map stays small: tails pool
    tail = model_tail(teacher, t_layers[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projectors = nn.ModuleList(three_layer_projector(cs, ct, rank) for rank, cs, ct, _ in aligned)
    return SimKDStudent(student, s_layers, projectors.to(device), tail, [a[0] for a in aligned],
                        [a[3] for a in aligned])

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


def _cache_budget_mb(device: torch.device, budget_mb: float | None) -> float:
    """The cache's size limit: the given one, else 4096 MB on the CPU and 60% of free memory on CUDA."""
    if budget_mb is not None:
        return float(budget_mb)
    if device.type == "cuda":
        return 0.6 * torch.cuda.mem_get_info(device)[0] / 2**20
    return 4096.0


def _build_cache(teacher: nn.Module, data: Dataset, layers: Sequence[int], s_shapes: Sequence[Shape],
                 t_shapes: Sequence[Shape], want: dict[str, tuple], store: torch.device, device: torch.device,
                 batch_size: int, progress: bool, kind: str = "aligned"
                 ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
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
            targets = teacher_targets([feats[i] for i in layers], s_shapes, t_shapes, kind)
            for buf, t in zip(out["features"], targets):
                buf[idx] = t.to(store, torch.float16)
        if "logits" in want:
            out["logits"][idx] = logits.float().to(store)
    return out


TeacherLookup = Callable[[torch.Tensor, torch.Tensor], tuple[list[torch.Tensor], torch.Tensor | None]]


def _teacher_lookup(teacher: nn.Module, data: Dataset, spec: Method, t_layers: Sequence[int],
                    s_shapes: Sequence[Shape], t_shapes: Sequence[Shape], *, fingerprint: str, augment: bool,
                    cache: dict, cache_budget_mb: float | None, device: torch.device, batch_size: int,
                    progress: bool) -> TeacherLookup:
    """A function (xb, idx) -> (teacher targets, teacher logits) reading the cache, or running the teacher."""
    kind = {"sp": "normalized", "semckd": "raw"}.get(spec.feature, "aligned")
    layers = list(t_layers) if spec.features else []
    if kind == "raw":                     # each teacher layer once, as it is
        unique = list(dict.fromkeys(layers))
        t_shapes = [t_shapes[layers.index(i)] for i in unique]
        layers = unique
    targets_shapes = []
    for s, t in zip(s_shapes, t_shapes):
        _, _, ct, size = _alignment(s, t)
        targets_shapes.append({"normalized": (math.prod(t),), "raw": tuple(t)}.get(kind, (ct, *size)))
    what = " and ".join(w for w, on in (("features", spec.features), ("logits", spec.kl)) if on)

    def on_the_fly(reason: str) -> TeacherLookup:
        print(f"teacher {what}: on the fly ({reason})", flush=True)

        def lookup(xb: torch.Tensor, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            feats, logits = _teacher_forward(teacher, xb, layers, spec.kl)
            return teacher_targets([feats[i] for i in layers], s_shapes, t_shapes, kind), logits
        return lookup

    if augment:
        return on_the_fly("augmentation on: the teacher sees the student's augmented batch")
    base = (fingerprint, data.name, data_fingerprint(data))      # the teacher's weights and the data's content
    keys = {}
    if spec.features:
        keys["features"] = (*base, tuple(layers), tuple(targets_shapes), kind)
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
                             batch_size, progress, kind)
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

def _resolve_layers(method: str, spec: Method, teacher: nn.Module, data: Dataset, teacher_layers, student_layers,
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
        from kdutils.kq import kq_per_class, layer_qualities, select_layers
        key = ("kq", state_fingerprint(teacher), data.name, data_fingerprint(data))
        if key not in cache:
            per_class = kq_per_class(data.name, teacher_name or "", num_classes=data.num_classes,
                                     image_size=data.image_size)
            cache[key] = layer_qualities(teacher, data, per_class=per_class, probe=False, cache_dir=None,
                                         device=device, progress=progress)
        teacher_layers = select_layers(cache[key], k=len(student_layers), by=spec.layers)
        print(f"teacher layers by {spec.layers} (top {len(student_layers)}): {teacher_layers}", flush=True)
    pairs = pair_layers(student_layers, teacher_layers)
    return [s for s, _ in pairs], [t for _, t in pairs]


# ----------------------------------------------------------------------------------------------------------------
# what happens while a student trains: loss terms per epoch, gradient conflict, distance to the teacher

MONITOR_BATCHES = 2      # fixed training batches that distill(..., monitor=True) measures after every epoch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al., 2019) of two feature batches (B, ...): 1 when one is an
    orthogonal transform and rescaling of the other, near 0 when unrelated; needs no projector."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T
    den = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l)
    return float((k * l).sum() / den) if den > 0 else float("nan")


def stage_parameters(model: nn.Module, layers: Sequence[int]) -> dict[str, list[nn.Parameter]]:
    """The backbone cut into stages at the given generalized layers: stage "layer i" holds the parameters that run
    after the previous listed layer and up to layer i (the first stage includes the stem)."""
    from kdutils.layers import split_at_layer
    params = dict(model.named_parameters())
    stages, seen = {}, set()
    for index in sorted(set(layers)):
        names = [n for n in split_at_layer(model, index)[0] if n not in seen]
        seen.update(names)
        stages[f"layer {index}"] = [params[n] for n in names if params[n].requires_grad]
    return stages


def _cosine(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float | None:
    """Cosine between two gradients given per parameter (None = no gradient); None when either is zero."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    na = math.sqrt(sum(float(x.double().pow(2).sum()) for x in a if x is not None))
    nb = math.sqrt(sum(float(y.double().pow(2).sum()) for y in b if y is not None))
    if na == 0 or nb == 0:
        return None
    return sum(float((x.double() * y.double()).sum()) for x, y in pairs) / (na * nb)


def _measure(model: nn.Module, inner: nn.Module, fixed: list, loss_fn: LossFn, terms: dict, feats: dict,
             lookup: TeacherLookup, spec: Method, s_layers: Sequence[int], projectors: nn.ModuleList | None,
             device: torch.device) -> dict:
    """One epoch's measurements on the fixed batches (see distill's `monitor`); the model's BatchNorm statistics and
    the global RNG are restored afterwards, so training goes on exactly as without them."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    was_training = model.training
    model.train()                        # as during training: BatchNorm on batch statistics
    stages = stage_parameters(inner, s_layers) if spec.ce_backbone else {}
    logit_grads: dict[str, list] = {k: [None] * len(v) for k, v in stages.items()}
    feature_grads: dict[str, list] = {k: [None] * len(v) for k, v in stages.items()}
    mse, cka = [[] for _ in s_layers], [[] for _ in s_layers]

    def add(store: list, grads: Sequence[torch.Tensor | None]) -> None:
        for i, g in enumerate(grads):
            if g is not None:
                store[i] = g.detach().clone() if store[i] is None else store[i] + g

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            for xb, yb, idx in fixed:
                xb, yb = to_input(xb, device), yb.to(device)
                with autocast(device):
                    loss_fn(model, xb, yb, idx)
                logit = sum(v for k, v in terms.items() if k in ("ce", "kl"))
                for name, params in stages.items():
                    add(logit_grads[name], torch.autograd.grad(logit, params, retain_graph=True, allow_unused=True))
                    add(feature_grads[name], torch.autograd.grad(terms["feature"], params, retain_graph=True,
                                                                 allow_unused=True))
                with torch.no_grad():
                    targets, _ = lookup(xb, idx)
                    for i, (layer, t, proj) in enumerate(zip(s_layers, targets, projectors)):
                        s = _pool(feature_map(feats[layer].float(), t.dim() - 2), t.shape[2:])
                        mse[i].append(float(F.mse_loss(proj(s), t.float())))
                        cka[i].append(linear_cka(s, t))
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(buffers[n])
            model.train(was_training)
    out = {"feature_mse": [sum(v) / len(v) for v in mse], "feature_cka": [sum(v) / len(v) for v in cka]}
    if stages:
        out["grad_cosine"] = {k: _cosine(logit_grads[k], feature_grads[k]) for k in stages}
    return out


@contextlib.contextmanager
def distill_loss(teacher: nn.Module, student: nn.Module, data: Dataset, method: str, *,
                 teacher_layers: Sequence[int] = (), student_layers: Sequence[int] = (), seed: int = 0,
                 temperature: float | None = None, augment: bool = False, cache: dict | None = None,
                 cache_budget_mb: float | None = None, device: torch.device | str | None = None,
                 batch_size: int = 128, record: dict | None = None, progress: bool = True,
                 monitor: int = 0) -> Iterator[tuple[LossFn, nn.ModuleList | None]]:
    """Set up a method's loss for `fit`: yields (loss_fn, projectors) with the student's layers tapped.

    Layers must already be resolved (see :func:`distill`). `record`, if given, receives the last batch's loss terms
    ("ce", "feature", "kl"; undetached) so a test can back-propagate one term alone. `temperature` None means the
    method's own (REGISTRY). `loss_fn.epoch_end` is an `on_epoch_end` for fit that adds each term's epoch mean to
    the history row ("terms") and, with `monitor` > 0, measurements on that many fixed training batches
    ("monitor", see :func:`distill`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    spec = REGISTRY[method]
    temperature = spec.temperature if temperature is None else temperature
    if monitor and spec.feature != "mse":
        raise ValueError(f"monitor measures methods with paired 1x1-projector feature losses (feature_kd, "
                         f"feature_kd_ce, standard_layers, fitnets_kd, ...); {method!r} has "
                         f"{'none' if not spec.feature else spec.feature + ' features'}. Pass monitor=False.")
    if student is teacher:
        raise ValueError("the student is the teacher: pass a separate student model.")
    if teacher.training or any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("the teacher must be frozen: call teacher.eval().requires_grad_(False) first "
                         "(distill does this for you).")
    check_class_counts(teacher, student, data)
    simkd = spec.feature == "simkd"
    if simkd != isinstance(student, SimKDStudent):
        raise ValueError("simkd trains a student wrapped with simkd_student (distill does this); other methods take "
                         "a plain student.")
    inner = student.student if simkd else student        # the network whose generalized layers are distilled
    device = torch.device(device) if device is not None else default_device()
    s_layers, t_layers = expand_pairs(method, student_layers, teacher_layers) if spec.features else ([], [])
    if simkd and s_layers != student.student_layers:
        raise ValueError(f"the SimKD student projects layers {student.student_layers} but student_layers resolve to "
                         f"{s_layers}: wrap it with simkd_student for the same layers.")
    projectors = None
    lookup: TeacherLookup | None = None
    cache = {} if cache is None else cache
    if spec.features or spec.kl:
        prepare_model(teacher, device)
        fingerprint = state_fingerprint(teacher)
        prepare_model(student, device)
        s_shapes = _feature_shapes(inner, s_layers, data.image_size, device)
        shapes_key = ("shapes", fingerprint, tuple(t_layers), data.image_size)
        if shapes_key not in cache:        # so a cached run never runs the teacher, not even to probe shapes
            cache[shapes_key] = _feature_shapes(teacher, t_layers, data.image_size, device)
        t_shapes = cache[shapes_key]
        if spec.features and not simkd:                  # SimKD's projectors live in its SimKDStudent
            with torch.random.fork_rng(devices=[]):      # deterministic projectors, global RNG untouched
                torch.manual_seed(seed)
                if spec.feature == "semckd":
                    projectors = semckd_modules(s_shapes, t_shapes, len(set(s_layers)), len(set(t_layers)),
                                                min(batch_size, data.num_train))
                else:
                    projectors = make_projectors(s_shapes, t_shapes) if spec.feature != "sp" else nn.ModuleList()
                projectors = projectors.to(device)
        lookup = _teacher_lookup(teacher, data, spec, t_layers, s_shapes, t_shapes, fingerprint=fingerprint,
                                 augment=augment, cache=cache, cache_budget_mb=cache_budget_mb, device=device,
                                 batch_size=max(batch_size, 256), progress=progress)

    with contextlib.ExitStack() as stack:
        feats: dict[int, torch.Tensor] = {}
        if spec.features and not simkd:
            feats = stack.enter_context(tap(student, s_layers, detach_at=None if spec.ce_backbone else max(s_layers)))

        def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            projected = model.project(xb) if simkd else None              # SimKD: one per pair, deepest last
            logits = model.classify(projected[-1]) if simkd else model(xb)
            terms = {"ce": F.cross_entropy(logits.float(), yb)}
            if lookup is not None:
                targets, teacher_logits = lookup(xb, idx)
                if simkd:
                    with torch.autocast(xb.device.type, enabled=False):     # the mean over the pairs
                        terms["feature"] = torch.stack([F.mse_loss(p.float(), t.float())
                                                        for p, t in zip(projected, targets)]).mean()
                elif spec.feature == "sp":
                    terms["feature"] = similarity_loss([feats[i] for i in s_layers], targets)
                elif spec.feature == "semckd":
                    terms["feature"] = semckd_loss([feats[i] for i in dict.fromkeys(s_layers)], targets, s_shapes,
                                                   t_shapes, projectors)
                elif spec.features:
                    terms["feature"] = feature_loss([feats[i] for i in s_layers], targets, projectors)
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
                row["monitor"] = _measure(model, inner, fixed, loss_fn, record, feats, lookup, spec, s_layers,
                                          projectors, device)
            sums.clear()                     # the next epoch starts from zero (the measurements added to them)
            seen[0] = 0

        loss_fn.epoch_end = epoch_end
        yield loss_fn, projectors


def _prepare_student(method: str, teacher: nn.Module, student: nn.Module, dataset: Dataset, teacher_layers,
                     student_layers, teacher_name: str | None, student_name: str | None, cache: dict,
                     device: torch.device | str | None, progress: bool, seed: int
                     ) -> tuple[nn.Module, list[int], list[int]]:
    """The student as it trains (wrapped for SimKD, with a projector per resolved pair) and its resolved layer
    pairs."""
    spec = REGISTRY[method]
    s_layers, t_layers = _resolve_layers(method, spec, teacher, dataset, teacher_layers, student_layers,
                                         teacher_name, student_name, cache, device, progress)
    if spec.feature == "simkd":
        student = simkd_student(teacher, student, s_layers, t_layers, dataset.image_size, seed)
    return student, s_layers, t_layers


def fill_teacher_cache(teacher: nn.Module, student: str, dataset: Dataset, method: str, *, cache: dict,
                       teacher_layers: Sequence[int] | None = None, student_layers: Sequence[int] | None = None,
                       seed: int = 0, augment: bool = False, cache_budget_mb: float | None = None,
                       device: torch.device | str | None = None, batch_size: int = 128,
                       teacher_name: str | None = None) -> dict:
    """Put in `cache` what distill(teacher, student, dataset, method, cache=cache, ...) reads from the teacher (KQ
    selection, feature shapes, features and logits), without training; returns `cache`. The teacher is frozen."""
    seed_everything(seed)
    built = build_model(student, dataset.num_classes, dataset.image_size)
    teacher.eval().requires_grad_(False)
    built, s_layers, t_layers = _prepare_student(method, teacher, built, dataset, teacher_layers, student_layers,
                                                 teacher_name or getattr(teacher, "kd_name", None), student, cache,
                                                 device, False, seed)
    with distill_loss(teacher, built, dataset, method, teacher_layers=t_layers, student_layers=s_layers, seed=seed,
                      augment=augment, cache=cache, cache_budget_mb=cache_budget_mb, device=device,
                      batch_size=batch_size, progress=False):
        pass
    return cache


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
                                                       progress, seed)
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
            extra = _projectors_like(checkpoint) if spec.feature in ("mse", "mse_all") else None
            return fit(student, dataset, extra=extra, **common)
        with distill_loss(teacher, student, dataset, method, teacher_layers=t_layers, student_layers=s_layers,
                          seed=seed, temperature=temperature, augment=augment, cache=cache,
                          cache_budget_mb=cache_budget_mb, device=device, batch_size=batch_size,
                          progress=progress, monitor=MONITOR_BATCHES if monitor is True else int(monitor)
                          ) as (loss_fn, projectors):
            return fit(student, dataset, loss_fn=loss_fn, extra=projectors, on_epoch_end=loss_fn.epoch_end, **common)
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
    cut = REGISTRY[method].features and not isinstance(student, SimKDStudent)
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
