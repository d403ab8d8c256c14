"""Model factory: the paper's teachers and students (and a CPU-scale pair), built from torchvision classes.

Every CNN gets a 3x3 stride-1 stem and keeps the ImageNet stem down-sampling (ResNet max-pool, MobileNetV2 stride-2
stem) only for inputs of 64 px and more (Tiny ImageNet), as in the paper. Every CNN contains an ``nn.Flatten`` whose
output is the globally pooled feature vector (the "Flatten" generalized layer). ViTs average all tokens (class token
included) after the final LayerNorm before the linear head.
"""
from __future__ import annotations

import http.client
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

MODELS: dict[str, str] = {
    "resnet34": "ResNet-34 teacher: BasicBlock [3,4,6,3], widths 64-512, 3x3 stem (ImageNet weights available)",
    "resnet9": "ResNet-9 student: BasicBlock [1,1,1,1], widths 64-512, 3x3 stem",
    "vgg19_bn": "VGG-19-BN teacher: cfg E, 1x1 avg-pool, MLP 512-4096-4096-C (ImageNet weights available)",
    "vgg11_bn": "VGG-11-BN student: cfg A, 1x1 avg-pool, MLP 512-4096-4096-C (ImageNet weights available)",
    "mobilenet_v2": "MobileNetV2 student: width 1.0, stride-1 stem below 64 px (ImageNet weights available)",
    "vit_b": "ViT-B teacher: 12 blocks, width 768, 12 heads, MLP 3072, 65 tokens, token mean (ImageNet weights)",
    "vit_et": "ViT-ET student: 8 blocks, width 192, 6 heads, MLP 576, 65 tokens, token mean",
    "resnet18_narrow": "CPU-scale teacher: BasicBlock [2,2,2,2], widths 32-64-128-256 (~2.8M parameters)",
    "resnet10_narrow": "CPU-scale student: BasicBlock [1,1,1,1], widths 16-32-64-128 (~0.3M parameters)",
}

# Peak (OneCycle max) learning rate per model: METHOD.md decision 3 (MaxLR), for teachers and students alike.
PEAK_LR = {
    "resnet34": 0.0075, "resnet9": 0.0075, "mobilenet_v2": 0.0075,
    "vgg19_bn": 0.005, "vgg11_bn": 0.005,
    "vit_b": 0.0001, "vit_et": 0.001,
    "resnet18_narrow": 0.0075, "resnet10_narrow": 0.0075,
}

# Peak LR of the "+240E" long schedule (SGD, METHOD.md section 6): 0.05 for ResNet-9/MobileNetV2, 0.01 for VGG-11 and
# ViT-ET; the CPU-scale student follows the ResNets.
LONG_LR = {"resnet9": 0.05, "mobilenet_v2": 0.05, "vgg11_bn": 0.01, "vit_et": 0.01, "resnet10_narrow": 0.05,
           "resnet34": 0.05, "resnet18_narrow": 0.05, "vgg19_bn": 0.01, "vit_b": 0.01}

