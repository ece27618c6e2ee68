"""Scoring a network on a labelled split, following UniMatch's ``evaluate()`` (``supervised.py``).

Modes (``eval.mode``):

* ``original`` -- the whole image in one forward pass (UniMatch's default for Pascal/COCO);
* ``center_crop`` -- only the central ``crop_size x crop_size`` window is predicted *and scored*:
  the mask is cut to the same window (UniMatch's Cityscapes mode during training). An image
  smaller than the crop is zero-padded to the crop for the forward pass (zero = the mean colour
  after normalisation) and the padding is dropped again, so it is scored on its own pixels;
* ``sliding_window`` -- ``crop_size`` windows every ``stride`` pixels (default
  ``int(crop_size * 2 / 3)``, UniMatch's ``int(grid * 2 / 3)``); the softmax probabilities of
  overlapping windows are summed and divided by the per-pixel window count (``eval.stride``
  overrides the step; it is capped at the crop so that no pixel is skipped). Deviation: UniMatch
  steps ``row += stride`` until the border and feeds the truncated windows it meets there (down
  to slivers a few pixels wide); here the last window of each row/column is shifted back to end
  at the border (mmsegmentation's ``slide_inference``), so every window is a full crop and every
  pixel is covered. Images smaller than the crop are zero-padded to it, padding dropped after.

Test-time augmentation (not in UniMatch; mmsegmentation's ``aug_test`` convention): for every
scale in ``eval.scales`` (the input is resized bilinearly, the chosen mode runs at that size and
the result is resized back) and, with ``eval.flip``, its horizontal mirror (flipped back), the
*softmax probabilities* are averaged. The returned tensor is then ``log`` of the averaged
probability: its softmax is that average and its argmax the prediction. A single plain pass
(``original``/``center_crop``, scale 1, no flip) returns the network's raw logits.

Scores come from one :class:`~semiseg.engine.metrics.ConfusionMatrix` accumulated over the split
and, under ``torch.distributed``, all-reduced over ranks (UniMatch all-reduces intersection and
union per batch; the sum is the same).

Volumes (a dataset with ``volumetric = True``, :class:`~semiseg.data.acdc.ACDCVolumeSet`) are
scored as UniMatch's medical ``unimatch.py`` does, by :func:`evaluate_volumes`: every slice of a
volume is resized (bilinear) to the crop size, predicted (the whole stack in one batch), its
logits resized back (bilinear) and arg-maxed; each foreground class gets its 3D Dice on each
volume, and the split's Dice of a class is the mean over volumes (``mDice``: the mean over the
foreground classes). ``eval.mode``, ``eval.flip`` and ``eval.scales`` do not apply.

Change detection (a dataset with ``change_detection = True``, :class:`~semiseg.data.change.
ChangeEvalSet`): the images are pairs stacked on the channel axis (6 channels), which every mode,
flip and scale treats as one image; the result also holds the change scores of
:func:`~semiseg.engine.metrics.change_scores` (``changed_iou``, ``unchanged_iou``, ``f1``,
``precision``, ``recall``, ``overall_acc``) from the same split-level confusion matrix, as
UniMatch's remote-sensing ``evaluate`` (which reports the IoU of each class and the overall accuracy).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from semiseg.engine.metrics import ConfusionMatrix, change_scores
from semiseg.models.common import eval_mode

AutocastFactory = Optional[Callable[[], object]]


class EvaluationInterrupted(Exception):
    """``should_stop()`` turned true during :func:`evaluate` (Ctrl-C in a training run)."""


# ---------------------------------------------------------------------------------------------
# Geometry


def default_stride(crop_size: int) -> int:
    """UniMatch's sliding-window step: two thirds of the crop."""
    return max(1, int(crop_size * 2 / 3))


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis: every ``stride`` pixels, the last one moved
    back to end exactly at the border. A ``size`` not larger than ``crop`` gives one window."""
    if size <= crop:
        return [0]
    return list(range(0, size - crop, stride)) + [size - crop]


def center_crop_box(height: int, width: int, crop_size: int) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the central crop (UniMatch: ``start = (size - crop) // 2``);
    an axis shorter than the crop is kept whole."""
    h, w = min(height, crop_size), min(width, crop_size)
    return (height - h) // 2, (width - w) // 2, h, w


