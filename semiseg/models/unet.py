"""The 2D UNet of UniMatch's medical scenario (``more-scenarios/medical/model/unet.py``, itself
SSL4MIS's), as a :class:`~semiseg.models.SegModel` encoder and head.

``model.encoder: unet`` with ``model.head: unet`` (both, or neither) builds it, trained from
scratch (``model.pretrained: false``). Defaults are the official network: one input channel
(``model.in_channels: 1``), widths ``model.unet_channels`` ``[16, 32, 64, 128, 256]`` and
per-stage dropout ``model.unet_dropout`` ``[0.05, 0.1, 0.2, 0.3, 0.5]``.

* Encoder (:class:`UNetEncoder`): an input block then four down blocks (2x2 max-pool), each
  block conv3x3-BN-LeakyReLU-Dropout-conv3x3-BN-LeakyReLU; five features at strides 1, 2, 4, 8,
  16, exposed through a ``feature_info`` like timm's.
* Head (:class:`UNetDecoder`): four up blocks (a 1x1 convolution to the skip's width, 2x
  bilinear upsampling with ``align_corners=True``, concatenation ``[skip, up]``, a conv block
  without dropout: the official ``UpBlock``'s default ``bilinear=True``, which its ``Decoder``
  keeps although the UNet's params say ``bilinear: False``) and a 3x3 classifier; it reads all
  five features (``in_index = (0, 1, 2, 3, 4)``) and returns logits at the input size. The
  parameter count equals the official network's (1.81M with the defaults).

UniMatch's feature perturbation (:func:`semiseg.methods.perturbations.feature_perturbation`)
therefore drops channels of all five features the decoder reads, as official
``decoder([cat(feat, Dropout2d(0.5)(feat)) for feat in feature])``. The input sides must be
multiples of 16 (four poolings); ``data.crop_size`` is checked.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.errors import ConfigError
from semiseg.models.heads import register_head

DEFAULT_CHANNELS = (16, 32, 64, 128, 256)
DEFAULT_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


def conv_block(in_channels: int, out_channels: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.LeakyReLU(),
        nn.Dropout(dropout),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.LeakyReLU())


class FeatureInfo:
    """What :class:`~semiseg.models.SegModel` reads of timm's ``feature_info``."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int]):
        self._channels, self._reductions = list(channels), list(reductions)

    def channels(self) -> list[int]:
        return list(self._channels)

    def reduction(self) -> list[int]:
        return list(self._reductions)


class UNetEncoder(nn.Module):
    def __init__(self, in_channels: int = 1, channels: Sequence[int] = DEFAULT_CHANNELS,
                 dropout: Sequence[float] = DEFAULT_DROPOUT):
        super().__init__()
        if len(channels) != 5 or len(dropout) != 5:
            raise ConfigError(f"config error: key 'model.unet_channels'/'model.unet_dropout': expected five values "
                              f"each, got {list(channels)} and {list(dropout)}")
        self.blocks = nn.ModuleList([conv_block(in_channels, channels[0], dropout[0])] + [
            nn.Sequential(nn.MaxPool2d(2), conv_block(channels[i - 1], channels[i], dropout[i])) for i in range(1, 5)])
        self.feature_info = FeatureInfo(channels, [1, 2, 4, 8, 16])
        self.in_channels = in_channels
        self.input_multiple = 16  # four 2x2 poolings (semiseg.models.segmodel.check_input_size)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats


class UpBlock(nn.Module):
    def __init__(self, deep: int, skip: int, out: int):
        super().__init__()
        self.reduce = nn.Conv2d(deep, skip, 1)
        self.conv = conv_block(2 * skip, out, 0.0)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.reduce(deep), scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(torch.cat((skip, up), dim=1))


class UNetDecoder(nn.Module):
    """Returns ``(logits, feature)``: logits at the shallowest feature's size (the input's) and
    the last up block's output, which the classifier reads."""

    def __init__(self, channels: Sequence[int], num_classes: int):
        super().__init__()
        c = list(channels)
        self.in_index = tuple(range(len(c)))
        self.ups = nn.ModuleList([UpBlock(c[i + 1], c[i], c[i]) for i in reversed(range(len(c) - 1))])
        self.classifier = nn.Conv2d(c[0], num_classes, 3, padding=1)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1])):
            x = up(x, skip)
        return self.classifier(x), x


@register_head("unet")
def build_unet_decoder(model_cfg, channels: Sequence[int], reductions: Sequence[int], num_classes: int) -> UNetDecoder:
    if list(reductions) != [1, 2, 4, 8, 16]:
        raise ConfigError("config error: key 'model.head': the unet head needs the unet encoder "
                          "(model.encoder: unet)")
    return UNetDecoder(channels, num_classes)


def build_unet_encoder(model_cfg) -> UNetEncoder:
    if model_cfg.head != "unet":
        raise ConfigError(f"config error: key 'model.head': the unet encoder goes with the unet head, got "
                          f"{model_cfg.head!r} (set model.head: unet)")
    if model_cfg.pretrained:
        raise ConfigError("config error: key 'model.pretrained': the medical UNet trains from scratch "
                          "(official recipe); set model.pretrained: false")
    return UNetEncoder(model_cfg.in_channels, model_cfg.unet_channels, model_cfg.unet_dropout)
