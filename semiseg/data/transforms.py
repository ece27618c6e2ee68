"""Augmentations on PIL images, following UniMatch (``dataset/transform.py``, ``dataset/semi.py``).

Geometric transforms take and return an ``(image, mask)`` pair so the two stay aligned; the
mask is an 8-bit ``L`` image (labels, or for unlabelled images an ignore mask). Randomness
comes from the global generators, as in UniMatch: Python's ``random`` for the geometric
choices, numpy's for blur sigma and CutMix boxes, torch's inside torchvision's ``ColorJitter``
and ``RandomGrayscale``. The data streams seed all three per sample
(:class:`semiseg.engine.sampling.SeededDataset`), so every draw is reproducible whatever the
number of loader workers.
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from semiseg.data import IGNORE_INDEX
from semiseg.models.pretrained import IMAGENET_MEAN, IMAGENET_STD

Mask = Optional[Image.Image]


def base_resize(img: Image.Image, mask: Mask, size: Optional[tuple[int, int]]) -> tuple[Image.Image, Mask]:
    """``data.resize``: a fixed (width, height) for every image on load; image bilinear, mask nearest."""
    if size is None or tuple(size) == img.size:
        return img, mask
    size = (int(size[0]), int(size[1]))
    return img.resize(size, Image.BILINEAR), (mask.resize(size, Image.NEAREST) if mask is not None else None)


def resize_scale(img: Image.Image, mask: Image.Image, ratio_range: tuple[float, float]
                 ) -> tuple[Image.Image, Image.Image]:
    """UniMatch's random rescale: the long side becomes a random integer in
    ``[long * ratio_range[0], long * ratio_range[1]]``, the short side keeps the aspect ratio
    (rounded); image bilinear, mask nearest."""
    w, h = img.size
    long_side = random.randint(int(max(w, h) * ratio_range[0]), int(max(w, h) * ratio_range[1]))
    if h > w:
        oh, ow = long_side, int(w * long_side / h + 0.5)
    else:
        ow, oh = long_side, int(h * long_side / w + 0.5)
    return img.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)


def crop(img: Image.Image, mask: Image.Image, size: int, ignore_value: int = IGNORE_INDEX,
         cover: Optional[tuple[int, int]] = None) -> tuple[Image.Image, Image.Image]:
    """Pad right/bottom to at least ``size`` (image with 0, mask with ``ignore_value``), then a
    random ``size`` x ``size`` crop (UniMatch's ``crop``). With ``cover`` = (x, y), a pixel of the
    unpadded image, the crop is drawn uniformly among the positions that contain that pixel
    (``data.class_uniform_p``); padding never moves it, since it is added right and bottom."""
    w, h = img.size
    pad_w, pad_h = max(size - w, 0), max(size - h, 0)
    if pad_w or pad_h:
        img = ImageOps.expand(img, border=(0, 0, pad_w, pad_h), fill=0)
        mask = ImageOps.expand(mask, border=(0, 0, pad_w, pad_h), fill=ignore_value)
    w, h = img.size
    if cover is None:
        x, y = random.randint(0, w - size), random.randint(0, h - size)
    else:
        cx, cy = cover
        x = random.randint(max(0, cx - size + 1), min(cx, w - size))
        y = random.randint(max(0, cy - size + 1), min(cy, h - size))
    box = (x, y, x + size, y + size)
    return img.crop(box), mask.crop(box)


def class_point(mask: Image.Image, ignore_value: int = IGNORE_INDEX) -> Optional[tuple[int, int]]:
    """A pixel (x, y) for :func:`crop` to cover: one class drawn uniformly among the labels that
    ``mask`` holds (``ignore_value`` apart), then one of its pixels uniformly; None when the mask
    holds no label. Draws from Python's ``random``, as the other geometric choices do."""
    labels = np.asarray(mask)
    classes = [int(c) for c in np.unique(labels) if c != ignore_value]
    if not classes:
        return None
    ys, xs = np.nonzero(labels == random.choice(classes))
    k = random.randrange(len(xs))
    return int(xs[k]), int(ys[k])


def hflip(img: Image.Image, mask: Image.Image, p: float = 0.5) -> tuple[Image.Image, Image.Image]:
    """Flip both left-right with probability ``p``."""
    if random.random() < p:
        return img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    return img, mask


def normalize(img: Image.Image, mask: Mask = None, mean=IMAGENET_MEAN, std=IMAGENET_STD
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Image -> float (3, H, W), ``(x / 255 - mean) / std``; mask -> long (H, W) (None stays None).
    ``mean``/``std`` None: ImageNet's."""
    # None: a data section read without its model; every path from a whole config resolves
    # data.mean/std from the encoder's weights first (semiseg.models.pretrained.resolve_normalization)
    mean = IMAGENET_MEAN if mean is None else mean
    std = IMAGENET_STD if std is None else std
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    y = torch.from_numpy(np.array(mask, dtype=np.int64)) if mask is not None else None
    return x.contiguous(), y


# ---------------------------------------------------------------------------------------------
# Strong (photometric) augmentation, UniMatch's recipe for the strong views

_COLOR_JITTER = T.ColorJitter(0.5, 0.5, 0.5, 0.25)


def color_jitter(img: Image.Image, p: float = 0.8) -> Image.Image:
    """Brightness, contrast, saturation 0.5 and hue 0.25, applied with probability ``p``."""
    return _COLOR_JITTER(img) if random.random() < p else img


def random_grayscale(img: Image.Image, p: float = 0.2) -> Image.Image:
    """Gray (kept as 3 channels) with probability ``p`` (torchvision's ``RandomGrayscale`` draw)."""
    return T.RandomGrayscale(p=p)(img)


def blur(img: Image.Image, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0)) -> Image.Image:
    """PIL Gaussian blur with sigma ~ U(``sigma``), applied with probability ``p``."""
    if random.random() < p:
        return img.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(*sigma)))
    return img


