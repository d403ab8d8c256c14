"""The precision rule: device and CPU capability -> autocast dtype, memory layout and grad scaler."""
import pytest
import torch

from kdutils.precision import autocast, batch_to, cpu_has_native_bf16, describe, model_to, precision_for, record

pytestmark = pytest.mark.usefixtures("single_thread")     # the fp32 reference numbers were measured at one thread


@pytest.mark.parametrize("device, kwargs, dtype, channels_last, scaler", [
    ("cuda", {"cuda_capability": (9, 0)}, torch.bfloat16, True, False),   # H100 / H200
    ("cuda", {"cuda_capability": (8, 0)}, torch.bfloat16, True, False),   # A100
    ("cuda", {"cuda_capability": (7, 5)}, torch.float16, True, True),     # T4: fp16 with a grad scaler
    ("cpu", {"cpu_bf16": True}, torch.bfloat16, True, False),             # AMX / AVX-512-BF16
    ("cpu", {"cpu_bf16": False}, None, True, False),                      # other CPUs: fp32, channels_last
    ("mps", {}, None, False, False),                                      # Apple: fp32 until measured
])
def test_rule_per_device(device, kwargs, dtype, channels_last, scaler):
    p = precision_for(device, **kwargs)
    assert (p.device_type, p.dtype, p.channels_last, p.grad_scaler) == (device, dtype, channels_last, scaler)


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_amp_false_is_plain_fp32_nchw_everywhere(device):
    p = precision_for(device, amp=False, cuda_capability=(9, 0), cpu_bf16=True)
    assert (p.dtype, p.channels_last, p.grad_scaler) == (None, False, False)


def test_describe_and_record():
    p = precision_for("cpu", cpu_bf16=True)
    assert describe(p) == "bf16 autocast, channels_last on cpu (native bf16)"
    assert record(p) == {"device": "cpu", "dtype": "bfloat16", "autocast": True, "channels_last": True,
                         "grad_scaler": False, "text": describe(p)}
    assert record(precision_for("cpu", amp=False))["dtype"] == "float32"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16(info) == torch.backends.mkldnn.is_available()
    assert not cpu_has_native_bf16(tmp_path / "missing")


def test_autocast_and_layout_follow_the_precision():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    low, plain = precision_for("cpu", cpu_bf16=True), precision_for("cpu", amp=False)
    model_to(conv, torch.device("cpu"), low)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert batch_to(x, low).is_contiguous(memory_format=torch.channels_last)
    assert batch_to(x, plain).is_contiguous()
    with autocast(low):
        assert conv(batch_to(x, low)).dtype == torch.bfloat16
    with autocast(plain):
        assert conv(x).dtype == torch.float32


# ------------------------------------------------------------------------------------------------------------------
# the rule inside fit, predict and the teacher cache

def _digits_slice():
    import dataclasses
    from kdutils.data import load_dataset
    ds = load_dataset("digits")
    return dataclasses.replace(ds, x_train=ds.x_train[:256], y_train=ds.y_train[:256], x_test=ds.x_test[:128],
                               y_test=ds.y_test[:128])


def _fit(amp: bool, **kw):
    from kdutils.models import build_model
    from kdutils.train import fit, seed_everything
    seed_everything(0)
    model = build_model("resnet10_narrow", 10, image_size=16)
    history = fit(model, _digits_slice(), epochs=2, lr=0.0075, seed=0, progress=False, device="cpu", amp=amp, **kw)
    return model, history


# kdutils before the precision rule (commit 80fdf01, where the CPU always ran fp32 NCHW), this exact run, one thread,
# on AVX-512 CPUs. fp32 kernels for other vector widths sum in another order: on an AVX2-only AMD EPYC the losses differ
# by 1.7e-5 and the parameter sum by 2e-6 (relative), far below what bf16 would change (~1e-2)
FP32_LOSSES = (2.357851505279541, 1.278846263885498)
FP32_TEST_ACC = (0.3125, 0.4140625)
FP32_PARAM_SUM = 692.0182706750254