def _pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad the bottom/right of ``x`` up to at least ``height x width``."""
    ph, pw = max(0, height - x.shape[-2]), max(0, width - x.shape[-1])
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# Prediction


def _forward(model: nn.Module, x: torch.Tensor, num_classes: int, autocast: AutocastFactory) -> torch.Tensor:
    """``model(x)`` as float32 logits at the input size (resized bilinearly if the network
    returns another size)."""
    with autocast() if autocast is not None else nullcontext():
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[1] != num_classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the network must return (B, {num_classes}, H, W) logits, got {got}")
    return _resize(out.float(), x.shape[-2:])


def _slide_probs(model: nn.Module, x: torch.Tensor, crop: int, stride: int, num_classes: int,
                 autocast: AutocastFactory) -> torch.Tensor:
    """Sliding-window softmax probabilities of ``x`` (B, 3, H, W) -> (B, K, H, W)."""
    b, _, h, w = x.shape
    padded = _pad_to(x, crop, crop)
    ph, pw = padded.shape[-2:]
    probs = padded.new_zeros(b, num_classes, ph, pw, dtype=torch.float32)
    count = padded.new_zeros(1, 1, ph, pw, dtype=torch.float32)
    for top in window_starts(ph, crop, stride):
        for left in window_starts(pw, crop, stride):
            window = padded[:, :, top:top + crop, left:left + crop]
            probs[:, :, top:top + crop, left:left + crop] += _forward(model, window, num_classes, autocast).softmax(1)
            count[:, :, top:top + crop, left:left + crop] += 1
    return (probs / count)[:, :, :h, :w]


def predict_logits(model: nn.Module, image: torch.Tensor, eval_cfg, num_classes: int,
                   crop_size: Optional[int] = None, autocast: AutocastFactory = None) -> torch.Tensor:
    """Logits of ``image`` (B, 3, H, W) under ``eval_cfg`` (mode, stride, flip, scales).

    Returns ``(B, K, H, W)`` float32 logits for ``original`` and ``sliding_window``. For
    ``center_crop`` the result covers only the window :func:`center_crop_box` gives, i.e.
    ``(B, K, min(H, crop), min(W, crop))``; the caller cuts the mask the same way (``evaluate``
    does). ``crop_size`` overrides ``eval_cfg.crop_size``; it is needed by the two crop modes.
    ``autocast`` is an optional factory of a context manager wrapped around each forward pass.
    See the module docstring for how passes are combined. Call under ``torch.inference_mode()``
    (``evaluate`` does) to avoid building a graph.
    """
    if image.dim() != 4:
        raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(image.shape)}")
    mode = eval_cfg.mode
    crop = crop_size or getattr(eval_cfg, "crop_size", None)
    if mode in ("center_crop", "sliding_window") and not crop:
        raise ValueError(f"eval.mode={mode} needs a crop size (eval.crop_size or data.crop_size)")
    height, width = image.shape[-2:]

    if mode == "center_crop":
        top, left, height, width = center_crop_box(image.shape[-2], image.shape[-1], crop)
        image = _pad_to(image[:, :, top:top + height, left:left + width], crop, crop)
    elif mode not in ("original", "sliding_window"):
        raise ValueError(f"unknown eval.mode {mode!r}: expected original, center_crop or sliding_window")

    scales = list(getattr(eval_cfg, "scales", None) or [1.0])
    flips = (False, True) if getattr(eval_cfg, "flip", False) else (False,)
    passes = [(float(s), f) for s in scales for f in flips]

    if mode != "sliding_window" and passes == [(1.0, False)]:
        return _forward(model, image, num_classes, autocast)[:, :, :height, :width]

    # a stride above the crop would leave pixels no window covers
    stride = min(getattr(eval_cfg, "stride", None) or default_stride(crop or 1), crop or 1)
    full_size = image.shape[-2:]
    total = None
    for scale, flipped in passes:
        x = image
        if scale != 1.0:
            x = _resize(x, (max(1, round(full_size[0] * scale)), max(1, round(full_size[1] * scale))))
        if flipped:
            x = x.flip(-1)
        if mode == "sliding_window":
            p = _slide_probs(model, x, crop, stride, num_classes, autocast)
        else:
            p = _forward(model, x, num_classes, autocast).softmax(1)
        if flipped:
            p = p.flip(-1)
        p = _resize(p, full_size)
        total = p if total is None else total + p
    mean = total / len(passes)
    return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()[:, :, :height, :width]


def class_map(logits: torch.Tensor) -> torch.Tensor:
    """``(B, K, H, W)`` scores -> ``(B, H, W)`` class indices (the first maximum on ties, as
    ``argmax(1)``). On the CPU an argmax across channels of a channels-first tensor walks memory
    with a stride of ``H * W``; one copy to channels-last makes it 5x faster (480x360, 11 classes:
    61 -> 12 ms, ``benchmarks/eval_speed.py``)."""
    return logits.contiguous(memory_format=torch.channels_last).argmax(1)


# ---------------------------------------------------------------------------------------------
# Evaluation loop


def _as_list(batch: list) -> list:
    """``collate_fn`` keeping the samples apart (images of a split may differ in size)."""
    return batch


def _groups(batch) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (B,3,H,W), masks (B,H,W)) groups of equal size from a loader item: either a list of
    sample dicts (consecutive samples of equal size are stacked) or an already-collated dict."""
    if isinstance(batch, dict):
        image, mask = batch["image"], batch["mask"]
        if image.dim() == 3:
            image, mask = image.unsqueeze(0), mask.unsqueeze(0)
        yield image, mask
        return
    run: list[dict] = []
    for sample in batch:
        if run and sample["image"].shape != run[0]["image"].shape:
            yield torch.stack([s["image"] for s in run]), torch.stack([s["mask"] for s in run])
            run = []
        run.append(sample)
    if run:
        yield torch.stack([s["image"] for s in run]), torch.stack([s["mask"] for s in run])


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _default_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def evaluate(model: nn.Module, dataset_or_loader: Dataset | Iterable, eval_cfg, num_classes: int,
             ignore_index: int = 255, device: Optional[torch.device | str] = None,
             crop_size: Optional[int] = None, progress: bool | Callable[[int, Optional[int]], None] = True,
             autocast: AutocastFactory = None,
             num_workers: int = 0, should_stop: Optional[Callable[[], bool]] = None,
             desc: Optional[str] = None) -> dict:
    """Score ``model`` on a split; returns ``mIoU``, ``per_class_iou``, ``pixel_acc``,
    ``mean_acc``, ``per_class_acc`` (percent, see :mod:`semiseg.engine.metrics`) and
    ``confusion`` (``K x K`` nested list, rows = ground truth).

    ``dataset_or_loader`` is a dataset of ``{"image": (3,H,W) float, "mask": (H,W) long, ...}``
    (images may differ in size; ``eval_cfg.batch_size`` samples are loaded together and those of
    equal size share a forward pass) or any iterable of such lists / collated dicts. A dataset is
    sharded by index ``range(rank, n, world_size)`` under torch.distributed -- no padding
    duplicates, unlike ``DistributedSampler`` -- and the confusion matrix is all-reduced, so
    every image counts exactly once. A loader is used as given (shard it yourself). Every rank
    must call this function.

    The model runs in eval mode under ``torch.inference_mode()`` and every submodule gets its
    previous train/eval mode back afterwards. ``device`` defaults to the model's; ``autocast`` is an
    optional context-manager factory for the forward passes; a tqdm bar (``desc``, counting
    images) is shown on rank 0 when ``progress`` is true; a callable ``progress(done, total)`` is
    called after every batch instead (the trainer shows it on its own bar).

    A sample without ``"image"`` but with ``"skipped"`` (a message: :class:`~semiseg.data.build.
    EvalSet` gives one for a file it cannot read) is left out; the messages are returned as
    ``skipped``. ``should_stop`` is asked before every batch: when it returns true the evaluation
    ends with :class:`EvaluationInterrupted` (the trainer's Ctrl-C).
    """
    if getattr(dataset_or_loader, "volumetric", False):
        return evaluate_volumes(model, dataset_or_loader, num_classes, crop_size or getattr(eval_cfg, "crop_size", None),
                                device=device, progress=progress, autocast=autocast, should_stop=should_stop,
                                desc=desc, with_hd95=bool(getattr(eval_cfg, "hd95", False)))
    rank, world = _rank_world()
    device = torch.device(device) if device is not None else _default_device(model)
    total = None
    if isinstance(dataset_or_loader, Dataset) and not isinstance(dataset_or_loader, DataLoader):
        from semiseg.engine.sampling import ignore_sigint

        shard = Subset(dataset_or_loader, range(rank, len(dataset_or_loader), world))
        total = len(shard)
        # its own generator: scoring must not draw from the global RNG (a resumed run that redoes
        # an interrupted evaluation then continues exactly as an uninterrupted one)
        loader: Iterable = DataLoader(shard, batch_size=getattr(eval_cfg, "batch_size", 1) or 1, shuffle=False,
                                      num_workers=num_workers, collate_fn=_as_list,
                                      pin_memory=device.type == "cuda", generator=torch.Generator(),
                                      worker_init_fn=ignore_sigint if num_workers > 0 else None)
    else:
        loader = dataset_or_loader

    unit = "image" if total is not None else "batch"
    if total is None and hasattr(loader, "__len__"):
        total = len(loader)
    bar, report = None, None
    if callable(progress):  # the caller shows it: progress(images done, total)
        report = progress
    elif progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc or f"eval ({eval_cfg.mode})", unit=unit, dynamic_ncols=True, leave=False,
                   mininterval=1.0)
    done = 0

    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    skipped: list[str] = []
    try:
        with eval_mode(model), torch.inference_mode():
            for batch in loader:
                if should_stop is not None and should_stop():
                    raise EvaluationInterrupted()
                count = len(batch) if isinstance(batch, list) else 1
                if isinstance(batch, list):
                    skipped += [s["skipped"] for s in batch if "image" not in s and s.get("skipped")]
                    batch = [s for s in batch if "image" in s]
                for image, mask in _groups(batch):
                    image = image.to(device, non_blocking=True)
                    mask = mask.to(device, non_blocking=True)
                    logits = predict_logits(model, image, eval_cfg, num_classes, crop_size, autocast)
                    if eval_cfg.mode == "center_crop":
                        crop = crop_size or eval_cfg.crop_size
                        top, left, h, w = center_crop_box(mask.shape[-2], mask.shape[-1], crop)
                        mask = mask[..., top:top + h, left:left + w]
                    logits = _resize(logits, mask.shape[-2:])  # only if the dataset gives other sizes
                    cm.update(class_map(logits), mask)
                done += count if unit == "image" else 1
                if bar is not None:
                    bar.update(count if unit == "image" else 1)
                if report is not None and rank == 0:
                    report(done, total)
    finally:
        if bar is not None:
            bar.close()
    cm.all_reduce()
    result = cm.compute()
    if getattr(dataset_or_loader, "change_detection", False):  # image pairs (semiseg.data.change)
        result.update(change_scores(cm.matrix))
    result["confusion"] = cm.matrix.cpu().tolist()
    result["skipped"] = skipped
    return result


