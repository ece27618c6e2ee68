"""The siamese encoder of UniMatch's change-detection scenario
(``more-scenarios/remote-sensing/model/semseg/deeplabv3plus.py``, reference only).

The network input is a pair stacked on the channel axis, ``(B, 2C, H, W)``: image A (before)
in the first ``C`` channels, image B (after) in the last ``C`` (:func:`semiseg.data.change.stack_pair`).
:class:`SiameseEncoder` runs one encoder (shared weights) on A and on B and returns, for every
feature level, the absolute difference ``|f_A - f_B|``. It is a drop-in encoder of
:class:`~semiseg.models.SegModel` (same ``feature_info``), so the head decodes the differenced
features -- DeepLabV3+ reads the low level and the deepest, as official ``c1 = |c11 - c21|``,
``c4 = |c14 - c24|`` -- and UniMatch's feature perturbation
(:func:`semiseg.methods.perturbations.feature_perturbation`, a function of ``encode``/``decode``)
drops channels of the *differenced* features, as official ``_decode(cat(c1, Dropout2d(c1)), ...)``.

As official, A and B go through the encoder in two separate passes, so BatchNorm normalises
each date with its own batch statistics. ``model.siamese`` (set for the change-detection
datasets) makes :func:`~semiseg.models.segmodel.build_model` wrap the encoder.
Deviation: official differences only the two features its DeepLabV3+ reads; here every level is
differenced (the others are not read by DeepLabV3+, so the result is the same).
"""

from __future__ import annotations

import torch
from torch import nn


class SiameseEncoder(nn.Module):
    """``forward(x)``: ``[|f_A - f_B| for each level]`` with ``f = encoder(.)`` on the two
    halves of ``x``'s channels. ``encoder``: any ``features_only``-style encoder (a list of maps)."""

    def __init__(self, encoder: nn.Module, in_channels: int = 3):
        super().__init__()
        self.encoder = encoder
        self.in_channels = in_channels
        self.feature_info = encoder.feature_info
        for attr in ("patch_size", "input_multiple"):  # read by SegModel / check_input_size
            if getattr(encoder, attr, None) is not None:
                setattr(self, attr, getattr(encoder, attr))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c = self.in_channels
        if x.dim() != 4 or x.shape[1] != 2 * c:
            raise ValueError(f"the siamese network takes an image pair stacked on the channel axis, "
                             f"(B, {2 * c}, H, W); got shape {tuple(x.shape)}")
        feats_a = self.encoder(x[:, :c])
        feats_b = self.encoder(x[:, c:])
        return [(fa - fb).abs() for fa, fb in zip(feats_a, feats_b)]
