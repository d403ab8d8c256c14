"""Tests of kdutils.layers: generalized-layer lists and shapes (METHOD.md section 2), taps, detaching, extraction."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdutils.layers import GenLayer, extract, generalized_layers, layer_table, standard_layers, tap
from kdutils.models import MODELS, build_model


pytestmark = pytest.mark.usefixtures("single_thread")


def _runs(*runs: tuple[int, tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Expand (count, shape) runs into one shape per layer."""
    return [shape for count, shape in runs for _ in range(count)]


# METHOD.md section 2, per-model tables at 32x32 (C x H x W, or tokens x width for ViTs).
SHAPES_32 = {
    "resnet34": _runs((4, (64, 32, 32)), (4, (128, 16, 16)), (6, (256, 8, 8)), (3, (512, 4, 4)), (1, (512,))),
    "resnet9": _runs((2, (64, 32, 32)), (1, (128, 16, 16)), (1, (256, 8, 8)), (1, (512, 4, 4)), (1, (512,))),
    "vgg19_bn": _runs((2, (64, 32, 32)), (2, (128, 16, 16)), (4, (256, 8, 8)), (4, (512, 4, 4)), (4, (512, 2, 2)),
                      (1, (512,)), (2, (4096,))),
    "vgg11_bn": _runs((1, (64, 32, 32)), (1, (128, 16, 16)), (2, (256, 8, 8)), (2, (512, 4, 4)), (2, (512, 2, 2)),
                      (1, (512,)), (2, (4096,))),
    "mobilenet_v2": _runs((1, (32, 32, 32)), (1, (16, 32, 32)), (2, (24, 16, 16)), (3, (32, 8, 8)), (4, (64, 4, 4)),
                          (3, (96, 4, 4)), (3, (160, 2, 2)), (1, (320, 2, 2)), (1, (1280, 2, 2)), (1, (1280,))),
    "vit_b": _runs((13, (65, 768))),
    "vit_et": _runs((9, (65, 192))),
    "resnet18_narrow": _runs((3, (32, 32, 32)), (2, (64, 16, 16)), (2, (128, 8, 8)), (2, (256, 4, 4)), (1, (256,))),
    "resnet10_narrow": _runs((2, (16, 32, 32)), (1, (32, 16, 16)), (1, (64, 8, 8)), (1, (128, 4, 4)), (1, (128,))),
}
COUNTS = {"resnet34": 18, "resnet9": 6, "vgg19_bn": 19, "vgg11_bn": 11, "mobilenet_v2": 20, "vit_b": 13, "vit_et": 9,
          "resnet18_narrow": 10, "resnet10_narrow": 6}


def _small_model(seed: int = 0) -> nn.Module:
    """The CPU-scale student, seeded."""
    torch.manual_seed(seed)
    return build_model("resnet10_narrow", 5)


def _no_hooks_left(model: nn.Module) -> bool:
    """True when no forward hook or pre-hook is registered anywhere in the model."""
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_tables_cover_every_model():
    assert set(SHAPES_32) == set(COUNTS) == set(MODELS)
    assert all(len(SHAPES_32[name]) == count for name, count in COUNTS.items())


@pytest.mark.parametrize("name", list(MODELS))
def test_tapped_shapes_at_32px_match_method_tables(name):
    """Shapes, forward order, one call per layer, no tapped tensor changed later in the forward (in-place ops)."""
    torch.manual_seed(0)
    model = build_model(name, 7).eval()
    layers = generalized_layers(model)
    assert len(layers) == COUNTS[name] and [layer.index for layer in layers] == list(range(len(layers)))
    modules = dict(model.named_modules())
    snapshots, handles = {}, []
    for layer in layers:  # independent hooks that copy each tensor at the moment it is produced
        keep = snapshots.setdefault(layer.index, [])
        module = modules[layer.path]
        handles.append(module.register_forward_pre_hook(lambda m, args, keep=keep: keep.append(args[0].clone()))
                       if layer.hook == "input" else
                       module.register_forward_hook(lambda m, args, out, keep=keep: keep.append(out.clone())))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), tap(model, range(len(layers))) as feats:
        logits = model(x)
    for handle in handles:
        handle.remove()
    assert logits.shape == (1, 7)
    assert list(feats) == list(range(len(layers)))  # hooks fired in index order: registration order = forward order
    assert [tuple(f.shape[1:]) for f in feats.values()] == SHAPES_32[name]
    assert all(len(copies) == 1 for copies in snapshots.values())  # each layer module runs once per forward
    assert all(torch.equal(feats[i], snapshots[i][0]) for i in feats)  # nothing mutated a stored tensor afterwards
    assert _no_hooks_left(model)


