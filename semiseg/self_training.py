"""Offline self-training beyond ST: class-balanced pseudo labels (CBST) and ST++'s choice of the
reliable images.

Both work on the labels ``semiseg pseudo-label --no-tags`` writes (:mod:`semiseg.pseudo_label`):
a supervised teacher labels the unlabelled images once, and a fresh student trains on the true
masks plus those labels (``data.extra_labels``).

**Class-balanced selection** (``semiseg pseudo-label --no-tags --keep-per-class P``; Zou et al.,
"Unsupervised Domain Adaptation for Semantic Segmentation via Class-Balanced Self-Training",
ECCV 2018, and its official CBST/CRST code). A confidence threshold shared by all classes keeps
the large, easy classes and drops the rare ones, whose predictions are less confident. CBST gives
every class ``c`` its own threshold ``k_c``: the confidence above which the most confident
fraction ``P`` of the pixels predicted as ``c`` lies (over the whole labelled set of images). A
pixel's label is then ``argmax_c p_c / k_c``, kept where that ratio is at least 1 and ignored
(255) elsewhere. Dividing by ``k_c`` also turns some pixels to a rare class whose threshold is
low, which is CBST's counterweight to the under-predicted classes. One round with a fixed ``P``
is implemented; CBST's schedule (``P`` from 0.2, +0.05 a round, at most 0.5) is a loop of
rounds a user runs. Thresholds come from a 1000-bin histogram per class, so the kept share is
``P`` rounded up to the bin (CBST sorts the confidences; the difference is below 0.001 in ``k_c``).
The softmax is that of the configured test-time augmentation (probabilities averaged over passes).

**Reliable images** (``semiseg select-reliable CKPT_1 ... CKPT_K``; ST++, Yang et al., CVPR 2022,
``select_reliable`` of the official code). Every unlabelled image is predicted by each
checkpoint, single scale, in eval mode. Its score is the mean over the earlier checkpoints of the
mIoU between their prediction and the last checkpoint's (classes present in neither ignored). The
images are sorted by score and the first half (``--fraction``) is reliable. ST++ then labels the
reliable images with the teacher, trains a student on them, labels the other half with that
student, and trains a final student on everything; the steps are the ``pseudo-label`` and
``train`` commands of ``docs/train-on-your-data.md``.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from semiseg.data import IGNORE_INDEX
from semiseg.data.datasets import resolve_root
from semiseg.engine.evaluator import predict_logits
from semiseg.errors import ConfigError
from semiseg.methods.cce import restrict_logits
from semiseg.models.common import eval_mode
from semiseg.pseudo_label import _eval_cfg, network_input, with_progress

HISTOGRAM_BINS = 1000


# ---------------------------------------------------------------------------------------------
# Class-balanced pseudo labels (CBST)


def check_keep(keep: float) -> None:
    """ConfigError unless ``keep`` (``--keep-per-class``) is a fraction in (0, 1]."""
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep-per-class {keep}: expected a fraction in (0, 1]")


def class_thresholds(histogram: np.ndarray, keep: float) -> np.ndarray:
    """``(K,)`` CBST thresholds from ``histogram`` ``(K, BINS)``: counts of the pixels predicted
    as each class by confidence bin (bin ``b`` holds confidences in ``[b / BINS, (b + 1) / BINS)``).
    ``k_c`` is the lower edge of the highest bin at which the pixels of bins ``>= b`` reach
    ``keep`` of the class's total; 1.0 for a class with no predicted pixel (never chosen unless
    certain)."""
    check_keep(keep)
    counts = np.asarray(histogram, dtype=np.float64)
    bins = counts.shape[1]
    from_top = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]  # from_top[c, b] = pixels in bins >= b
    totals = counts.sum(1)
    thresholds = np.ones(counts.shape[0])
    for c in np.flatnonzero(totals):
        reached = np.flatnonzero(from_top[c] >= keep * totals[c] - 1e-9)
        thresholds[c] = max(reached[-1] / bins, 1e-6)
    return thresholds


def balanced_labels(probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` CBST labels of ``probs`` ``(K, H, W)``: ``argmax_c p_c / k_c`` where that ratio
    is at least 1, ``IGNORE_INDEX`` elsewhere."""
    ratio, labels = (probs / thresholds.to(probs)[:, None, None]).max(0)
    return labels.masked_fill(ratio < 1.0, IGNORE_INDEX)


