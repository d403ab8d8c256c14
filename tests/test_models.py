"""Tests of kdutils.models: architectures, logits, parameter counts, ImageNet-weight loading and its errors."""
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.resnet import BasicBlock, ResNet

from kdutils import models
from kdutils.models import (MODELS, build_model, count_parameters, head_parameters, pool_patch_kernels,
                            resize_vit_state_dict)

C = 7  # number of classes used throughout


pytestmark = pytest.mark.usefixtures("single_thread")


def _vit_params(blocks: int, d: int, mlp: int, patch: int, tokens: int, classes: int) -> int:
    """Parameter count of a torchvision ViT from its sizes."""
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * mlp + mlp) + (mlp * d + d)
    return 3 * patch * patch * d + d + d + tokens * d + blocks * block + 2 * d + d * classes + classes


def _expected_params(name: str) -> int | tuple[int, int]:
    """Expected parameter count with C classes at 32 px: exact where derivable from torchvision, else a range."""
    meta = {n: w.meta["num_params"] for n, w in models._WEIGHTS.items() if w is not None}
    imagenet_head = 1000 + 1000 * {"resnet34": 512, "vgg19_bn": 4096, "vgg11_bn": 4096, "mobilenet_v2": 1280,
                                   "vit_b": 768}.get(name, 0)
    if name == "resnet34":  # 7x7 stem -> 3x3 stem, new fc
        return meta[name] - 64 * 3 * 49 + 64 * 3 * 9 - imagenet_head + 512 * C + C
    if name == "resnet9":  # resnet18 minus the second block of every stage
        resnet18 = tvm.ResNet18_Weights.IMAGENET1K_V1.meta["num_params"]
        second_blocks = sum(2 * 9 * w * w + 4 * w for w in (64, 128, 256, 512))
        return resnet18 - second_blocks - 64 * 3 * 49 + 64 * 3 * 9 - (512 * 1000 + 1000) + 512 * C + C
    if name in ("vgg19_bn", "vgg11_bn"):  # first Linear 25088 -> 512 inputs, new last Linear
        return meta[name] - 25088 * 4096 + 512 * 4096 - imagenet_head + 4096 * C + C
    if name == "mobilenet_v2":
        return meta[name] - imagenet_head + 1280 * C + C
    if name == "vit_b":
        assert meta[name] == _vit_params(12, 768, 3072, 16, 197, 1000)  # the formula matches torchvision's count
        return _vit_params(12, 768, 3072, 4, 65, C)
    if name == "vit_et":
        return _vit_params(8, 192, 576, 4, 65, C)
    return {"resnet18_narrow": (2_000_000, 3_000_000), "resnet10_narrow": (250_000, 350_000)}[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_parameter_counts_at_32px(name):
    torch.manual_seed(0)
    model = build_model(name, C).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, C)
    assert torch.isfinite(logits).all()
    expected = _expected_params(name)
    if isinstance(expected, tuple):
        assert expected[0] <= count_parameters(model) <= expected[1]
    else:
        assert count_parameters(model) == expected
    flattens = [m for m in model.modules() if isinstance(m, nn.Flatten)]
    assert len(flattens) == (0 if name.startswith("vit") else 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_at_64px(name):
    model = build_model(name, C, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, C)


def test_stem_rules_follow_image_size():
    small, large = build_model("resnet9", C, 32), build_model("resnet9", C, 64)
    assert isinstance(small.maxpool, nn.Identity) and isinstance(large.maxpool, nn.MaxPool2d)
    for model in (small, large):
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert build_model("mobilenet_v2", C, 32).features[0][0].stride == (1, 1)
    assert build_model("mobilenet_v2", C, 64).features[0][0].stride == (2, 2)
    vit32, vit64 = build_model("vit_et", C, 32), build_model("vit_et", C, 64)
    assert (vit32.patch_size, vit64.patch_size) == (4, 8)
    assert vit32.encoder.pos_embedding.shape == vit64.encoder.pos_embedding.shape == (1, 65, 192)


def test_vit_head_averages_all_tokens_after_final_layernorm():
    torch.manual_seed(0)
    model = build_model("vit_et", C).eval()
    nn.init.normal_(model.heads.head.weight)  # the default head is zero, which would make the check vacuous
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.encoder(torch.cat([model.class_token.expand(2, -1, -1), model._process_input(x)], dim=1))
        assert torch.allclose(model(x), model.heads(tokens.mean(dim=1)), atol=1e-6)
        assert not torch.allclose(model(x), model.heads(tokens[:, 0]), atol=1e-3)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*resnet34, resnet9"):
        build_model("resnet50", C)
    for name in ("resnet9", "vit_et", "resnet18_narrow", "resnet10_narrow"):
        with pytest.raises(ValueError, match=f"{name} has no ImageNet weights; use pretrained=False"):
            build_model(name, C, pretrained=True)
    with pytest.raises(ValueError, match="image_size 32 .* or 64 .*got 48"):
        build_model("vit_et", C, image_size=48)
    with pytest.raises(ValueError, match="image_size >= 32.*got 16"):
        build_model("vgg11_bn", C, image_size=16)
    with pytest.raises(ValueError, match="image_size >= 8.*got 4"):
        build_model("resnet9", C, image_size=4)
    small = build_model("resnet10_narrow", C, image_size=16).eval()  # the quick preset's digits are 16x16
    assert small(torch.zeros(2, 3, 16, 16)).shape == (2, C)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub directory, so nothing cached on this machine is used."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    return tmp_path


def test_offline_pretrained_says_what_to_do(hub_dir, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as info:
        build_model("resnet34", C, pretrained=True)
    message = str(info.value)
    assert "could not be downloaded" in message and "network is unreachable" in message
    assert "https://download.pytorch.org/models/resnet34-b627a593.pth" in message
    assert "pretrained=False" in message and str(hub_dir / "checkpoints" / "resnet34-b627a593.pth") in message


def test_pretrained_resnet34_keeps_backbone_and_replaces_stem_and_head(hub_dir, monkeypatch):
    torch.manual_seed(1)
    imagenet = ResNet(BasicBlock, [3, 4, 6, 3]).state_dict()  # stands in for the real download

    def fake_download(url, dst, *args, **kwargs):
        torch.save(imagenet, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = build_model("resnet34", C, pretrained=True)
    state = model.state_dict()
    for key in ("bn1.weight", "layer1.0.conv1.weight", "layer3.5.bn2.running_mean", "layer4.2.conv2.weight"):
        assert torch.equal(state[key], imagenet[key])
    assert state["conv1.weight"].shape == (64, 3, 3, 3) and state["fc.weight"].shape == (C, 512)
    assert (hub_dir / "checkpoints" / "resnet34-b627a593.pth").exists()


def test_pretrained_vgg11_bn_replaces_first_and_last_classifier_layers(monkeypatch):
    imagenet = {k: torch.randn_like(v) if v.is_floating_point() else v
                for k, v in build_model("vgg11_bn", 1000).state_dict().items()}
    imagenet["classifier.0.weight"] = torch.randn(4096, 25088)  # torchvision's shape; dropped on loading
    monkeypatch.setattr(models, "download_weights", lambda weights: dict(imagenet))
    state = build_model("vgg11_bn", C, pretrained=True).state_dict()
    for key in ("features.0.weight", "features.1.running_var", "features.25.weight", "classifier.3.weight"):
        assert torch.equal(state[key], imagenet[key])
    assert state["classifier.0.weight"].shape == (4096, 512) and state["classifier.6.weight"].shape == (C, 4096)
    assert not torch.equal(state["classifier.0.weight"], imagenet["classifier.0.weight"][:, :512])


def test_pretrained_vit_b_resizes_patch_kernels_and_position_embeddings(monkeypatch):
    torch.manual_seed(2)
    imagenet = tvm.vit_b_16().state_dict()
    monkeypatch.setattr(models, "download_weights", lambda weights: dict(imagenet))
    model = build_model("vit_b", C, pretrained=True)
    state = model.state_dict()
    assert torch.equal(state["encoder.layers.encoder_layer_11.mlp.3.weight"],
                       imagenet["encoder.layers.encoder_layer_11.mlp.3.weight"])
    assert torch.allclose(state["conv_proj.weight"], imagenet["conv_proj.weight"].reshape(768, 3, 4, 4, 4, 4)
                          .mean(dim=(3, 5)), atol=1e-6)
    assert torch.equal(state["encoder.pos_embedding"][0, 0], imagenet["encoder.pos_embedding"][0, 0])
    assert state["heads.head.weight"].shape == (C, 768) and not state["heads.head.weight"].any()


def test_pool_patch_kernels_averages_blocks():
    weight = torch.randn(5, 3, 16, 16)
    pooled = pool_patch_kernels(weight, 4)
    assert pooled.shape == (5, 3, 4, 4)
    assert torch.allclose(pooled[2, 1, 3, 0], weight[2, 1, 12:16, 0:4].mean())
    assert torch.allclose(pool_patch_kernels(weight, 8)[4, 2, 0, 7], weight[4, 2, 0:2, 14:16].mean())
    with pytest.raises(ValueError, match="not a multiple"):
        pool_patch_kernels(weight, 5)


@pytest.mark.parametrize("image_size, patch_size", [(32, 4), (64, 8)])
def test_resize_vit_state_dict_keeps_class_token_first(image_size, patch_size):
    pos = torch.randn(1, 1 + 14 * 14, 6)
    state = {"encoder.pos_embedding": pos, "conv_proj.weight": torch.randn(6, 3, 16, 16),
             "heads.head.weight": torch.randn(10, 6), "heads.head.bias": torch.randn(10)}
    resized = resize_vit_state_dict(state, image_size, patch_size)
    assert set(resized) == {"encoder.pos_embedding", "conv_proj.weight"}
    new = resized["encoder.pos_embedding"]
    assert new.shape == (1, 65, 6) and resized["conv_proj.weight"].shape == (6, 3, patch_size, patch_size)
    assert torch.equal(new[0, 0], pos[0, 0])  # class token is torchvision's first token and is not interpolated
    old_grid, new_grid = pos[0, 1:].reshape(14, 14, 6), new[0, 1:].reshape(8, 8, 6)
    for (i, j), (k, m) in {(0, 0): (0, 0), (0, 7): (0, 13), (7, 0): (13, 0), (7, 7): (13, 13)}.items():
        assert torch.allclose(new_grid[i, j], old_grid[k, m], atol=1e-5)  # align_corners keeps the corners
    constant = resize_vit_state_dict({"encoder.pos_embedding": torch.full((1, 197, 2), 3.0),
                                      "conv_proj.weight": torch.ones(2, 3, 16, 16)}, image_size, patch_size)
    assert torch.allclose(constant["encoder.pos_embedding"], torch.tensor(3.0))


@pytest.mark.parametrize("name, head_tensors", [("resnet10_narrow", 2), ("vgg11_bn", 6), ("mobilenet_v2", 2),
                                                ("vit_et", 2)])
def test_head_parameters_are_the_classifier_after_pooling(name, head_tensors):
    model = build_model(name, C)
    head = head_parameters(model)
    assert len(head) == head_tensors and head[-1].shape == (C,)  # ends with the C-way bias
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].split(".")[0] in ("fc", "classifier", "heads") for p in head)
    with pytest.raises(ValueError, match="no `fc`, `classifier` or `heads`"):
        head_parameters(nn.Sequential(nn.Linear(2, 2)))
