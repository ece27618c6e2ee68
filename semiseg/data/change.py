"""Bi-temporal change detection, UniMatch's remote-sensing scenario (``more-scenarios/remote-sensing``).

Layout under ``data.root`` (LEVIR-CD / WHU-CD as UniMatch distributes them, 256x256 tiles)::

    A/NAME.png       the image before
    B/NAME.png       the image after (same size as A/NAME.png)
    label/NAME.png   the change mask: 0 unchanged, 255 changed (nothing else)

Classes: 0 ``unchanged``, 1 ``changed``. The 0/255 on disk become 0/1 on load; any other value
is a :class:`~semiseg.errors.DataError` of one line naming the file (official UniMatch divides
by 255 and truncates, so a stray 128 would silently become "unchanged").

Datasets (``data.dataset``):

* ``levir_cd``, ``whu_cd``: splits are UniMatch's lists of file names, ``splits/levir/...`` and
  ``splits/whu/...``: ``train.txt``, ``val.txt``, ``test.txt`` and ``{5%,10%,20%,40%}/
  labeled.txt``, ``unlabeled.txt``. A file under the root wins; otherwise the official lists
  bundled with semiseg (``semiseg/data/cd_splits/``, from github.com/LiheYoung/UniMatch,
  MIT licence) are used, so ``data.labeled: splits/levir/5%/labeled.txt`` works on the real
  folder as downloaded. ``data.val_split`` / ``eval --split``: ``val``, ``test`` (official
  UniMatch evaluates on ``test.txt``; semiseg defaults to ``val`` and the shipped configs set
  ``test`` to match).
* ``folder_cd``: a user's own pairs: ``<root>/<split>/{A,B,label}/`` (the layout of the
  original LEVIR-CD release: ``train/``, ``val/``, ``test/``), or flat ``<root>/{A,B,label}/``
  with ``<split>.txt`` lists of names (without a ``train.txt``, every pair of the flat layout is
  training data). A pair without ``label/NAME.png`` is unlabelled.

The network input is the pair stacked on the channel axis: ``(6, H, W)``, A's normalised RGB
then B's (:func:`stack_pair`). Geometry and CutMix boxes therefore move A, B and the label
together for free; the strong photometric views are drawn for A and for B separately.

Training sets follow official ``dataset/semicd.py`` (reference only, not copied):

* geometry, identical for A, B and the label: UniMatch's random rescale of the long side by
  ``data.scale_range`` (official ``(0.8, 1.2)``; the shipped configs set it), a
  ``data.crop_size`` crop (padding: images 0, label 255), a horizontal flip with p 1/2;
* labelled: ``{"image": (6, S, S), "mask": (S, S)}``;
* unlabelled: ``weak`` ``(6, S, S)``; each strong view: A with colour jitter (p 0.8, 0.5, 0.5,
  0.5, 0.25) and blur (p 0.5, sigma U(0.1, 2)), its CutMix box (p 0.5), then B with its own
  jitter and blur draws (official order); ``ignore_mask`` 255 where the crop padded.

Deviations: ``data.resize`` (a base resize) applies when set (official: none); the official
unlabelled strong views carry no random grayscale, nor do these.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from semiseg.data import IGNORE_INDEX
from semiseg.data.io import LabelMap, read_image, read_mask
from semiseg.data.transforms import base_resize, blur, color_jitter, cutmix_box, normalize
from semiseg.errors import DataError

CHANGE_DATASETS = ("levir_cd", "whu_cd", "folder_cd")
CHANGE_CLASSES = ("unchanged", "changed")
CHANGE_PALETTE = [(0, 0, 0), (255, 255, 255)]
# stored 0 / 255 -> class 0 / 1; every other value is an error
CHANGE_LABELS = LabelMap.from_table({0: 0, 255: 1}, (), "0 (unchanged) or 255 (changed): a binary change mask")


def image_b_for(image_a: Path) -> Path:
    """``.../A/NAME`` -> ``.../B/NAME``."""
    return image_a.parent.parent / "B" / image_a.name


def label_for(image_a: Path) -> Path:
    """``.../A/NAME`` -> ``.../label/NAME`` (a PNG of the same stem if the name is not one)."""
    label = image_a.parent.parent / "label" / image_a.name
    return label if label.suffix.lower() == ".png" else label.with_suffix(".png")


def read_change_mask(path: Path) -> np.ndarray:
    """The change mask of ``path`` as (H, W) uint8 in {0, 1}; DataError naming the file if it is
    not binary 0/255."""
    return CHANGE_LABELS.decode(read_mask(path), path)


def load_images(a_path: Path, b_path: Optional[Path] = None) -> tuple[Image.Image, Image.Image]:
    """Images A and B of a pair, RGB; DataError naming both files when their sizes differ."""
    b_path = b_path if b_path is not None else image_b_for(a_path)
    a, b = read_image(a_path), read_image(b_path)
    if a.size != b.size:
        raise DataError(f"image pair {a_path} ({a.width}x{a.height}) and {b_path} ({b.width}x{b.height}) differ "
                        "in size: expected the two dates of one tile at the same size")
    return a, b


def load_triplet(a_path: Path, b_path: Optional[Path], label_path: Path
                 ) -> tuple[Image.Image, Image.Image, Image.Image]:
    """A, B and the decoded change mask (``L`` image of 0/1), every check naming the files."""
    a, b = load_images(a_path, b_path)
    labels = read_change_mask(label_path)
    if labels.shape != (a.height, a.width):
        raise DataError(f"change mask {label_path} is {labels.shape[1]}x{labels.shape[0]} but its images "
                        f"{a_path} are {a.width}x{a.height}: expected the same size")
    return a, b, Image.fromarray(labels)


# ---------------------------------------------------------------------------------------------
# Joint geometry: one draw, applied to every image of the pair and to the mask


def joint_resize_scale(images: Sequence[Image.Image], mask: Image.Image, ratio_range: tuple[float, float]
                       ) -> tuple[list[Image.Image], Image.Image]:
    """UniMatch's random rescale, one draw for all: images bilinear, mask nearest."""
    w, h = images[0].size
    long_side = random.randint(int(max(w, h) * ratio_range[0]), int(max(w, h) * ratio_range[1]))
    if h > w:
        oh, ow = long_side, int(w * long_side / h + 0.5)
    else:
        ow, oh = long_side, int(h * long_side / w + 0.5)
    return [im.resize((ow, oh), Image.BILINEAR) for im in images], mask.resize((ow, oh), Image.NEAREST)


