"""Photometric augmentation of whole image batches, as tensors on the training device.

The data layer augments each image on load (:mod:`semiseg.data.transforms`, PIL). A method that
augments *after* its pseudo labels exist -- Alonso et al.'s strong copies of the weak view, made
on the GPU in the official code -- works on normalised ``(B, 3, H, W)`` batches instead: undo
the normalisation (:func:`denormalize`), change colours in [0, 1], normalise again
(:func:`normalize`). Randomness comes from Python's ``random`` and torch's global generator.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as TF


def _stats(images: torch.Tensor, values: Sequence[float]) -> torch.Tensor:
    return images.new_tensor(values).view(1, 3, 1, 1)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``x * std + mean``: normalised images back to [0, 1] colours (not clamped)."""
    return images * _stats(images, std) + _stats(images, mean)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std``, as the data layer normalises every image."""
    return (images - _stats(images, mean)) / _stats(images, std)


def color_jitter(images: torch.Tensor, strength: float) -> torch.Tensor:
    """kornia's ``ColorJitter(brightness=s, contrast=s, saturation=s/2, hue=s/3)`` on ``(B, 3, H, W)``
    images in [0, 1], factors drawn per image, the four operations in a random order per image."""
    out = []
    s = strength
    for img in images:
        ops = [
            lambda x, f=random.uniform(1 - s, 1 + s): TF.adjust_brightness(x, f),
            lambda x, f=random.uniform(1 - s, 1 + s): TF.adjust_contrast(x, f),
            lambda x, f=random.uniform(1 - s / 2, 1 + s / 2): TF.adjust_saturation(x, f),
            lambda x, f=random.uniform(-s / 3, s / 3): TF.adjust_hue(x, f),
        ]
        for k in torch.randperm(4).tolist():
            img = ops[k](img)
        out.append(img.clamp(0, 1))
    return torch.stack(out)


def gaussian_blur(images: torch.Tensor, sigma_range: tuple[float, float], kernel: int) -> torch.Tensor:
    """Isotropic Gaussian blur of ``(B, 3, H, W)`` images, sigma ``U(sigma_range)`` per image; the
    ``kernel`` side is shrunk (to an odd size) to fit small images."""
    h, w = images.shape[-2:]
    k = min(kernel, 2 * min(h, w) - 1)
    k = k if k % 2 == 1 else k - 1
    return torch.stack([TF.gaussian_blur(img, [k, k], [s, s])
                        for img, s in zip(images, (random.uniform(*sigma_range) for _ in images))])
