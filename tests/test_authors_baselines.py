"""SimKD and SemCKD as the paper's released code runs them (METHOD.md section 6, 9.7, 9.8): every value here is
computed again in the test from the modules and a few lines of arithmetic, not by the helpers under test."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdutils.checkpoints import load_checkpoint
from kdutils.data import batches
from kdutils.distill import distill, distill_loss, gradient_flow
from kdutils.feature_losses import semckd_attention, semckd_modules, simkd_student
from kdutils.layers import extract, model_tail
from kdutils.models import build_model
from kdutils.train import fit, seed_everything

TEACHER, STUDENT = "resnet18_narrow", "resnet10_narrow"     # standard layers (2, 4, 6, 8) and (1, 2, 3, 4)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher():
    seed_everything(11)
    return build_model(TEACHER, 10).eval().requires_grad_(False)


def first_batch(ds, n=8):
    return next(batches(ds.x_train, ds.y_train, n, mean=ds.mean, std=ds.std, with_index=True))


def outputs(model, paths, x):
    """The outputs of the named modules on one forward pass, read with plain forward hooks."""
    got = {}
    handles = [model.get_submodule(p).register_forward_hook(lambda _m, _a, out, p=p: got.__setitem__(p, out))
               for p in paths]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return [got[p] for p in paths]


def projector_params(c_in, c_out):
    """1x1 conv c_in -> 2 c_out, BN, 3x3 conv 2 c_out -> 2 c_out, BN, 1x1 conv 2 c_out -> c_out; no biases."""
    hidden = 2 * c_out
    return c_in * hidden + 2 * hidden + 9 * hidden * hidden + 2 * hidden + hidden * c_out


# ------------------------------------------------------------------------------------------------------------ SimKD

def test_simkd_distils_every_pair_and_classifies_through_the_eval_mode_tail(tiny, teacher):
    seed_everything(0)
    net = simkd_student(teacher, build_model(STUDENT, 10), [1, 2, 3, 4], [2, 4, 6, 8], 32, seed=0).train()
    assert len(net.projectors) == 4
    xb, yb, idx = first_batch(tiny)
    terms = {}
    # augment=True: the teacher runs on the batch (fp32), so the cached fp16 targets do not blur the comparison
    with distill_loss(teacher, net, tiny, "simkd", teacher_layers=[2, 4, 6, 8], student_layers=[1, 2, 3, 4],
                      record=terms, device="cpu", batch_size=8, augment=True, progress=False) as (loss_fn, _):
        loss_fn(net, xb, yb, idx)
    # by hand: the student's four blocks, one projector each onto the teacher's block of the same resolution
    with torch.no_grad():
        f_s = outputs(net.student, ["layer1.0", "layer2.0", "layer3.0", "layer4.0"], xb)
        f_t = outputs(teacher, ["layer1.1", "layer2.1", "layer3.1", "layer4.1"], xb)
        projected = [p(f) for p, f in zip(net.projectors, f_s)]
        mse = sum(((p - t) ** 2).mean() for p, t in zip(projected, f_t)) / 4          # weight 1/4 per pair
        # the deepest projection through the teacher's own last block, pool and fc, all in eval mode
        logits = teacher.fc(teacher.avgpool(teacher.layer4[1](projected[3])))
        ce = F.cross_entropy(logits, yb)
    assert [tuple(p.shape[1:]) for p in projected] == [(32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert terms["feature"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)          # tail on the teacher's BN statistics
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(xb), teacher.fc(teacher.avgpool(teacher.layer4[1](
            net.projectors[3](outputs(net.student, ["layer4.0"], xb)[0])))), atol=1e-5)   # the same path at test time

    flow = gradient_flow(teacher, net, tiny, "simkd", teacher_layers=[2, 4, 6, 8], student_layers=[1, 2, 3, 4],
                         batch_size=8)
    ce_grad, mse_grad = flow["|grad| from CE"], flow["|grad| from feature MSE"]
    assert all(mse_grad[f"projectors.{i}.0.weight"] > 0 for i in range(4))       # every pair is distilled
    assert all(ce_grad[f"projectors.{i}.0.weight"] == 0 for i in range(3))       # only the deepest feeds the tail
    assert ce_grad["projectors.3.0.weight"] > 0 and ce_grad["tail.0.conv1.weight"] > 0
    assert mse_grad["tail.0.conv1.weight"] == 0 and mse_grad["student.conv1.weight"] > 0


def test_simkd_with_k_pairs_uses_the_deepest_and_a_finished_run_reloads(tiny, teacher, tmp_path):
    kw = dict(student_layers=[3, 4], epochs=1, lr=0.005, batch_size=8, progress=False, device="cpu",
              checkpoint=tmp_path / "simkd.pt")
    history = distill(teacher, STUDENT, tiny, "simkd", **kw)
    meta = load_checkpoint(tmp_path / "simkd.pt")["meta"]
    assert meta["student_layers"] == [3, 4] and meta["teacher_layers"] == [6, 8]     # the two deepest pairs
    student_params = sum(p.numel() for p in build_model(STUDENT, 10).parameters())
    tail = sum(p.numel() for n, p in teacher.named_parameters() if n.startswith(("layer4.1.", "fc.")))
    # student layers 3, 4 (64, 128 channels) onto teacher layers 6, 8 (128, 256 channels)
    projectors = projector_params(64, 128) + projector_params(128, 256)
    assert history[0]["params"] == student_params + projectors + tail
    again = distill(teacher, STUDENT, tiny, "simkd", **kw)                  # finished: loads every projector back
    assert again[0]["test_acc"] == history[0]["test_acc"] and again[0]["params"] == history[0]["params"]


def test_simkd_resnet34_to_resnet9_parameter_count():
    torch.manual_seed(0)
    teacher = build_model("resnet34", 10).eval().requires_grad_(False)
    student = build_model("resnet9", 10)
    n_student = sum(p.numel() for p in student.parameters())
    net = simkd_student(teacher, student, [1, 2, 3, 4], [3, 7, 13, 16], 32)
    tail = sum(p.numel() for n, p in teacher.named_parameters() if n.startswith(("layer4.2.", "fc.")))
    widths = [64, 128, 256, 512]                       # resnet9 and resnet34 stages have the same channels
    added = sum(projector_params(c, c) for c in widths[:3])
    assert added == 3_444_224                          # the three projectors the deepest pair alone lacked
    assert sum(p.numel() for p in net.parameters()) == n_student + added + projector_params(512, 512) + tail


def test_simkd_tail_stays_in_eval_mode_with_the_teachers_statistics(tiny, teacher):
    seed_everything(0)
    net = simkd_student(teacher, build_model(STUDENT, 10), [1, 2, 3, 4], [2, 4, 6, 8], 32, seed=0)
    tail_bns = [m for m in net.tail.modules() if isinstance(m, nn.BatchNorm2d)]
    teacher_bns = [m for m in teacher.layer4[1].modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(tail_bns) == len(teacher_bns) == 2
    gamma = [bn.weight.detach().clone() for bn in tail_bns]
    student_mean = net.student.bn1.running_mean.clone()
    with distill_loss(teacher, net, tiny, "simkd", teacher_layers=[2, 4, 6, 8], student_layers=[1, 2, 3, 4],
                      device="cpu", batch_size=8, progress=False) as (loss_fn, extra):
        fit(net, tiny, epochs=1, lr=0.005, batch_size=8, loss_fn=loss_fn, extra=extra, device="cpu",
            progress=False)
    net.train()
    assert net.student.training and all(p.training for p in net.projectors)
    assert not any(m.training for m in net.tail.modules())
    for bn, ref, g in zip(tail_bns, teacher_bns, gamma):
        assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
        assert not torch.equal(bn.weight, g)                                   # ... though the tail is trained
    assert not torch.equal(net.student.bn1.running_mean, student_mean)       # the student's BN does update


# ------------------------------------------------------------------------------------------------- model_tail

def test_vgg_tail_starts_at_the_relu_and_reproduces_the_logits():
    torch.manual_seed(0)
    vgg = build_model("vgg19_bn", 10, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = vgg(x)
        feature = extract(vgg, x, [15])[15]                      # its last standard layer, 512 x 2 x 2
        tail = model_tail(vgg, 15)
        kept = feature.clone()
        out = tail(feature)
    assert isinstance(tail[0], nn.ReLU) and isinstance(tail[1], nn.MaxPool2d)
    assert sum(p.numel() for p in tail.parameters()) == sum(
        p.numel() for n, p in vgg.named_parameters() if n.startswith("classifier."))   # no conv, no BN re-applied
    assert torch.equal(out, logits) and torch.equal(feature, kept)     # exact, and the input is not overwritten
    assert not tail.training and all(p.requires_grad for p in tail.parameters())


@pytest.mark.parametrize("name, index, before, block", [("resnet18_narrow", 8, 7, "layer4.1"),
                                                        ("vit_et", 7, 6, "encoder.layers.encoder_layer_6")])
def test_resnet_and_vit_tails_reapply_the_block(name, index, before, block):
    torch.manual_seed(0)
    model = build_model(name, 10, image_size=32).eval()
    if hasattr(model, "heads"):                                 # open the zero-initialised ViT head
        nn.init.normal_(model.heads.head.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feature = extract(model, x, [before])[before]           # the input of the block that produces `index`
        tail = model_tail(model, index)
        out = tail(feature)
    own = model.get_submodule(block)
    assert tail[0] is not own and type(tail[0]) is type(own)
    assert all(torch.equal(a, b) for a, b in zip(tail[0].state_dict().values(), own.state_dict().values()))
    assert torch.allclose(out, logits, atol=1e-5) and not tail.training


# ------------------------------------------------------------------------------------------------------ SemCKD

def test_semckd_attention_mlp_two_leaky_layers_then_l2():
    torch.manual_seed(0)
    s_unique, t_unique = [(4, 4, 4), (6, 2, 2)], [(5, 4, 4), (3, 2, 2)]
    s_shapes = [s for s in s_unique for _ in t_unique]
    t_shapes = [t for _ in s_unique for t in t_unique]
    modules = semckd_modules(s_shapes, t_shapes, 2, 2, batch_size=4)
    student = [torch.randn(4, *sh) for sh in s_unique]
    teacher = [torch.randn(4, *sh) for sh in t_unique]

    def leaky(v, slope):
        return torch.where(v > 0, v, slope * v)

    def embed(f, mlp, slope=0.01, last=True):
        first, second = [m for m in mlp if isinstance(m, nn.Linear)]
        g = f.flatten(1) @ f.flatten(1).T                                # B x B dot products
        h = leaky(g @ first.weight.T + first.bias, slope) @ second.weight.T + second.bias
        h = leaky(h, slope) if last else h
        return h / h.norm(dim=1, keepdim=True)

    def weights(**kw):
        q = [embed(f, m, **kw) for f, m in zip(student, modules["query"])]
        k = [embed(f, m, **kw) for f, m in zip(teacher, modules["key"])]
        return torch.stack([torch.stack([(qs * kt).sum(1) for kt in k], 1).softmax(1) for qs in q])   # (S, B, T)

    with torch.no_grad():
        got, want = semckd_attention(student, teacher, modules), weights()
        old = weights(slope=0.1, last=False)                   # the former MLP: LeakyReLU(0.1) once, none after
    assert got.shape == (2, 4, 2) and torch.allclose(got.sum(-1), torch.ones(2, 4))
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(old, want, atol=1e-3)            # the two MLPs give visibly different weights
