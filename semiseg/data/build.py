"""Torch datasets for training and evaluation, data loaders, and the dataset check.

The three datasets follow UniMatch's ``SemiDataset`` modes:

* :class:`LabeledSet` (``train_l``): ``{"image", "mask", "id"}`` after the base resize, random
  rescale (``data.scale_range``), crop (``data.crop_size``; mask padded with 255; with
  probability ``data.class_uniform_p`` placed over a pixel of a class drawn uniformly among
  those of the rescaled mask) and flip;
  with ``strong=True`` (AllSpark) also the strong photometric set.
* :class:`UnlabeledSet` (``train_u``): the same geometry once, then a weak view and
  ``num_strong`` strong views, each strong view with its own photometric draw and CutMix box:
  ``{"weak", "strong_1", "box_1", "strong_2", "box_2", "ignore_mask", "id"}`` (only the views
  asked for). ``ignore_mask`` is 255 where the crop padded the image, 0 elsewhere. The masks of
  unlabelled images are never read (UniMatch reads them only to find the padding, marked 254;
  here a blank mask is padded with 255 instead, which gives the same ignore mask), except by the
  diagnostic ``method.oracle_pseudo_labels``, which adds the crop's true ``"mask"`` (same draws,
  so the same crops as without it).
* :class:`EvalSet` (``val``): the whole image after the base resize, ``{"image", "mask", "id",
  "path"}``.

Every file is checked when it is read (see :mod:`semiseg.data.io`); :func:`check_dataset` runs
the same checks over a whole dataset and reports every bad file. A file that turns out unusable
in the middle of a run does not end it: the training sets put the next usable sample in its
place and name the file in the sample's ``"skipped"`` string (the trainer warns, counts and stops
past ``data.max_bad_files``); :class:`EvalSet` returns ``{"skipped": message}`` instead of the
sample, which the evaluation leaves out.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from semiseg.config import CHANGE_DATASETS, Config, DataConfig
from semiseg.data import IGNORE_INDEX
from semiseg.data.datasets import (DatasetInfo, Sample, dataset_info, list_samples, read_split_file,
                                   resolve_root)
from semiseg.data.io import (check_same_size, decode_mask, load_or_substitute, load_pair, read_image,  # noqa: F401
                             read_mask)
from semiseg.data.splits import is_count_or_fraction, resolve_labeled
from semiseg.data.transforms import (base_resize, class_point, crop, cutmix_box, cutout, hflip, normalize,
                                     resize_scale, strong_photometric)
from semiseg.errors import ConfigError, DataError

VOID_CARRIED = 254  # void's value while a true unlabelled mask rides through the crop (255 = padding)


def _data_cfg(cfg: Union[Config, DataConfig]) -> DataConfig:
    """The data section; from a whole config with ``data.mean``/``std`` resolved from the encoder's
    weights (a data section alone normalises with ImageNet's statistics where they are unset)."""
    if isinstance(cfg, Config):
        from semiseg.models.pretrained import resolve_normalization

        return resolve_normalization(cfg).data
    return cfg


class LabeledSet(Dataset):
    """Labelled training crops (UniMatch's ``train_l``)."""

    def __init__(self, samples: list[Sample], data_cfg: DataConfig, strong: bool = False, tags=None,
                 pseudo_images: frozenset = frozenset()):
        self.samples = samples
        self.cfg = data_cfg
        self.strong = strong
        # data.extra_labels_strong: the images (paths) whose mask is a pseudo label get the strong
        # photometric changes and cutout
        self.pseudo_images = pseudo_images
        self.tags = tags  # a semiseg.data.tags.TagSource: adds "tags" derived from the whole mask

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return load_or_substitute(self.samples, index, self._load)

    def _load(self, sample: Sample) -> dict:
        cfg = self.cfg
        img, mask = load_pair(sample.image, sample.mask, sample.label_map)
        tags = self.tags.for_labels(np.asarray(mask)) if self.tags is not None else None
        img, mask = base_resize(img, mask, cfg.resize)
        img, mask = resize_scale(img, mask, cfg.scale_range)
        cover = None  # data.class_uniform_p: the crop covers a pixel of a class drawn uniformly
        if cfg.class_uniform_p > 0 and random.random() < cfg.class_uniform_p:
            cover = class_point(mask, IGNORE_INDEX)
        img, mask = crop(img, mask, cfg.crop_size, ignore_value=IGNORE_INDEX, cover=cover)
        img, mask = hflip(img, mask)
        if self.strong:
            img = strong_photometric(img, cfg)
        elif sample.image in self.pseudo_images:
            img, mask = cutout(strong_photometric(img, cfg), mask)
        image, mask = normalize(img, mask, cfg.mean, cfg.std)
        out = {"image": image, "mask": mask, "id": sample.id}
        if tags is not None:
            out["tags"] = torch.from_numpy(tags.astype(np.float32))
        return out


class UnlabeledSet(Dataset):
    """Unlabelled training crops with a weak and ``num_strong`` strong views (UniMatch's ``train_u``)."""

    def __init__(self, samples: list[Sample], data_cfg: DataConfig, num_strong: int = 2, tags=None,
                 with_masks: bool = False):
        if num_strong not in (0, 1, 2):
            raise ValueError(f"num_strong must be 0, 1 or 2, got {num_strong}")
        self.samples = samples
        self.cfg = data_cfg
        self.num_strong = num_strong
        self.tags = tags  # a semiseg.data.tags.TagSource: adds "tags" (tags file, else the mask)
        # with_masks: the diagnostic method.oracle_pseudo_labels, which reads the true masks
        self.with_masks = with_masks
        if with_masks:
            unmasked = next((s for s in samples if s.mask is None), None)
            if unmasked is not None:
                raise DataError(f"key 'method.oracle_pseudo_labels': needs the masks of the unlabelled images; "
                                f"{unmasked.image} has none")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return load_or_substitute(self.samples, index, self._load)

    def _load(self, sample: Sample) -> dict:
        cfg = self.cfg
        if self.with_masks:  # void becomes VOID_CARRIED so that padding alone is 255 after the crop
            img, carried = base_resize(*load_pair(sample.image, sample.mask, sample.label_map), cfg.resize)
            carried = carried.point(lambda v: VOID_CARRIED if v == IGNORE_INDEX else v)
        else:
            img, _ = base_resize(read_image(sample.image), None, cfg.resize)
            carried = Image.new("L", img.size, 0)
        # The ignore mask rides through the geometry like a label map: 0 on image pixels,
        # 255 where the crop pads (with_masks: the true mask, void carried as VOID_CARRIED).
        img, carried = resize_scale(img, carried, cfg.scale_range)
        img, carried = crop(img, carried, cfg.crop_size, ignore_value=IGNORE_INDEX)
        img, carried = hflip(img, carried)

        out = {"id": sample.id}
        if self.with_masks:
            labels = np.array(carried, dtype=np.int64)
            out["mask"] = torch.from_numpy(np.where(labels == VOID_CARRIED, IGNORE_INDEX, labels))
            ignore_mask = Image.fromarray(np.where(labels == IGNORE_INDEX, IGNORE_INDEX, 0).astype(np.uint8))
        else:
            ignore_mask = carried
        for k in range(1, self.num_strong + 1):  # per view: photometric draw, then its box (UniMatch's order)
            out[f"strong_{k}"], _ = normalize(strong_photometric(img, cfg), None, cfg.mean, cfg.std)
            out[f"box_{k}"] = cutmix_box(cfg.crop_size, p=0.5)
        out["weak"], out["ignore_mask"] = normalize(img, ignore_mask, cfg.mean, cfg.std)
        if self.tags is not None:
            out["tags"] = torch.from_numpy(self.tags.for_sample(sample).astype(np.float32))
        return out


class EvalSet(Dataset):
    """Whole images after the base resize, with their masks (UniMatch's ``val``)."""

    def __init__(self, samples: list[Sample], data_cfg: DataConfig):
        self.samples = samples
        self.cfg = data_cfg

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample, cfg = self.samples[index], self.cfg
        try:
            img, mask = base_resize(*load_pair(sample.image, sample.mask, sample.label_map), cfg.resize)
        except DataError as e:  # left out of the score, with a warning (see evaluate)
            return {"skipped": str(e), "id": sample.id, "path": str(sample.image)}
        image, mask = normalize(img, mask, cfg.mean, cfg.std)
        return {"image": image, "mask": mask, "id": sample.id, "path": str(sample.image)}


# ---------------------------------------------------------------------------------------------
# Building the sets of a config


@dataclass
class TrainSets:
    labeled: LabeledSet
    unlabeled: Optional[UnlabeledSet]
    info: DatasetInfo


def repeat_to_length(samples: list[Sample], length: int, seed: int = 0) -> list[Sample]:
    """UniMatch's ``nsample``: the list repeated ``ceil(length / len)`` times, shuffled (seeded),
    truncated to ``length`` -- so a labelled epoch is as long as an unlabelled one."""
    repeated = samples * math.ceil(length / len(samples))
    random.Random(seed).shuffle(repeated)
    return repeated[:length]


def build_train_sets(cfg: Union[Config, DataConfig], num_strong: int, with_unlabeled: bool,
                     strong_labeled: bool = False, unlabeled_masks: bool = False) -> TrainSets:
    """The labelled set and (``with_unlabeled``) the unlabelled set of ``data.train_split``;
    ``unlabeled_masks``: the unlabelled crops carry their true masks (``"mask"``), for the
    diagnostic ``method.oracle_pseudo_labels`` (not for change detection).

    When there is an unlabelled set larger than the labelled one, the labelled list is repeated
    to its length (:func:`repeat_to_length`); labelled images are never dropped (UniMatch
    truncates when the labelled set is the larger).
    """
    from semiseg.data.tags import build_tag_source

    data = _data_cfg(cfg)
    info = dataset_info(data)
    if unlabeled_masks and data.dataset in CHANGE_DATASETS:
        raise ConfigError(f"key 'method.oracle_pseudo_labels': not available for data.dataset "
                          f"'{data.dataset}' (not for change detection)")
    if data.dataset == "acdc":  # h5py missing: one line here, not a traceback from a loader worker
        from semiseg.data.acdc import require_h5py

        require_h5py()
    labeled, unlabeled = resolve_labeled(data, list_samples(data, data.train_split))
    if data.dataset == "acdc":  # HDF5 slices, one channel, the medical pipeline (semiseg.data.acdc)
        from semiseg.data.acdc import ACDCLabeledSet, ACDCUnlabeledSet

        acdc_unlabeled = (ACDCUnlabeledSet(unlabeled, data.crop_size, num_strong, with_masks=unlabeled_masks)
                          if with_unlabeled and unlabeled else None)
        if acdc_unlabeled is not None and len(unlabeled) > len(labeled):
            labeled = repeat_to_length(labeled, len(unlabeled), data.split_seed)
        return TrainSets(ACDCLabeledSet(labeled, data.crop_size), acdc_unlabeled, info)
    if data.dataset in CHANGE_DATASETS:  # image pairs, stacked on the channel axis (semiseg.data.change)
        from semiseg.data.change import ChangeLabeledSet, ChangeUnlabeledSet

        cd_unlabeled = ChangeUnlabeledSet(unlabeled, data, num_strong) if with_unlabeled and unlabeled else None
        if cd_unlabeled is not None and len(unlabeled) > len(labeled):
            labeled = repeat_to_length(labeled, len(unlabeled), data.split_seed)
        return TrainSets(ChangeLabeledSet(labeled, data), cd_unlabeled, info)
    pseudo_images: frozenset = frozenset()
    if data.extra_labels:
        pool = {s.image for s in unlabeled}
        labeled, unlabeled = add_extra_labels(labeled, unlabeled, data.extra_labels, info.num_classes,
                                              balance=data.extra_labels_balance)
        if data.extra_labels_strong:
            pseudo_images = frozenset(s.image for s in labeled if s.image in pool)
    tags = build_tag_source(data, info)
    unlabeled_set = (UnlabeledSet(unlabeled, data, num_strong, tags=tags, with_masks=unlabeled_masks)
                     if with_unlabeled and unlabeled else None)
    if unlabeled_set is not None and len(unlabeled) > len(labeled):
        labeled = repeat_to_length(labeled, len(unlabeled), data.split_seed)
    return TrainSets(LabeledSet(labeled, data, strong=strong_labeled, tags=tags, pseudo_images=pseudo_images),
                     unlabeled_set, info)


def add_extra_labels(labeled: list[Sample], unlabeled: list[Sample], folder: str, num_classes: int,
                     balance: bool = False) -> tuple[list[Sample], list[Sample]]:
    """``data.extra_labels``: every unlabelled image with a ``<folder>/<id>.png`` (a pseudo label
    written by ``semiseg pseudo-label``; class indices, 255 = ignore) joins the labelled list with
    it as its mask; the others stay unlabelled. ``balance`` (``data.extra_labels_balance``): the
    labelled list is repeated ``ceil(len(extra) / len(labeled))`` times first, as ST++'s
    ``semi_train`` list is."""
    from pathlib import Path

    from semiseg.data.io import LabelMap

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data.extra_labels folder {root} does not exist: expected the --out folder of "
                        "'semiseg pseudo-label'")
    label_map = LabelMap.identity(num_classes, (IGNORE_INDEX,))
    extra, rest = [], []
    for s in unlabeled:
        png = root / f"{s.id}.png"
        if png.is_file():
            extra.append(Sample(s.id, s.image, png, label_map))
        else:
            rest.append(s)
    if not extra:
        raise DataError(f"data.extra_labels folder {root} holds no <id>.png for any unlabelled image")
    if balance and labeled:
        labeled = labeled * math.ceil(len(extra) / len(labeled))
    return labeled + extra, rest