# ---------------------------------------------------------------------------------------------
# Volumes (UniMatch's medical scenario)


def volume_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float]:
    """3D Dice in percent of classes ``1..K-1`` between two label volumes:
    ``200 |P_c & G_c| / (|P_c| + |G_c|)``. A class absent from both is 100 (perfect; the
    official code would divide by zero)."""
    out = []
    for c in range(1, num_classes):
        p, g = pred == c, target == c
        denom = int(p.sum()) + int(g.sum())
        out.append(100.0 if denom == 0 else 200.0 * int((p & g).sum()) / denom)
    return out


def hd95(pred: torch.Tensor, target: torch.Tensor) -> Optional[float]:
    """95% Hausdorff distance in voxels between two binary volumes (medpy's ``hd95``, which
    SSL4MIS and UniMatch's medical baselines report): the surface voxels of each (the voxels
    an erosion removes), the distance of every surface voxel of one to the other's surface,
    both directions pooled, the 95th percentile. None when either volume is empty. Needs scipy."""
    try:
        from scipy import ndimage
    except ImportError:
        from semiseg.errors import SemisegError

        raise SemisegError("eval.hd95 needs scipy, which is not installed: pip install 'semiseg[medical]'") from None
    import numpy as np

    a, b = pred.cpu().numpy().astype(bool), target.cpu().numpy().astype(bool)
    if not a.any() or not b.any():
        return None
    structure = ndimage.generate_binary_structure(a.ndim, 1)
    surf_a = a ^ ndimage.binary_erosion(a, structure=structure, border_value=0)
    surf_b = b ^ ndimage.binary_erosion(b, structure=structure, border_value=0)
    to_b = ndimage.distance_transform_edt(~surf_b)[surf_a]
    to_a = ndimage.distance_transform_edt(~surf_a)[surf_b]
    return float(np.percentile(np.concatenate([to_b, to_a]), 95))