def write_class_balanced_labels(cfg, net: nn.Module, samples, out_dir: str | Path, num_classes: int,
                                keep: float, device: str | torch.device = "cpu", progress: bool = False
                                ) -> tuple[list[Path], np.ndarray]:
    """CBST pseudo labels of ``samples`` (no tags), one ``<id>.png`` each in ``out_dir`` at the
    original size, and the ``(K,)`` thresholds. Two passes: the first predicts every image once
    (kept as float16 log-probabilities at the network's resolution in a temporary folder) and
    counts the confidences per predicted class; the second applies the thresholds."""
    check_keep(keep)  # the fraction's error before any prediction
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_cfg, crop = _eval_cfg(cfg), cfg.eval.crop_size or cfg.data.crop_size
    device = torch.device(device)
    every_class = torch.ones(1, num_classes)
    histogram = np.zeros((num_classes, HISTOGRAM_BINS), dtype=np.int64)

    def full_size_probs(stored: np.ndarray, size) -> torch.Tensor:
        logits = torch.from_numpy(stored).float().unsqueeze(0)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return restrict_logits(logits, every_class).softmax(1)[0]

    with tempfile.TemporaryDirectory(prefix=".cbst-", dir=out) as tmp, eval_mode(net), torch.inference_mode():
        sizes = {}
        for i, sample in enumerate(with_progress(samples, "pseudo-label (CBST 1/2)", progress)):
            x, size = network_input(cfg, sample)
            stored = predict_logits(net, x.to(device), eval_cfg, num_classes, crop)[0].cpu().half().numpy()
            np.save(os.path.join(tmp, f"{i}.npy"), stored)
            sizes[i] = size
            conf, labels = full_size_probs(stored, size).max(0)
            bins = (conf * HISTOGRAM_BINS).long().clamp_(0, HISTOGRAM_BINS - 1)
            histogram += np.bincount((labels * HISTOGRAM_BINS + bins).flatten().numpy(),
                                     minlength=num_classes * HISTOGRAM_BINS).reshape(num_classes, -1)
        thresholds = class_thresholds(histogram, keep)
        k = torch.from_numpy(thresholds).float()
        written = []
        for i, sample in enumerate(with_progress(samples, "pseudo-label (CBST 2/2)", progress)):
            labels = balanced_labels(full_size_probs(np.load(os.path.join(tmp, f"{i}.npy")), sizes[i]), k)
            path = out / f"{sample.id}.png"
            Image.fromarray(labels.numpy().astype(np.uint8), mode="L").save(path)
            written.append(path)
    return written, thresholds


# ---------------------------------------------------------------------------------------------
# ST++: the reliable images


def image_miou(pred: torch.Tensor, reference: torch.Tensor, num_classes: int) -> float:
    """mIoU of ``pred`` against ``reference`` (two label maps of one image), over the classes
    present in either (ST++'s ``meanIOU`` of one image: ``nanmean`` of the IoUs)."""
    pair = reference.flatten().long() * num_classes + pred.flatten().long()
    confusion = torch.bincount(pair, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    inter = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else float("nan")


@torch.inference_mode()
def label_stability(cfg, nets: Sequence[nn.Module], samples, num_classes: int,
                    device: str | torch.device = "cpu", progress: bool = False) -> dict[str, float]:
    """ST++'s reliability of each sample: the mean, over ``nets[:-1]``, of the mIoU between that
    checkpoint's prediction and ``nets[-1]``'s (single scale, no flip, eval mode, at the network's
    resolution)."""
    if len(nets) < 2:
        raise ConfigError(f"select-reliable: got {len(nets)} checkpoint(s), expected at least two "
                          "(the earlier ones, then the final one)")
    plain = _eval_cfg(cfg).model_copy(update={"scales": [1.0], "flip": False})
    crop = cfg.eval.crop_size or cfg.data.crop_size
    device = torch.device(device)
    scores = {}
    with ExitStack() as stack:
        for net in nets:
            stack.enter_context(eval_mode(net))
        for sample in with_progress(samples, "select-reliable", progress):
            x = network_input(cfg, sample)[0].to(device)
            preds = [predict_logits(net, x, plain, num_classes, crop).argmax(1)[0].cpu() for net in nets]
            scores[sample.id] = float(np.mean([image_miou(p, preds[-1], num_classes) for p in preds[:-1]]))
    return scores


def split_reliable(scores: dict[str, float], fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """The ids sorted by score, highest first (ties in the given order): the first
    ``int(len * fraction)`` are reliable, the rest not (ST++: ``[:len // 2]``). A NaN score (an
    image no class was predicted in) sorts last."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"select-reliable --fraction {fraction}: expected a fraction in (0, 1)")
    ranked = sorted(scores, key=lambda i: -scores[i] if scores[i] == scores[i] else float("inf"))
    cut = int(len(ranked) * fraction)
    return ranked[:cut], ranked[cut:]


def write_split(samples, ids: Sequence[str], path: str | Path, data_cfg) -> Path:
    """A split file of the samples with ``ids`` (in that order): ``image [mask]`` per line,
    relative to the dataset root, as the bundled split files are."""
    by_id = {s.id: s for s in samples}
    root = Path(os.path.abspath(resolve_root(data_cfg)))
    lines = []
    for i in ids:
        s = by_id[i]
        fields = [os.path.relpath(os.path.abspath(s.image), root)]
        if s.mask is not None:
            fields.append(os.path.relpath(os.path.abspath(s.mask), root))
        lines.append(" ".join(fields))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def select_reliable(cfg, nets: Sequence[nn.Module], samples, num_classes: int, out_dir: str | Path,
                    fraction: float = 0.5, device: str | torch.device = "cpu", progress: bool = False,
                    checkpoints: Optional[Sequence[str]] = None) -> dict:
    """ST++'s selection written to ``out_dir``: ``reliable.txt`` and ``unreliable.txt`` (split
    files for ``pseudo-label --split`` and ``data.unlabeled``) and ``reliability.json`` (the
    scores, most reliable first). Returns the JSON's content."""
    split_reliable({}, fraction)  # the fraction's error before any prediction
    scores = label_stability(cfg, nets, samples, num_classes, device, progress)
    reliable, unreliable = split_reliable(scores, fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_split(samples, reliable, out / "reliable.txt", cfg.data)
    write_split(samples, unreliable, out / "unreliable.txt", cfg.data)
    summary = {"checkpoints": list(checkpoints or []), "fraction": fraction, "reliable": len(reliable),
               "unreliable": len(unreliable), "scores": {i: scores[i] for i in reliable + unreliable}}
    (out / "reliability.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