def build_eval_set(cfg: Union[Config, DataConfig], split: str = "val") -> EvalSet:
    """Every image of ``split`` with its mask, for scoring (ACDC: every volume of ``split``,
    an :class:`~semiseg.data.acdc.ACDCVolumeSet`)."""
    data = _data_cfg(cfg)
    if data.dataset == "acdc":  # whole volumes, scored in 3D (semiseg.engine.evaluator)
        from semiseg.data.acdc import ACDCVolumeSet, require_h5py

        require_h5py()  # before any worker reads a volume
        return ACDCVolumeSet(list_samples(data, split))
    samples = list_samples(data, split)
    unmasked = next((s for s in samples if s.mask is None), None)
    if unmasked is not None:
        raise DataError(f"image {unmasked.image} of split '{split}' has no mask: every evaluation image needs one")
    if data.dataset in CHANGE_DATASETS:  # pairs, scored with the change metrics too
        from semiseg.data.change import ChangeEvalSet

        return ChangeEvalSet(samples, data)
    return EvalSet(samples, data)


# ---------------------------------------------------------------------------------------------
# Checking a whole dataset


def _attempt(problems: list[str], read, *args):
    try:
        return read(*args)
    except DataError as e:
        problems.append(str(e))
        return None


def check_sample(sample: Sample, bad_values: Optional[Counter] = None) -> list[str]:
    """Every problem of one sample: unreadable image or mask, size mismatch, undefined mask values
    (each undefined value is also counted in ``bad_values``, once per mask)."""
    problems: list[str] = []
    if sample.image.suffix == ".h5":  # acdc: one HDF5 file holds image and label
        from semiseg.data.acdc import read_h5

        _attempt(problems, read_h5, sample.image, 2 if sample.image.parent.name == "slices" else 3)
        return problems
    if sample.image_b is not None:  # a change-detection pair: A and B the same size, a 0/255 mask
        from semiseg.data.change import load_images, load_triplet

        if sample.mask is None:
            _attempt(problems, load_images, sample.image, sample.image_b)
        else:
            _attempt(problems, load_triplet, sample.image, sample.image_b, sample.mask)
        return problems
    image = _attempt(problems, read_image, sample.image)
    if sample.mask is None:
        return problems
    raw = _attempt(problems, read_mask, sample.mask)
    if raw is None:
        return problems
    if image is not None:
        _attempt(problems, check_same_size, image, raw, sample.image, sample.mask)
    if bad_values is not None and sample.label_map is not None:
        bad_values.update(sample.label_map.invalid_values(raw))
    _attempt(problems, decode_mask, raw, sample.label_map, sample.mask)
    return problems


