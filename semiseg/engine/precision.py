"""Where and how a run computes: CPU threads, the concrete precision of ``train.precision:
auto``, the autocast context it implies, batches moved to the device (channels-last when asked)
and ``train.deterministic``. Set up by the trainer; ``semiseg bench`` and ``report`` set their
threads here too."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from semiseg.errors import SemisegError


def set_threads(threads) -> int:
    """``train.threads`` (or ``--threads``): ``"auto"`` keeps torch's default, a number sets
    ``torch.set_num_threads``. Returns the number of threads now in use."""
    if threads not in (None, "auto"):
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def set_deterministic(device: torch.device) -> None:
    """``train.deterministic: true``: deterministic kernels everywhere they exist.

    On the CPU every kernel a run uses has a deterministic version, so a non-deterministic one is
    an error (``warn_only=False``): a killed and resumed run equals an uninterrupted one bit for
    bit (docs/runs-and-checkpoints.md). On CUDA some kernels every segmentation step needs have none in PyTorch (the
    summed cross-entropy's ``nll_loss2d`` forward, the backward of bilinear upsampling and of
    adaptive average pooling): strict mode would stop at the first loss. There the mode is
    ``warn_only=True``: deterministic cuDNN and cuBLAS (``CUBLAS_WORKSPACE_CONFIG=:4096:8``,
    unless already set, as cuBLAS asks) and a warning naming each kernel that is not."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True, warn_only=False)


def cpu_has_native_bf16(cpuinfo: Optional[str] = None) -> bool:
    """True when the CPU executes bf16 dot products natively (AVX-512 BF16 or AMX), read from
    ``/proc/cpuinfo`` (or the given text); False where that cannot be read. Without them bf16 is
    emulated and slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision: auto`` (the default) is ``bf16`` on a CPU with native bf16 and ``fp32``
    everywhere else, CUDA included.

    Measured on the CamVid-CPU v1 protocol (BENCHMARKS.md): on an AVX-512 BF16 CPU, bf16 autocast
    makes the UniMatch step 1.9x faster at unchanged mIoU. On CUDA nothing has been measured
    here yet, so ``auto`` keeps fp32 there; ``bf16`` and ``fp16`` are one key away."""
    if precision != "auto":
        return precision
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast_factory(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise SemisegError("config error: key 'train.precision': fp16 needs CUDA; use bf16 on the CPU")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Optional[dict], device: torch.device, channels_last: bool = False) -> Optional[dict]:
    if batch is None:
        return None
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out