# name -> (blocks per stage, stage widths, ImageNet weights or None)
_RESNETS = {
    "resnet34": ((3, 4, 6, 3), (64, 128, 256, 512), tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet9": ((1, 1, 1, 1), (64, 128, 256, 512), None),
    "resnet18_narrow": ((2, 2, 2, 2), (32, 64, 128, 256), None),
    "resnet10_narrow": ((1, 1, 1, 1), (16, 32, 64, 128), None),
}
# name -> (torchvision layer configuration, ImageNet weights)
_VGGS = {"vgg19_bn": ("E", tvm.VGG19_BN_Weights.IMAGENET1K_V1), "vgg11_bn": ("A", tvm.VGG11_BN_Weights.IMAGENET1K_V1)}
# name -> (blocks, heads, width, MLP width, ImageNet weights or None)
_VITS = {
    "vit_b": (12, 12, 768, 3072, tvm.ViT_B_16_Weights.IMAGENET1K_V1),
    "vit_et": (8, 6, 192, 576, None),
}
_WEIGHTS = {
    **{name: spec[2] for name, spec in _RESNETS.items()},
    **{name: spec[1] for name, spec in _VGGS.items()},
    "mobilenet_v2": tvm.MobileNet_V2_Weights.IMAGENET1K_V1,
    **{name: spec[4] for name, spec in _VITS.items()},
}


class TokenMeanViT(VisionTransformer):
    """torchvision ViT whose head reads the mean of all tokens (class token included) after the final LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-embed, prepend the class token, encode, average the tokens, classify."""
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x).mean(dim=1))


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier's parameters (ResNet `fc`, VGG/MobileNetV2 `classifier`, ViT `heads`): all after the pooling;
    for SimKD's wrapped student, the teacher tail that classifies."""
    for attr in ("fc", "classifier", "heads", "tail"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            return list(head.parameters())
    raise ValueError(f"{type(model).__name__} has no `fc`, `classifier` or `heads` module; build it with build_model.")


def has_imagenet_weights(name: str) -> bool:
    """Whether torchvision has ImageNet weights for a ``MODELS`` name (build_model(..., pretrained=True) works)."""
    return _WEIGHTS.get(name) is not None


def is_vit(name: str) -> bool:
    """Whether a ``MODELS`` name is a vision transformer (else a CNN)."""
    return name in _VITS


def build_model(name: str, num_classes: int, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """Build one of ``MODELS`` for square ``image_size`` inputs, optionally from ImageNet weights."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (one logit per class); got {num_classes!r}. Pass the "
                         f"dataset's data.num_classes.")
    weights = _WEIGHTS[name] if pretrained else None
    if pretrained and weights is None:
        with_weights = ", ".join(n for n, w in _WEIGHTS.items() if w is not None)
        raise ValueError(f"{name} has no ImageNet weights; use pretrained=False (models with weights: {with_weights})")
    if name in _VITS:
        if image_size not in (32, 64):
            raise ValueError(f"{name} needs image_size 32 (patch 4) or 64 (patch 8) for 64 patches; got {image_size}")
    elif name in _RESNETS and image_size < 8:
        raise ValueError(f"{name} needs image_size >= 8 (its stages halve the map 3 times); got {image_size}")
    elif name not in _RESNETS and image_size < 32:
        raise ValueError(f"{name} needs image_size >= 32 (its stages halve the map 5 times); got {image_size}")
    if name in _RESNETS:
        model = _resnet(*_RESNETS[name][:2], num_classes, image_size, weights)
    elif name in _VGGS:
        model = _vgg(_VGGS[name][0], num_classes, weights)
    elif name == "mobilenet_v2":
        model = _mobilenet_v2(num_classes, image_size, weights)
    else:
        model = _vit(*_VITS[name][:4], num_classes, image_size, weights)
    model.kd_name = name  # lets layers.standard_layers and distill find the model's name
    return model


def _resnet(blocks: tuple[int, ...], widths: tuple[int, ...], num_classes: int, image_size: int,
            weights: tvm.WeightsEnum | None) -> ResNet:
    """torchvision ResNet with a 3x3 stride-1 stem, max-pool only at >= 64 px, optional custom stage widths."""
    model = ResNet(BasicBlock, list(blocks))
    if weights is not None:
        model.load_state_dict(download_weights(weights))
    new_modules: list[nn.Module] = []
    if widths[0] != 64:  # torchvision hard-codes 64-128-256-512: rebuild the stages with its own _make_layer
        model.inplanes = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stage = model._make_layer(BasicBlock, width, n, stride=1 if i == 0 else 2)
            setattr(model, f"layer{i + 1}", stage)
            new_modules.append(stage)
        model.bn1 = nn.BatchNorm2d(widths[0])
    model.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
    for conv in (m for module in [model.conv1, *new_modules] for m in module.modules() if isinstance(m, nn.Conv2d)):
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's ResNet init
    if image_size < 64:
        model.maxpool = nn.Identity()
    model.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # torchvision's flatten is then a no-op
    model.fc = nn.Linear(widths[-1], num_classes)
    return model


def _vgg(cfg: str, num_classes: int, weights: tvm.WeightsEnum | None) -> tvm.VGG:
    """torchvision VGG-BN with a 1x1 adaptive avg-pool + Flatten and a 512-4096-4096-C classifier."""
    features = tvm.vgg.make_layers(tvm.vgg.cfgs[cfg], batch_norm=True)
    with torch.device("meta"):  # skip allocating torchvision's 25088x4096 classifier (seconds on a CPU), replaced below
        model = tvm.VGG(features)  # torchvision's init still runs on the real feature layers
    model.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.classifier = nn.Sequential(_linear(512, 4096), nn.ReLU(True), nn.Dropout(0.5),
                                     _linear(4096, 4096), nn.ReLU(True), nn.Dropout(0.5), _linear(4096, num_classes))
    if weights is not None:  # keep the middle classifier Linear; the first and last are new, as in the paper
        new = ("classifier.0.", "classifier.6.")
        state = {k: v for k, v in download_weights(weights).items() if not k.startswith(new)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if not all(k.startswith(new) for k in missing) or unexpected:
            raise RuntimeError(f"VGG weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


def _mobilenet_v2(num_classes: int, image_size: int, weights: tvm.WeightsEnum | None) -> tvm.MobileNetV2:
    """torchvision MobileNetV2 (width 1.0) with a stride-1 stem below 64 px and Flatten leading the classifier."""
    model = tvm.mobilenet_v2()
    if weights is not None:
        model.load_state_dict(download_weights(weights))
    if image_size < 64:
        model.features[0][0].stride = (1, 1)
    model.classifier = nn.Sequential(nn.Flatten(), model.classifier[0], _linear(model.last_channel, num_classes))
    return model


def _vit(num_layers: int, num_heads: int, width: int, mlp_width: int, num_classes: int, image_size: int,
         weights: tvm.WeightsEnum | None) -> TokenMeanViT:
    """Token-mean ViT with 64 patches (patch 4 at 32 px, 8 at 64 px); ImageNet weights are resized to fit."""
    patch_size = image_size // 8
    model = TokenMeanViT(image_size=image_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
                         hidden_dim=width, mlp_dim=mlp_width, num_classes=num_classes)
    if weights is not None:
        state = resize_vit_state_dict(download_weights(weights), image_size, patch_size)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) != {"heads.head.weight", "heads.head.bias"} or unexpected:
            raise RuntimeError(f"ViT weights do not fit: missing {missing}, unexpected {unexpected}")
    return model  # the head stays zero-initialised (torchvision's init), as in the paper


def resize_vit_state_dict(state: dict[str, torch.Tensor], image_size: int, patch_size: int) -> dict[str, torch.Tensor]:
    """Fit a torchvision ViT state dict to a new patch size and grid; drops the head.

    The patch-embedding kernels are average-pooled to ``patch_size`` x ``patch_size`` and the position embeddings
    (class token first) are interpolated bicubically to the ``image_size // patch_size`` grid.
    """
    state = interpolate_embeddings(image_size, patch_size, dict(state), reset_heads=True)
    state["conv_proj.weight"] = pool_patch_kernels(state["conv_proj.weight"], patch_size)
    return state


def pool_patch_kernels(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Average-pool (out, in, k, k) patch-embedding kernels down to (out, in, patch_size, patch_size)."""
    if weight.shape[-1] % patch_size:
        raise ValueError(f"kernel size {weight.shape[-1]} is not a multiple of patch_size {patch_size}")
    return F.adaptive_avg_pool2d(weight, patch_size)


def download_weights(weights: tvm.WeightsEnum) -> dict[str, torch.Tensor]:
    """Load torchvision ImageNet weights through the torch hub cache, with an actionable error when offline."""
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, http.client.HTTPException) as err:
        file = Path(weights.url).name
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(
            f"the ImageNet weights {weights} could not be downloaded from {weights.url} ({err}). "
            f"Use pretrained=False, or download {file} elsewhere and place it in {cache}/{file}."
        ) from err


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """Linear layer with torchvision's VGG/MobileNetV2 init: N(0, 0.01) weights, zero bias."""
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, 0, 0.01)
    nn.init.zeros_(layer.bias)
    return layer
