"""Labelled / unlabelled partitions of a training set.

``data.labeled`` names which training images keep their masks:

* unset: every image with a mask is labelled; images without one (``unlabeled/`` of a folder
  dataset) form the unlabelled pool;
* a count ``N`` or a fraction ``"1/8"`` (``round(len / 8)``, at least 1): the first N images of
  a permutation of the training images drawn with ``data.split_seed`` -- deterministic, and
  nested (the 1/16 images are among the 1/8 ones for the same seed);
* a split file (e.g. ``splits/1_8/labeled.txt``, see :mod:`semiseg.data.datasets`).

``data.unlabeled`` names a split file for the unlabelled pool; unset, the pool is every training
image that is not labelled. Unlabelled masks are never read.
"""

from __future__ import annotations

import os
import random
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import numpy as np

from semiseg.config import DataConfig
from semiseg.data import IGNORE_INDEX
from semiseg.data.datasets import Sample, read_split_file
from semiseg.data.io import read_mask
from semiseg.errors import ConfigError, DataError

LabeledSpec = Union[int, str]  # a count, "46", or a fraction, "1/8"


def is_count_or_fraction(spec) -> bool:
    if isinstance(spec, int):
        return True
    text = str(spec).strip()
    parts = text.split("/")
    return text.isdigit() or (len(parts) == 2 and all(p.strip().isdigit() for p in parts))


def labeled_count(spec: LabeledSpec, available: int) -> int:
    """How many images ``spec`` (a count or a fraction of ``available``) asks for."""
    if not is_count_or_fraction(spec):
        raise ConfigError(f"key 'data.labeled': expected a count like 46 or a fraction like 1/8, got {spec!r}")
    text = str(spec).strip()
    count = max(1, round(available * Fraction(text))) if "/" in text else int(text)
    if count < 1:
        raise ConfigError(f"key 'data.labeled': expected a positive count, got {spec!r}")
    if count > available:
        raise ConfigError(f"key 'data.labeled': {spec} asks for {count} labelled images but the training split has "
                          f"only {available} images with masks")
    return count


def present_classes(sample: Sample) -> set[int]:
    """The classes (not the ignore label) that occur in a sample's mask."""
    raw = read_mask(sample.mask)
    labels = sample.label_map.decode(raw, sample.mask) if sample.label_map is not None else raw
    return set(np.unique(labels).tolist()) - {IGNORE_INDEX}


def _greedy_class_cover(order: list[Sample], num_classes: Optional[int]) -> list[int]:
    """Indices into ``order`` of images that together show every class of the pool: repeatedly
    the image adding the most classes not yet shown (earliest in ``order`` on ties)."""
    classes = [present_classes(s) for s in order]
    if num_classes is not None:
        classes = [{c for c in cs if c < num_classes} for cs in classes]
    missing = set().union(*classes)
    chosen: list[int] = []
    while missing:
        best = max(range(len(order)), key=lambda i: (len(classes[i] & missing), -i))
        chosen.append(best)
        missing -= classes[best]
    return chosen


def make_split(samples: list[Sample], labeled: LabeledSpec, seed: int = 0, balanced: bool = False,
               num_classes: Optional[int] = None) -> tuple[list[Sample], list[Sample]]:
    """Partition ``samples`` into (labelled, unlabelled).

    Only images with a mask can be labelled. The labelled images are the first ``labeled`` of a
    permutation drawn with ``seed``; with ``balanced``, a greedy cover of every class present in
    the pool (reading the masks) is taken first and the permutation fills the rest. Both parts
    keep the order of ``samples``.
    """
    candidates = [i for i, s in enumerate(samples) if s.mask is not None]
    count = labeled_count(labeled, len(candidates))
    order = list(candidates)
    random.Random(seed).shuffle(order)
    if balanced:
        cover = [order[i] for i in _greedy_class_cover([samples[j] for j in order], num_classes)]
        if len(cover) > count:
            raise ConfigError(f"--labeled {labeled}: {count} images cannot show every class of the pool; "
                              f"a greedy cover needs {len(cover)}")
        in_cover = set(cover)
        order = cover + [i for i in order if i not in in_cover]
    chosen = set(order[:count])
    return ([s for i, s in enumerate(samples) if i in chosen],
            [s for i, s in enumerate(samples) if i not in chosen])


def resolve_labeled(data_cfg: DataConfig, train_samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """The (labelled, unlabelled) training samples named by ``data.labeled`` / ``data.unlabeled``."""
    spec = data_cfg.labeled
    if spec is None:
        labeled = [s for s in train_samples if s.mask is not None]
    elif is_count_or_fraction(spec):
        labeled, _ = make_split(train_samples, spec, seed=data_cfg.split_seed)
    else:
        labeled = read_split_file(spec, data_cfg)
    if not labeled:
        raise DataError("the labelled split is empty: no training image has a mask")
    unmasked = next((s for s in labeled if s.mask is None), None)
    if unmasked is not None:
        raise DataError(f"labelled image {unmasked.image} has no mask (data.labeled={spec!r}): expected "
                        "'IMAGE MASK' lines or images whose mask the dataset layout provides")
    if data_cfg.unlabeled:
        unlabeled = read_split_file(data_cfg.unlabeled, data_cfg)
    else:
        taken = {s.image for s in labeled}
        unlabeled = [s for s in train_samples if s.image not in taken]
    return labeled, unlabeled


def _relative(path: Path, root: Path) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel == ".." or rel.startswith(".." + os.sep):
        raise DataError(f"{path} is outside the dataset root {root}: split files hold paths inside the root")
    return Path(rel).as_posix()


def write_split(out_dir: str | Path, labeled: list[Sample], unlabeled: list[Sample], root: str | Path
                ) -> tuple[Path, Path]:
    """Write ``labeled.txt`` and ``unlabeled.txt`` as ``IMAGE MASK`` lines relative to ``root``
    (unlabelled lines keep the mask path when known, as the community's files do; an image
    without a mask is a one-field line)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def line(s: Sample) -> str:
        fields = [_relative(s.image, root)] + ([_relative(s.mask, root)] if s.mask is not None else [])
        return " ".join(fields) + "\n"

    paths = out / "labeled.txt", out / "unlabeled.txt"
    for path, samples in zip(paths, (labeled, unlabeled)):
        path.write_text("".join(line(s) for s in samples))
    return paths
