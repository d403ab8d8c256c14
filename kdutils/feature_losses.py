"""Feature losses, one unit per kind, registered by name in FEATURE_LOSSES (torchdistill's loss and module registries
are the model): paired 1x1-conv MSE ("mse"), all-to-all MSE ("mse_all"), similarity-preserving ("sp"), SimKD
("simkd") and SemCKD ("semckd"). A unit (:class:`FeatureLoss`) says which layer pairs it compares, what it builds
(1x1 projectors; 3-layer projectors and attention MLPs; a SimKD student with the teacher's tail), what it compares
with (kdutils.feature_maps.Targets: the teacher's features pooled to their pair, L2-normalised vectors, or as they are) and how
it computes its loss from the student's features and the teacher's targets. A new feature loss is one unit here and
one kdutils.distill.REGISTRY entry naming it.

Called by kdutils.distill (a Method's `feature` names its unit; distill and distill_loss dispatch through it) and
the tests; the pairing, shape and target helpers every unit shares are in kdutils.feature_maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdutils.checkpoints import load_checkpoint
from kdutils.feature_maps import (TARGETS, Shape, Targets, alignment, all_to_all, feature_map, feature_shapes, one_to_one,
                                  pool_to, pool_to_size)
from kdutils.layers import extract, model_tail

Pairing = Callable[[Sequence[int], Sequence[int]], tuple[list[int], list[int]]]


# ----------------------------------------------------------------------------------------------------------------
# "mse" and "mse_all": 1x1 projectors and the MSE to the pooled teacher maps

def make_projectors(student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> nn.ModuleList:
    """One bias-free 1x1 convolution per layer pair, student channels -> teacher channels (Conv1d for ViT tokens)."""
    if len(student_shapes) != len(teacher_shapes):
        raise ValueError(f"{len(student_shapes)} student shapes but {len(teacher_shapes)} teacher shapes.")
    convs = []
    for s, t in zip(student_shapes, teacher_shapes):
        rank, cs, ct, _ = alignment(tuple(s), tuple(t))
        conv = nn.Conv1d if rank == 1 else nn.Conv2d
        convs.append(conv(cs, ct, kernel_size=1, bias=False))
    return nn.ModuleList(convs)


def flat_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`a` and `b` as 1-D tensors, element for element, in `a`'s memory order (NHWC for a channels_last map):
    an elementwise loss over 4-D channels_last maps runs at a third of the speed of the same loss over 1-D views."""
    if a.dim() == 4 and not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last):
        a, b = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)
    return a.reshape(-1), b.reshape(-1)


def feature_loss(student_feats: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                 projectors: nn.ModuleList) -> torch.Tensor:
    """Mean over pairs of MSE(projector(student feature, pooled to the target's size), target): the projector runs
    in the caller's autocast (it is part of the student), the MSE in float32.

    `targets` are teacher features already in map form and pooled (see :func:`teacher_targets`).
    """
    if not (len(student_feats) == len(targets) == len(projectors)):
        raise ValueError(f"got {len(student_feats)} student features, {len(targets)} targets and "
                         f"{len(projectors)} projectors; they must match one per layer pair.")
    losses = []
    for s, t, proj in zip(student_feats, targets, projectors):
        s = pool_to(s, t)                     # pool first: the 1x1 conv commutes with avg-pooling
        projected = proj(s)                   # in the caller's autocast: the projector is part of the model
        with torch.autocast(s.device.type, enabled=False):
            losses.append(F.mse_loss(*flat_pair(projected.float(), t.float())))
    return torch.stack(losses).mean()


def _build_1x1(s_shapes: Sequence[Shape], t_shapes: Sequence[Shape], s_layers: Sequence[int],
               t_layers: Sequence[int], batch_size: int) -> nn.ModuleList:
    """A 1x1 projector per pair."""
    return make_projectors(s_shapes, t_shapes)