def joint_crop(images: Sequence[Image.Image], mask: Image.Image, size: int, ignore_value: int = IGNORE_INDEX
               ) -> tuple[list[Image.Image], Image.Image]:
    """Pad right/bottom to ``size`` (images 0, mask ``ignore_value``), one random crop for all."""
    w, h = images[0].size
    pad_w, pad_h = max(size - w, 0), max(size - h, 0)
    if pad_w or pad_h:
        images = [ImageOps.expand(im, border=(0, 0, pad_w, pad_h), fill=0) for im in images]
        mask = ImageOps.expand(mask, border=(0, 0, pad_w, pad_h), fill=ignore_value)
    w, h = images[0].size
    x, y = random.randint(0, w - size), random.randint(0, h - size)
    box = (x, y, x + size, y + size)
    return [im.crop(box) for im in images], mask.crop(box)


def joint_hflip(images: Sequence[Image.Image], mask: Image.Image, p: float = 0.5
                ) -> tuple[list[Image.Image], Image.Image]:
    """Flip all left-right with probability ``p`` (one draw)."""
    if random.random() < p:
        return [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images], mask.transpose(Image.FLIP_LEFT_RIGHT)
    return list(images), mask


def joint_geometry(images: Sequence[Image.Image], mask: Image.Image, data_cfg) -> tuple[list[Image.Image], Image.Image]:
    """Base resize (``data.resize``), rescale, crop, flip: the same for every image and the mask."""
    images = list(images)
    if data_cfg.resize is not None:
        images = [base_resize(im, None, data_cfg.resize)[0] for im in images]
        _, mask = base_resize(mask, mask, data_cfg.resize)
    images, mask = joint_resize_scale(images, mask, data_cfg.scale_range)
    images, mask = joint_crop(images, mask, data_cfg.crop_size, ignore_value=IGNORE_INDEX)
    return joint_hflip(images, mask)