def check_dataset(cfg: Union[Config, DataConfig], splits=("train", "val"), hints: Optional[list[str]] = None
                  ) -> list[str]:
    """Read every image and mask of the configured dataset's ``splits`` (and parse its labelled /
    unlabelled split files); one line per problem, every bad file listed, layout problems that
    would lose data silently first (:meth:`~semiseg.data.datasets.DatasetReader.audit`). Used by
    ``semiseg check-data``; what to change in the config, when the problems suggest it, is
    appended to ``hints``."""
    from semiseg.data.datasets import get_reader

    data = _data_cfg(cfg)
    dataset_info(data)  # a config problem (folder without num_classes) or a missing root is raised,
    root = resolve_root(data)  # not listed
    problems: list[str] = list(get_reader(data).audit(root))
    bad_values: Counter = Counter()
    seen: set = set()
    for split in splits:
        samples = _attempt(problems, list_samples, data, split, False) or []
        for sample in samples:
            if (sample.image, sample.mask) in seen:
                continue
            seen.add((sample.image, sample.mask))
            problems.extend(check_sample(sample, bad_values))
    for split_file in (data.labeled, data.unlabeled):
        if split_file is not None and not is_count_or_fraction(split_file):
            _attempt(problems, read_split_file, split_file, data)
    if hints is not None and bad_values and data.dataset == "folder":
        value, count = bad_values.most_common(1)[0]
        n = data.num_classes
        hints.append(f"hint: {count} mask(s) hold the value {value}, which is not a class (data.num_classes={n}) "
                     f"nor the void value (data.ignore_index={data.ignore_index}): if {value} marks unlabelled "
                     f"pixels, set data.ignore_index={value}"
                     + (f"; if it is a class, set data.num_classes={value + 1}" if value < 255 else ""))
    return problems


