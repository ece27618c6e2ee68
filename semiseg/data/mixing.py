"""Batched mixing of images and their targets, shared by the methods.

A mixing mask says, per pixel, which of two tensors a pixel comes from. The same mask mixes
images ``(B, C, H, W)`` and per-pixel maps ``(B, H, W)`` (pseudo labels, confidences, ignore
masks), so an image and its targets can never come apart.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def cutmix(a: torch.Tensor, b: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Pixels where ``box`` is 1 from ``b``, the rest from ``a`` (UniMatch's CutMix).

    ``box`` is ``(B, H, W)`` in {0, 1} (or bool); ``a`` and ``b`` are ``(B, H, W)`` maps or
    ``(B, C, H, W)`` images, the box is broadcast over the channels.
    """
    take_b = box.bool()
    if a.dim() == take_b.dim() + 1:
        take_b = take_b.unsqueeze(1)
    return torch.where(take_b, b, a)


def mix_targets(target_a: torch.Tensor, target_b: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """The targets of :func:`cutmix` ed images: labels, confidences, ignore masks ``(B, H, W)``."""
    return cutmix(target_a, target_b, box)


def classmix_mask(pseudo_label: torch.Tensor, exclude: Sequence[int] = (),
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ClassMix's mask (Olsson et al., WACV 2021): half of the classes present in ``pseudo_label``
    ``(H, W)``, ``(n + n % 2) // 2`` of ``n`` (rounded up), chosen at random after removing
    ``exclude`` (e.g. background); returns the ``(H, W)`` bool mask of the pixels of the chosen
    classes. Alonso et al.'s official code differs (``n // 2 + 1`` classes, exclusion only when
    other classes remain): :mod:`semiseg.methods.contrastive_memory` follows that one."""
    classes = torch.unique(pseudo_label)
    if len(exclude):
        classes = classes[~torch.isin(classes, torch.as_tensor(list(exclude), device=classes.device))]
    n = classes.numel()
    order = torch.randperm(n, generator=generator).to(classes.device)
    chosen = classes[order[: (n + n % 2) // 2]]
    return torch.isin(pseudo_label, chosen)


def classmix_masks(pseudo_labels: torch.Tensor, exclude: Sequence[int] = (),
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """:func:`classmix_mask` for each image of a ``(B, H, W)`` batch."""
    return torch.stack([classmix_mask(label, exclude, generator) for label in pseudo_labels])


def classmix(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste ``source`` onto ``target`` where ``mask`` is True (the pixels of the classes chosen
    from the source's labels). Shapes as in :func:`cutmix`."""
    return cutmix(target, source, mask)