def strong_view(img: Image.Image) -> Image.Image:
    """One strong view of one date: colour jitter (p 0.8), then blur (p 0.5), as official semicd."""
    return blur(color_jitter(img))


def stack_pair(a: Image.Image, b: Image.Image, mean=None, std=None) -> torch.Tensor:
    """A and B normalised (``(x / 255 - mean) / std`` each) and stacked: ``(6, H, W)``."""
    return torch.cat((normalize(a, None, mean, std)[0], normalize(b, None, mean, std)[0]))


def split_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(..., 2C, H, W)`` -> the A and B halves along the channel axis."""
    c = x.shape[-3] // 2
    return x[..., :c, :, :], x[..., c:, :, :]


# ---------------------------------------------------------------------------------------------
# Torch datasets


class _PairSet(Dataset):
    def __init__(self, samples, data_cfg):
        self.samples = samples
        self.cfg = data_cfg

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        from semiseg.data.io import load_or_substitute

        return load_or_substitute(self.samples, index, self._load)


class ChangeLabeledSet(_PairSet):
    """Labelled pairs: ``{"image": (6, S, S), "mask": (S, S) in {0, 1, 255}, "id"}``."""

    def _load(self, sample) -> dict:
        cfg = self.cfg
        a, b, mask = load_triplet(sample.image, sample.image_b, sample.mask)
        (a, b), mask = joint_geometry((a, b), mask, cfg)
        return {"image": stack_pair(a, b, cfg.mean, cfg.std), "mask": torch.from_numpy(np.array(mask, np.int64)),
                "id": sample.id}


class ChangeUnlabeledSet(_PairSet):
    """Unlabelled pairs: ``weak``, ``strong_k`` (6 channels; A and B jittered separately),
    ``box_k``, ``ignore_mask`` (255 where the crop padded), ``id``."""

    def __init__(self, samples, data_cfg, num_strong: int = 2):
        if num_strong not in (0, 1, 2):
            raise ValueError(f"num_strong must be 0, 1 or 2, got {num_strong}")
        super().__init__(samples, data_cfg)
        self.num_strong = num_strong

    def _load(self, sample) -> dict:
        cfg = self.cfg
        a, b = load_images(sample.image, sample.image_b)
        (a, b), ignore = joint_geometry((a, b), Image.new("L", a.size, 0), cfg)
        out = {"id": sample.id}
        for k in range(1, self.num_strong + 1):  # official order: A's draws, its box, then B's draws
            a_s = strong_view(a)
            out[f"box_{k}"] = cutmix_box(cfg.crop_size, p=0.5)
            b_s = strong_view(b)
            out[f"strong_{k}"] = stack_pair(a_s, b_s, cfg.mean, cfg.std)
        out["weak"] = stack_pair(a, b, cfg.mean, cfg.std)
        out["ignore_mask"] = torch.from_numpy(np.array(ignore, np.int64))
        return out


class ChangeEvalSet(_PairSet):
    """Whole pairs (after ``data.resize``, if set): ``{"image": (6, H, W), "mask", "id", "path"}``;
    an unreadable pair gives ``{"skipped": message}``. ``change_detection``: the evaluator adds
    the change scores (:func:`semiseg.engine.metrics.change_scores`)."""

    change_detection = True

    def __getitem__(self, index: int) -> dict:  # an unreadable pair is reported, not substituted
        sample, cfg = self.samples[index], self.cfg
        try:
            a, b, mask = load_triplet(sample.image, sample.image_b, sample.mask)
        except DataError as e:
            return {"skipped": str(e), "id": sample.id, "path": str(sample.image)}
        if cfg.resize is not None:
            a, mask = base_resize(a, mask, cfg.resize)
            b, _ = base_resize(b, None, cfg.resize)
        return {"image": stack_pair(a, b, cfg.mean, cfg.std), "mask": torch.from_numpy(np.array(mask, np.int64)),
                "id": sample.id, "path": str(sample.image)}