def _describe_labeled(data: DataConfig) -> str:
    spec = data.labeled
    if spec is None:
        return "every training image with a mask is labelled (data.labeled unset)"
    if is_count_or_fraction(spec):
        return f"data.labeled={spec}, drawn with data.split_seed={data.split_seed}"
    return f"data.labeled={spec}" + (f", data.unlabeled={data.unlabeled}" if data.unlabeled else "")


def dataset_summary(cfg: Union[Config, DataConfig]) -> list[str]:
    """What ``semiseg check-data`` found, in a few lines: the training images that are labelled
    and unlabelled, the validation images and how each split was chosen, and images a list file
    leaves out. Raises the first DataError / ConfigError it meets."""
    from semiseg.data.datasets import FolderLayout, describe_split, get_reader

    data = _data_cfg(cfg)
    info = dataset_info(data)
    reader = get_reader(data)
    root = reader.root()
    lines = [f"{data.dataset} dataset at {root}: {info.num_classes} classes"]
    train = list_samples(data, data.train_split, audit=False)
    labeled, unlabeled = resolve_labeled(data, train)
    lines.append(f"train: {len(labeled)} labelled + {len(unlabeled)} unlabelled images "
                 f"({describe_split(data, data.train_split)}; {_describe_labeled(data)})")
    val = list_samples(data, data.val_split, audit=False)
    lines.append(f"val: {len(val)} images ({describe_split(data, data.val_split)})")
    if isinstance(reader, FolderLayout) and (root / f"{data.train_split}.txt").is_file():
        from semiseg.data.datasets import _images_in

        used = {s.image.resolve() for s in train + val}
        unused = [p for folder in ("images", "unlabeled") for p in _images_in(root / folder)
                  if p.resolve() not in used]
        if unused:
            lines.append(f"note: {len(unused)} images of images/ and unlabeled/ are in neither "
                         f"{data.train_split}.txt nor {data.val_split}.txt, so they are not used (the first: "
                         f"{unused[0]}); list unlabelled images in {data.train_split}.txt too, one path per line")
    return lines
