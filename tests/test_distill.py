"""distill: loss values by hand, projector shapes and alignment, gradient isolation of the CE-free head, the teacher
cache (reuse, invalidation, on-the-fly fallback), every method end to end, and the teacher left untouched."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdutils.checkpoints import load_checkpoint
from kdutils.data import batches
from kdutils.distill import METHODS, distill, distill_loss, fill_teacher_cache, kd_loss
from kdutils.feature_losses import feature_loss, make_projectors
from kdutils.feature_maps import feature_map, pair_layers, teacher_targets
from kdutils.layers import extract, standard_layers
from kdutils.models import build_model
from kdutils.train import seed_everything, state_fingerprint

TEACHER, STUDENT = "resnet18_narrow", "resnet10_narrow"
KQ_LIKE = [5, 6, 7, 8]   # deep teacher layers, as KQ picks them; fixed here so the tests need no KQ run
# end-to-end runs use a second resnet10_narrow as the teacher (9x cheaper than resnet18_narrow on a shared CPU);
# its deep layers 2..5 end in the pooled 128-vector, so they also exercise the vector and student-pooling cases
SMALL, SMALL_LAYERS = "resnet10_narrow", [2, 3, 4, 5]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher():
    seed_everything(123)
    return build_model(SMALL, 10).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def shared_cache():
    """One teacher cache for the module (keys hold the teacher's fingerprint, so sharing it is safe)."""
    return {}


def one_batch(ds, n=8):
    xb, yb, idx = next(batches(ds.x_train, ds.y_train, n, mean=ds.mean, std=ds.std, with_index=True))
    return xb, yb, idx


def count_forwards(model):
    """Attach a counter of the model's forward calls (a pre-hook on the root, so aborted forwards count too)."""
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


# ---------------------------------------------------------------------------------------------------- loss values

def test_kd_loss_hand_computed_and_t2_scaling():
    # teacher softmax [0.75, 0.25] against a uniform student: KL = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.1308120...
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    zs = torch.zeros(1, 2)
    assert kd_loss(zs, torch.tensor([[math.log(3.0), 0.0]]), temperature=1) == pytest.approx(kl, rel=1e-6)
    # at T = 2 the logits 2 ln 3 soften to the same distribution: the value is T^2 = 4 times the KL
    assert kd_loss(zs, torch.tensor([[2 * math.log(3.0), 0.0]]), temperature=2) == pytest.approx(4 * kl, rel=1e-6)
    # batchmean: a batch of [that row, identical logits] averages KL over the 2 rows
    zt = torch.tensor([[4 * math.log(3.0), 0.0], [1.0, 1.0]])
    assert kd_loss(torch.zeros(2, 2), zt) == pytest.approx(16 * kl / 2, rel=1e-6)
    # general case against the definition: T^2 * mean_b sum_c p_t (log p_t - log p_s)
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 7, generator=g), 3 * torch.randn(5, 7, generator=g)
    p_t, p_s = F.softmax(zt / 4, 1), F.softmax(zs / 4, 1)
    assert kd_loss(zs, zt) == pytest.approx((16 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()).item(), rel=1e-5)
    assert kd_loss(zt, zt).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_loss_hand_computed():
    # pair 1: student 1x2x2 (native) vs teacher 1x4x4 -> the teacher is pooled to 2x2
    # pair 2: student vector (2,) vs teacher 1x2x2 -> the teacher is pooled to 1x1
    # pair 3: student 1x4x4 vs teacher 1x2x2 -> the student is pooled to 2x2, then projected
    s_shapes, t_shapes = [(1, 2, 2), (2,), (1, 4, 4)], [(1, 4, 4), (1, 2, 2), (1, 2, 2)]
    proj = make_projectors(s_shapes, t_shapes)
    with torch.no_grad():
        proj[0].weight.fill_(2.0)
        proj[1].weight.copy_(torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
        proj[2].weight.fill_(1.0)
    student = [torch.tensor([1.0, 2, 3, 4]).view(1, 1, 2, 2), torch.tensor([[1.0, -1.0]]),
               torch.arange(16.0).view(1, 1, 4, 4)]
    teacher_raw = [torch.arange(16.0).view(1, 1, 4, 4), torch.tensor([1.0, 2, 3, 5]).view(1, 1, 2, 2),
                   torch.zeros(1, 1, 2, 2)]
    targets = teacher_targets(teacher_raw, s_shapes, t_shapes)
    assert targets[0].flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert targets[1].shape == (1, 1, 1, 1) and targets[1].item() == 2.75
    # MSEs: (0.25+0.25+20.25+20.25)/4 = 10.25; (0 - 2.75)^2 = 7.5625; (2.5^2+4.5^2+10.5^2+12.5^2)/4 = 73.25
    loss = feature_loss(student, targets, proj)
    assert loss.item() == pytest.approx((10.25 + 7.5625 + 73.25) / 3)
    assert loss.dtype == torch.float32


def test_pair_layers_depth_order_and_errors():
    assert pair_layers([4, 1, 3, 2], [15, 12, 14, 13]) == [(1, 12), (2, 13), (3, 14), (4, 15)]
    with pytest.raises(ValueError, match="as many teacher layers"):
        pair_layers([1, 2, 3, 4], [12, 13])
    with pytest.raises(ValueError, match="repeat"):
        pair_layers([1, 1], [2, 3])


# ---------------------------------------------------------------------------------------------------- shapes

def test_projector_shapes_cnn_pair():
    student, teacher = build_model(STUDENT, 10), build_model(TEACHER, 10)
    x = torch.zeros(2, 3, 32, 32)
    s_feats = extract(student.eval(), x, standard_layers(STUDENT))
    t_feats = extract(teacher.eval(), x, KQ_LIKE)
    s_shapes = [tuple(s_feats[i].shape[1:]) for i in standard_layers(STUDENT)]
    t_shapes = [tuple(t_feats[i].shape[1:]) for i in KQ_LIKE]
    assert s_shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (128, 4, 4)]
    assert t_shapes == [(128, 8, 8), (128, 8, 8), (256, 4, 4), (256, 4, 4)]
    proj = make_projectors(s_shapes, t_shapes)
    assert [(type(p), p.in_channels, p.out_channels, p.kernel_size, p.bias) for p in proj] == [
        (nn.Conv2d, 16, 128, (1, 1), None), (nn.Conv2d, 32, 128, (1, 1), None),
        (nn.Conv2d, 64, 256, (1, 1), None), (nn.Conv2d, 128, 256, (1, 1), None)]
    # compared at the smaller map: 8x8, 8x8, 4x4, 4x4 (student 32x32 and 16x16 maps are pooled down)
    targets = teacher_targets([t_feats[i] for i in KQ_LIKE], s_shapes, t_shapes)
    assert [tuple(t.shape[1:]) for t in targets] == t_shapes
    assert feature_loss([s_feats[i] for i in standard_layers(STUDENT)], targets, proj).isfinite()


