"""Stage two of PCT (Wang et al., Pattern Recognition 2022): pseudo-label PNGs for the weak images,
and scoring a network *with* tags.

``semiseg pseudo-label CHECKPOINT --split unlabeled --out DIR`` predicts every image of the split
with the checkpoint's default network (HybridNet for ``pct``, as the official ``run.py`` uses
the HybridNet checkpoint for ``inference.py``), restricts the prediction to the image's tags
(``data.tags`` of the checkpoint's config, or ``--set data.tags=...``) and writes
``DIR/<id>.png``: one class index per pixel (8-bit), at the image's original size. The
configured test-time augmentation applies (``--set eval.flip=true --set
eval.scales=[0.5,0.75,1.0,1.25,1.5]``, the official ``TEST_FLIP`` / ``TEST_MULTISCALE``).
Deviation: the passes' softmax probabilities are averaged (:func:`~semiseg.engine.evaluator.
predict_logits`), the official code averages logits; the restricted argmax is then taken, after
bilinear resizing to the original size.

A supervised run with ``data.extra_labels: DIR`` then trains on the strong ground truth plus these
pseudo labels (:func:`semiseg.data.build.add_extra_labels`) and needs no tags at test time.

``--no-tags`` writes plain self-training labels instead: the argmax over every class, no tags
read (the pseudo labels of ST / ST++, Yang et al., CVPR 2022, whose ``label.py`` predicts the
unlabelled images with the supervised network, softmax averaged over scales 0.5-2.0 and flips).
Without ``data.tags`` and without ``--no-tags`` the tags come from the images' own masks (PCT's
weak images); for semi-supervised self-training on images without masks, pass ``--no-tags``.
``data.extra_labels_balance: true`` then repeats the ground-truth images to as many as the
pseudo-labelled ones, as ST++'s ``semi_train`` set does, and ``data.extra_labels_strong: true``
gives the pseudo-labelled crops its strong augmentation. ST++'s "++" (the reliable half of the
images by the stability of their labels over checkpoints, ``semiseg select-reliable``) and CBST's
class-balanced labels (``--keep-per-class P``) are in :mod:`semiseg.self_training`.

``--score`` reports the mIoU of the tag-restricted predictions on a split with masks, the tags
derived from the ground truth (every class with a pixel, plus the background): the quality of
the pseudo labels (official ``test.py``, "evaluation with image-level labels"); ``semiseg eval``
gives the usual score without tags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from semiseg.data import IGNORE_INDEX
from semiseg.data.build import EvalSet
from semiseg.data.datasets import dataset_info, list_samples, read_split_file, resolve_root
from semiseg.data.io import read_image
from semiseg.data.splits import resolve_labeled
from semiseg.data.tags import TagSource, build_tag_source, resolve_background
from semiseg.data.transforms import base_resize, normalize
from semiseg.engine.evaluator import predict_logits
from semiseg.engine.metrics import ConfusionMatrix
from semiseg.errors import DataError
from semiseg.methods.cce import restrict_logits, tags_from_labels
from semiseg.models.common import eval_mode


def split_samples(cfg, split: str):
    """The samples of ``split``: ``unlabeled`` / ``labeled`` (the config's partition of the
    training split), a split file, or a split name of the dataset."""
    data = cfg.data
    if split in ("unlabeled", "labeled"):
        labeled, unlabeled = resolve_labeled(data, list_samples(data, data.train_split))
        return unlabeled if split == "unlabeled" else labeled
    path = Path(split)
    if path.suffix == ".txt" or (resolve_root(data) / path).is_file() or path.is_file():
        return read_split_file(split, data)
    return list_samples(data, split)


def network_input(cfg, sample) -> tuple[torch.Tensor, tuple[int, int]]:
    """The ``(1, 3, h, w)`` network input of ``sample`` (base resize, normalised) and the
    image's original ``(H, W)``."""
    img = read_image(sample.image)
    x, _ = normalize(base_resize(img, None, cfg.data.resize)[0], None, cfg.data.mean, cfg.data.std)
    return x.unsqueeze(0), (img.height, img.width)


