"""Segmentation heads: DeepLabV3+ (as in UniMatch), SegFormer's all-MLP head and the DPT head
of UniMatch V2 for plain ViT encoders.

A head takes the encoder's feature list (shallow to deep) and returns ``(logits, feature)``:
the logits (DeepLabV3+ and SegFormer: at the resolution of the shallowest feature, stride 4 for
most encoders, the patch size for a plain ViT, whose features all share it; DPT: at 8x a ViT's
patch grid) and the feature map the classifier reads, for methods that need per-pixel
embeddings. ``in_index`` lists the features a head actually reads, so UniMatch's feature
perturbation (:func:`semiseg.methods.perturbations.feature_perturbation`) perturbs exactly those.

Every width comes from the encoder's ``feature_info``; nothing assumes a ResNet.

Heads are found by name: :func:`register_head` puts a builder ``(model_cfg, channels,
reductions, num_classes) -> head`` in :data:`HEAD_BUILDERS` under the ``model.head`` value it
answers to (the config validates the names, :data:`semiseg.config.schema.HEADS`). A new head
is a module and a builder here plus its name there. ``dpt`` (:class:`DPTHead`) needs four
features at one stride (a plain ViT read at four blocks); other encoders are a config error.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.errors import ConfigError

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
                 output_stride: int, channels: int = 256, dropout: float = 0.0,
                 rates: Optional[Sequence[int]] = None):
        super().__init__()
        if len(in_channels) != len(reductions) or len(in_channels) < 2:
            raise ValueError(f"expected at least two features with one reduction each, got channels "
                             f"{list(in_channels)} and reductions {list(reductions)}")
        if reductions[-1] != output_stride:
            raise ValueError(f"the deepest feature is at stride {reductions[-1]}, not output_stride {output_stride}")
        self.in_index = (0, len(in_channels) - 1)
        self.reduce = conv_bn_relu(in_channels[0], 48, 1)
        self.aspp = ASPP(in_channels[-1], channels, tuple(rates) if rates else aspp_rates(output_stride))
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
                             dropout=0.0 if model_cfg.dropout is None else model_cfg.dropout,
                             rates=model_cfg.aspp_rates)


@register_head("segformer")
def build_segformer(model_cfg, channels: Sequence[int], reductions: Sequence[int], num_classes: int) -> SegFormerHead:
    """SegFormer's all-MLP head: ``model.embed_dim`` wide, dropout 0.1 by default."""
    return SegFormerHead(channels, num_classes, embed_dim=model_cfg.embed_dim,
                         dropout=0.1 if model_cfg.dropout is None else model_cfg.dropout)


# ---------------------------------------------------------------------------------------------
# DPT (plain ViT encoders)

# UniMatch V2's DPT sizes by the encoder's width: (features, out_channels)
DPT_SIZES: dict[int, tuple[int, tuple[int, int, int, int]]] = {
    384: (64, (48, 96, 192, 384)),  # ViT-S
    768: (128, (96, 192, 384, 768)),  # ViT-B
    1024: (256, (256, 512, 1024, 1024)),  # ViT-L
    1536: (384, (1536, 1536, 1536, 1536)),  # ViT-g
}