def test_32x32_student_against_4x4_teacher_map():
    proj = make_projectors([(16, 32, 32)], [(256, 4, 4)])
    assert isinstance(proj[0], nn.Conv2d) and (proj[0].in_channels, proj[0].out_channels) == (16, 256)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 16, 32, 32, generator=g), torch.randn(2, 256, 4, 4, generator=g)
    target = teacher_targets([t], [(16, 32, 32)], [(256, 4, 4)])[0]
    assert torch.equal(target, t)                                   # the smaller teacher map is left as it is
    expected = F.mse_loss(proj[0](F.adaptive_avg_pool2d(s, 4)), t)  # the student map is pooled 32x32 -> 4x4
    assert feature_loss([s], [target], proj).item() == pytest.approx(expected.item(), rel=1e-6)
    # the other way round the teacher is pooled: a 4x4 student against a 32x32 teacher map
    t_big = torch.randn(2, 8, 32, 32, generator=g)
    assert torch.allclose(teacher_targets([t_big], [(16, 4, 4)], [(8, 32, 32)])[0], F.adaptive_avg_pool2d(t_big, 4))
    t_odd = torch.randn(2, 8, 5, 5, generator=g)     # sizes that do not divide: overlapping adaptive windows
    assert torch.equal(teacher_targets([t_odd], [(16, 2, 2)], [(8, 5, 5)])[0], F.adaptive_avg_pool2d(t_odd, 2))


def test_projector_shapes_vit_pair():
    vit_et, vit_b = build_model("vit_et", 10).eval(), build_model("vit_b", 10).eval()
    x = torch.zeros(1, 3, 32, 32)
    s_layers, t_layers = standard_layers("vit_et"), [9, 10, 11, 12]
    with torch.no_grad():
        s_feats, t_feats = extract(vit_et, x, s_layers), extract(vit_b, x, t_layers)
    s_shapes = [tuple(s_feats[i].shape[1:]) for i in s_layers]
    t_shapes = [tuple(t_feats[i].shape[1:]) for i in t_layers]
    assert s_shapes == [(65, 192)] * 4 and t_shapes == [(65, 768)] * 4
    proj = make_projectors(s_shapes, t_shapes)
    assert all(isinstance(p, nn.Conv1d) and (p.in_channels, p.out_channels, p.kernel_size) == (192, 768, (1,))
               and p.bias is None for p in proj)
    targets = teacher_targets([t_feats[i] for i in t_layers], s_shapes, t_shapes)
    assert [tuple(t.shape) for t in targets] == [(1, 768, 65)] * 4     # (B, width, tokens)
    assert torch.equal(targets[0], t_feats[9].transpose(1, 2))
    assert feature_map(torch.zeros(3, 65, 192), 1).shape == (3, 192, 65)
    assert feature_loss([s_feats[i] for i in s_layers], targets, proj).isfinite()
    with pytest.raises(ValueError, match="pair CNNs with CNNs"):
        make_projectors([(16, 32, 32)], [(65, 768)])


# ---------------------------------------------------------------------------------------------------- gradients

def grads(model):
    """name -> whether the parameter received a non-zero gradient."""
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


def run_terms(teacher, student, ds, method, t_layers, s_layers, cache=None):
    """Loss terms of one batch through the same loss function distill hands to fit."""
    record = {}
    with distill_loss(teacher, student, ds, method, teacher_layers=t_layers, student_layers=s_layers,
                      device="cpu", progress=False, record=record, cache=cache, batch_size=8) as (loss_fn, proj):
        xb, yb, idx = one_batch(ds)
        loss, logits = loss_fn(student, xb, yb, idx)
    assert loss.item() == pytest.approx(sum(t.item() for t in record.values()), rel=1e-6)
    return record, proj


