"""Supervised segmentation losses: cross-entropy with an ignore index, and OHEM.

OHEM follows UniMatch's ``ProbOhemCrossEntropy2d`` (official ``util/ohem.py``): among the valid
pixels, keep those whose probability of the true class is at most ``thresh``; if fewer than
``min_kept`` pixels would be kept, raise the threshold to the ``min_kept``-th smallest
probability. When the batch has fewer valid pixels than ``min_kept`` every valid pixel is kept.
With ``min_kept: 0`` the official criterion never applies the threshold (it is only computed
inside its ``min_kept > 0`` branch), so OHEM is then plain cross-entropy over the valid pixels;
the same holds here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OhemCrossEntropy(nn.Module):
    def __init__(self, ignore_index: int = 255, thresh: float = 0.7, min_kept: int = 100000):
        super().__init__()
        self.ignore_index = ignore_index
        self.thresh = thresh
        self.min_kept = min_kept

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logits (B,K,H,W), target (B,H,W)
        with torch.no_grad():
            valid = target != self.ignore_index
            num_valid = int(valid.sum())
            keep = valid
            if 0 < self.min_kept <= num_valid:  # min_kept 0, or too few valid pixels: plain CE
                prob = logits.detach().float().softmax(1)
                safe_target = target.masked_fill(~valid, 0)
                true_prob = prob.gather(1, safe_target.unsqueeze(1)).squeeze(1)
                true_prob = true_prob.masked_fill(~valid, 1.0)
                kth = true_prob.flatten().kthvalue(self.min_kept).values
                threshold = torch.maximum(torch.tensor(self.thresh, device=logits.device), kth)
                keep = valid & (true_prob <= threshold)
            hard_target = target.masked_fill(~keep, self.ignore_index)
        return F.cross_entropy(logits, hard_target, ignore_index=self.ignore_index)


DICE_SMOOTH = 1e-5  # official DiceLoss's smooth


def dice_loss(probs: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Official ``DiceLoss`` of class probabilities ``probs`` ``(B, K, H, W)`` against class
    indices ``target`` ``(B, H, W)``, over the pixels where ``keep`` ``(B, H, W)`` is true (all
    when None): the mean over the ``K`` classes of ``1 - (2 I_c + s) / (Z_c + Y_c + s)``, with
    ``I_c = sum p_c t_c``, ``Z_c = sum p_c^2``, ``Y_c = sum t_c^2`` over the kept pixels of the
    whole batch and ``s = 1e-5``. No kept pixel: 0. A target outside ``0..K-1`` (the ignore
    label) is one-hot zero."""
    probs = probs.float()
    k = probs.shape[1]
    onehot = (target.unsqueeze(1) == torch.arange(k, device=target.device).view(1, k, 1, 1)).float()
    if keep is not None:
        w = keep.unsqueeze(1).float()
        probs, onehot = probs * w, onehot * w
    dims = (0, 2, 3)
    intersect = (probs * onehot).sum(dims)
    z, y = (probs * probs).sum(dims), (onehot * onehot).sum(dims)
    return (1.0 - (2.0 * intersect + DICE_SMOOTH) / (z + y + DICE_SMOOTH)).mean()


class CEDiceLoss(nn.Module):
    """``(CE + Dice) / 2``, UniMatch's medical labelled loss (``train.loss: ce_dice``)."""

    def __init__(self, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        dice = dice_loss(logits.float().softmax(1), target, target != self.ignore_index)
        return (ce + dice) / 2.0


def build_supervised_loss(train_cfg, ignore_index: int = 255) -> nn.Module:
    if train_cfg.loss == "ce_dice":
        return CEDiceLoss(ignore_index)
    if train_cfg.loss == "ohem":
        return OhemCrossEntropy(ignore_index, train_cfg.ohem_thresh, train_cfg.ohem_min_kept)
    return nn.CrossEntropyLoss(ignore_index=ignore_index)
