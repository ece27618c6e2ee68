"""Class-aware cross-entropy (CCE) and image-tag helpers, as small pure functions.

Wang, Zhang, Kan, Shan, "Learning pseudo labels for semi-and-weakly supervised semantic
segmentation", Pattern Recognition 2022, Sec. 3.2. With the image-level tags ``y`` of an image
(multi-hot over the ``K`` classes), the class-aware softmax only distributes probability over
the tagged classes::

    p_c = y_c exp(z_c) / sum_k y_k exp(z_k)        (untagged classes: p_c = 0)
    CCE(z, t) = -log p_t

and the pseudo label of a pixel is ``argmax_c p_c``, which is always a tagged class.

Numerics (deviation from the official ``ClassLogSoftMax`` in ``lib/net/loss.py``, which computes
``exp(z) / (sum y exp(z) + 1e-5)`` and ``log(. + 1e-5)``, overflowing in fp16/fp32 for large
logits and biased by the epsilons): here untagged logits are set to ``-inf`` and the usual
log-sum-exp ``log_softmax`` is taken, which is exact and stable.

Two guards the paper does not need (its tags always cover the pixel labels):

* an image with no tag at all is treated as if every class were tagged (no restriction), so
  its softmax is never ``0/0``;
* in :func:`class_aware_cross_entropy` a pixel whose target class is not tagged (possible when
  ``data.tags_min_pixels > 1`` drops a class with a few pixels) is ignored like ``ignore_index``
  instead of giving an infinite loss.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def as_tag_mask(tags: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """``(B, K)`` multi-hot (bool or float) -> bool ``(B, K)``; an all-false row becomes all-true
    (an image without tags is not restricted)."""
    mask = tags > 0.5 if tags.dtype.is_floating_point else tags.bool()
    if num_classes is not None and mask.shape[-1] != num_classes:
        raise ValueError(f"tags have {mask.shape[-1]} classes, logits {num_classes}")
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | empty


def restrict_logits(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """``(B, K, H, W)`` logits (float32) with the classes not tagged in each image set to ``-inf``."""
    mask = as_tag_mask(tags, logits.shape[1])
    return logits.float().masked_fill(~mask[:, :, None, None], float("-inf"))


def class_aware_log_softmax(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """``log p`` of the tag-restricted softmax: ``-inf`` at untagged classes."""
    return restrict_logits(logits, tags).log_softmax(dim=1)


def class_aware_softmax(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """The tag-restricted softmax ``p``: exactly zero at untagged classes, sums to 1 per pixel."""
    return restrict_logits(logits, tags).softmax(dim=1)


@torch.no_grad()
def class_aware_pseudo_label(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` argmax of the restricted softmax: always a tagged class."""
    return restrict_logits(logits.detach(), tags).argmax(dim=1)


def class_aware_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tags: torch.Tensor,
                              ignore_index: int = 255, reduction: str = "mean") -> torch.Tensor:
    """CCE of ``(B, K, H, W)`` logits against ``(B, H, W)`` labels with ``(B, K)`` tags.

    ``reduction="mean"``: average over the pixels that count (target neither ``ignore_index`` nor
    an untagged class), 0 when there are none; ``"sum"``; ``"none"``: ``(B, H, W)`` with 0 at the
    pixels that do not count. With every class tagged it equals ``F.cross_entropy``.
    """
    log_p = class_aware_log_softmax(logits, tags)
    valid = target != ignore_index
    safe = target.masked_fill(~valid, 0).long()
    picked = log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
    valid = valid & torch.isfinite(picked)  # target class not tagged
    per_pixel = torch.where(valid, -picked, picked.new_zeros(()))
    if reduction == "none":
        return per_pixel
    if reduction == "sum":
        return per_pixel.sum()
    if reduction == "mean":
        return per_pixel.sum() / valid.sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")


@torch.no_grad()
def tags_from_labels(labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
                     background: Optional[int] = None, min_pixels: int = 1) -> torch.Tensor:
    """``(B, K)`` bool tags of ``(B, H, W)`` label maps: class ``c`` is tagged when it has at least
    ``min_pixels`` pixels; ``background`` (when not None) is always tagged."""
    b = labels.shape[0]
    flat = labels.reshape(b, -1).long()
    valid = (flat != ignore_index) & (flat >= 0) & (flat < num_classes)
    counts = torch.zeros(b, num_classes, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, flat.masked_fill(~valid, 0), valid.long())
    tags = counts >= max(1, int(min_pixels))
    if background is not None:
        tags[:, background] = True
    return tags


def foreground_classes(num_classes: int, background: Optional[int]) -> list[int]:
    """The classes the image-level classification loss scores (all but the background)."""
    return [c for c in range(num_classes) if c != background]


def multilabel_tag_loss(logits: torch.Tensor, tags: torch.Tensor, background: Optional[int]) -> torch.Tensor:
    """Multi-label soft-margin loss of the global max-pooled logits against the tags, the
    background class excluded (official ``F.multilabel_soft_margin_loss(pred_global[:, 1:],
    category[:, 1:])``)."""
    pooled = F.adaptive_max_pool2d(logits.float(), 1).flatten(1)
    keep = foreground_classes(logits.shape[1], background)
    return F.multilabel_soft_margin_loss(pooled[:, keep], tags.float()[:, keep])