def test_amp_false_reproduces_the_fp32_numbers():
    model, history = _fit(False)
    assert [h["loss"] for h in history] == pytest.approx(FP32_LOSSES, rel=1e-4)
    assert [h["test_acc"] for h in history] == list(FP32_TEST_ACC)
    assert float(sum(p.detach().double().sum() for p in model.parameters())) == pytest.approx(FP32_PARAM_SUM, rel=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.skipif(precision_for("cpu").dtype != torch.bfloat16, reason="this CPU has no native bf16")
def test_default_trains_in_bf16_channels_last_with_fp32_losses():
    from kdutils.train import cross_entropy_loss
    seen = {}

    def loss_fn(model, xb, yb, idx):
        seen["input_channels_last"] = xb.is_contiguous(memory_format=torch.channels_last)
        loss, logits = cross_entropy_loss(model, xb, yb, idx)
        seen["logits"], seen["loss"] = logits.dtype, loss.dtype
        return loss, logits

    model, history = _fit(True, loss_fn=loss_fn)
    assert seen == {"input_channels_last": True, "logits": torch.bfloat16, "loss": torch.float32}
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    # a different computation than fp32 (so the fp32 test above can tell them apart), but the same training
    losses = [h["loss"] for h in history]
    assert losses != pytest.approx(FP32_LOSSES, rel=1e-4)
    assert losses == pytest.approx(FP32_LOSSES, rel=0.05)


def test_predict_and_the_teacher_cache_follow_amp():
    from kdutils.distill import fill_teacher_cache
    from kdutils.models import build_model
    from kdutils.train import predict
    ds = _digits_slice()
    teacher = build_model("resnet18_narrow", 10, image_size=16).eval()
    fp32 = predict(teacher, ds.x_test, mean=ds.mean, std=ds.std, amp=False)
    default = predict(teacher, ds.x_test, mean=ds.mean, std=ds.std)
    assert fp32.dtype == default.dtype == torch.float32        # logits come back in fp32 either way
    if precision_for("cpu").dtype == torch.bfloat16:
        assert not torch.equal(fp32, default) and torch.allclose(fp32, default, atol=0.05 * float(fp32.abs().max()))
    cache: dict = {}
    for amp in (False, True):
        fill_teacher_cache(teacher, "resnet10_narrow", ds, "hinton_kd", cache=cache, device="cpu", amp=amp)
    logit_keys = [k for k in cache if isinstance(k, tuple) and k[-1] == "logits"]
    assert len(logit_keys) == (2 if precision_for("cpu").dtype is not None else 1)   # one entry per precision


def test_flat_pair_matches_the_4d_loss_in_either_layout():
    import torch.nn.functional as F
    from kdutils.feature_losses import flat_pair
    torch.manual_seed(0)
    a, b = torch.randn(4, 8, 3, 5), torch.randn(4, 8, 3, 5)
    reference = F.mse_loss(a, b)
    for a_cl in (False, True):
        for b_cl in (False, True):
            x = a.contiguous(memory_format=torch.channels_last) if a_cl else a
            y = b.contiguous(memory_format=torch.channels_last) if b_cl else b
            fx, fy = flat_pair(x, y)
            assert fx.dim() == fy.dim() == 1
            assert torch.allclose(F.mse_loss(fx, fy), reference, rtol=1e-6)
            assert torch.equal(fx - fy, flat_pair(x - y, x - y)[0])    # element for element, not just the mean
    x = a.contiguous(memory_format=torch.channels_last)
    assert flat_pair(x, b)[0].data_ptr() == x.data_ptr()           # a channels_last map is viewed, not copied


def test_cached_feature_maps_take_the_students_layout():
    from kdutils.distill import fill_teacher_cache
    from kdutils.models import build_model
    ds = _digits_slice()
    teacher = build_model("resnet18_narrow", 10, image_size=16).eval()
    for amp in (False, True):
        cache: dict = {}
        fill_teacher_cache(teacher, "resnet10_narrow", ds, "feature_kd", cache=cache, device="cpu", amp=amp,
                           teacher_layers=[5, 6, 7, 8])
        maps = [e["tensors"] for k, e in cache.items() if isinstance(k, tuple) and k[-1] != "logits"
                and isinstance(e, dict) and isinstance(e.get("tensors"), torch.Tensor) and e["tensors"].dim() == 4]
        assert maps, "no cached feature maps"
        want_cl = amp and precision_for("cpu").channels_last
        assert all(m.is_contiguous(memory_format=torch.channels_last) for m in maps) if want_cl else \
            all(m.is_contiguous() for m in maps)
