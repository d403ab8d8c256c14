"""Which number format and memory layout a device trains and infers in: one rule for CPU, CUDA and Apple MPS.

`precision_for(device)` decides; `autocast`, `model_to` and `batch_to` apply the decision; `describe` and `record`
say it (a set-up line; manifests and results.json). kdutils.train (fit, predict, evaluate, load_model),
kdutils.distill, kdutils.teacher_cache, kdutils.monitor and kdutils.kq's feature extraction all follow it, each with an
`amp` switch (amp=False: plain fp32 NCHW). Losses, KQ's statistics (Gram, SVD, eigh) and accuracies are computed
in fp32 whatever the forward pass ran in.

The rule (the CPU rows measured with benchmarks/speed_bench.py on a Sapphire Rapids and a Zen 4; the CUDA rows are the
rule kdutils.train applied on CUDA before it covered every device):
- CUDA with native bf16 (compute capability 8.0+: A100, H100, L4, RTX 30xx/40xx): bf16 autocast, channels_last.
- older CUDA (T4, V100): fp16 autocast with a gradient scaler, channels_last.
- a CPU with native bf16 kernels (Intel AMX or AVX-512-BF16, e.g. Sapphire Rapids, Zen 4): bf16 autocast,
  channels_last (2-3x fp32 NCHW in a training step of the course's models on both; without AMX, Zen 4's bf16
  matmul peak is only 2.2x its fp32 one, and the gain is nearer 2x).
- any other CPU: fp32, channels_last (convolutions still gain from the layout; bf16 would be emulated, slower).
- Apple MPS: fp32, contiguous (not measured: no Mac was at hand; see kdutils.train.default_device).
- `amp=False`: fp32, contiguous NCHW on every device -- exactly the code path of kdutils before this rule.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")   # /proc/cpuinfo flags of CPUs whose oneDNN kernels run bf16 natively


class Precision(NamedTuple):
    """What a device computes in: autocast dtype (None: plain fp32), memory layout, grad scaler, and why."""
    device_type: str
    dtype: torch.dtype | None
    channels_last: bool
    grad_scaler: bool
    reason: str


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU runs bf16 matrix kernels natively (AMX or AVX-512-BF16 flag; False off Linux)."""
    try:
        flags = {flag for line in Path(cpuinfo).read_text().splitlines() if line.startswith("flags")
                 for flag in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS) and torch.backends.mkldnn.is_available()


def precision_for(device: torch.device | str, amp: bool = True, *, cuda_capability: tuple[int, int] | None = None,
                  cpu_bf16: bool | None = None) -> Precision:
    """The precision rule above for `device`; `cuda_capability` / `cpu_bf16` override the detection (tests)."""
    kind = torch.device(device).type
    if not amp:
        return Precision(kind, None, False, False, "fp32 requested (amp=False)")
    if kind == "cuda":
        major = (cuda_capability or torch.cuda.get_device_capability(torch.device(device)))[0]
        if major >= 8:
            return Precision(kind, torch.bfloat16, True, False, "native bf16")
        return Precision(kind, torch.float16, True, True, "no native bf16 before compute capability 8.0")
    if kind == "cpu":
        if cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16:
            return Precision(kind, torch.bfloat16, True, False, "native bf16")
        return Precision(kind, None, True, False, "no native bf16 on this CPU")
    return Precision(kind, None, False, False, "low precision not measured on this device")


def describe(precision: Precision) -> str:
    """One line for a notebook's set-up output, e.g. 'bf16 autocast, channels_last on cpu (native bf16)'."""
    number = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}.get(precision.dtype,
                                                                                                  "fp32")
    layout = "channels_last" if precision.channels_last else "NCHW"
    return f"{number}, {layout} on {precision.device_type} ({precision.reason})"


def record(precision: Precision) -> dict:
    """The precision as plain JSON values, for manifests and results.json."""
    return {"device": precision.device_type, "dtype": str(precision.dtype or torch.float32).replace("torch.", ""),
            "autocast": precision.dtype is not None, "channels_last": precision.channels_last,
            "grad_scaler": precision.grad_scaler, "text": describe(precision)}


def autocast(precision: Precision) -> contextlib.AbstractContextManager:
    """The forward-pass context of `precision`: torch.autocast in its dtype, or nothing for fp32."""
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(precision.device_type, dtype=precision.dtype)


def model_to(model: nn.Module, device: torch.device, precision: Precision) -> nn.Module:
    """Move a model to the device in the layout of `precision`: channels_last, or contiguous NCHW."""
    layout = torch.channels_last if precision.channels_last else torch.contiguous_format
    return model.to(device).to(memory_format=layout)


def batch_to(xb: torch.Tensor, precision: Precision) -> torch.Tensor:
    """An image batch (N, C, H, W) in the layout of `precision`; other tensors unchanged."""
    return xb.contiguous(memory_format=torch.channels_last) if precision.channels_last and xb.dim() == 4 else xb
