"""Alonso et al.'s contrastive learning from a class-wise memory bank (``contrastive_memory``).

References are written here with explicit loops / closed forms, never with the library's helpers.
Most tests run on a tiny stand-in network (two strided convs + a 1x1 classifier, features at
stride 4); one step runs on the real SegModel (resnet18, 32x32).
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.config import load_config
from semiseg.data.mixing import classmix_masks
from semiseg.errors import ConfigError
from semiseg.methods.base import Batch, StepContext
from semiseg.methods.contrastive_memory import (
    ClassBalance,
    ContrastiveMemory,
    entropy_loss,
    forward_with_features,
    pseudo_label_loss,
    teacher_momentum,
)
from semiseg.methods.memory_bank import (
    ClassMemory,
    class_memory_loss,
    memory_candidates,
    rank_for_memory,
)
from semiseg.models.common import gather_from_ranks

K = 3  # classes


class TinySeg(nn.Module):
    """The SegModel contract: ``features`` (a list), ``decode(..., return_features=True)`` returning
    the map before the classifier at stride 4, ``param_groups``, ``decoder.classifier``."""

    def __init__(self, channels: int = 8, num_classes: int = K):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels),
                                     nn.ReLU(), nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU())
        self.decoder = nn.Module()
        self.decoder.classifier = nn.Conv2d(channels, num_classes, 1)

    def features(self, x):
        return [self.encoder(x)]

    def decode(self, feats, out_size=None, return_features=False):
        feature = feats[-1]
        logits = self.decoder.classifier(feature)
        if out_size is not None:
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=True)
        return (logits, feature) if return_features else logits

    def forward(self, x):
        return self.decode(self.features(x), out_size=x.shape[-2:])

    def param_groups(self):
        return list(self.encoder.parameters()), list(self.decoder.parameters())


def make_method(seed: int = 0, channels: int = 8, **keys) -> ContrastiveMemory:
    overrides = {"method.name": "contrastive_memory", "method.proj_dim": 8, "method.memory_per_class": 16,
                 "method.labeled_classmix_prob": 0.0, "method.labeled_jitter_prob": 0.0}
    overrides.update({f"method.{k}": v for k, v in keys.items()})
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    return ContrastiveMemory(cfg, TinySeg(channels), K)


def make_batch(seed: int = 0, b: int = 2, size: int = 16, pad_rows: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ignore = torch.zeros(b, size, size, dtype=torch.long)
    ignore[:, :pad_rows] = 255
    mask = torch.randint(0, K, (b, size, size), generator=g)
    mask[:, -2:] = 255
    return Batch({"image": torch.randn(b, 3, size, size, generator=g), "mask": mask},
                 {"weak": torch.randn(b, 3, size, size, generator=g), "ignore_mask": ignore})


def ctx_at(iteration: int, total: int = 100) -> StepContext:
    return StepContext(iteration=iteration, total_iters=total, lr=0.01, iters_per_epoch=4)


class FirstCoordinate(nn.Module):
    """A selector whose raw score is the first coordinate (sigmoid is monotone: same ranking)."""

    def forward(self, x):
        return x[:, :1]


# ---------------------------------------------------------------------------------------------
# Teacher momentum


def test_teacher_momentum_matches_the_official_formula():
    total = 1000
    for i in (0, 1, 3, 50, 499, 999):
        cos = 1 - (1 - 0.995) * (math.cos(math.pi * i / total) + 1) / 2
        expected = min(1 - 1 / (10 * i + 1), cos)
        assert teacher_momentum(i, total, 0.995, "cosine") == pytest.approx(expected, abs=1e-12)
        assert teacher_momentum(i, total, 0.996, "constant") == pytest.approx(min(1 - 1 / (10 * i + 1), 0.996))
    assert teacher_momentum(0, total) == 0.0  # the first step copies the student
    assert teacher_momentum(500, 1000) == pytest.approx(1 - 0.005 / 2)  # half-way: 0.9975


def test_after_step_moves_teacher_and_teacher_heads_with_that_momentum():
    m = make_method()
    with torch.no_grad():
        for p in list(m.model.parameters()) + list(m.heads.parameters()):
            p.add_(1.0)
    t_before = m.teacher.module.decoder.classifier.weight.clone()
    th_before = m.teacher_heads.module.projection[0].weight.clone()
    m.after_step(ctx_at(7, 100))
    mom = teacher_momentum(7, 100)
    s = m.model.decoder.classifier.weight
    assert torch.allclose(m.teacher.module.decoder.classifier.weight, mom * t_before + (1 - mom) * s)
    sh = m.heads.projection[0].weight
    assert torch.allclose(m.teacher_heads.module.projection[0].weight, mom * th_before + (1 - mom) * sh)


# ---------------------------------------------------------------------------------------------
# ClassMix


def test_classmix_masks_take_half_plus_one_of_the_source_classes_and_exclude():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3],     # 4 classes -> 3 chosen
                           [0, 0, 0, 0, 0, 0, 0, 0],     # only background -> it is chosen
                           [0, 0, 1, 1, 255, 255, 2, 2]])  # ignore never chosen
    labels = labels.view(3, 1, 8).expand(3, 4, 8).clone()
    for exclude in ([], [0]):
        for _ in range(10):
            masks = classmix_masks(labels, exclude, generator=g, variant="alonso", ignore_index=255)
            for i in range(3):
                present = set(labels[i].unique().tolist())
                chosen = set(labels[i][masks[i]].unique().tolist())
                assert chosen <= present
                for c in present:  # whole classes only
                    in_mask = masks[i][labels[i] == c]
                    assert bool(in_mask.all()) or not bool(in_mask.any())
                candidates = {c for c in present if c != 255}
                if candidates - set(exclude):
                    candidates -= set(exclude)
                assert 255 not in chosen
                assert chosen <= candidates
                assert len(chosen) == len(candidates) // 2 + 1


def test_classmix_moves_image_label_and_confidence_with_one_mask():
    m = make_method(classmix_exclude=[0])
    b, h, w = 3, 6, 6
    g = torch.Generator().manual_seed(1)
    images = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w) \
        + 0.01 * torch.randn(b, 3, h, w, generator=g)
    labels = torch.randint(0, K, (b, h, w), generator=g)
    conf = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1).expand(b, h, w) / 10 \
        + 0.001 * torch.rand(b, h, w, generator=g)
    out_img, out_lab, out_conf, masks = m.classmix(images, labels, conf)
    for i in range(b):
        j = (i + 1) % b  # image i receives image i+1's pixels of image i+1's chosen classes
        for y in range(h):
            for x in range(w):
                src = j if masks[j, y, x] else i
                assert torch.equal(out_img[i, :, y, x], images[src, :, y, x])
                assert out_lab[i, y, x] == labels[src, y, x]
                assert out_conf[i, y, x] == conf[src, y, x]
        # the pasted pixels are exactly those of the source's chosen classes
        chosen = set(labels[j][masks[j]].tolist())
        assert 0 not in chosen or set(labels[j].unique().tolist()) == {0}
        assert torch.equal(masks[j], torch.isin(labels[j], torch.tensor(sorted(chosen), dtype=torch.long)))


# ---------------------------------------------------------------------------------------------
# Memory


def test_memory_candidates_are_correct_and_confident_only():
    features = torch.arange(8, dtype=torch.float32).view(1, 2, 2, 2)  # vector at (y, x) = (f0, f1)
    labels = torch.tensor([[[0, 1], [2, 255]]])
    prediction = torch.tensor([[[0, 1], [1, 0]]])
    confidence = torch.tensor([[[0.99, 0.95], [0.99, 0.99]]])
    vectors, classes = memory_candidates(features, labels, prediction, confidence, 0.95)
    # (0,0): correct, 0.99 -> in; (0,1): correct but 0.95 is not > 0.95; (1,0): wrong; (1,1): ignore
    assert classes.tolist() == [0]
    assert vectors.tolist() == [[0.0, 4.0]]


def test_memory_is_a_fifo_keeping_the_newest_within_capacity():
    mem = ClassMemory(num_classes=2, size=4, dim=2)
    rows = lambda *v: torch.tensor([[x, -x] for x in v], dtype=torch.float32)  # noqa: E731
    mem.push(0, rows(1, 2, 3))
    assert mem.entries(0)[:, 0].tolist() == [1, 2, 3]
    mem.push(0, rows(4, 5))
    assert mem.entries(0)[:, 0].tolist() == [4, 5, 1, 2]  # newest first, oldest (3) dropped
    mem.push(0, rows(6, 7, 8, 9, 10))
    assert mem.entries(0)[:, 0].tolist() == [6, 7, 8, 9]  # at most `size`, the first of the batch
    assert mem.counts.tolist() == [4, 0] and mem.entries(1).shape == (0, 2)
    mem.push(1, rows())
    assert mem.counts.tolist() == [4, 0]


def test_rank_for_memory_orders():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5])
    assert rank_for_memory(scores, 2, "paper").tolist() == [1, 3]  # highest first
    assert rank_for_memory(scores, 2, "official").tolist() == [2, 0]  # the official ascending sort
    assert rank_for_memory(scores, 10, "paper").tolist() == [1, 3, 0, 2]
    # official: no more candidates than the limit -> no sort, pixel order
    assert rank_for_memory(scores, 4, "official").tolist() == [0, 1, 2, 3]
    assert rank_for_memory(scores, 10, "official").tolist() == [0, 1, 2, 3]
    assert rank_for_memory(scores, 3, "official").tolist() == [2, 0, 3]
    assert rank_for_memory(scores, 4, "paper").tolist() == [1, 3, 0, 2]


@pytest.mark.parametrize("per_image", [1, 20])  # limit 2: classes above it; limit 40: every class below it
@pytest.mark.parametrize("ranking", ["paper", "official"])
def test_update_memory_keeps_the_documented_ranking(ranking, per_image):
    m = make_method(memory_ranking=ranking, memory_per_image=per_image, memory_conf_thresh=0.0)
    heads = m.teacher_heads.module
    heads.projection = nn.Identity()  # vectors = the teacher's decoder features (8-d = proj_dim)
    for c in range(K):
        heads.feature_selectors[c] = FirstCoordinate()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        logits, features = forward_with_features(m.teacher.module, images)
    labels = logits.argmax(1)  # every pixel correctly predicted by the teacher
    m.update_memory(images, labels, ctx_at(0))
    labels_down = labels[:, ::4, ::4]  # nearest 16 -> 4 picks rows/cols 0, 4, 8, 12
    vectors = features.permute(0, 2, 3, 1)
    limit = 2 * per_image  # batch size * per image
    sizes = []
    for c in range(K):
        cand = [vectors[b, y, x] for b in range(2) for y in range(4) for x in range(4) if labels_down[b, y, x] == c]
        sizes.append(len(cand))
        # official FeatureMemory: sort (ascending) and cut only when there are more than the limit
        if ranking == "paper" or len(cand) > limit:
            cand.sort(key=lambda v: float(v[0]), reverse=(ranking == "paper"))
        expected = cand[:limit][:16]  # then the memory keeps memory_per_class (16), newest first
        got = m.memory.entries(c)
        assert got.shape[0] == len(expected)
        for e, r in zip(expected, got):
            assert torch.allclose(e, r, atol=1e-6)
    assert int(m.memory.counts.sum()) > 0
    if per_image == 1:
        assert max(sizes) > limit  # the sorting branch is exercised
    else:
        assert 2 < max(sizes) <= limit  # the unsorted branch, with an order to lose


# ---------------------------------------------------------------------------------------------
# Loss


def reference_loss(features, labels, banks, v, u, num_classes):
    """Explicit loops: mean over (feature, entry) pairs of (1 - cos) * a_i * b_j, weights rescaled
    to mean 1, summed over classes with >= 2 features and entries, divided by K."""
    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    total = 0.0
    for c in range(num_classes):
        fs = [features[i] for i in range(len(labels)) if labels[i] == c]
        ms = [banks[c][j] / banks[c][j].norm() for j in range(banks[c].shape[0])]
        if len(fs) < 2 or len(ms) < 2:
            continue
        a = [sig(float(f @ v[c])) for f in fs]
        b = [sig(float(mj @ u[c])) for mj in ms]
        a = [x * len(a) / sum(a) for x in a]
        b = [x * len(b) / sum(b) for x in b]
        s = 0.0
        for i, f in enumerate(fs):
            for j, mj in enumerate(ms):
                cos = float(f @ mj) / float(f.norm())
                s += (1 - cos) * a[i] * b[j]
        total += s / (len(fs) * len(ms))
    return total / num_classes


def test_class_memory_loss_equals_the_reference():
    g = torch.Generator().manual_seed(4)
    d, num_classes = 5, 4
    features = torch.randn(9, d, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 3])  # class 2: one feature -> skipped
    banks = [torch.randn(3, d, generator=g), torch.randn(4, d, generator=g), torch.randn(5, d, generator=g),
             torch.randn(1, d, generator=g)]  # class 3: one entry -> skipped
    v, u = torch.randn(num_classes, d, generator=g), torch.randn(num_classes, d, generator=g)
    fw = lambda c, x: torch.sigmoid(x @ v[c])  # noqa: E731
    mw = lambda c, x: torch.sigmoid(x @ u[c])  # noqa: E731
    loss = class_memory_loss(features, labels, banks.__getitem__, fw, mw, num_classes)
    expected = reference_loss(features, labels, banks, v, u, num_classes)
    assert expected > 0
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # rescaling to mean 1: scaling every selector output by a constant changes nothing
    half = class_memory_loss(features, labels, banks.__getitem__, lambda c, x: 0.3 * fw(c, x),
                             lambda c, x: 0.7 * mw(c, x), num_classes)
    assert float(half) == pytest.approx(expected, rel=1e-5)
    # the feature selector sees the features detached, the memory gets no gradient
    f = features.clone().requires_grad_()
    seen = []
    class_memory_loss(f, labels, banks.__getitem__, lambda c, x: seen.append(x.requires_grad) or fw(c, x), mw,
                      num_classes).backward()
    assert seen and not any(seen) and f.grad is not None


def test_ignored_pixels_never_take_part():
    m = make_method()
    g = torch.Generator().manual_seed(5)
    for c in range(K):
        m.memory.push(c, torch.randn(6, 8, generator=g))
    fmap = torch.randn(2, 8, 4, 4, generator=g)
    labels = torch.randint(0, K, (2, 16, 16), generator=g)
    labels[0, :8] = 255  # feature rows 0 and 1 of image 0 are ignored
    labels[1, :, 12:] = 255  # feature column 3 of image 1
    ignored = torch.zeros(2, 4, 4, dtype=torch.bool)
    ignored[0, :2] = True
    ignored[1, :, 3] = True
    x = fmap.clone().requires_grad_()
    loss = m.contrastive_term(x, labels)
    loss.backward()
    assert float(loss.detach()) > 0
    grad_norm = x.grad.norm(dim=1)
    assert torch.all(grad_norm[ignored] == 0) and torch.all(grad_norm[~ignored] > 0)
    changed = fmap.clone()
    changed[ignored.unsqueeze(1).expand_as(changed)] = 100.0
    assert float(m.contrastive_term(changed, labels).detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    # the pseudo-label and entropy losses: zero gradient on ignored pixels
    logits = torch.randn(2, K, 5, 5, generator=g, requires_grad=True)
    target = torch.randint(0, K, (2, 5, 5), generator=g)
    target[:, 0] = 255
    conf = torch.rand(2, 5, 5, generator=g)
    (pseudo_label_loss(logits, target, conf) + entropy_loss(logits, target != 255)).backward()
    assert torch.all(logits.grad[:, :, 0] == 0) and torch.all(logits.grad[:, :, 1:].abs().sum(1) > 0)


def test_pseudo_label_and_entropy_losses_by_hand():
    logits = torch.tensor([[1.0, 2.0], [0.5, 0.5], [3.0, -1.0]]).t().reshape(1, 2, 1, 3)  # 3 pixels
    target = torch.tensor([[[0, 1, 255]]])
    conf = torch.tensor([[[0.9, 0.5, 1.0]]])
    ce0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(2)))
    ce1 = math.log(2)
    expected = (ce0 * 0.9 ** 6 + ce1 * 0.5 ** 6) / 2
    assert float(pseudo_label_loss(logits, target, conf)) == pytest.approx(expected, rel=1e-6)
    w = torch.tensor([2.0, 3.0])
    expected_w = (2 * ce0 * 0.9 ** 6 + 3 * ce1 * 0.5 ** 6) / 2
    assert float(pseudo_label_loss(logits, target, conf, class_weights=w)) == pytest.approx(expected_w, rel=1e-6)
    p0 = [math.exp(1) / (math.exp(1) + math.exp(2)), math.exp(2) / (math.exp(1) + math.exp(2))]
    h0 = -sum(p * math.log2(p) for p in p0)
    expected_h = (h0 + 1.0) / 2 / math.log2(2)
    assert float(entropy_loss(logits, target != 255)) == pytest.approx(expected_h, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Steps


def test_contrastive_terms_wait_for_their_start_and_memory_for_its_own():
    m = make_method(memory_start_iter=10, contrastive_start_iter=20, memory_conf_thresh=0.0, rampup_iters=0)
    batch = make_batch(6, pad_rows=3)
    with torch.no_grad():  # labelled masks = the teacher's predictions: every pixel may enter
        batch.labeled["mask"] = m.teacher.module(batch.labeled["image"]).argmax(1)
    r = m.train_step(batch, ctx_at(10))  # not yet: the memory starts at iteration > 10
    assert float(r.logs["loss_contrastive_l"]) == 0 and float(r.logs["loss_contrastive_u"]) == 0
    assert int(m.memory.counts.sum()) == 0
    r = m.train_step(batch, ctx_at(20))  # memory filled, contrastive still off
    assert int(m.memory.counts.sum()) > 0
    assert float(r.logs["loss_contrastive_l"]) == 0 and float(r.logs["loss_contrastive_u"]) == 0
    r = m.train_step(batch, ctx_at(21))
    assert float(r.logs["loss_contrastive_l"]) > 0 and float(r.logs["loss_contrastive_u"]) > 0


def test_train_step_runs_with_finite_loss_and_logs():
    m = make_method(memory_start_iter=0, contrastive_start_iter=0, rampup_iters=2, class_balance=True,
                    class_balance_window=2, memory_conf_thresh=0.0, labeled_classmix_prob=1.0,
                    labeled_jitter_prob=1.0, classmix_prob=1.0)
    opt = torch.optim.SGD([p for group in m.param_groups() for p in group], lr=0.01)
    for it in range(1, 5):
        m.train()
        r = m.train_step(make_batch(it, pad_rows=4), ctx_at(it, 10))
        assert torch.isfinite(r.loss)
        opt.zero_grad()
        r.loss.backward()
        assert m.heads.projection[0].weight.grad is not None  # the heads are trained
        opt.step()
        m.after_step(ctx_at(it, 10))
    for key in ("loss_x", "loss_u", "loss_entropy", "loss_contrastive_l", "loss_contrastive_u", "mask_ratio",
                "memory_fill", "ema_momentum", "rampup"):
        assert key in r.logs and math.isfinite(float(r.logs[key])), key
    assert float(r.logs["loss_contrastive_l"]) > 0
    assert list(m.eval_models()) == ["student", "teacher"]
    assert m.eval_models()["teacher"] is m.teacher.module


def test_one_step_on_segmodel():
    from semiseg.models.segmodel import build_model

    cfg = load_config(None, {"method.name": "contrastive_memory", "model.decoder_channels": 16,
                             "method.memory_start_iter": 0, "method.contrastive_start_iter": 0,
                             "method.memory_conf_thresh": 0.0, "method.proj_dim": 16})
    torch.manual_seed(0)
    m = ContrastiveMemory(cfg, build_model(cfg.model, K), K)
    assert m.heads.projection[0].in_features == 16  # the decoder features before the classifier
    r = m.train_step(make_batch(7, size=32), ctx_at(1, 10))
    assert torch.isfinite(r.loss)
    r.loss.backward()


def test_max_pixels_per_class_caps_the_vectors_of_each_class():
    m = make_method(max_pixels_per_class=2)
    for c in range(K):
        m.memory.push(c, torch.randn(4, 8))
    rows = []
    predict = m.heads.predict
    m.heads.predict = lambda x: rows.append(x.shape[0]) or predict(x)
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, 8:] = 1  # 8 feature pixels of class 0, 8 of class 1
    loss = m.contrastive_term(torch.randn(1, 8, 4, 4), labels)
    assert rows == [4] and torch.isfinite(loss)


def test_param_groups_hold_the_student_heads_not_the_teachers():
    m = make_method()
    enc, head = m.param_groups()
    ids = {id(p) for p in enc} | {id(p) for p in head}
    assert {id(p) for p in m.heads.parameters()} <= {id(p) for p in head}
    assert not ids & {id(p) for p in m.teacher.parameters()}
    assert not ids & {id(p) for p in m.teacher_heads.parameters()}
    assert len(ids) == len(enc) + len(head) == len(list(m.model.parameters())) + len(list(m.heads.parameters()))


def test_memory_and_balance_round_trip_through_state_dict():
    a = make_method(class_balance=True, class_balance_window=3)
    g = torch.Generator().manual_seed(8)
    a.memory.push(1, torch.randn(5, 8, generator=g))
    a.memory.push(2, torch.randn(20, 8, generator=g))
    a.balance.update(torch.randint(0, K, (2, 4, 4)), torch.randint(0, K, (2, 4, 4)), 3)
    state = a.state_dict()
    assert {"memory.bank", "memory.counts", "balance.labeled_counts"} <= set(state)
    assert any(k.startswith("teacher.module.") for k in state)
    assert any(k.startswith("teacher_heads.module.") for k in state)
    b = make_method(seed=1, class_balance=True, class_balance_window=3)
    b.load_state_dict(state)
    assert torch.equal(b.memory.bank, a.memory.bank) and b.memory.counts.tolist() == [0, 5, 16]
    assert torch.equal(b.balance.labeled_counts, a.balance.labeled_counts) and int(b.balance.steps) == 1
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_class_balance_weights():
    bal = ClassBalance(4)
    lab = torch.tensor([0, 0, 0, 0, 1, 1, 255])
    unl = torch.tensor([0, 1, 1, 2])
    bal.update(lab, unl, window=2)
    assert torch.equal(bal.weights(), torch.ones(4))  # window not full yet
    bal.update(lab, unl, window=2)
    freqs = [2 * (4 + 1), 2 * (2 + 2), 2 * 1, 0]
    median = sorted(freqs)[1] / 2 + sorted(freqs)[2] / 2  # numpy's median of 4 values
    seen = [math.sqrt(median / f) for f in freqs[:3]]
    expected = seen + [math.sqrt(max(max(median / f for f in freqs[:3]), 1.0))]
    assert bal.weights().tolist() == pytest.approx(expected, rel=1e-6)


def test_config_keys_and_defaults():
    cfg = load_config(None, {"method.name": "contrastive_memory"})
    mc = cfg.method
    assert (mc.ema_momentum, mc.memory_per_class, mc.proj_dim, mc.memory_ranking) == (0.995, 256, 256, "paper")
    assert (mc.contrastive_weight_l, mc.contrastive_weight_u, mc.entropy_weight) == (0.1, 0.1, 0.01)
    assert mc.classmix_exclude == [] and mc.class_balance is False
    pascal = load_config(None, {"method.name": "contrastive_memory", "method.classmix_exclude": [0]})
    assert pascal.method.classmix_exclude == [0]
    with pytest.raises(ConfigError):
        load_config(None, {"method.name": "contrastive_memory", "method.memory_ranking": "best"})


# ---------------------------------------------------------------------------------------------
# Distributed gather


def _gather_worker(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    rows = torch.full((rank + 1, 3), float(rank))  # rank 0: one row, rank 1: two rows
    torch.save(gather_from_ranks(rows), f"{out}.{rank}")
    dist.destroy_process_group()


def test_gather_from_ranks():
    rows = torch.randn(3, 4)
    assert gather_from_ranks(rows) is rows  # no process group: a no-op
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gathered")
        mp.start_processes(_gather_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2, join=True,
                           start_method="fork")
        r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert torch.equal(r0, r1)
    assert r0[:, 0].tolist() == [0.0, 1.0, 1.0]


def test_start_iterations_beyond_the_schedule_warn_naming_the_key():
    def build(iters, **keys):
        overrides = {"method.name": "contrastive_memory", "method.proj_dim": 8, "train.iters": iters,
                     **{f"method.{k}": v for k, v in keys.items()}}
        return ContrastiveMemory(load_config(None, overrides), TinySeg(8), K)

    with pytest.warns(UserWarning, match=r"method\.contrastive_start_iter=2000 is not below train\.iters=1200: "
                                         r"the contrastive terms never start"):
        build(1200)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(1200, memory_start_iter=300, contrastive_start_iter=600, rampup_iters=600)