@pytest.mark.parametrize("name, expected", [
    ("resnet9", _runs((1, (64, 64, 64)), (1, (64, 32, 32)), (1, (128, 16, 16)), (1, (256, 8, 8)), (1, (512, 4, 4)),
                      (1, (512,)))),
    ("resnet34", [(64, 64, 64)] + SHAPES_32["resnet34"][1:]),  # stem before the max-pool, then the 32 px table
    ("mobilenet_v2", SHAPES_32["mobilenet_v2"]),  # stride-2 stem at 64 px: same shapes as at 32 px
    ("vgg11_bn", [s if len(s) == 1 else (s[0], 2 * s[1], 2 * s[2]) for s in SHAPES_32["vgg11_bn"]]),
    ("vit_et", SHAPES_32["vit_et"]),  # patch 8: still 64 patches + class token
])
def test_layer_table_at_64px(name, expected):
    table = layer_table(build_model(name, 7, image_size=64), 64)
    assert list(table["shape"]) == expected


def test_layer_table_columns_and_mode_restore():
    model = _small_model()
    model.train()
    model.layer2.eval()  # a mixed state must survive
    table = layer_table(model, 32)
    assert list(table.columns) == ["index", "path", "kind", "shape", "numel"]
    assert list(table["path"]) == ["relu", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "avgpool.1"]
    assert list(table["kind"]) == ["relu", "block", "block", "block", "block", "flatten"]
    assert list(table["numel"]) == [16 * 32 * 32, 16 * 32 * 32, 32 * 16 * 16, 64 * 8 * 8, 128 * 4 * 4, 128]
    assert model.training and not model.layer2.training and not model.layer2[0].bn1.training
    assert model.layer3.training and _no_hooks_left(model)


def test_kinds_and_hook_types():
    vgg_kinds = [layer.kind for layer in generalized_layers(build_model("vgg11_bn", 3))]
    assert vgg_kinds == ["relu"] * 8 + ["flatten", "fc", "fc"]
    vit = generalized_layers(build_model("vit_et", 3))
    assert vit[0] == GenLayer(0, "encoder", "embed", "input")
    assert vit[-1] == GenLayer(8, "encoder.layers.encoder_layer_7", "block", "output")
    mnv2 = generalized_layers(build_model("mobilenet_v2", 3))
    assert (mnv2[0].path, mnv2[18].path, mnv2[19].path) == ("features.0.2", "features.18.2", "classifier.0")