@pytest.mark.parametrize("teacher_name,student_name,t_layers,head", [
    (TEACHER, STUDENT, KQ_LIKE, ("fc.",)),
    # ViT: the head is the last encoder block + final LayerNorm + linear head (teacher: a second vit_et)
    ("vit_et", "vit_et", [1, 2, 3, 4], ("encoder.layers.encoder_layer_7.", "encoder.ln.", "heads.")),
])
def test_ce_free_head_gets_no_gradient_into_backbone(tiny, teacher_name, student_name, t_layers, head):
    seed_everything(0)
    teacher = build_model(teacher_name, 10).eval().requires_grad_(False)
    student = build_model(student_name, 10)
    if hasattr(student, "heads"):          # torchvision zero-initialises the ViT head, which would block every
        nn.init.normal_(student.heads.head.weight, std=0.1)   # gradient into the last block; open that path
    terms, proj = run_terms(teacher, student, tiny, "feature_kd", t_layers, standard_layers(student_name))
    assert set(terms) == {"ce", "feature"}
    terms["ce"].backward(retain_graph=True)
    ce = grads(student)
    is_head = {n: n.startswith(head) for n in ce}
    assert any(is_head.values()) and not all(is_head.values())
    assert all(ce[n] for n in ce if is_head[n]), "every head parameter learns from CE"
    assert not any(ce[n] for n in ce if not is_head[n]), "no CE gradient may reach the backbone"
    assert all(p.grad is None for p in proj.parameters())
    student.zero_grad(set_to_none=True)
    terms["feature"].backward()
    mse = grads(student)
    assert not any(mse[n] for n in mse if is_head[n]), "the feature loss does not train the head"
    assert mse["conv1.weight" if "conv1.weight" in mse else "conv_proj.weight"]
    assert sum(mse.values()) >= 0.8 * sum(not h for h in is_head.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())


def test_feature_kd_ce_lets_ce_into_the_backbone(tiny, teacher, shared_cache):
    seed_everything(0)
    student = build_model(STUDENT, 10)
    terms, _ = run_terms(teacher, student, tiny, "feature_kd_ce", SMALL_LAYERS, standard_layers(STUDENT), shared_cache)
    terms["ce"].backward()
    ce = grads(student)
    assert ce["conv1.weight"] and ce["layer1.0.conv1.weight"] and ce["layer4.0.conv2.weight"] and ce["fc.weight"]


# every method's loss terms, written out (not read back from the registry)
TERMS = {"ce": {"ce"}, "hinton_kd": {"ce", "kl"}, "hinton_kd_t2": {"ce", "kl"}, "hinton_kd_std": {"ce", "kl"},
         "feature_kd": {"ce", "feature"}, "feature_kd_ce": {"ce", "feature"},
         "feature_kd_ll": {"ce", "feature", "kl"}, "standard_layers": {"ce", "feature"},
         "fitnets_kd": {"ce", "feature", "kl"}, "fitnets_kd_nokl": {"ce", "feature"},
         "fitnets_fc_kd": {"ce", "feature", "kl"}, "sp_kd": {"ce", "feature", "kl"},
         "feature_kd_s": {"ce", "feature"}, "feature_kd_i": {"ce", "feature"}, "feature_kd_e": {"ce", "feature"},
         "feature_kd_sqrt_ie": {"ce", "feature"}, "simkd": {"ce", "feature", "kl"}, "semckd": {"ce", "feature", "kl"}}
CE_FREE = ["feature_kd", "standard_layers", "feature_kd_s", "feature_kd_i", "feature_kd_e", "feature_kd_sqrt_ie"]
STANDARD = ["standard_layers", "fitnets_kd", "fitnets_kd_nokl", "fitnets_fc_kd", "sp_kd", "simkd", "semckd"]


def test_loss_terms_and_projectors_per_method(tiny, teacher, shared_cache):
    assert set(TERMS) == set(METHODS)
    for method, names in TERMS.items():
        if method == "simkd":              # trains a wrapped student; see test_simkd_predicts_through_the_teacher_tail
            continue
        uses = "feature" in names
        t_layers = standard_layers(SMALL) if method in STANDARD else SMALL_LAYERS
        terms, proj = run_terms(teacher, build_model(STUDENT, 10), tiny, method, t_layers if uses else [],
                                standard_layers(STUDENT) if uses else [], shared_cache)
        assert set(terms) == names, method
        n_proj = {"fitnets_fc_kd": 16, "sp_kd": 0, "semckd": 3}.get(method, 4) if uses else None   # semckd: 3 parts
        assert (proj is None if n_proj is None else len(proj) == n_proj), method