def dpt_sizes(width: int) -> tuple[int, tuple[int, ...]]:
    """(features, out_channels) of the DPT head on an encoder ``width`` channels wide:
    :data:`DPT_SIZES` (UniMatch V2's), and for another width W the ViT-S/B rule scaled:
    W // 6 and (W // 8, W // 4, W // 2, W), none below 8."""
    if width in DPT_SIZES:
        return DPT_SIZES[width]
    return max(8, width // 6), tuple(max(8, width // d) for d in (8, 4, 2, 1))


def conv3x3(in_channels: int, out_channels: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class ResidualConvUnit(nn.Module):
    """DPT's residual unit without BatchNorm: ``x + conv2(relu(conv1(relu(x))))``, 3x3 convs
    with bias (the ReLUs are not in place: ``x`` is the skip)."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = conv3x3(features, features)
        self.conv2 = conv3x3(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """DPT's fusion block: the deeper path, plus ``resConfUnit1`` of the skip when there is one,
    through ``resConfUnit2``, resized (bilinear, ``align_corners=True``) to ``size`` or by 2,
    then a 1x1 conv with bias (``out_conv``)."""

    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None,
                size: Optional[Sequence[int]] = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = resize(x, size, align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """The DPT head of UniMatch V2 (``model/semseg/dpt.py``, ``DPTHead`` with ``use_bn=False``,
    after Depth Anything), for the four same-stride feature maps of a plain ViT.

    For feature ``i`` (shallow to deep, ``(B, C_i, h, w)`` at the patch grid):

    * ``projects[i]``: 1x1 conv with bias to ``out_channels[i]``;
    * ``resize_layers[i]``: x4 (transposed conv, kernel 4 stride 4), x2 (transposed conv, kernel
      2 stride 2), as is, /2 (3x3 conv, stride 2, padding 1);
    * ``scratch.layer{i+1}_rn``: 3x3 conv without bias to ``features``;

    then fusion deep to shallow, each :class:`FeatureFusionBlock` resizing to the next shallower
    map (``refinenet1`` by 2): ``path_4 = refinenet4(l4)``, ``path_3 = refinenet3(path_4, l3)``,
    ``path_2 = refinenet2(path_3, l2)``, ``path_1 = refinenet1(path_2, l1)``, at 8x the patch
    grid; and ``scratch.output_conv``: 3x3 conv -> ReLU -> 1x1 conv to the classes.

    Returns ``(logits, path_1)``: the logits at 8x the patch grid, and the fused map the
    classifier reads (``features`` channels). :class:`~semiseg.models.SegModel` resizes the
    logits to the input (bilinear, ``align_corners=True`` by default, as UniMatch V2's
    ``F.interpolate`` to ``(patch_h * 14, patch_w * 14)``). Parameter names follow the
    official module's, so its weights would load by name; as there, ``refinenet4`` (no skip to
    fuse) has a ``resConfUnit1`` that is never used and gets no gradient.

    Deviations: the official head takes token sequences and one encoder width; this one takes
    the maps the encoder already reshaped and a width per feature (the same on a ViT).
    ``dropout`` (``model.dropout``; default 0, the official head has none) puts
    ``Dropout2d`` before the final 1x1 conv when positive.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, features: int = 256,
                 out_channels: Sequence[int] = (256, 512, 1024, 1024), dropout: float = 0.0):
        super().__init__()
        if len(in_channels) != 4 or len(out_channels) != 4:
            raise ValueError(f"expected four input and four output widths, got {list(in_channels)} "
                             f"and {list(out_channels)}")
        self.in_index = (0, 1, 2, 3)
        self.projects = nn.ModuleList(nn.Conv2d(c, o, 1) for c, o in zip(in_channels, out_channels))
        c = list(out_channels)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c[0], c[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(c[1], c[1], kernel_size=2, stride=2),
            nn.Identity(),
            conv3x3(c[3], c[3], stride=2),
        ])
        self.scratch = nn.Module()
        for i, width in enumerate(c, start=1):
            setattr(self.scratch, f"layer{i}_rn", conv3x3(width, features, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FeatureFusionBlock(features))
        self.scratch.output_conv = nn.Sequential(
            conv3x3(features, features), nn.ReLU(inplace=True), nn.Conv2d(features, num_classes, 1))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scratch
        layers = [rn(size_layer(project(f))) for f, project, size_layer, rn in zip(
            features, self.projects, self.resize_layers, (s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn))]
        l1, l2, l3, l4 = layers
        path = s.refinenet4(l4, size=l3.shape[-2:])
        path = s.refinenet3(path, l3, size=l2.shape[-2:])
        path = s.refinenet2(path, l2, size=l1.shape[-2:])
        path_1 = s.refinenet1(path, l1)
        hidden = s.output_conv[1](s.output_conv[0](path_1))
        return s.output_conv[2](self.dropout(hidden)), path_1


@register_head("dpt")
def build_dpt(model_cfg, channels: Sequence[int], reductions: Sequence[int], num_classes: int) -> DPTHead:
    """UniMatch V2's DPT head, for a plain ViT read at four blocks. Its widths are
    ``model.dpt_features`` and ``model.dpt_channels``, unset: :func:`dpt_sizes` of the encoder's
    width. No dropout by default, as official."""
    if len(channels) != 4 or len(set(reductions)) != 1:
        raise ConfigError(f"config error: key 'model.head': dpt needs a plain ViT encoder read at four blocks "
                          f"(four features at one stride), but the encoder gives {len(channels)} at strides "
                          f"{list(reductions)}; use a ViT (e.g. vit_small_patch14_dinov2) with four "
                          f"model.encoder_layers, or another head")
    features, out_channels = dpt_sizes(max(channels))
    if model_cfg.dpt_features is not None:
        features = model_cfg.dpt_features
    if model_cfg.dpt_channels is not None:
        out_channels = tuple(model_cfg.dpt_channels)
    return DPTHead(channels, num_classes, features=features, out_channels=out_channels,
                   dropout=0.0 if model_cfg.dropout is None else model_cfg.dropout)


class PSPHead(nn.Module):
    """PSPNet's pyramid-pooling head, as UniMatch's remote-sensing ``model/semseg/pspnet.py``
    (reference only): the deepest feature ``x`` (``C`` channels) and its average pools at 1, 2, 3
    and 6 bins, each through a 1x1 conv-BN-ReLU to ``C / 4`` and upsampled back (bilinear,
    ``align_corners=True``), concatenated (``2C``), a 3x3 conv-BN-ReLU to ``C / 4``, dropout
    (official: ``nn.Dropout(0.1)``, element-wise) and a 1x1 classifier with bias. Reads only the
    deepest feature (``in_index``), so UniMatch's feature perturbation drops its channels only,
    as official. The returned feature is the 3x3 conv's output, before the dropout."""

    bins = (1, 2, 3, 6)

    def __init__(self, in_channels: int, num_classes: int, in_index: int, dropout: float = 0.1):
        super().__init__()
        inter = max(1, in_channels // 4)
        self.in_index = (in_index,)
        self.pools = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_channels, inter, 1))
                                   for b in self.bins)
        self.bottleneck = conv_bn_relu(in_channels + len(self.bins) * inter, inter, 3)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(inter, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = features[self.in_index[0]]
        pooled = [resize(pool(x), x.shape[-2:], align_corners=True) for pool in self.pools]
        feature = self.bottleneck(torch.cat([x] + pooled, dim=1))
        return self.classifier(self.dropout(feature)), feature


@register_head("pspnet")
def build_pspnet(model_cfg, channels: Sequence[int], reductions: Sequence[int], num_classes: int) -> PSPHead:
    """PSPNet's head on the deepest feature (UniMatch's change-detection alternative to
    DeepLabV3+); ``model.dropout`` unset: 0.1, as official."""
    return PSPHead(channels[-1], num_classes, len(channels) - 1,
                   dropout=0.1 if model_cfg.dropout is None else model_cfg.dropout)