def with_progress(samples, desc: str, progress: bool):
    """``samples``, behind a tqdm bar when ``progress``."""
    if not progress:
        return samples
    from tqdm import tqdm

    return tqdm(samples, desc=desc, dynamic_ncols=True, leave=False)


def _eval_cfg(cfg):
    """The config's test-time settings, ``center_crop`` replaced by whole images (every pixel
    needs a label)."""
    mode = cfg.eval.mode if cfg.eval.mode != "center_crop" else "original"
    return cfg.eval.model_copy(update={"mode": mode})


@torch.inference_mode()
def restricted_prediction(net: nn.Module, image: torch.Tensor, tags: torch.Tensor, eval_cfg, num_classes: int,
                          crop_size: Optional[int] = None, out_size: Optional[tuple[int, int]] = None
                          ) -> torch.Tensor:
    """``(B, H, W)`` labels: the tag-restricted argmax of ``net``'s (test-time augmented) logits
    of ``image`` ``(B, 3, h, w)``, resized bilinearly to ``out_size = (H, W)`` first."""
    logits = predict_logits(net, image, eval_cfg, num_classes, crop_size)
    if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return restrict_logits(logits, tags.to(logits.device)).argmax(1)


def write_pseudo_labels(cfg, net: nn.Module, samples, out_dir: str | Path, num_classes: int,
                        device: str | torch.device = "cpu", progress: bool = False, use_tags: bool = True
                        ) -> list[Path]:
    """One ``<id>.png`` per sample in ``out_dir`` (tag-restricted labels at the original size);
    ``use_tags=False``: the argmax over every class, no tags read (self-training labels)."""
    tags_source, every_class = None, torch.ones(1, num_classes)
    if use_tags:
        tags_source = build_tag_source(cfg.data)
    if use_tags and tags_source is None:  # no data.tags: the masks are the only possible source
        info = dataset_info(cfg.data)
        tags_source = TagSource(num_classes, list(info.class_names), resolve_background(cfg.data, info.class_names),
                                cfg.data.tags_min_pixels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_cfg, crop = _eval_cfg(cfg), cfg.eval.crop_size or cfg.data.crop_size
    device = torch.device(device)
    written = []
    with eval_mode(net):
        for sample in with_progress(samples, "pseudo-label", progress):
            tags = torch.from_numpy(tags_source.for_sample(sample)).unsqueeze(0) if use_tags else every_class
            x, size = network_input(cfg, sample)
            labels = restricted_prediction(net, x.to(device), tags, eval_cfg, num_classes, crop, size)
            path = out / f"{sample.id}.png"
            Image.fromarray(labels[0].cpu().numpy().astype(np.uint8), mode="L").save(path)
            written.append(path)
    return written


def score_with_tags(cfg, net: nn.Module, split: str, num_classes: int, device: str | torch.device = "cpu",
                    background: Optional[int] = None) -> dict:
    """mIoU etc. of the tag-restricted predictions on ``split`` (a split with masks), the tags
    of each image derived from its ground truth (any pixel; ``background`` always)."""
    samples = split_samples(cfg, split)
    if any(s.mask is None for s in samples):
        raise DataError(f"--score: split '{split}' has images without masks; scoring needs ground truth")
    dataset = EvalSet(samples, cfg.data)
    eval_cfg, crop = _eval_cfg(cfg), cfg.eval.crop_size or cfg.data.crop_size
    device = torch.device(device)
    cm = ConfusionMatrix(num_classes, IGNORE_INDEX, device=device)
    with eval_mode(net):
        for i in range(len(dataset)):
            item = dataset[i]
            if "image" not in item:  # a file that cannot be read
                raise DataError(item["skipped"])
            mask = item["mask"].unsqueeze(0).to(device)
            tags = tags_from_labels(mask, num_classes, IGNORE_INDEX, background)
            pred = restricted_prediction(net, item["image"].unsqueeze(0).to(device), tags, eval_cfg, num_classes,
                                         crop, tuple(mask.shape[-2:]))
            cm.update(pred, mask)
    result = cm.compute()
    result["images"] = len(dataset)
    return result