def predict_volume(model: nn.Module, image: torch.Tensor, num_classes: int, crop_size: int,
                   autocast: AutocastFactory = None) -> torch.Tensor:
    """Class map ``(D, H, W)`` of a volume ``(D, H, W)``: every slice resized (bilinear) to
    ``crop_size`` squared, the stack predicted in one batch, the logits resized back and arg-maxed."""
    d, h, w = image.shape
    x = F.interpolate(image.float().unsqueeze(1), size=(crop_size, crop_size), mode="bilinear", align_corners=False)
    logits = _forward(model, x, num_classes, autocast)
    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return class_map(logits)


def evaluate_volumes(model: nn.Module, dataset: Dataset, num_classes: int, crop_size: Optional[int],
                     device: Optional[torch.device | str] = None,
                     progress: bool | Callable[[int, Optional[int]], None] = True, autocast: AutocastFactory = None,
                     should_stop: Optional[Callable[[], bool]] = None, desc: Optional[str] = None,
                     with_hd95: bool = False) -> dict:
    """Score ``model`` on a dataset of volumes ``{"image": (D, H, W), "mask": (D, H, W)}`` (see the
    module docstring). Returns ``mDice`` and ``per_class_dice`` (percent; index 0, the
    background, None), ``volumes`` (how many were scored), and from the voxel confusion matrix of
    all volumes the usual ``mIoU``, ``per_class_iou``, ``pixel_acc``, ``mean_acc``,
    ``confusion``; ``skipped`` lists unreadable volumes. With ``with_hd95`` (``eval.hd95``) also
    ``per_class_hd95`` and ``mHD95`` (voxels; a class's mean over the volumes where both the
    prediction and the ground truth hold it, None if none). Sharded by index under
    torch.distributed, the sums all-reduced."""
    if not crop_size:
        raise ValueError("volume evaluation needs the crop size (data.crop_size)")
    rank, world = _rank_world()
    device = torch.device(device) if device is not None else _default_device(model)
    indices = range(rank, len(dataset), world)
    bar, report = None, progress if callable(progress) else None
    if progress is True and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc=desc or "eval (volumes)", unit="volume", dynamic_ncols=True, leave=False,
                   mininterval=1.0)
    cm = ConfusionMatrix(num_classes, 255, device=device)
    dice_sum = torch.zeros(num_classes - 1, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    hd_sum = torch.zeros(num_classes - 1, dtype=torch.float64, device=device)
    hd_count = torch.zeros(num_classes - 1, dtype=torch.float64, device=device)
    skipped: list[str] = []
    try:
        with eval_mode(model), torch.inference_mode():
            for done, i in enumerate(indices, 1):
                if should_stop is not None and should_stop():
                    raise EvaluationInterrupted()
                sample = dataset[i]
                if "image" not in sample:
                    skipped.append(sample.get("skipped", f"volume {i}"))
                else:
                    image, mask = sample["image"].to(device), sample["mask"].to(device)
                    pred = predict_volume(model, image, num_classes, crop_size, autocast)
                    dice_sum += torch.tensor(volume_dice(pred, mask, num_classes), dtype=torch.float64,
                                             device=device)
                    count += 1
                    cm.update(pred, mask)
                    if with_hd95:
                        for c in range(1, num_classes):
                            d = hd95(pred == c, mask == c)
                            if d is not None:
                                hd_sum[c - 1] += d
                                hd_count[c - 1] += 1
                if bar is not None:
                    bar.update(1)
                if report is not None and rank == 0:
                    report(done, len(indices))
    finally:
        if bar is not None:
            bar.close()
    if world > 1:
        for t in (dice_sum, count, hd_sum, hd_count):
            dist.all_reduce(t)
    cm.all_reduce()
    result = cm.compute()
    per_class = (dice_sum / count.clamp_min(1)).tolist()
    result["per_class_dice"] = [None] + per_class
    result["mDice"] = sum(per_class) / len(per_class) if count > 0 and per_class else float("nan")
    result["volumes"] = int(count)
    if with_hd95:
        per_hd = [float(hd_sum[i] / hd_count[i]) if hd_count[i] > 0 else None for i in range(num_classes - 1)]
        result["per_class_hd95"] = [None] + per_hd
        defined = [v for v in per_hd if v is not None]
        result["mHD95"] = sum(defined) / len(defined) if defined else None
    result["confusion"] = cm.matrix.cpu().tolist()
    result["skipped"] = skipped
    return result