@pytest.mark.parametrize("method", CE_FREE)
def test_every_ce_free_method_keeps_ce_out_of_the_backbone(tiny, teacher, method):
    from kdutils.distill import gradient_flow
    seed_everything(0)
    student = build_model(STUDENT, 10)
    flow = gradient_flow(teacher, student, tiny, method, student_layers=standard_layers(STUDENT),
                         teacher_layers=standard_layers(SMALL) if method in STANDARD else SMALL_LAYERS, batch_size=8)
    backbone = flow["part"] == "backbone"
    assert backbone.sum() > 10 and (flow.loc[backbone, "|grad| from CE"] == 0).all(), method
    assert (flow.loc[~backbone, "|grad| from feature MSE"] == 0).all() and (flow.loc[~backbone, "|grad| from CE"] > 0).all()


@pytest.mark.parametrize("method", ["feature_kd_ll", "fitnets_kd_nokl", "fitnets_fc_kd", "sp_kd", "hinton_kd_std"])
def test_logit_methods_send_ce_into_the_backbone(tiny, teacher, method):
    from kdutils.distill import gradient_flow
    seed_everything(0)
    uses = "feature" in TERMS[method]
    flow = gradient_flow(teacher, build_model(STUDENT, 10), tiny, method,
                         teacher_layers=(standard_layers(SMALL) if method in STANDARD else SMALL_LAYERS) if uses else (),
                         student_layers=standard_layers(STUDENT) if uses else (), batch_size=8)
    assert flow.loc["conv1.weight", "|grad| from CE"] > 0 and flow.loc["layer1.0.conv1.weight", "|grad| from CE"] > 0
    if "kl" in TERMS[method]:
        assert flow.loc["conv1.weight", "|grad| from KL"] > 0


def test_standardized_kd_loss_hand_computed():
    from kdutils.distill import kd_loss, standardize_logits
    zs, zt = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 0.0, 3.0]])
    # z-scores with Bessel's correction: student (1,2,3): mean 2, std 1; teacher (0,0,3): mean 1, std sqrt(3)
    ss, st = torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([-1.0, -1.0, 2.0]) / math.sqrt(3.0)
    assert torch.allclose(standardize_logits(zs)[0], ss, atol=1e-5)
    assert torch.allclose(standardize_logits(zt)[0], st, atol=1e-5)
    ps, pt = torch.softmax(ss / 4, 0), torch.softmax(st / 4, 0)
    kl = float((pt * (pt.log() - ps.log())).sum())
    assert kd_loss(zs, zt, 4.0, standardize=True).item() == pytest.approx(16 * kl, rel=1e-4)
    assert kd_loss(zs, zt, 2.0).item() == pytest.approx(4 * float(
        (torch.softmax(zt[0] / 2, 0) * (torch.log_softmax(zt[0] / 2, 0) - torch.log_softmax(zs[0] / 2, 0))).sum()),
        rel=1e-5)


def test_similarity_loss_hand_computed():
    from kdutils.feature_losses import similarity_loss
    from kdutils.feature_maps import teacher_targets
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])          # normalised: (1, 0), (1, 1)/sqrt(2) -> off-diagonal 1/sqrt(2)
    t = torch.tensor([[0.0, 2.0], [0.0, 3.0]])          # normalised: both (0, 1) -> every entry 1
    targets = teacher_targets([t], [(2,)], [(2,)], kind="normalized")
    want = 2 * (1 - 1 / math.sqrt(2)) ** 2 / 4          # two off-diagonal entries differ, mean over 4
    assert similarity_loss([s], targets).item() == pytest.approx(want, rel=1e-6)
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)   # maps are flattened first
    assert similarity_loss([maps, maps], teacher_targets([maps, maps], [(3, 2, 2)] * 2, [(3, 2, 2)] * 2,
                                                         kind="normalized")).item() == pytest.approx(0.0, abs=1e-7)


def test_every_feature_method_names_one_registered_unit():
    from kdutils.distill import REGISTRY
    from kdutils.feature_losses import FEATURE_LOSSES
    assert {m.feature for m in REGISTRY.values() if m.feature} == set(FEATURE_LOSSES)
    assert [n for n, m in REGISTRY.items() if m.monitorable] == [n for n, m in REGISTRY.items() if m.feature == "mse"]
    assert [n for n, m in REGISTRY.items() if m.wraps_student] == ["simkd"]
    assert all(m.unit is None for m in REGISTRY.values() if not m.features)