def strong_photometric(img: Image.Image, cfg=None) -> Image.Image:
    """One strong view: colour jitter (p=0.8), grayscale (p=0.2), blur (p=0.5), in UniMatch's order.
    ``cfg`` (a DataConfig) may change the probabilities and the blur's sigma range
    (``data.strong_jitter_p``, ``strong_grayscale_p``, ``strong_blur_p``, ``strong_blur_sigma``)."""
    if cfg is None:
        return blur(random_grayscale(color_jitter(img)))
    return blur(random_grayscale(color_jitter(img, cfg.strong_jitter_p), cfg.strong_grayscale_p),
                cfg.strong_blur_p, cfg.strong_blur_sigma)


def random_box(h: int, w: int, size_min: float, size_max: float, ratio_1: float, ratio_2: float,
               redraw_area: bool = False) -> tuple[int, int, int, int]:
    """``(x, y, box_w, box_h)``: a rectangle of area ``U(size_min, size_max) * h * w`` and aspect
    (h/w) ``U(ratio_1, ratio_2)`` (sides truncated to integers) at a uniformly drawn top-left
    corner; aspect and corner are redrawn until it fits inside ``h x w``, and so is the area when
    ``redraw_area`` (ST++'s cutout; UniMatch's CutMix box keeps its first area)."""
    area = np.random.uniform(size_min, size_max) * h * w
    while True:
        ratio = np.random.uniform(ratio_1, ratio_2)
        bw, bh = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        x, y = np.random.randint(0, w), np.random.randint(0, h)
        if x + bw <= w and y + bh <= h:
            return x, y, bw, bh
        if redraw_area:
            area = np.random.uniform(size_min, size_max) * h * w


def cutout(img: Image.Image, mask: Image.Image, p: float = 0.5, size_min: float = 0.02, size_max: float = 0.4,
           ratio_1: float = 0.3, ratio_2: float = 1 / 0.3, ignore_value: int = IGNORE_INDEX
           ) -> tuple[Image.Image, Image.Image]:
    """ST++'s cutout (Yang et al., CVPR 2022), for pseudo-labelled training crops: with
    probability ``p`` one rectangle of area ``U(size_min, size_max)`` of the image and aspect
    (h/w) ``U(ratio_1, ratio_2)``, at a uniformly drawn top-left corner (area, aspect and corner
    redrawn until it fits), is filled with uniform noise in 0..255 per pixel and channel, and its
    mask pixels become ``ignore_value`` (no loss there)."""
    if random.random() >= p:
        return img, mask
    w, h = img.size
    x, y, bw, bh = random_box(h, w, size_min, size_max, ratio_1, ratio_2, redraw_area=True)
    pixels, labels = np.array(img), np.array(mask)
    pixels[y:y + bh, x:x + bw] = np.random.uniform(0, 255, (bh, bw) + pixels.shape[2:]).astype(np.uint8)
    labels[y:y + bh, x:x + bw] = ignore_value
    return Image.fromarray(pixels), Image.fromarray(labels)


def cutmix_box(size: int, p: float = 0.5, size_min: float = 0.02, size_max: float = 0.4,
               ratio_1: float = 0.3, ratio_2: float = 1 / 0.3) -> torch.Tensor:
    """UniMatch's ``obtain_cutmix_box``: a (size, size) long tensor of {0, 1}.

    With probability ``1 - p`` it is all zeros. Otherwise one rectangle of area
    ``U(size_min, size_max) * size**2`` and aspect (h/w) ``U(ratio_1, ratio_2)`` (w and h
    truncated to integers) is set to 1, at a uniformly drawn top-left corner; aspect and corner
    are redrawn until the rectangle fits inside the image.
    """
    box = torch.zeros(size, size, dtype=torch.long)
    if random.random() > p:
        return box
    x, y, w, h = random_box(size, size, size_min, size_max, ratio_1, ratio_2)
    box[y:y + h, x:x + w] = 1
    return box
