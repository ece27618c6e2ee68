"""Segmentation metrics from one confusion matrix accumulated over a whole split.

Follows the official UniMatch evaluation (``intersectionAndUnion`` in ``util/utils.py``):
intersections and unions are *summed over every image of the split* (and over every process)
before any division, so mIoU is a split-level score, not a mean of per-image scores. Both
quantities come from a ``K x K`` confusion matrix (rows = ground truth, columns = prediction):

* ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``, reported in percent;
* a class that occurs neither in the ground truth nor in the prediction has an undefined IoU
  (``None`` in ``per_class_iou``) and is left out of the mean (mmsegmentation's ``nanmean``).
  UniMatch divides by ``union + 1e-10`` and would count such a class as 0; on the standard
  validation splits every class occurs, so both give the same number. A class that is predicted
  but absent from the ground truth has IoU 0 and *is* counted;
* ``pixel_acc`` = correctly labelled pixels / labelled pixels; ``mean_acc`` = mean over the
  classes present in the ground truth of the per-class recall ``TP_c / GT_c``.

Pixels whose target equals ``ignore_index`` (255 by default) are not counted anywhere.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """A ``K x K`` int64 count matrix: ``matrix[gt, pred]`` = number of pixels.

    >>> cm = ConfusionMatrix(3)
    >>> cm.update(pred, target)    # any shapes, equal; target == ignore_index is skipped
    >>> cm.all_reduce()            # sum over torch.distributed ranks (no-op in one process)
    >>> cm.compute()["mIoU"]
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count the pixels of one batch. ``pred`` and ``target`` hold class indices (any integer
        dtype, same shape); target pixels equal to ``ignore_index`` are skipped."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        k = self.num_classes
        pred = pred.to(self.matrix.device, torch.int64).reshape(-1)
        target = target.to(self.matrix.device, torch.int64).reshape(-1)
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        if target.numel() == 0:
            return
        for name, values in (("target", target), ("prediction", pred)):
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= k:
                bad = lo if lo < 0 else hi
                raise ValueError(f"{name} holds class index {bad} outside [0, {k}) "
                                 f"(ignore_index={self.ignore_index})")
        self.matrix += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks when torch.distributed is initialised; else a no-op.

        Every rank must call it (it is a collective). With the NCCL backend a CPU matrix is
        reduced through the current CUDA device."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_backend() == "nccl" and self.matrix.device.type != "cuda":
            buf = self.matrix.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(buf)
            self.matrix.copy_(buf.cpu())
        else:
            dist.all_reduce(self.matrix)

    def compute(self) -> dict:
        """Scores in percent: ``mIoU``, ``per_class_iou`` (``None`` where undefined),
        ``pixel_acc``, ``mean_acc`` and ``per_class_acc`` (``None`` for classes absent from the
        ground truth). An empty matrix gives NaN scores."""
        m = self.matrix.detach().to("cpu", torch.float64)
        tp = m.diag()
        gt = m.sum(dim=1)
        predicted = m.sum(dim=0)
        union = gt + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, math.nan))
        total = gt.sum()
        return {
            "mIoU": _nanmean_percent(iou),
            "per_class_iou": _percent_list(iou),
            "pixel_acc": float(tp.sum() / total * 100) if total > 0 else math.nan,
            "mean_acc": _nanmean_percent(acc),
            "per_class_acc": _percent_list(acc),
        }


def _nanmean_percent(values: torch.Tensor) -> float:
    defined = values[~values.isnan()]
    return float(defined.mean() * 100) if defined.numel() else math.nan


def _percent_list(values: torch.Tensor) -> list[Optional[float]]:
    return [None if math.isnan(v) else v * 100 for v in values.tolist()]


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def format_table(result: dict, class_names: Optional[Sequence[str]] = None) -> str:
    """A plain-text table: one row per class (IoU, accuracy), then mIoU / pixel acc / mean acc.

    ``result`` is what :meth:`ConfusionMatrix.compute` or ``evaluate`` returns. The per-class
    accuracy comes from ``per_class_acc`` or, failing that, from the ``confusion`` matrix."""
    ious = list(result.get("per_class_iou") or [])
    accs = result.get("per_class_acc")
    if accs is None and result.get("confusion") is not None:
        m = torch.tensor(result["confusion"], dtype=torch.float64)
        gt = m.sum(dim=1)
        accs = [float(m[i, i] / gt[i] * 100) if gt[i] > 0 else None for i in range(len(gt))]
    accs = list(accs or [None] * len(ious))
    names = list(class_names or [])
    names += [f"class_{i}" for i in range(len(names), len(ious))]
    width = max([len("pixel acc")] + [len(n) for n in names[: len(ious)]])
    line = f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}"
    rows = [line, "-" * len(line)]
    for name, iou, acc in zip(names, ious, accs):
        rows.append(f"{name:<{width}}  {_fmt(iou):>7}  {_fmt(acc):>7}")
    rows.append("-" * len(line))
    for label, key in (("mIoU", "mIoU"), ("pixel acc", "pixel_acc"), ("mean acc", "mean_acc")):
        if key in result:
            rows.append(f"{label:<{width}}  {_fmt(result[key]):>7}")
    return "\n".join(rows)


def change_scores(matrix) -> dict:
    """Binary change-detection scores from a 2 x 2 confusion matrix (rows ground truth, columns
    prediction; class 1 = changed), in percent, as UniMatch's remote-sensing scenario and the
    change-detection literature report them: ``changed_iou`` (the paper's score,
    ``TP / (TP + FP + FN)``), ``unchanged_iou``, ``f1`` (``2 P R / (P + R)`` =
    ``2 TP / (2 TP + FP + FN)``), ``precision`` ``TP / (TP + FP)``, ``recall`` ``TP / (TP + FN)``
    and ``overall_acc`` (correct pixels / scored pixels). A score whose denominator is 0 is NaN."""
    m = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    if tuple(m.shape) != (2, 2):
        raise ValueError(f"change scores need a 2 x 2 confusion matrix (unchanged, changed), got {tuple(m.shape)}")
    tn, fp, fn, tp = m[0, 0].item(), m[0, 1].item(), m[1, 0].item(), m[1, 1].item()

    def pct(num: float, den: float) -> float:
        return num / den * 100 if den > 0 else math.nan

    return {"changed_iou": pct(tp, tp + fp + fn), "unchanged_iou": pct(tn, tn + fn + fp),
            "f1": pct(2 * tp, 2 * tp + fp + fn), "precision": pct(tp, tp + fp), "recall": pct(tp, tp + fn),
            "overall_acc": pct(tp + tn, tp + tn + fp + fn)}


CHANGE_KEYS = (("changed IoU", "changed_iou"), ("unchanged IoU", "unchanged_iou"), ("F1", "f1"),
               ("precision", "precision"), ("recall", "recall"), ("overall acc", "overall_acc"))


def format_change(result: dict) -> str:
    """The change scores of ``result`` (:func:`change_scores`), one per line."""
    return "\n".join(f"{label:<13} {_fmt(result.get(key)):>7}" for label, key in CHANGE_KEYS)