def test_all_to_all_pairs_average_every_pair():
    from kdutils.distill import REGISTRY
    from kdutils.feature_losses import feature_loss, make_projectors
    from kdutils.feature_maps import teacher_targets
    assert REGISTRY["fitnets_kd"].unit.pairs([2, 1], [7, 5]) == ([1, 2], [5, 7])
    assert REGISTRY["fitnets_fc_kd"].unit.pairs([2, 1], [7, 5]) == ([1, 1, 2, 2], [5, 7, 5, 7])
    torch.manual_seed(0)
    s_shapes, t_shapes = [(2, 4, 4), (2, 4, 4), (3, 2, 2), (3, 2, 2)], [(4, 2, 2), (5, 1, 1)] * 2
    student = [torch.randn(2, *sh) for sh in s_shapes]
    teacher = [torch.randn(2, *sh) for sh in t_shapes]
    proj = make_projectors(s_shapes, t_shapes)
    targets = teacher_targets(teacher, s_shapes, t_shapes)
    each = [feature_loss([a], [b], nn.ModuleList([p])).item() for a, b, p in zip(student, targets, proj)]
    assert feature_loss(student, targets, proj).item() == pytest.approx(sum(each) / 4, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- the cache

def test_cache_reuse_and_invalidation(tiny, capsys, tmp_path):
    seed_everything(5)
    teacher = build_model(SMALL, 10)
    calls, handle = count_forwards(teacher)
    cache = {}
    kw = dict(teacher_layers=SMALL_LAYERS, epochs=1, lr=0.005, seed=0, batch_size=8, cache=cache, progress=False,
              device="cpu")
    distill(teacher, STUDENT, tiny, "feature_kd", **kw)
    first = calls[0]
    assert 1 <= first <= 2      # one cache-building pass (16 images) + one shape probe; not once per batch
    assert "cached on cpu" in capsys.readouterr().out
    distill(teacher, STUDENT, tiny, "feature_kd", **kw)
    assert calls[0] == first, "a second run with the same cache must not run the teacher"
    assert "reusing the cache" in capsys.readouterr().out
    old = {k: v for k, v in cache.items() if isinstance(v, dict)}
    assert len(old) == len(SMALL_LAYERS)         # one entry per target (teacher layer, target shape, kind)

    with torch.no_grad():                        # a new teacher checkpoint: a new key, features recomputed
        teacher.layer1[0].conv1.weight.mul_(-1.0)
    distill(teacher, STUDENT, tiny, "feature_kd", **kw)
    assert calls[0] > first
    new = {k: v for k, v in cache.items() if isinstance(v, dict) and k not in old}
    assert len(new) == len(SMALL_LAYERS)
    old_entry, new_entry = next(iter(old.values())), next(iter(new.values()))
    assert old_entry["tensors"].dtype == torch.float16
    assert not torch.equal(old_entry["tensors"], new_entry["tensors"])
    handle.remove()


def test_runs_whose_layers_overlap_share_their_cached_targets(tiny, capsys):
    seed_everything(5)
    teacher = build_model(SMALL, 10)
    cache: dict = {}
    kw = dict(epochs=1, lr=0.005, seed=0, batch_size=8, cache=cache, progress=False, device="cpu")
    distill(teacher, STUDENT, tiny, "feature_kd", teacher_layers=SMALL_LAYERS, **kw)
    first = {k: v["tensors"] for k, v in cache.items() if isinstance(v, dict)}
    capsys.readouterr()
    distill(teacher, STUDENT, tiny, "feature_kd", teacher_layers=[1, *SMALL_LAYERS[1:]], **kw)   # layer 1 in slot 0
    assert "3 of 4 targets reused" in capsys.readouterr().out
    entries = {k: v["tensors"] for k, v in cache.items() if isinstance(v, dict)}
    assert len(entries) == len(first) + 1 and all(entries[k] is t for k, t in first.items())   # one new target


@pytest.mark.parametrize("method", ["feature_kd", "hinton_kd", "fitnets_kd"])
def test_fill_teacher_cache_leaves_nothing_for_distill_to_compute(tiny, capsys, method):
    seed_everything(5)
    teacher = build_model(SMALL, 10)
    layers = {"teacher_layers": SMALL_LAYERS} if method == "feature_kd" else {}   # the others pick their own
    cache = fill_teacher_cache(teacher, STUDENT, tiny, method, cache={}, batch_size=8, device="cpu", **layers)
    assert "cached on cpu" in capsys.readouterr().out
    calls, handle = count_forwards(teacher)
    plain = distill(teacher, STUDENT, tiny, method, epochs=1, lr=0.005, seed=0, batch_size=8, cache={},
                    progress=False, device="cpu", **layers)          # a fresh cache: distill runs the teacher
    fresh = calls[0]
    capsys.readouterr()
    cached = distill(teacher, STUDENT, tiny, method, epochs=1, lr=0.005, seed=0, batch_size=8, cache=cache,
                     progress=False, device="cpu", **layers)
    handle.remove()
    assert fresh >= 1
    assert calls[0] == fresh, "distill ran the teacher although fill_teacher_cache had filled the cache"
    assert "reusing the cache" in capsys.readouterr().out
    assert [r["test_acc"] for r in cached] == [r["test_acc"] for r in plain]
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in plain], rel=1e-3)


def test_teacher_on_the_fly_with_augmentation_or_small_budget(tiny, capsys):
    seed_everything(5)
    teacher = build_model(SMALL, 10)
    calls, handle = count_forwards(teacher)
    kw = dict(teacher_layers=SMALL_LAYERS, epochs=1, lr=0.005, seed=0, batch_size=8, progress=False, device="cpu")
    distill(teacher, STUDENT, tiny, "feature_kd", augment=True, **kw)
    assert calls[0] >= 2                         # once per batch of the epoch (16 / 8)
    assert "on the fly (augmentation on" in capsys.readouterr().out
    calls[0] = 0
    distill(teacher, STUDENT, tiny, "hinton_kd", epochs=1, lr=0.005, seed=0, batch_size=8, progress=False,
            device="cpu", cache_budget_mb=0)
    assert calls[0] >= 2
    assert "budget" in capsys.readouterr().out
    handle.remove()


# ---------------------------------------------------------------------------------------------------- end to end

