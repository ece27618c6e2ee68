"""The segmentation network: a timm encoder, an optional neck and a head.

:class:`SegModel` keeps encoding and decoding separate so that methods can work between them:
UniMatch perturbs the features (:func:`semiseg.methods.perturbations.feature_perturbation`,
a function of ``encode``/``decode`` on the method side), pixel-contrastive methods read
the decoder features (``decode(..., return_features=True)``) and AllSpark-style methods set a
``neck`` on the deepest feature::

    feats = model.encode(x)
    feats[-1] = model.neck(feats[-1])
    logits = model.decode(feats, out_size=x.shape[-2:])
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.config import ModelConfig
from semiseg.models.encoder import create_encoder
from semiseg.errors import ConfigError
from semiseg.models.heads import HEAD_BUILDERS, resize


class SegModel(nn.Module):
    """Encoder + head. Attributes:

    * ``encoder``: timm ``features_only`` model; ``encode`` returns its features shallow to deep;
    * ``decoder``: the head (:mod:`semiseg.models.heads`), returning ``(logits, feature)``;
    * ``neck``: ``None``, or a module a method sets on the deepest feature; ``features`` and
      ``forward`` (and the feature perturbations of :mod:`semiseg.methods.perturbations`)
      apply it between encoder and head, ``encode`` and ``decode`` do not;
    * ``num_classes``, ``feature_channels``, ``feature_reductions`` (from ``feature_info``);
    * ``patch_size``: a plain ViT encoder's patch size, whose multiples its inputs must be
      (:func:`check_input_size`); None for other encoders;
    * ``align_corners``: how ``decode`` resizes the logits to ``out_size`` (bilinear). True
      (default) as UniMatch's DeepLabV3+; the official AllSpark decoder (SegFormer head) resizes
      with False, and the ``allspark`` method sets that on a SegFormer head
      (``model.align_corners`` in the config overrides both).
      Every prediction path (training, evaluation, ``predict``, ``export``) goes through
      ``decode``, so they all follow it.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, num_classes: int, align_corners: bool = True):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.neck: Optional[nn.Module] = None
        self.align_corners = bool(align_corners)
        self.num_classes = num_classes
        self.feature_channels: list[int] = list(encoder.feature_info.channels())
        self.feature_reductions: list[int] = list(encoder.feature_info.reduction())
        self.patch_size: Optional[int] = getattr(encoder, "patch_size", None)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features, shallow to deep (a new list: callers may replace entries)."""
        return list(self.encoder(x))

    def decode(self, features: Sequence[torch.Tensor], out_size: Optional[Sequence[int]] = None,
               return_features: bool = False):
        """Logits ``(B, K, h, w)`` at the shallowest feature's size, or at ``out_size``
        (bilinear, with :attr:`align_corners`). With ``return_features`` also the head's
        feature map before the classifier, ``(B, C, h, w)``, never resized.

        A plain-ViT encoder pads an input whose sides are not multiples of its patch size at the
        bottom and right (timm's ``dynamic_img_pad``): its logits then cover the padded image,
        so they are resized to that size and cut back to ``out_size``."""
        logits, feature = self.decoder(features)
        if out_size is not None and self.patch_size and any(int(v) % self.patch_size for v in out_size):
            p = self.patch_size
            h, w = (int(v) for v in out_size)
            logits = resize(logits, (-(-h // p) * p, -(-w // p) * p), align_corners=self.align_corners)[..., :h, :w]
        elif out_size is not None:
            logits = resize(logits, out_size, align_corners=self.align_corners)
        return (logits, feature) if return_features else logits

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features with the neck, if any, applied to the deepest one."""
        feats = self.encode(x)
        if self.neck is not None:
            feats[-1] = self.neck(feats[-1])
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input size."""
        return self.decode(self.features(x), out_size=x.shape[-2:])

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(encoder parameters, all others: head and neck), each parameter exactly once."""
        encoder = list(self.encoder.parameters())
        others = [p for name, p in self.named_parameters() if not name.startswith("encoder.")]
        return encoder, others


def build_model(model_cfg: ModelConfig, num_classes: int) -> SegModel:
    """The network described by the ``model`` config section, for ``num_classes`` classes.

    ``model.dropout`` is the channel dropout before the classifier; unset, each head keeps its
    official default (DeepLabV3+: none, as UniMatch; SegFormer: 0.1; DPT: none, as UniMatch
    V2). ``model.encoder_norm`` reads a plain ViT's blocks through its final norm (unset: yes).
    ``model.align_corners`` is the final logit resize (:attr:`SegModel.align_corners`); unset,
    True here, and a method may change it (``allspark`` sets False on a SegFormer head, as its official decoder).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if model_cfg.encoder == "unet":  # the medical UNet (semiseg.models.unet)
        from semiseg.models.unet import build_unet_encoder

        encoder = build_unet_encoder(model_cfg)
    else:
        kwargs = dict(model_cfg.encoder_kwargs)
        if model_cfg.in_channels != 3:
            kwargs.setdefault("in_chans", model_cfg.in_channels)
        encoder = create_encoder(model_cfg.encoder, model_cfg.output_stride, model_cfg.pretrained,
                                 layers=model_cfg.encoder_layers, encoder_kwargs=kwargs,
                                 norm=model_cfg.encoder_norm)
    if model_cfg.siamese:  # change detection: |f_A - f_B| of a shared encoder (semiseg.models.siamese)
        from semiseg.models.siamese import SiameseEncoder

        encoder = SiameseEncoder(encoder, model_cfg.in_channels)
    channels = list(encoder.feature_info.channels())
    reductions = list(encoder.feature_info.reduction())
    builder = HEAD_BUILDERS.get(model_cfg.head)
    if builder is None:
        raise ConfigError(f"config error: key 'model.head': no head is registered as {model_cfg.head!r}; "
                          f"expected one of: {', '.join(sorted(HEAD_BUILDERS))}")
    head = builder(model_cfg, channels, reductions, num_classes)
    align_corners = True if model_cfg.align_corners is None else model_cfg.align_corners
    return SegModel(encoder, head, num_classes, align_corners=align_corners)


def check_input_size(model: nn.Module, size: int, key: str) -> None:
    """A :class:`ConfigError` naming ``key`` when ``size`` (a crop side) is not a multiple of the
    patch size of ``model``'s plain-ViT encoder; nothing for other encoders."""
    patch = getattr(model, "patch_size", None)
    multiple = getattr(getattr(model, "encoder", None), "input_multiple", None)  # the UNet's 16
    if multiple and size % multiple:
        raise ConfigError(f"config error: key '{key}': {size} is not a multiple of {multiple} (the UNet pools "
                          f"four times); use e.g. {max(multiple, size // multiple * multiple)}")
    if patch and size % patch:
        below, above = size // patch * patch, (size // patch + 1) * patch
        fits = f"{below} or {above}" if below else str(above)
        raise ConfigError(f"config error: key '{key}': {size} is not a multiple of the encoder's patch size "
                          f"{patch}; use e.g. {fits}")
