"""Feature perturbations: functions of a segmentation network's ``encode`` and ``decode``.

A perturbation runs between the encoder and the head, so it belongs to the method that asks for
it, not to the network. Each function here takes the network (anything with ``encode``,
``decode``, ``neck`` and a ``decoder`` whose ``in_index`` lists the features it reads, as
:class:`~semiseg.models.SegModel`) and encodes once:

* :func:`decode_perturbed`: encode (the ``neck``, if set, on the deepest feature), rewrite the
  feature list, decode at the input size; the building block;
* :func:`feature_perturbation`: UniMatch's UniPerb, ``(logits, logits_fp)`` from the clean
  features and a channel-dropout copy of them, decoded together in one batch;
* :func:`complementary_dropout`: UniMatch V2's complementary channel dropout, two views of the
  same images encoded together and decoded through complementary channel masks
  (:func:`complementary_channel_masks`).
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


def complementary_channel_masks(num_pairs: int, widths: Sequence[int], kept_fraction: float = 0.5,
                                device: Optional[torch.device] = None) -> dict[int, torch.Tensor]:
    """UniMatch V2's complementary channel-dropout masks for ``num_pairs`` image pairs: for each
    feature width ``C`` in ``widths`` a ``(2 * num_pairs, C)`` mask whose first half (the first
    view of each pair) is ``2 * Bernoulli(0.5)`` and whose second half (the second view) is its
    complement ``2 - mask``: every channel is kept, doubled, by exactly one view of a pair, so
    each view's mask has expectation 1 and the two views' masks sum to 2.
    ``int(num_pairs * kept_fraction)`` pairs, drawn at random once for all widths, keep every
    channel in both views (mask 1), as official (``num_kept = int(bs // 2 * (1 - dropout_prob))``,
    ``dropout_prob = 0.5``).

    Official ``model/semseg/dpt.py`` draws one mask of the ViT's width and multiplies all four
    intermediate features by it; here features of one width share one mask (so a ViT gets
    exactly that), and features of another width (a DeepLabV3+'s low-level and deepest
    features) get their own, with the same kept pairs.
    """
    num_kept = int(num_pairs * kept_fraction)
    kept = torch.randperm(num_pairs)[:num_kept].to(device)
    masks = {}
    for width in dict.fromkeys(int(w) for w in widths):  # distinct widths, in order
        first = torch.bernoulli(torch.full((num_pairs, width), 0.5, device=device)) * 2.0
        second = 2.0 - first
        first[kept] = 1.0
        second[kept] = 1.0
        masks[width] = torch.cat((first, second))
    return masks


def complementary_dropout(model: nn.Module, x: torch.Tensor, kept_fraction: float = 0.5) -> torch.Tensor:
    """UniMatch V2's complementary dropout: logits at the input size of ``x = cat(view_1,
    view_2)``, two views of the same ``B`` images (``2B`` rows), encoded together; each feature
    the head reads is multiplied channel-wise by :func:`complementary_channel_masks` (row ``i``
    of the first view and row ``B + i`` of the second get complementary masks), then decoded in
    one pass, as official ``model(torch.cat((img_u_s1, img_u_s2)), comp_drop=True)``. Only in
    training mode: in eval mode the features pass unchanged."""
    if x.shape[0] % 2:
        raise ValueError(f"complementary dropout needs the two views of each image stacked, got an odd batch of {x.shape[0]}")
    if not model.training:
        return model(x)
    read = read_features(model)

    def dropped(feats: list[torch.Tensor]) -> list[torch.Tensor]:
        masks = complementary_channel_masks(x.shape[0] // 2, [feats[i].shape[1] for i in sorted(read)],
                                            kept_fraction, device=feats[0].device)
        return [f * masks[f.shape[1]].to(f.dtype)[:, :, None, None] if i in read else f
                for i, f in enumerate(feats)]

    return decode_perturbed(model, x, dropped)
