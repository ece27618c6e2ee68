"""Batched mixing of images and their targets, shared by the methods.

A mixing mask says, per pixel, which of two tensors a pixel comes from. The same mask mixes
images ``(B, C, H, W)`` and per-pixel maps ``(B, H, W)`` (pseudo labels, confidences, ignore
masks), so an image and its targets can never come apart.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

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


ClassMixVariant = Literal["classmix", "alonso"]


def classmix_mask(pseudo_label: torch.Tensor, exclude: Sequence[int] = (),
                  generator: Optional[torch.Generator] = None, variant: ClassMixVariant = "classmix",
                  ignore_index: Optional[int] = None) -> torch.Tensor:
    """ClassMix's mask: the ``(H, W)`` bool mask of the pixels of about half of the classes present
    in ``pseudo_label`` ``(H, W)``, chosen at random. ``variant`` says how many and which:

    * ``classmix`` (Olsson et al., WACV 2021): ``(n + n % 2) // 2`` of the ``n`` candidates
      (rounded-up half); the candidates are the present classes minus ``exclude`` (e.g.
      background) and ``ignore_index``, always -- an image with nothing else selects nothing.
    * ``alonso`` (the official code of Alonso et al., ICCV 2021, ``transformmasks``):
      ``n // 2 + 1`` of them; ``ignore_index`` and then each class of ``exclude`` are removed
      from the candidates only while another candidate remains.
    """
    classes = torch.unique(pseudo_label)
    drops = ([] if ignore_index is None else [ignore_index]) + list(exclude)
    if variant == "classmix":
        if drops:
            classes = classes[~torch.isin(classes, torch.as_tensor(drops, device=classes.device))]
        count = (classes.numel() + classes.numel() % 2) // 2
    elif variant == "alonso":
        for drop in drops:
            if classes.numel() > 1 and bool((classes == drop).any()):
                classes = classes[classes != drop]
        count = classes.numel() // 2 + 1
    else:
        raise ValueError(f"classmix variant {variant!r}: expected 'classmix' or 'alonso'")
    order = torch.randperm(classes.numel(), generator=generator).to(classes.device)
    return torch.isin(pseudo_label, classes[order[:count]])


def classmix_masks(pseudo_labels: torch.Tensor, exclude: Sequence[int] = (),
                   generator: Optional[torch.Generator] = None, variant: ClassMixVariant = "classmix",
                   ignore_index: Optional[int] = None) -> torch.Tensor:
    """:func:`classmix_mask` for each image of a ``(B, H, W)`` batch."""
    return torch.stack([classmix_mask(label, exclude, generator, variant, ignore_index) for label in pseudo_labels])


def classmix(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste ``source`` onto ``target`` where ``mask`` is True (the pixels of the classes chosen
    from the source's labels). Shapes as in :func:`cutmix`."""
    return cutmix(target, source, mask)


def mix_with_next(tensors: Sequence[torch.Tensor], masks: torch.Tensor) -> list[torch.Tensor]:
    """ClassMix of a batch with itself: image ``j`` receives the masked pixels of image ``j + 1``
    (cyclically), the mask being image ``j + 1``'s own ClassMix mask (:func:`classmix_masks` of
    its labels; Alonso et al.'s official ``transformsgpu.mix``). Every tensor -- images
    ``(B, C, H, W)``, labels and confidences ``(B, H, W)`` -- is mixed with the same mask."""
    source_mask = masks.roll(-1, dims=0)
    return [classmix(t.roll(-1, dims=0), t, source_mask) for t in tensors]
