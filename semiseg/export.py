"""``semiseg export``: the inference network of a checkpoint as an ONNX model.

The exported graph is the network alone (:meth:`Method.inference_model`): input ``image``, a
normalised float32 batch ``N x 3 x H x W`` (``(x / 255 - data.mean) / data.std``, RGB); output
``logits``, ``N x K x H x W`` (the network upsamples to the input size). Batch, height and width
are dynamic axes; for a plain-ViT encoder only the batch is (see below). Evaluation modes (sliding window, flips, scales) and the resize back to the
original image size are pre/post-processing the caller does, as :class:`semiseg.api.Predictor`
does in Python. Normalisation constants, class names and the input size the model was trained
at are written into the ONNX ``metadata_props``.

The legacy TorchScript-based exporter is used (``torch.onnx.export(..., dynamo=False)``): the
dynamo exporter needs ``onnxscript``, which is not a dependency. It needs the ``onnx`` package
(``pip install 'semiseg[export]'``); ``onnxruntime`` is only needed to check the result
(``verify=True``).

A plain ViT (an encoder with a ``patch_size``) resamples its position embeddings to the input's
patch grid with Python arithmetic, which the tracer records as constants: its graph would only
run at the traced size. Such a network is exported for a fixed input of ``size`` x ``size``
(default ``data.crop_size``) with a dynamic batch, and the metadata says so
(``semiseg.fixed_size``); resize or tile to that size before calling it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from semiseg.errors import SemisegError

FORMATS = ("onnx",)
DEFAULT_OPSET = 17


class ExportError(SemisegError):
    exit_code = 6


class _Logits(nn.Module):
    """The network as a plain ``image -> logits`` module (float32 output)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image).float()


def export_onnx(checkpoint: str | Path, out: str | Path, which: str = "auto", opset: int = DEFAULT_OPSET,
                size: Optional[int] = None, dynamic: bool = True, overrides=None, verify: bool = False,
                log: Optional[Callable[[str], None]] = None) -> Path:
    """Write the ONNX model of ``checkpoint`` (a file or run directory) to ``out``; returns it.

    ``size`` is the side of the example input used for tracing (default: ``data.crop_size``).
    With ``verify`` the file is run in onnxruntime on a second, differently sized input and
    compared with PyTorch (raises ExportError beyond 1e-3 relative to the logit range); the
    verdict, with the difference found, goes to ``log``.
    """
    try:
        import onnx  # noqa: F401  (torch.onnx needs it to serialise)
    except ImportError:
        raise ExportError("export --format onnx needs the onnx package: pip install 'semiseg[export]'") from None
    from semiseg.api import build_method_from_checkpoint

    cfg, method, meta = build_method_from_checkpoint(checkpoint, overrides, "cpu")
    which = method.model_name(which)  # "auto" -> the network it stands for, as recorded in the metadata
    net = _Logits(method.inference_model(which)).eval()
    side = int(size or cfg.eval.crop_size or cfg.data.crop_size)
    channels = cfg.model.in_channels  # 1 for the medical UNet (acdc)
    if cfg.model.siamese:  # change detection: the pair stacked on the channel axis
        channels *= 2
    example = torch.randn(1, channels, side, side)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fixed_size = getattr(net.net, "patch_size", None) is not None  # a plain ViT: see the module docstring
    if fixed_size:
        axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
    else:
        axes = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic (it stays dynamic)
            torch.onnx.export(net, (example,), str(out), input_names=["image"], output_names=["logits"],
                              dynamic_axes=axes if dynamic else None, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
    except SemisegError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"export of {checkpoint} to ONNX failed: {first}") from None
    _add_metadata(out, cfg, meta, method.num_classes, side, which, fixed_size)
    if fixed_size and log is not None:
        log(f"note: a plain-ViT network runs at the traced input size only: the graph takes {side}x{side} "
            "images (any batch size)")
    if verify:
        # dynamic: another batch size and a non-square size than the traced example
        if fixed_size:
            shape = (2 if dynamic else 1, channels, side, side)
        else:
            grow = (16, 32) if cfg.model.encoder == "unet" else (8, 24)  # the UNet takes multiples of 16
            shape = (2, channels, side + grow[0], side + grow[1]) if dynamic else (1, channels, side, side)
        diff = verify_onnx(out, net, shape)
        if log is not None:
            log(f"verified: onnxruntime matches PyTorch on a {'x'.join(map(str, shape))} input "
                f"(largest difference {diff:.2g}, tolerance 1e-3 of the logit range)")
    return out


def _add_metadata(path: Path, cfg, meta: dict, num_classes: int, side: int, which: str,
                  fixed_size: bool = False) -> None:
    import onnx

    model = onnx.load(str(path))
    props = {
        "semiseg.mean": json.dumps(list(cfg.data.mean)), "semiseg.std": json.dumps(list(cfg.data.std)),
        "semiseg.class_names": json.dumps(meta.get("class_names") or [f"class_{i}" for i in range(num_classes)]),
        "semiseg.num_classes": str(num_classes), "semiseg.crop_size": str(side),
        "semiseg.method": str(meta.get("method", cfg.method.name)), "semiseg.model": which,
        "semiseg.encoder": cfg.model.encoder, "semiseg.iter": str(meta.get("iter", "")),
        "semiseg.fixed_size": json.dumps([side, side] if fixed_size else None),
    }
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))


def verify_onnx(path: Path, net: nn.Module, shape: tuple[int, int, int, int], rtol: float = 1e-3) -> float:
    """Run ``path`` in onnxruntime on a random input of ``shape`` and compare with ``net``;
    returns the max abs difference (ExportError if too large)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("verifying an ONNX export needs onnxruntime: pip install 'semiseg[export]'") from None
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x).numpy()
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"image": x.numpy()})[0]
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"ONNX model {path} does not run in onnxruntime on input {tuple(shape)}: {first}") from None
    if got.shape != ref.shape:
        raise ExportError(f"ONNX model {path} returns shape {got.shape}, PyTorch {ref.shape}")
    diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max()) or 1.0
    if diff > rtol * scale + 1e-4:
        raise ExportError(f"ONNX model {path} differs from PyTorch by {diff:.3g} (logits up to {scale:.3g})")
    return diff
