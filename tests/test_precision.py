"""The precision rule: device and CPU capability -> autocast dtype, memory layout and grad scaler."""
import pytest
import torch

from kdutils.precision import autocast, batch_to, cpu_has_native_bf16, describe, model_to, precision_for, record


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