def test_every_method_runs_and_leaves_the_teacher_untouched(tiny, tmp_path):
    seed_everything(7)
    teacher = build_model(TEACHER, 10)       # SimKD re-applies its last standard block: one without down-sampling
    teacher.train()                              # distill freezes it while training and restores the mode after
    before = state_fingerprint(teacher)
    cache = {}
    for method in METHODS:
        ck = tmp_path / f"{method}.pt"
        layers = KQ_LIKE if "feature_kd" in method else None      # every KQ-based method
        history = distill(teacher, STUDENT, tiny, method, teacher_layers=layers, teacher_name=TEACHER, epochs=1,
                          lr=0.005, seed=0, batch_size=8, cache=cache, checkpoint=ck, progress=False, device="cpu")
        assert len(history) == 1 and {"epoch", "loss", "train_acc", "test_acc"} <= set(history[0])
        assert math.isfinite(history[0]["loss"])
        meta = load_checkpoint(ck)["meta"]
        assert meta["method"] == method and meta["seed"] == 0
        if method == "simkd":                 # all four standard pairs, as the paper's code
            assert meta["teacher_layers"] == standard_layers(TEACHER)
            assert meta["student_layers"] == standard_layers(STUDENT)
        elif method in STANDARD:
            assert meta["teacher_layers"] == standard_layers(TEACHER)
        if "feature_kd" in method:
            assert meta["teacher_layers"] == KQ_LIKE
        if "feature" in TERMS[method] and method != "simkd":
            assert meta["student_layers"] == standard_layers(STUDENT) and meta["teacher_fingerprint"] == before
    assert state_fingerprint(teacher) == before
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_same_init_and_data_order_resume_and_guards(tiny, teacher, tmp_path):
    kw = dict(epochs=1, lr=0.005, seed=3, batch_size=8, progress=False, device="cpu")
    a = distill(teacher, STUDENT, tiny, "ce", **kw)
    b = distill(teacher, STUDENT, tiny, "ce", **kw)
    assert a[0]["loss"] == b[0]["loss"] and a[0]["test_acc"] == b[0]["test_acc"]   # same init, same order

    ck = tmp_path / "fkd.pt"
    first = distill(teacher, STUDENT, tiny, "feature_kd", teacher_layers=SMALL_LAYERS, checkpoint=ck, **kw)
    calls, handle = count_forwards(teacher)
    again = distill(teacher, STUDENT, tiny, "feature_kd", checkpoint=ck, **kw)   # layers come from the checkpoint
    handle.remove()
    assert again == first and calls[0] == 0
    with pytest.raises(ValueError, match="another distillation run"):
        distill(teacher, STUDENT, tiny, "feature_kd_ce", teacher_layers=SMALL_LAYERS, checkpoint=ck, **kw)

    with pytest.raises(ValueError, match="student is the teacher"):
        distill(teacher, teacher, tiny, "ce", **kw)
    with pytest.raises(ValueError, match="unknown method"):
        distill(teacher, STUDENT, tiny, "crd", **kw)
    with pytest.raises(ValueError, match="standard layers"):
        distill(teacher, STUDENT, tiny, "standard_layers", teacher_layers=SMALL_LAYERS, teacher_name=SMALL, **kw)
    anonymous = build_model(SMALL, 10)
    anonymous.__dict__.pop("kd_name", None)     # a teacher whose architecture name is unknown
    with pytest.raises(ValueError, match="teacher_name"):
        distill(anonymous, STUDENT, tiny, "fitnets_kd", **kw)
    with pytest.raises(ValueError, match="frozen"):
        with distill_loss(build_model(SMALL, 10), build_model(STUDENT, 10), tiny, "hinton_kd"):
            pass


def test_default_teacher_layers_come_from_kq(tiny, teacher, monkeypatch, tmp_path):
    import pandas as pd

    import kdutils.distill as distill_module
    calls = []

    def fake_layer_qualities(model, dataset, *args, **kwargs):   # KQ itself is tested in test_kq.py
        calls.append(dataset.num_train)
        return pd.DataFrame({"quality": [0.1, 0.5, 0.2, 0.9, 0.8, 0.7]}, index=pd.RangeIndex(6, name="layer"))

    monkeypatch.setattr(distill_module, "layer_qualities", fake_layer_qualities)
    cache = {}
    for method in ("feature_kd", "feature_kd_ce"):
        ck = tmp_path / f"{method}.pt"
        distill(teacher, STUDENT, tiny, method, epochs=1, lr=0.005, seed=0, batch_size=8, cache=cache, checkpoint=ck,
                progress=False, device="cpu")
        assert load_checkpoint(ck)["meta"]["teacher_layers"] == [1, 3, 4, 5]   # top 4 by quality, depth order
    assert calls == [16], "KQ runs once per teacher and dataset when the cache is shared"


