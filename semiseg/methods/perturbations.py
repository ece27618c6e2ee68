"""Feature perturbations: functions of a segmentation network's ``encode`` and ``decode``.

A perturbation runs between the encoder and the head, so it belongs to the method that asks for
it, not to the network. Each function here takes the network (anything with ``encode``,
``decode``, ``neck`` and a ``decoder`` whose ``in_index`` lists the features it reads, as
:class:`~semiseg.models.SegModel`) and encodes once:

* :func:`decode_perturbed`: encode (the ``neck``, if set, on the deepest feature), rewrite the
  feature list, decode at the input size; the building block;
* :func:`feature_perturbation`: UniMatch's UniPerb, ``(logits, logits_fp)`` from the clean
  features and a channel-dropout copy of them, decoded together in one batch.

UniMatch V2's complementary dropout (two streams with complementary channel masks) is another
feature-list rewrite for :func:`decode_perturbed` and goes here beside UniPerb.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FeatureDrop = Callable[[torch.Tensor], torch.Tensor]  # one feature map -> its perturbed copy


def encode_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """``model.encode(x)`` with ``model.neck``, if any, applied to the deepest feature."""
    feats = model.encode(x)
    if model.neck is not None:
        feats[-1] = model.neck(feats[-1])
    return feats


def read_features(model: nn.Module) -> set[int]:
    """Indices of the encoder features the head reads (``model.decoder.in_index``)."""
    return set(model.decoder.in_index)


def decode_perturbed(model: nn.Module, x: torch.Tensor,
                     rewrite: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]) -> torch.Tensor:
    """Logits at the input size of ``model.decode(rewrite(features))``, the features encoded once
    from ``x`` (neck included). ``rewrite`` may stack several streams along the batch; the
    caller splits the logits again."""
    return model.decode(rewrite(encode_features(model, x)), out_size=x.shape[-2:])


def feature_perturbation(model: nn.Module, x: torch.Tensor, p: float = 0.5,
                         drop: Optional[FeatureDrop] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """UniMatch's feature perturbation (UniPerb): ``(logits, logits_fp)`` at the input size.

    Encodes once, then decodes in one pass a batch of the clean features followed by a copy of
    each feature the head reads passed through channel dropout (``Dropout2d(p)``); for
    DeepLabV3+ that is the low-level and the deepest feature, as in UniMatch's
    ``torch.cat((c1, nn.Dropout2d(0.5)(c1)))``. BatchNorm therefore sees both halves together,
    as official. Deviation: the official code builds a fresh ``nn.Dropout2d``, which is always
    in training mode; here the dropout follows ``model.training``, so in eval mode the two
    outputs are equal.

    ``drop`` replaces the dropout (one feature map in, its perturbed copy out), e.g. a fixed
    channel mask in tests; None is ``F.dropout2d(f, p, training=model.training)``.
    """
    if drop is None:
        def drop(f: torch.Tensor) -> torch.Tensor:
            return F.dropout2d(f, p, training=model.training)
    read = read_features(model)

    def doubled(feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat((f, drop(f))) if i in read else f for i, f in enumerate(feats)]

    logits, logits_fp = decode_perturbed(model, x, doubled).chunk(2)
    return logits, logits_fp
