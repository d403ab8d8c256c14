"""Generalized layers (the paper's unit of depth) and forward hooks that read or detach them.

A generalized layer ends at every ReLU/LeakyReLU/ReLU6, residual block (BasicBlock, Bottleneck, InvertedResidual),
transformer encoder block and nn.Flatten; residual and encoder blocks are not looked into, other modules are. For a
torchvision ViT, layer 0 is the input of its ``encoder``: patch embedding + class token, before the position embedding.
Logits are never a generalized layer.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn as nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import Encoder, EncoderBlock

_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ReLU6)
_BLOCKS = (BasicBlock, Bottleneck, InvertedResidual, EncoderBlock)

# METHOD.md section 2, "Baseline": the student/teacher distillation layers of the prior-work baselines
# (last layer of each resolution stage); the narrow CPU pair follows the same rule.
_STANDARD_LAYERS = {
    "vgg19_bn": (3, 7, 11, 15),
    "vgg11_bn": (1, 3, 5, 7),
    "resnet34": (3, 7, 13, 16),
    "resnet9": (1, 2, 3, 4),
    "mobilenet_v2": (3, 6, 13, 17),
    "vit_b": (2, 4, 8, 10),
    "vit_et": (1, 3, 5, 7),
    "resnet18_narrow": (2, 4, 6, 8),
    "resnet10_narrow": (1, 2, 3, 4),
}


@dataclass(frozen=True)
class GenLayer:
    """One generalized layer: its index, the module it is read from, and how."""

    index: int
    path: str  # dotted path as in model.named_modules()
    kind: str  # "relu" | "block" | "flatten" | "embed" | "fc"
    hook: str  # "output" (forward hook on the module's output) or "input" (forward pre-hook, input[0])


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the deepest wanted layer has been read."""


def generalized_layers(model: nn.Module) -> list[GenLayer]:
    """The model's generalized layers in forward order (module registration order)."""
    layers: list[GenLayer] = []
    previous_leaf: nn.Module | None = None

    def visit(module: nn.Module, path: str) -> None:
        nonlocal previous_leaf
        if isinstance(module, Encoder):
            layers.append(GenLayer(len(layers), path, "embed", "input"))
        if isinstance(module, _ACTIVATIONS):
            kind = "fc" if isinstance(previous_leaf, nn.Linear) else "relu"
            layers.append(GenLayer(len(layers), path, kind, "output"))
        elif isinstance(module, _BLOCKS):
            layers.append(GenLayer(len(layers), path, "block", "output"))
        elif isinstance(module, nn.Flatten):
            layers.append(GenLayer(len(layers), path, "flatten", "output"))
        else:
            for name, child in module.named_children():
                visit(child, f"{path}.{name}" if path else name)
        if not any(True for _ in module.children()) or isinstance(module, _BLOCKS):
            previous_leaf = module

    for name, child in model.named_children():
        visit(child, name)
    return layers


def standard_layers(name: str) -> list[int]:
    """The 4 standard ("Baseline") distillation layers of a model from ``kdutils.models.MODELS``."""
    if name not in _STANDARD_LAYERS:
        raise ValueError(f"no standard layers for {name!r}; known models: {', '.join(_STANDARD_LAYERS)}")
    return list(_STANDARD_LAYERS[name])


def distillation_layers(name: str, k: int | None = None) -> list[int]:
    """The student layers distilled when k pairs are used: the k deepest standard layers (all 4 when k is None)."""
    layers = standard_layers(name)
    k = len(layers) if k is None else k
    if not 1 <= k <= len(layers):
        raise ValueError(f"k={k} does not fit {name}: pass 1 <= k <= {len(layers)} (its standard layers: {layers}).")
    return layers[len(layers) - k:]


@functools.lru_cache(maxsize=None)
def generalized_layer_count(name: str) -> int:
    """How many generalized layers a kdutils.models model has (any input size; counted on a weightless copy)."""
    from kdutils.models import build_model
    with torch.device("meta"):
        return len(generalized_layers(build_model(name, 10, image_size=32)))


