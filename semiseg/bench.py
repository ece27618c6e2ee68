"""``semiseg bench CONFIG``: how fast one training step of the configured method runs here.

After ``warmup`` steps, ``steps`` full training steps are timed: :meth:`Trainer.step`, the very
step ``semiseg train`` runs (batch fetch, ``train_step``, backward, gradient averaging across
ranks, ``train.grad_clip``, optimiser step, BatchNorm averaging, ``after_step``). Reported:

* ``sec_per_step`` and ``images_per_sec`` (labelled + unlabelled + CutMix-partner images);
* ``peak_memory_mb``: resident set size on the CPU, ``max_memory_allocated`` on CUDA;
* ``flops_per_step``: counted once with ``torch.utils.flop_counter`` over a whole step, with the
  backward of a grouped convolution counted as its own groups' work (:func:`conv_backward_flops`;
  PyTorch's formula counts a depthwise convolution's backward as a dense one's, which made
  EfficientNet's step ten times larger than it is);
* ``achieved_tflops`` and ``mfu``: achieved FLOP/s over the device's measured dense matmul peak
  at the run's precision (a large square matmul timed here, not a datasheet figure);
* ``loader_images_per_sec``: the data pipeline alone, with ``data.workers`` processes, so one
  can see whether loading keeps up with the step.
"""

from __future__ import annotations

import itertools
import json
import resource
import sys
import time

import torch

from semiseg.config import Config


def matmul_peak_flops(device: torch.device, precision: str, size: int = 2048, repeats: int = 5) -> float:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None) -> int:
    """FLOPs of ``aten.convolution_backward``: the forward convolution's count (the weight's shape
    already holds ``C_in / groups``) once for the input gradient and once for the weight
    gradient, as ``output_mask`` asks for them."""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` as :class:`~torch.utils.flop_counter.FlopCounterMode` counts them, with
    :func:`conv_backward_flops` for convolution backward passes."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}) as counter:
        fn()
    return counter.get_total_flops()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3, loader_batches: int = 10,
              fixed_batch: bool = False) -> dict:
    """Time ``steps`` training steps after ``warmup`` ones. ``fixed_batch``: every step takes the
    first batch of each stream again (still moved to the device each step), so the time is the
    step's computation alone, whatever the data loader's speed."""
    from semiseg.engine.precision import set_threads
    from semiseg.engine.trainer import Trainer

    import tempfile

    trainer = Trainer(cfg, run_dir=tempfile.mkdtemp(prefix="semiseg-bench-"), progress=False)
    set_threads(cfg.train.threads)
    trainer.build()
    device = trainer.device
    streams = {k: s.iterate_from(0) for k, s in trainer.streams.items()}
    if fixed_batch:
        streams = {k: itertools.repeat(next(it)) for k, it in streams.items()}
    images_per_step = sum(s.sampler.batch_size for s in trainer.streams.values())

    def step(i: int):
        trainer.step(i, streams)  # the step ``semiseg train`` runs, nothing re-implemented

    for i in range(warmup):
        step(i)
    flops = count_flops(lambda: step(warmup))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + 1 + i)
    _sync(device)
    sec = (time.perf_counter() - t0) / steps

    # The loader alone: fresh streams so the timing includes nothing but loading.
    fresh = {k: s.iterate_from(10_000) for k, s in trainer.streams.items()}
    next(iter(fresh.values()))
    t0 = time.perf_counter()
    for _ in range(loader_batches):
        for it in fresh.values():
            next(it)
    loader_ips = loader_batches * images_per_step / (time.perf_counter() - t0)
    trainer.close_streams()

    peak = matmul_peak_flops(device, trainer.precision)
    achieved = flops / sec
    return {
        "method": cfg.method.name, "encoder": cfg.model.encoder, "head": cfg.model.head,
        "crop_size": cfg.data.crop_size, "batch_size": cfg.train.batch_size,
        "images_per_step": images_per_step, "precision": trainer.precision,
        "channels_last": cfg.train.channels_last, "compile": cfg.train.compile,
        "device": str(device), "threads": torch.get_num_threads(),
        "steps": steps, "fixed_batch": fixed_batch, "sec_per_step": sec, "images_per_sec": images_per_step / sec,
        "peak_memory_mb": peak_memory_mb(device), "flops_per_step": flops,
        "achieved_tflops": achieved / 1e12, "matmul_peak_tflops": peak / 1e12, "mfu": achieved / peak,
        "loader_images_per_sec": loader_ips, "workers": cfg.data.workers,
    }


def format_bench(r: dict) -> str:
    return "\n".join([
        f"{r['method']} | {r['encoder']}+{r['head']} | crop {r['crop_size']} | {r['images_per_step']} images/step | "
        f"{r['precision']}{' channels_last' if r['channels_last'] else ''}{' compiled' if r['compile'] else ''} "
        f"on {r['device']} ({r['threads']} threads)",
        f"  {r['sec_per_step']:.3f} s/step   {r['images_per_sec']:.1f} images/s   peak memory {r['peak_memory_mb']:.0f} MB",
        f"  {r['flops_per_step'] / 1e9:.1f} GFLOP/step   {r['achieved_tflops'] * 1e3:.1f} GFLOP/s achieved   "
        f"matmul peak {r['matmul_peak_tflops'] * 1e3:.1f} GFLOP/s   MFU {100 * r['mfu']:.1f}%",
        f"  data loader alone: {r['loader_images_per_sec']:.1f} images/s with {r['workers']} workers"
        + ("  (slower than the step: the loader is the bottleneck)"
           if r["loader_images_per_sec"] < r["images_per_sec"] else ""),
    ])


def main(cfg: Config, steps: int, warmup: int, as_json: bool, fixed_batch: bool = False) -> int:
    r = run_bench(cfg, steps=steps, warmup=warmup, fixed_batch=fixed_batch)
    print(json.dumps(r) if as_json else format_bench(r))
    sys.stdout.flush()
    return 0
