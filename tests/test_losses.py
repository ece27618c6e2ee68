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


def official_ohem_reference(logits, target, thresh, min_kept, ignore=255):
    """UniMatch's ProbOhemCrossEntropy2d spelt out pixel by pixel: over the whole batch, when
    0 < min_kept <= number of valid pixels, the threshold is raised to the min_kept-th smallest
    true-class probability and only pixels at or below it count; otherwise (min_kept 0, or too
    few valid pixels) every valid pixel counts. Mean of -log p over the counted pixels."""
    b, k, h, w = logits.shape
    pixels = []  # (true-class probability, -log of it) of every valid pixel
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                if t == ignore:
                    continue
                z = [float(logits[i, c, y, x]) for c in range(k)]
                m = max(z)
                log_p = z[t] - m - math.log(sum(math.exp(v - m) for v in z))
                pixels.append((math.exp(log_p), -log_p))
    if 0 < min_kept <= len(pixels):
        kth = sorted(p for p, _ in pixels)[min_kept - 1]
        threshold = kth if kth > thresh else thresh
        pixels = [(p, nll) for p, nll in pixels if p <= threshold]
    return sum(nll for _, nll in pixels) / len(pixels)


def test_ohem_with_min_kept_zero_is_plain_cross_entropy():
    # the official criterion only thresholds inside its `min_kept > 0` branch
    p = torch.tensor([0.9, 0.6, 0.3, 0.5])
    logits = torch.stack([torch.log(p), torch.log(1 - p)]).view(1, 2, 1, 4)
    target = torch.tensor([[[0, 0, 0, 255]]])
    loss = OhemCrossEntropy(255, thresh=0.7, min_kept=0)(logits, target)
    assert math.isclose(loss.item(), -(math.log(0.9) + math.log(0.6) + math.log(0.3)) / 3, rel_tol=1e-6)


def test_ohem_matches_the_official_arithmetic_on_a_fixed_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g) * 2
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[0, :2] = 255
    for thresh in (0.3, 0.7):
        for min_kept in (0, 1, 7, 30, 48, 49, 500):  # 48 valid pixels
            got = OhemCrossEntropy(255, thresh=thresh, min_kept=min_kept)(logits, target).item()
            ref = official_ohem_reference(logits, target, thresh, min_kept)
            assert math.isclose(got, ref, rel_tol=1e-5), (thresh, min_kept, got, ref)


def test_poly_schedule():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert math.isclose(poly_lr(0.01, 50, 100, 0.9), 0.01 * 0.5**0.9)
    assert math.isclose(poly_lr(0.01, 0, 100, 0.9, warmup_iters=10), 0.001)