def split_at_layer(model: nn.Module, index: int) -> tuple[list[str], list[str]]:
    """Parameter names (backbone, head) on either side of generalized layer `index`, from the module structure.

    The backbone holds every parameter whose module runs before the layer's output (its module and all modules
    registered before it); the head holds the rest (the modules after it: for a ResNet student, the classifier).
    This is where :func:`tap` with ``detach_at=index`` cuts the gradient.
    """
    layers = generalized_layers(model)
    layer = layers[_check_indices(model, layers, [index])[0]]
    backbone: list[str] = []
    head: list[str] = []
    state = "before"            # named_modules is pre-order: before the layer's module, inside it, after it
    for path, module in model.named_modules():
        inside = path == layer.path or path.startswith(layer.path + ".")
        if state == "before" and inside:
            state = "after" if layer.hook == "input" else "inside"
        elif state == "inside" and not inside:
            state = "after"
        names = [f"{path}.{n}" if path else n for n, _ in module.named_parameters(recurse=False)]
        (head if state == "after" else backbone).extend(names)
    return backbone, head


class TokenMean(nn.Module):
    """Average over the token dimension: (B, T, W) -> (B, W), as kdutils' ViTs do before their head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over dim 1."""
        return x.mean(dim=1)


def model_tail(model: nn.Module, index: int) -> nn.Sequential:
    """A trainable deep copy of a model, in eval mode, from the module that is generalized layer `index` to its logits.

    Its input has the shape of that layer's *output*, as in the paper's SimKD code (METHOD.md 6 and 9.7): a ResNet
    residual block or a ViT encoder block is applied again, a VGG tail starts at the unit's ReLU (ReLU -> ... ->
    classifier; conv and BN are not re-applied; that ReLU is made out-of-place, so the tail never overwrites its
    input). The copy is in eval mode like the frozen teacher it comes from (BatchNorm on the teacher's running
    statistics, dropout off); its parameters require gradients. Supported where `index` is a residual block of a
    ResNet, a conv-BN-ReLU unit of a VGG, or an encoder block of a ViT (the teachers' standard layers all are).
    """
    import copy
    from torchvision.models import VGG, ResNet
    from torchvision.models.vision_transformer import VisionTransformer

    layer = generalized_layers(model)[_check_indices(model, generalized_layers(model), [index])[0]]
    model = copy.deepcopy(model).eval().requires_grad_(True)
    modules = dict(model.named_modules())
    if isinstance(model, ResNet) and layer.kind == "block":
        stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
        blocks = [b for stage in stages for b in stage]
        start = blocks.index(modules[layer.path])
        if blocks[start].downsample is not None:
            raise ValueError(f"{layer.path} changes the feature shape (a down-sampling block), so it cannot be "
                             f"re-applied to its own output: cut the tail at a block without down-sampling.")
        return nn.Sequential(*blocks[start:], model.avgpool, model.fc).eval()
    if isinstance(model, VGG) and layer.path.startswith("features."):
        k = int(layer.path.split(".")[1])        # the unit's ReLU: the tail re-applies neither conv nor BN
        model.features[k].inplace = False
        return nn.Sequential(*model.features[k:], model.avgpool, model.classifier).eval()
    if isinstance(model, VisionTransformer) and layer.kind == "block":
        blocks = list(model.encoder.layers)
        start = blocks.index(modules[layer.path])
        return nn.Sequential(*blocks[start:], model.encoder.ln, TokenMean(), model.heads).eval()
    raise ValueError(f"cannot cut {type(model).__name__} at generalized layer {index} ({layer.kind} {layer.path}): "
                     f"a tail starts at a ResNet block, a VGG conv unit or a ViT encoder block.")