# the paper's four students: CE never reaches the backbone (defined from the module structure, not the gradients)
@pytest.mark.parametrize("student_name, teacher_name, t_layers, head_starts", [
    ("resnet9", SMALL, SMALL_LAYERS, ("fc.",)),
    ("vgg11_bn", SMALL, SMALL_LAYERS, ("classifier.",)),
    ("mobilenet_v2", SMALL, SMALL_LAYERS, ("features.18.", "classifier.")),     # 1x1 conv 320->1280 after layer 17
    ("vit_et", "vit_et", [1, 2, 3, 4], ("encoder.layers.encoder_layer_7.", "encoder.ln.", "heads.")),
])
def test_gradient_isolation_of_every_paper_student(tiny, student_name, teacher_name, t_layers, head_starts):
    from kdutils.distill import gradient_flow
    seed_everything(0)
    teacher = build_model(teacher_name, 10)
    student = build_model(student_name, 10)
    if hasattr(student, "heads"):          # open the zero-initialised ViT head, so CE would reach the last block
        nn.init.normal_(student.heads.head.weight, std=0.1)
    flow = gradient_flow(teacher, student, tiny, "feature_kd", teacher_layers=t_layers,
                         student_layers=standard_layers(student_name), batch_size=8)
    head = flow.index[flow["part"] == "head"]
    backbone = flow.index[flow["part"] == "backbone"]
    assert sorted(head) == sorted(n for n in flow.index if n.startswith(head_starts))   # structure, as expected
    ce, mse = flow["|grad| from CE"], flow["|grad| from feature MSE"]
    assert (ce[backbone] == 0).all(), f"CE reached {list(backbone[ce[backbone] > 0])[:3]}"
    assert (mse[head] == 0).all(), "the feature loss reached the head"
    assert (ce[head] > 0).all(), "every head tensor learns from CE"
    assert (mse[backbone] > 0).all(), f"no feature gradient for {list(backbone[mse[backbone] == 0])[:3]}"
    assert flow["classifier"].sum() >= 2 and set(flow.index[flow["classifier"]]) <= set(head)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())     # restored afterwards


def test_simkd_predicts_through_the_teacher_tail(tiny, tmp_path):
    from kdutils.distill import gradient_flow
    from kdutils.feature_losses import SimKDStudent, simkd_student
    seed_everything(0)
    teacher = build_model(TEACHER, 10).eval().requires_grad_(False)
    student = simkd_student(teacher, build_model(STUDENT, 10), [4], [8], 32, seed=0)
    assert isinstance(student, SimKDStudent) and [type(m).__name__ for m in student.tail][-2:] == ["Sequential", "Linear"]
    tail_params = sum(p.numel() for p in student.tail.parameters())
    assert tail_params == sum(p.numel() for n, p in teacher.named_parameters() if n.startswith(("layer4.1.", "fc.")))
    xb = one_batch(tiny)[0]
    assert student(xb).shape == (8, 10) and student.project(xb)[-1].shape == (8, 256, 4, 4)  # layer 8: 256x4x4
    flow = gradient_flow(teacher, student, tiny, "simkd", teacher_layers=[8], student_layers=[4], batch_size=8)
    assert flow.loc["student.conv1.weight", "|grad| from CE"] > 0                   # CE trains everything
    assert flow.loc["tail.0.conv1.weight", "|grad| from feature MSE"] == 0           # the MSE stops at the projector
    assert not any(p.grad is not None for p in teacher.parameters())                 # the teacher itself is untouched
    history = distill(teacher, STUDENT, tiny, "simkd", epochs=1, lr=0.005, batch_size=8, progress=False,
                      checkpoint=tmp_path / "simkd.pt", device="cpu")
    full = simkd_student(teacher, build_model(STUDENT, 10), standard_layers(STUDENT), standard_layers(TEACHER), 32)
    assert history[0]["params"] == sum(p.numel() for p in full.parameters())        # evaluated with the tail
    with pytest.raises(ValueError, match="down-sampling"):
        simkd_student(teacher, build_model(STUDENT, 10), [4], [7], 32)              # layer 7 = layer4.0, stride 2
    small = simkd_student(teacher, build_model(STUDENT, 10), [4], [6], 32)         # 4x4 student, 8x8 teacher map:
    assert small(xb).shape == (8, 10) and small.project(xb)[-1].shape == (8, 128, 4, 4)  # the tail pools any size


def test_semckd_loss_weights_pairs_by_attention():
    from kdutils.feature_losses import semckd_loss, semckd_modules
    torch.manual_seed(0)
    s_unique, t_unique = [(4, 4, 4), (6, 2, 2)], [(5, 4, 4), (3, 2, 2)]
    s_shapes = [s for s in s_unique for _ in t_unique]
    t_shapes = [t for _ in s_unique for t in t_unique]
    modules = semckd_modules(s_shapes, t_shapes, 2, 2, batch_size=3)
    student = [torch.randn(3, *sh) for sh in s_unique]
    teacher = [torch.randn(3, *sh) for sh in t_unique]
    loss = semckd_loss(student, teacher, s_shapes, t_shapes, modules)
    # by hand: the same attention weights and per-sample pair MSEs, summed over teacher layers, averaged
    def embed(f, mlp):
        flat = f.flatten(1)
        return F.normalize(mlp(flat @ flat.T), dim=1)
    total = 0.0
    for i, f_s in enumerate(student):
        q = embed(f_s, modules["query"][i])
        logits = torch.stack([(q * embed(f_t, modules["key"][j])).sum(1) for j, f_t in enumerate(teacher)], 1)
        w = logits.softmax(1)
        for j, f_t in enumerate(teacher):
            size = f_t.shape[2:] if f_s.shape[2] >= f_t.shape[2] else f_s.shape[2:]
            target = F.adaptive_avg_pool2d(f_t, size)
            out = modules["projectors"][2 * i + j](F.adaptive_avg_pool2d(f_s, size))
            total = total + (w[:, j] * (out - target).pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(total.item() / 2, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in modules["query"].parameters())
    assert all(p.grad is not None for p in modules["key"].parameters())


# ----------------------------------------------------------------------------------------------------------------
# loss terms per epoch and the monitor (gradient conflict, distance to the teacher)

def test_linear_cka_and_gradient_cosine_known_values():
    from kdutils.monitor import _cosine, linear_cka
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen))
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-9)   # invariant to rotation, scale, shift
    assert linear_cka(x, torch.randn(64, 20, generator=gen)) < 0.5             # unrelated features
    assert linear_cka(x, torch.zeros(64, 20)) != linear_cka(x, torch.zeros(64, 20))   # NaN: a constant feature
    a, b = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [torch.tensor([1.0, 1.0]), torch.tensor([-2.0])]
    # <a, b> = 1 - 4 = -3, |a| = sqrt(5), |b| = sqrt(6)
    assert _cosine(a, b) == pytest.approx(-3 / math.sqrt(30))
    assert _cosine([torch.zeros(2), None], b) is None


