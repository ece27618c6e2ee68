"""Segmentation heads: DeepLabV3+ (as in UniMatch) and SegFormer's all-MLP head.

A head takes the encoder's feature list (shallow to deep) and returns ``(logits, feature)``:
the logits at the resolution of the shallowest feature (stride 4 for most encoders, the patch
size for a plain ViT, whose features all share it) and the
feature map the classifier reads, for methods that need per-pixel embeddings. ``in_index``
lists the features a head actually reads, so UniMatch's feature perturbation
(:func:`semiseg.methods.perturbations.feature_perturbation`) perturbs exactly those.

Every width comes from the encoder's ``feature_info``; nothing assumes a ResNet.

Heads are found by name: :func:`register_head` puts a builder ``(model_cfg, channels,
reductions, num_classes) -> head`` in :data:`HEAD_BUILDERS` under the ``model.head`` value it
answers to (the config validates the names, :data:`semiseg.config.schema.HEADS`). A new head
(e.g. ``dpt`` for ViT encoders) is a module and a builder here plus its name there.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HeadBuilder = Callable[..., nn.Module]  # (model_cfg, channels, reductions, num_classes) -> head
HEAD_BUILDERS: dict[str, HeadBuilder] = {}


def register_head(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator: build ``model.head: <name>`` with the decorated function, called as
    ``builder(model_cfg, channels, reductions, num_classes)`` with the encoder's per-feature
    widths and strides (shallow to deep)."""

    def wrap(builder: HeadBuilder) -> HeadBuilder:
        HEAD_BUILDERS[name] = builder
        return builder

    return wrap


# ASPP dilation rates per output stride: (6, 12, 18) at 16 and (12, 24, 36) at 8 are the
# DeepLabV3+ / UniMatch settings; (3, 6, 9) at 32 halves the OS16 rates in the same spirit
# (not an official setting: UniMatch never runs an undilated encoder under DeepLabV3+).
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def aspp_rates(stride: int) -> tuple[int, ...]:
    """The ASPP rates at ``stride``: :data:`ASPP_RATES`, and for a stride it lacks (a plain ViT's
    patch size 14) those of the nearest stride in it (14: the OS16 rates)."""
    return ASPP_RATES[min(ASPP_RATES, key=lambda s: (abs(s - stride), s))]


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    """Bilinear resize to ``size`` (h, w)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> ReLU."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool -> 1x1 conv-BN-ReLU -> broadcast back.

    As in the official code (and torchvision), BatchNorm sees one value per channel and image,
    so a training-mode forward needs a batch of at least two.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize(self.conv(self.pool(x)), x.shape[-2:], align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling as in UniMatch's ``ASPPModule``.

    Five parallel branches (1x1, three dilated 3x3, image pooling), each conv-BN-ReLU at
    ``channels``, concatenated and projected by a 1x1 conv-BN-ReLU. UniMatch's projection has
    no dropout (torchvision's DeepLabV3 adds Dropout(0.5) there); we follow UniMatch.
    UniMatch sets the width to ``in_channels // 8`` (256 for ResNet-50/101); here it is the
    ``channels`` argument (``model.decoder_channels``, default 256), so the head stays the
    official width on those encoders and does not shrink to 64 on a ResNet-18.
    """

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int]):
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels, 1)]
            + [conv_bn_relu(in_channels, channels, 3, dilation=r) for r in self.rates]
            + [ASPPPooling(in_channels, channels)]
        )
        self.project = conv_bn_relu(len(self.branches) * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ decoder as in UniMatch (``model/semseg/deeplabv3plus.py``).

    * low level: the shallowest feature (stride 4) -> 1x1 conv-BN-ReLU to 48 channels;
    * high level: ASPP on the deepest feature, rates from ``output_stride`` (:func:`aspp_rates`);
    * the ASPP output is upsampled (bilinear, ``align_corners=True``) to the low-level size,
      concatenated after the low-level projection, fused by two 3x3 conv-BN-ReLU at
      ``channels``, and classified by a 1x1 conv with bias.

    ``dropout`` (default 0, as UniMatch, which has none) puts ``Dropout2d(dropout)`` before the
    classifier when positive. Only the first and the last feature are read (``in_index``).
    """

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[int], num_classes: int,
                 output_stride: int, channels: int = 256, dropout: float = 0.0):
        super().__init__()
        if len(in_channels) != len(reductions) or len(in_channels) < 2:
            raise ValueError(f"expected at least two features with one reduction each, got channels "
                             f"{list(in_channels)} and reductions {list(reductions)}")
        if reductions[-1] != output_stride:
            raise ValueError(f"the deepest feature is at stride {reductions[-1]}, not output_stride {output_stride}")
        self.in_index = (0, len(in_channels) - 1)
        self.reduce = conv_bn_relu(in_channels[0], 48, 1)
        self.aspp = ASPP(in_channels[-1], channels, aspp_rates(output_stride))
        self.fuse = nn.Sequential(
            conv_bn_relu(channels + 48, channels, 3),
            conv_bn_relu(channels, channels, 3),
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = features[self.in_index[0]], features[self.in_index[1]]
        high = resize(self.aspp(high), low.shape[-2:], align_corners=True)
        feature = self.fuse(torch.cat([self.reduce(low), high], dim=1))
        return self.classifier(self.dropout(feature)), feature


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder (NVlabs/SegFormer ``SegFormerHead``).

    Each feature is linearly embedded to ``embed_dim`` (a 1x1 conv with bias, the same map as
    the official per-pixel ``nn.Linear``), upsampled to the shallowest feature's size (bilinear,
    ``align_corners=False`` as official), concatenated deepest first (``[c4, c3, c2, c1]`` as
    official), fused by a 1x1 conv-BN-ReLU, passed through ``Dropout2d(dropout)`` (0.1 in
    the official configs) and classified by a 1x1 conv. Reads every feature it is given.
    The returned feature is the fused map before the dropout.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.in_index = tuple(range(len(in_channels)))
        self.embed = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels)
        self.fuse = conv_bn_relu(len(in_channels) * embed_dim, embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        size = features[0].shape[-2:]
        embedded = [resize(embed(f), size, align_corners=False) for embed, f in zip(self.embed, features)]
        feature = self.fuse(torch.cat(embedded[::-1], dim=1))
        return self.classifier(self.dropout(feature)), feature


# ---------------------------------------------------------------------------------------------
# The registered heads. ``model.dropout`` unset keeps each head's official default.


@register_head("deeplabv3plus")
def build_deeplabv3plus(model_cfg, channels: Sequence[int], reductions: Sequence[int],
                        num_classes: int) -> DeepLabV3PlusHead:
    """UniMatch's DeepLabV3+: ``model.decoder_channels`` wide, no dropout by default. The ASPP
    rates follow the encoder's deepest stride (``model.output_stride``; a plain ViT's patch size)."""
    return DeepLabV3PlusHead(channels, reductions, num_classes, output_stride=reductions[-1],
                             channels=model_cfg.decoder_channels,
                             dropout=0.0 if model_cfg.dropout is None else model_cfg.dropout)


@register_head("segformer")
def build_segformer(model_cfg, channels: Sequence[int], reductions: Sequence[int], num_classes: int) -> SegFormerHead:
    """SegFormer's all-MLP head: ``model.embed_dim`` wide, dropout 0.1 by default."""
    return SegFormerHead(channels, num_classes, embed_dim=model_cfg.embed_dim,
                         dropout=0.1 if model_cfg.dropout is None else model_cfg.dropout)
