"""Supervised losses on fixed tensors against hand-written references."""

import math

import torch

from semiseg.engine.optim import poly_lr
from semiseg.methods.losses import OhemCrossEntropy


def test_ohem_keeps_hard_pixels_and_min_kept():
    # 1 image, 2 classes, 4 pixels; true-class probabilities 0.9, 0.6, 0.3, (ignored)
    p = torch.tensor([0.9, 0.6, 0.3, 0.5])
    logits = torch.stack([torch.log(p), torch.log(1 - p)]).view(1, 2, 1, 4)
    target = torch.tensor([[[0, 0, 0, 255]]])
    # threshold 0.7, min_kept 1: keep pixels with p <= 0.7 -> pixels 1 and 2
    loss = OhemCrossEntropy(255, thresh=0.7, min_kept=1)(logits, target)
    assert math.isclose(loss.item(), -(math.log(0.6) + math.log(0.3)) / 2, rel_tol=1e-6)
    # min_kept 3 raises the threshold to the 3rd smallest probability (0.9): all valid kept
    loss = OhemCrossEntropy(255, thresh=0.7, min_kept=3)(logits, target)
    assert math.isclose(loss.item(), -(math.log(0.9) + math.log(0.6) + math.log(0.3)) / 3, rel_tol=1e-6)
    # fewer valid pixels than min_kept: every valid pixel is kept (official behaviour)
    loss = OhemCrossEntropy(255, thresh=0.7, min_kept=10)(logits, target)
    assert math.isclose(loss.item(), -(math.log(0.9) + math.log(0.6) + math.log(0.3)) / 3, rel_tol=1e-6)


def test_poly_schedule():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert math.isclose(poly_lr(0.01, 50, 100, 0.9), 0.01 * 0.5**0.9)
    assert math.isclose(poly_lr(0.01, 0, 100, 0.9, warmup_iters=10), 0.001)