def test_stage_parameters_partition_the_backbone():
    from kdutils.monitor import stage_parameters
    from kdutils.layers import split_at_layer
    model = build_model(STUDENT, 10)
    stages = stage_parameters(model, standard_layers(STUDENT))
    assert list(stages) == [f"layer {i}" for i in standard_layers(STUDENT)]
    ids = [id(p) for params in stages.values() for p in params]
    assert len(ids) == len(set(ids))                              # disjoint
    names = dict(model.named_parameters())
    backbone = {id(names[n]) for n in split_at_layer(model, max(standard_layers(STUDENT)))[0]}
    assert set(ids) == backbone and all(stages.values())          # every backbone parameter, no empty stage


def test_monitor_measures_without_changing_the_run(tiny, teacher):
    kw = dict(teacher_layers=SMALL_LAYERS, teacher_name=SMALL, epochs=2, lr=0.005, seed=1, batch_size=8,
              progress=False, device="cpu")
    plain = distill(teacher, STUDENT, tiny, "feature_kd_ce", **kw)
    watched = distill(teacher, STUDENT, tiny, "feature_kd_ce", monitor=True, **kw)
    assert [r["loss"] for r in plain] == [r["loss"] for r in watched]          # bit-identical training
    assert [r["test_acc"] for r in plain] == [r["test_acc"] for r in watched]
    for row in watched:
        assert set(row["terms"]) == {"ce", "feature"}
        assert row["terms"]["ce"] + row["terms"]["feature"] == pytest.approx(row["loss"], rel=1e-5)
        m = row["monitor"]
        assert len(m["feature_mse"]) == len(m["feature_cka"]) == 4 and all(v > 0 for v in m["feature_mse"])
        assert list(m["grad_cosine"]) == [f"layer {i}" for i in standard_layers(STUDENT)]
        assert all(-1 <= c <= 1 for c in m["grad_cosine"].values())
    free = distill(teacher, STUDENT, tiny, "feature_kd", monitor=True, **kw)
    assert "grad_cosine" not in free[-1]["monitor"]       # no CE in a CE-free backbone: nothing to compare
    with pytest.raises(ValueError, match="monitor measures methods with paired"):
        distill(teacher, STUDENT, tiny, "sp_kd", monitor=True, **{**kw, "teacher_layers": None})


def test_monitor_cosine_matches_a_direct_computation(tiny, teacher):
    """One fixed batch, one epoch at lr 0 (the weights do not move): the recorded cosine per stage equals the cosine
    of the CE and feature gradients computed directly on that batch."""
    from kdutils.monitor import _cosine, stage_parameters
    from kdutils.precision import autocast, batch_to, precision_for
    seed_everything(0)
    student = build_model(STUDENT, 10)
    history = distill(teacher, student, tiny, "feature_kd_ce", teacher_layers=SMALL_LAYERS, teacher_name=SMALL,
                      student_name=STUDENT, epochs=1, lr=1e-12, seed=0, batch_size=16, progress=False,
                      device="cpu", monitor=1, cache_budget_mb=0)
    terms: dict = {}
    with distill_loss(teacher, student, tiny, "feature_kd_ce", teacher_layers=SMALL_LAYERS,
                      student_layers=standard_layers(STUDENT), seed=0, record=terms, device="cpu", progress=False,
                      cache_budget_mb=0) as (loss_fn, _):
        xb, yb, idx = one_batch(tiny, 16)
        student.train()
        precision = precision_for("cpu")           # the monitor measures in the precision the run trains in
        with autocast(precision):
            loss_fn(student, batch_to(xb, precision), yb, idx)
        for name, params in stage_parameters(student, standard_layers(STUDENT)).items():
            g_ce = torch.autograd.grad(terms["ce"], params, retain_graph=True, allow_unused=True)
            g_f = torch.autograd.grad(terms["feature"], params, retain_graph=True, allow_unused=True)
            assert history[0]["monitor"]["grad_cosine"][name] == pytest.approx(_cosine(g_ce, g_f), abs=1e-4)