@contextmanager
def tap(model: nn.Module, indices: Iterable[int], *, detach_at: int | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Record the requested generalized layers on every forward pass (and optionally detach one of them).

    Yields a dict that each forward pass fills with ``index -> tensor`` (overwriting the previous pass); the tensors
    keep their autograd graph. With ``detach_at=k`` the layer-k hook hands a detached tensor to the rest of the
    network, so a loss on the output trains only the modules after layer k (the CE-free student head), while the
    dict still holds the undetached layer-k tensor. Hooks are removed on exit, also after an exception.
    """
    layers = generalized_layers(model)
    wanted = set(_check_indices(model, layers, indices))
    hooked = wanted | set(_check_indices(model, layers, [] if detach_at is None else [detach_at]))
    modules = dict(model.named_modules())
    store: dict[int, torch.Tensor] = {}

    def recorder(index: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def record(tensor: torch.Tensor) -> torch.Tensor | None:
            if index in wanted:
                store[index] = tensor
            return tensor.detach() if index == detach_at else None
        return record

    handles = []
    try:
        for index in sorted(hooked):
            handles.append(_hook(modules[layers[index].path], layers[index], recorder(index)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def extract(model: nn.Module, x: torch.Tensor, indices: Iterable[int], *, stop_early: bool = True
            ) -> dict[int, torch.Tensor]:
    """One forward pass of ``x``; returns the requested generalized layers' outputs.

    With ``stop_early`` the forward is aborted right after the deepest requested layer, so later modules never run.
    The model's train/eval mode is left as it is (call ``model.eval()`` first for inference features).
    """
    indices = sorted(set(indices))
    if not indices:
        raise ValueError("extract needs at least one generalized-layer index")
    with tap(model, indices) as store:
        stop = None
        if stop_early:
            deepest = generalized_layers(model)[indices[-1]]
            stop = _hook(model.get_submodule(deepest.path), deepest, _raise_stop)
        try:
            model(x)
        except _StopForward:
            pass
        finally:
            if stop is not None:
                stop.remove()
    return dict(store)


def layer_table(model: nn.Module, image_size: int, in_chans: int = 3) -> pd.DataFrame:
    """Table of the generalized layers (index, path, kind, shape without batch dim, numel) for one image size."""
    layers = generalized_layers(model)
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, image_size, image_size, device=param.device, dtype=param.dtype)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            features = extract(model, x, range(len(layers)))
    finally:
        for module, mode in modes.items():
            module.training = mode
    rows = [{"index": layer.index, "path": layer.path, "kind": layer.kind,
             "shape": tuple(features[layer.index].shape[1:]), "numel": features[layer.index][0].numel()}
            for layer in layers]
    return pd.DataFrame(rows, columns=["index", "path", "kind", "shape", "numel"])


def _check_indices(model: nn.Module, layers: list[GenLayer], indices: Iterable[int]) -> list[int]:
    """Validate generalized-layer indices against the model, with an error naming the valid range."""
    checked = [operator.index(i) for i in indices]
    bad = [i for i in checked if not 0 <= i < len(layers)]
    if bad:
        raise IndexError(f"generalized-layer index {bad[0]} out of range: {type(model).__name__} has {len(layers)} "
                         f"generalized layers, valid indices are 0..{len(layers) - 1} (see layers.layer_table)")
    return checked


def _hook(module: nn.Module, layer: GenLayer, fn: Callable[[torch.Tensor], torch.Tensor | None]
          ) -> torch.utils.hooks.RemovableHandle:
    """Register ``fn`` on the layer's tensor; a tensor returned by ``fn`` replaces it in the forward pass."""
    if layer.hook == "input":
        def pre_hook(_module: nn.Module, args: tuple) -> tuple | None:
            new = fn(args[0])
            return None if new is None else (new, *args[1:])
        return module.register_forward_pre_hook(pre_hook)

    def forward_hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return fn(output)
    return module.register_forward_hook(forward_hook)


def _raise_stop(_tensor: torch.Tensor) -> None:
    """Hook body that ends the forward pass."""
    raise _StopForward