def test_rules_on_a_plain_stack():
    """Containers are recursed into; ReLU after a Linear is an "fc" layer; the logits are not a layer."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 3), nn.LeakyReLU()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8), nn.ReLU6(), nn.Linear(8, 2))
    layers = generalized_layers(model)
    assert [(layer.path, layer.kind) for layer in layers] == [("1", "relu"), ("2.1", "relu"), ("4", "flatten"),
                                                              ("6", "fc")]
    feats = extract(model, torch.randn(2, 3, 9, 9), [3])
    assert feats[3].shape == (2, 8) and feats[3].min() >= 0 and feats[3].max() <= 6


@pytest.mark.parametrize("name, wanted", [("vgg19_bn", [3, 7, 11, 15]), ("vgg11_bn", [1, 3, 5, 7]),
                                          ("resnet34", [3, 7, 13, 16]), ("resnet9", [1, 2, 3, 4]),
                                          ("mobilenet_v2", [3, 6, 13, 17]), ("vit_b", [2, 4, 8, 10]),
                                          ("vit_et", [1, 3, 5, 7]), ("resnet18_narrow", [2, 4, 6, 8]),
                                          ("resnet10_narrow", [1, 2, 3, 4])])
def test_standard_layer_lists(name, wanted):
    assert standard_layers(name) == wanted


@pytest.mark.parametrize("name", ["resnet18_narrow", "resnet10_narrow", "resnet34", "resnet9"])
def test_standard_layers_end_the_resolution_stages(name):
    """For the ResNets the standard layers are the last block of each stage (shape change follows them)."""
    shapes = SHAPES_32[name]
    stage_ends = [i for i in range(1, len(shapes) - 1) if shapes[i] != shapes[i + 1]]
    assert standard_layers(name) == stage_ends


def test_detach_at_trains_only_the_head():
    model = _small_model()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with tap(model, [1, 4], detach_at=4) as feats:
        F.cross_entropy(model(x), y).backward()
    assert feats[4].requires_grad and feats[4].grad_fn is not None  # the dict keeps the undetached tensor
    assert feats[1].requires_grad
    for path, param in model.named_parameters():
        if path.startswith("fc."):
            assert param.grad is not None and param.grad.abs().sum() > 0
        else:
            assert param.grad is None or not param.grad.any(), path
    # the stored layer still carries a graph into the backbone (for the feature loss)
    feats[4].sum().backward()
    assert model.conv1.weight.grad.abs().sum() > 0
    assert _no_hooks_left(model)


def test_without_detach_the_backbone_gets_ce_gradients():
    model = _small_model()
    with tap(model, [4]):
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    assert model.conv1.weight.grad.abs().sum() > 0 and model.layer4[0].conv2.weight.grad.abs().sum() > 0


def test_detach_at_vit_embedding_uses_the_pre_hook():
    torch.manual_seed(0)
    model = build_model("vit_et", 3)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # a zero head would pass no gradient at all
    with tap(model, [0], detach_at=0) as feats:
        F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2])).backward()
    assert feats[0].shape == (2, 65, 192) and feats[0].grad_fn is not None
    assert model.conv_proj.weight.grad is None and model.class_token.grad is None
    assert model.encoder.pos_embedding.grad.abs().sum() > 0
    assert model.encoder.layers[0].mlp[0].weight.grad.abs().sum() > 0


def test_tap_stores_the_latest_pass_and_cleans_up_after_errors():
    model = _small_model().eval()
    x1, x2 = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref1 = extract(model, x1, [5])[5]
        with tap(model, [5]) as feats:
            model(x1)
            assert torch.equal(feats[5], ref1)
            logits2 = model(x2)
            assert not torch.allclose(feats[5], ref1)
            assert torch.allclose(model.fc(feats[5]), logits2)
    with pytest.raises(KeyError):
        with tap(model, [0, 2], detach_at=3):
            raise KeyError("boom")
    assert _no_hooks_left(model)


def test_extract_stops_after_the_deepest_layer():
    model = _small_model().eval()
    x = torch.randn(2, 3, 32, 32)
    calls = {"layer4": 0, "fc": 0}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda m, a, o, n=name: calls.__setitem__(n, calls[n] + 1))
    with torch.no_grad(), tap(model, [1, 3]) as full:
        model(x)
    assert calls == {"layer4": 1, "fc": 1}
    with torch.no_grad():
        early = extract(model, x, [3, 1, 3])
    assert calls == {"layer4": 1, "fc": 1}  # nothing after layer 3 ran
    assert sorted(early) == [1, 3] and all(torch.equal(early[i], full[i]) for i in (1, 3))
    assert not early[3].requires_grad and not model.training
    late = extract(model, x, [3], stop_early=False)
    assert calls == {"layer4": 2, "fc": 2} and torch.equal(late[3], full[3])
    assert all(len(m._forward_hooks) == (1 if m in (model.layer4, model.fc) else 0) for m in model.modules())


def test_extract_vit_embedding_skips_the_encoder():
    model = build_model("vit_et", 3).eval()
    ran = []
    model.encoder.layers[0].register_forward_hook(lambda *args: ran.append(True))
    feats = extract(model, torch.randn(1, 3, 32, 32), [0])
    assert feats[0].shape == (1, 65, 192) and ran == []
    assert torch.equal(feats[0][:, 0], model.class_token.detach()[:, 0])  # class token first, no position


def test_errors_are_clear():
    model = _small_model()
    with pytest.raises(IndexError, match="index 6 out of range.*6 generalized layers.*0..5"):
        with tap(model, [1, 6]):
            pass
    with pytest.raises(IndexError, match="index -1 out of range"):
        extract(model, torch.randn(1, 3, 32, 32), [-1])
    with pytest.raises(IndexError, match="index 9 out of range"):
        with tap(model, [1], detach_at=9):
            pass
    with pytest.raises(ValueError, match="at least one"):
        extract(model, torch.randn(1, 3, 32, 32), [])
    with pytest.raises(ValueError, match="no standard layers for 'resnet50'.*resnet34"):
        standard_layers("resnet50")
    assert _no_hooks_left(model)
