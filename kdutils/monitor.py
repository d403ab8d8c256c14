"""What happens while a student trains, measured without changing the run: the gradient-conflict monitor.

After every epoch, distill(..., monitor=True) runs :func:`measure` on MONITOR_BATCHES fixed training batches: each
distilled layer's MSE and linear CKA (:func:`linear_cka`) to its teacher target, and per backbone stage
(:func:`stage_parameters`) the cosine between the gradients of the logit terms and of the feature term.

Called by kdutils.distill (distill_loss's epoch end), benchmarks/monitor_bench.py (MONITOR_BATCHES) and the tests;
notebook 5 reads the measurements from the history rows (kdutils.result_plots, kdutils.results).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdutils.feature_maps import pool_to
from kdutils.layers import split_at_layer
from kdutils.teacher_cache import TeacherLookup
from kdutils.precision import Precision, autocast, batch_to
from kdutils.train import LossFn

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


def measure(model: nn.Module, inner: nn.Module, fixed: list, loss_fn: LossFn, terms: dict, feats: dict,
            lookup: TeacherLookup, ce_backbone: bool, s_layers: Sequence[int], projectors: nn.ModuleList | None,
            device: torch.device, precision: Precision) -> dict:
    """One epoch's measurements on the fixed batches (see distill's `monitor`); the model's BatchNorm statistics and
    the global RNG are restored afterwards, so training goes on exactly as without them. The gradient cosines are
    measured only when CE reaches the backbone (`ce_backbone`)."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    was_training = model.training
    model.train()                        # as during training: BatchNorm on batch statistics
    stages = stage_parameters(inner, s_layers) if ce_backbone else {}
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
                xb, yb = batch_to(xb, precision), yb.to(device)
                with autocast(precision):
                    loss_fn(model, xb, yb, idx)
                logit = sum(v for k, v in terms.items() if k in ("ce", "kl"))
                if stages:                   # one backward pass per term for every stage, split afterwards
                    params = [p for ps in stages.values() for p in ps]
                    for store, term in ((logit_grads, logit), (feature_grads, terms["feature"])):
                        grads = iter(torch.autograd.grad(term, params, retain_graph=True, allow_unused=True))
                        for name, ps in stages.items():
                            add(store[name], [next(grads) for _ in ps])
                with torch.no_grad():
                    targets, _ = lookup(xb, idx)
                    for i, (layer, t, proj) in enumerate(zip(s_layers, targets, projectors)):
                        s = pool_to(feats[layer].float(), t)
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