def _mse(student_feats: list[torch.Tensor], targets: list[torch.Tensor], modules: nn.Module,
         s_shapes: Sequence[Shape], t_shapes: Sequence[Shape]) -> torch.Tensor:
    """The projected MSE, averaged over the pairs."""
    return feature_loss(student_feats, targets, modules)


def _projectors_like(checkpoint: str | Path) -> nn.ModuleList:
    """Empty projectors with the shapes stored in a checkpoint (to reload a finished run without the teacher)."""
    state = load_checkpoint(checkpoint).get("extra") or {}
    convs = []
    for i in range(len(state)):
        w = state[f"{i}.weight"]
        conv = nn.Conv1d if w.dim() == 3 else nn.Conv2d
        convs.append(conv(w.shape[1], w.shape[0], kernel_size=1, bias=False))
    return nn.ModuleList(convs)


# ----------------------------------------------------------------------------------------------------------------
# "sp": similarity-preserving KD, nothing to build

def similarity_loss(student_feats: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, 2019, as the paper's baseline): per layer pair, the MSE between the
    B x B cosine-similarity (Gram) matrices of the student's and the teacher's flattened features, averaged over the
    whole matrix and then over the pairs, in float32. `targets` are L2-normalised teacher vectors (teacher_targets
    with kind="normalized")."""
    if len(student_feats) != len(targets):
        raise ValueError(f"got {len(student_feats)} student features but {len(targets)} targets; one per layer pair.")
    losses = []
    for s, t in zip(student_feats, targets):
        with torch.autocast(s.device.type, enabled=False):
            s = F.normalize(s.flatten(1).float(), dim=1)
            t = t.float()
            losses.append(F.mse_loss(s @ s.T, t @ t.T))
    return torch.stack(losses).mean()


def _build_nothing(s_shapes: Sequence[Shape], t_shapes: Sequence[Shape], s_layers: Sequence[int],
                   t_layers: Sequence[int], batch_size: int) -> nn.ModuleList:
    """No trainable parts (an empty list, so the checkpoint's extra is empty)."""
    return nn.ModuleList()


def _similarity(student_feats: list[torch.Tensor], targets: list[torch.Tensor], modules: nn.Module,
                s_shapes: Sequence[Shape], t_shapes: Sequence[Shape]) -> torch.Tensor:
    """The Gram-matrix MSE, averaged over the pairs."""
    return similarity_loss(student_feats, targets)


# ----------------------------------------------------------------------------------------------------------------
# "simkd": the student wrapped with 3-layer projectors and a copy of the teacher's tail

def three_layer_projector(c_in: int, c_out: int, rank: int = 2) -> nn.Sequential:
    """SimKD's (and SemCKD's) projector: 1x1 conv -> BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv, hidden width
    2 x c_out, no biases; Conv1d over the tokens for ViT features (rank 1)."""
    conv, norm = (nn.Conv1d, nn.BatchNorm1d) if rank == 1 else (nn.Conv2d, nn.BatchNorm2d)
    hidden = 2 * c_out
    return nn.Sequential(conv(c_in, hidden, 1, bias=False), norm(hidden), nn.ReLU(inplace=True),
                         conv(hidden, hidden, 3, padding=1, bias=False), norm(hidden), nn.ReLU(inplace=True),
                         conv(hidden, c_out, 1, bias=False))


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
        return self.projectors[i](pool_to_size(feature_map(feature, self.ranks[i]), self.sizes[i]))

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
    s_layers, t_layers = one_to_one(student_layers, teacher_layers)
    device = next(teacher.parameters()).device
    s_shapes = feature_shapes(student.to(device), s_layers, image_size, device)
    t_shapes = feature_shapes(teacher, t_layers, image_size, device)
    aligned = [alignment(s, t) for s, t in zip(s_shapes, t_shapes)]  # a smaller student map stays small: tails pool
    tail = model_tail(teacher, t_layers[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projectors = nn.ModuleList(three_layer_projector(cs, ct, rank) for rank, cs, ct, _ in aligned)
    return SimKDStudent(student, s_layers, projectors.to(device), tail, [a[0] for a in aligned],
                        [a[3] for a in aligned])


def _simkd_forward(model: nn.Module, xb: torch.Tensor, feats: dict[int, torch.Tensor], s_layers: Sequence[int]
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The projected features (one per pair, deepest last) and the teacher tail's logits on the deepest."""
    projected = model.project(xb)
    return model.classify(projected[-1]), projected


def _simkd_mse(projected: list[torch.Tensor], targets: list[torch.Tensor], modules: nn.Module | None,
               s_shapes: Sequence[Shape], t_shapes: Sequence[Shape]) -> torch.Tensor:
    """The mean over the pairs of MSE(projected student feature, pooled teacher map), in float32."""
    with torch.autocast(projected[0].device.type, enabled=False):
        return torch.stack([F.mse_loss(*flat_pair(p.float(), t.float())) for p, t in zip(projected, targets)]).mean()


# ----------------------------------------------------------------------------------------------------------------
# "semckd": all-to-all 3-layer projectors weighted per sample by attention over teacher layers

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
        rank, cs, ct, _ = alignment(tuple(s), tuple(t))
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
                rank, _, _, size = alignment(tuple(s_shapes[k]), tuple(t_shapes[k]))
                target = pool_to_size(feature_map(f_t.float(), rank), size)
                projected = modules["projectors"][k](pool_to_size(feature_map(f_s.float(), rank), size))
                per_sample = (projected - target).pow(2).flatten(1).mean(dim=1)                      # (B,)
                total = total + (weights[i, :, j] * per_sample).mean()
    return total / n_s


def _build_semckd(s_shapes: Sequence[Shape], t_shapes: Sequence[Shape], s_layers: Sequence[int],
                  t_layers: Sequence[int], batch_size: int) -> nn.ModuleDict:
    """The all-to-all projectors and the query/key MLPs for this batch size."""
    return semckd_modules(s_shapes, t_shapes, len(set(s_layers)), len(set(t_layers)), batch_size)


def _each_layer_once(model: nn.Module, xb: torch.Tensor, feats: dict[int, torch.Tensor], s_layers: Sequence[int]
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The student's logits and its tapped features, one per distinct student layer."""
    logits = model(xb)
    return logits, [feats[i] for i in dict.fromkeys(s_layers)]


def _semckd(student_feats: list[torch.Tensor], targets: list[torch.Tensor], modules: nn.Module,
            s_shapes: Sequence[Shape], t_shapes: Sequence[Shape]) -> torch.Tensor:
    """The attention-weighted all-to-all MSE."""
    return semckd_loss(student_feats, targets, s_shapes, t_shapes, modules)


# ----------------------------------------------------------------------------------------------------------------
# the units and their registry

def tapped_forward(model: nn.Module, xb: torch.Tensor, feats: dict[int, torch.Tensor], s_layers: Sequence[int]
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The student's logits and its tapped features, one per pair (`feats` is the tap the forward pass fills)."""
    logits = model(xb)
    return logits, [feats[i] for i in s_layers]


def _nothing_to_reload(checkpoint: str | Path) -> None:
    """No built parts to reload with a finished run (the checkpoint's model holds everything that predicts)."""
    return None


@dataclass(frozen=True)
class FeatureLoss:
    """One kind of feature loss: what it builds, which layer pairs it compares, with what, and how.

    pairs: (student layers, teacher layers) -> the compared pairs as two aligned lists. targets: what the teacher's
    features become (kdutils.teacher_cache computes and caches them). build: (student shapes, teacher shapes,
    student layers, teacher layers, fixed batch size) -> the trainable parts besides the student, built from the
    run's seed (None: none). forward: (model, batch, tapped features, student layers) -> (logits, the student
    features the loss takes). loss: (student features, targets, built parts, student shapes, teacher shapes) -> the
    feature term. wrap: (teacher, student, student layers, teacher layers, image size, seed) -> the network that
    trains and predicts in the student's place (SimKD; its features are not tapped). monitorable: distill's monitor
    can measure it. reload: a finished checkpoint's built parts, to reload it without the teacher (or None).
    """
    builds: str
    pairs: Pairing
    targets: Targets
    loss: Callable[[list[torch.Tensor], list[torch.Tensor], nn.Module | None, Sequence[Shape], Sequence[Shape]],
                   torch.Tensor]
    build: Callable[[Sequence[Shape], Sequence[Shape], Sequence[int], Sequence[int], int], nn.Module] | None = None
    forward: Callable[[nn.Module, torch.Tensor, dict[int, torch.Tensor], Sequence[int]],
                      tuple[torch.Tensor, list[torch.Tensor]]] = tapped_forward
    wrap: Callable[[nn.Module, nn.Module, Sequence[int], Sequence[int], int, int], nn.Module] | None = None
    monitorable: bool = False
    reload: Callable[[str | Path], nn.Module | None] = _nothing_to_reload

    @property
    def wraps_student(self) -> bool:
        """Whether the unit trains a wrapped student (SimKDStudent) instead of tapping the plain one."""
        return self.wrap is not None


FEATURE_LOSSES: dict[str, FeatureLoss] = {
    "mse": FeatureLoss("a bias-free 1x1 projector per pair", one_to_one, TARGETS["aligned"], _mse, build=_build_1x1,
                       monitorable=True, reload=_projectors_like),
    "mse_all": FeatureLoss("a bias-free 1x1 projector per (student, teacher) pair, all to all", all_to_all,
                           TARGETS["aligned"], _mse, build=_build_1x1, reload=_projectors_like),
    "sp": FeatureLoss("nothing (batch Gram matrices compared directly)", one_to_one, TARGETS["normalized"],
                      _similarity, build=_build_nothing),
    "simkd": FeatureLoss("a 3-layer projector per pair and a trainable copy of the teacher's tail (SimKDStudent)",
                         one_to_one, TARGETS["aligned"], _simkd_mse, forward=_simkd_forward, wrap=simkd_student),
    "semckd": FeatureLoss("a 3-layer projector per (student, teacher) pair and query/key attention MLPs", all_to_all,
                          TARGETS["raw"], _semckd, build=_build_semckd, forward=_each_layer_once),
}


def build_parts(unit: FeatureLoss, s_shapes: Sequence[Shape], t_shapes: Sequence[Shape], s_layers: Sequence[int],
                t_layers: Sequence[int], batch_size: int, seed: int, device: torch.device) -> nn.Module | None:
    """A unit's trainable parts on `device`, drawn from `seed` without touching the global RNG (None: it builds
    none)."""
    if unit.build is None:
        return None
    with torch.random.fork_rng(devices=[]):      # deterministic projectors, global RNG untouched
        torch.manual_seed(seed)
        return unit.build(s_shapes, t_shapes, s_layers, t_layers, batch_size).to(device)


def distilled_network(unit: FeatureLoss | None, student: nn.Module) -> nn.Module:
    """The network whose generalized layers are distilled: the student, or the one inside its SimKD wrapper; refuses
    a wrapped student for a unit that does not wrap (and a plain one for one that does)."""
    wrapped = unit is not None and unit.wraps_student
    if wrapped != isinstance(student, SimKDStudent):
        raise ValueError("simkd trains a student wrapped with simkd_student (distill does this); other methods take "
                         "a plain student.")
    return student.student if wrapped else student


def check_wrapped_layers(student: nn.Module, s_layers: Sequence[int]) -> None:
    """Refuse a SimKD student whose projected layers are not the resolved student layers."""
    if isinstance(student, SimKDStudent) and s_layers != student.student_layers:
        raise ValueError(f"the SimKD student projects layers {student.student_layers} but student_layers resolve to "
                         f"{s_layers}: wrap it with simkd_student for the same layers.")
