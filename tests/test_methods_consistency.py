"""FixMatch, UniMatch, Mean Teacher and the EMA teacher on small fixed tensors.

Every expected value is computed here independently, with explicit loops over pixels, from the
stand-in model's logits: the library's helpers are never used to build a reference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.config import load_config
from semiseg.errors import ConfigError
from semiseg.methods.base import Batch, StepContext
from semiseg.methods.consistency import PseudoTarget, apply_cutmix, mask_ratio, unsupervised_loss
from semiseg.methods.fixmatch import FixMatch
from semiseg.methods.perturbations import feature_perturbation
from semiseg.methods.meanteacher import MeanTeacher, sigmoid_rampup
from semiseg.methods.teacher import EMATeacher, ema_momentum
from semiseg.methods.unimatch import UniMatch

K, H, W = 3, 5, 6  # classes, image size
B_L, B_U = 2, 3  # labelled / unlabelled batch sizes


# ---------------------------------------------------------------------------------------------
# Stand-ins


class TinySeg(nn.Module):
    """The SegModel contract on a 3x3 conv + 1x1 classifier. Without BatchNorm its output for an
    image does not depend on the rest of the batch, so references may predict image by image.

    ``fp_scale`` makes the feature perturbation deterministic (:func:`build` gives UniMatch
    :meth:`fp_drop` as its ``perturb_feature``: features times a fixed channel mask); None keeps
    real ``dropout2d``. Every ``forward`` and every ``encode`` (the feature perturbation's one
    encoding) is recorded as (kind, training, input).
    """

    def __init__(self, seed: int = 0, bn: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.head = nn.Conv2d(4, K, 1)
        with torch.no_grad():
            self.head.weight.mul_(4.0)  # spread the confidences around the thresholds used below
        self.head.in_index = (0,)  # the feature the head reads
        self.fp_scale = torch.tensor([2.0, 0.0, 2.0, 0.0]).view(1, 4, 1, 1)
        self.calls: list[tuple[str, bool, torch.Tensor]] = []

    def features(self, x):
        return F.relu(self.norm(self.enc(x)))

    def forward(self, x):
        self.calls.append(("forward", self.training, x.detach().clone()))
        return self.head(self.features(x))

    neck = None

    @property
    def decoder(self):
        return self.head

    def encode(self, x):
        self.calls.append(("encode", self.training, x.detach().clone()))
        return [self.features(x)]

    def decode(self, feats, out_size=None):
        return self.head(feats[0])

    def fp_drop(self, f):
        return f * self.fp_scale

    def perturbed(self, x):
        """Reference for the fp stream (not recorded)."""
        return self.head(self.features(x) * self.fp_scale)

    def param_groups(self):
        return list(self.enc.parameters()) + list(self.norm.parameters()), list(self.head.parameters())


def box(top, left, h, w):
    b = torch.zeros(H, W, dtype=torch.long)
    b[top:top + h, left:left + w] = 1
    return b


def unlabeled_batch(g):
    ignore_mask = torch.zeros(B_U, H, W, dtype=torch.long)
    ignore_mask[:, -1, :] = 255  # padding: bottom row of every image ...
    ignore_mask[0, :, -2:] = 255  # ... and the right of the first
    return {
        "weak": torch.randn(B_U, 3, H, W, generator=g),
        "strong_1": torch.randn(B_U, 3, H, W, generator=g),
        "strong_2": torch.randn(B_U, 3, H, W, generator=g),
        "ignore_mask": ignore_mask,
        "box_1": torch.stack([box(0, 0, 3, 3), box(1, 2, 4, 4), box(2, 1, 2, 5)]),
        "box_2": torch.stack([box(2, 3, 3, 3), box(0, 0, 5, 2), box(1, 1, 1, 1)]),
    }


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, K, (B_L, H, W), generator=g)
    mask[0, 0, :] = 255
    labeled = {"image": torch.randn(B_L, 3, H, W, generator=g), "mask": mask}
    return Batch(labeled, unlabeled_batch(g), unlabeled_batch(g))


def ctx(iteration=0):
    return StepContext(iteration=iteration, total_iters=100, lr=0.01)


def build(method_cls, name, model=None, **keys):
    cfg = load_config({"method": {"name": name, **keys}})
    model = model if model is not None else TinySeg()
    method = method_cls(cfg, model, K)
    if isinstance(method, UniMatch) and getattr(model, "fp_scale", None) is not None:
        method.perturb_feature = model.fp_drop  # the deterministic feature perturbation
    return method


# ---------------------------------------------------------------------------------------------
# Independent references (explicit loops)


def ref_pseudo(logits):
    """(label, confidence) per pixel, by looping over pixels and classes."""
    B = logits.shape[0]
    label = torch.zeros(B, H, W, dtype=torch.long)
    conf = torch.zeros(B, H, W, dtype=torch.float64)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                z = [float(v) for v in logits[b, :, i, j]]
                e = [math.exp(v - max(z)) for v in z]
                best = max(range(K), key=lambda c: z[c])
                label[b, i, j], conf[b, i, j] = best, e[best] / sum(e)
    return label, conf


def ref_cutmix(a, b, cutmix_box):
    out = a.clone()
    for n in range(a.shape[0]):
        for i in range(H):
            for j in range(W):
                if cutmix_box[n, i, j] == 1:
                    out[n, ..., i, j] = b[n, ..., i, j]
    return out


def nll(z, c):
    z = [float(v) for v in z]
    m = max(z)
    return m + math.log(sum(math.exp(v - m) for v in z)) - z[int(c)]


def ref_unsup(logits, label, conf, ignore, thresh):
    total, valid = 0.0, 0
    for b in range(logits.shape[0]):
        for i in range(H):
            for j in range(W):
                if ignore[b, i, j] == 255:
                    continue
                valid += 1
                if conf[b, i, j] >= thresh:
                    total += nll(logits[b, :, i, j], label[b, i, j])
    return total / valid


def ref_ce(logits, mask):
    total, valid = 0.0, 0
    for b in range(logits.shape[0]):
        for i in range(H):
            for j in range(W):
                if mask[b, i, j] != 255:
                    total += nll(logits[b, :, i, j], mask[b, i, j])
                    valid += 1
    return total / valid


def ref_ratio(conf, ignore, thresh):
    valid = [(b, i, j) for b in range(conf.shape[0]) for i in range(H) for j in range(W) if ignore[b, i, j] != 255]
    return sum(1 for b, i, j in valid if conf[b, i, j] >= thresh) / len(valid)


def close(a, b, tol=1e-5):
    a, b = (float(v.detach()) if torch.is_tensor(v) else float(v) for v in (a, b))
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# ---------------------------------------------------------------------------------------------
# Shared pieces


def test_unsupervised_loss_threshold_padding_and_normalisation():
    # one image of 1x4 pixels, 2 classes; pixel 3 is padding
    logits = torch.tensor([[[[2.0, 0.0, -1.0, 5.0]], [[0.0, 1.0, 1.0, 0.0]]]])
    label = torch.tensor([[[0, 1, 0, 1]]])
    conf = torch.tensor([[[0.99, 0.50, 0.95, 0.99]]])
    ignore = torch.tensor([[[0, 0, 0, 255]]])
    target = PseudoTarget(label, conf, ignore)
    # confident non-padding pixels: 0 (0.99) and 2 (0.95 >= 0.95); 3 non-padding pixels in all
    ce0 = math.log(1 + math.exp(-2.0))  # -log softmax([2, 0])[0]
    ce2 = math.log(math.exp(-1.0) + math.exp(1.0)) + 1.0  # -log softmax([-1, 1])[0]
    assert close(unsupervised_loss(logits, target, 0.95), (ce0 + ce2) / 3)
    assert close(mask_ratio(target, 0.95), 2 / 3)
    assert close(unsupervised_loss(logits, target, 0.999), 0.0)
    assert close(mask_ratio(target, 0.0), 1.0)


def test_unsupervised_loss_matches_loop_reference_on_random_tensors():
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(B_U, K, H, W, generator=g)
    label, conf = ref_pseudo(3 * torch.randn(B_U, K, H, W, generator=g))
    ignore = unlabeled_batch(g)["ignore_mask"]
    target = PseudoTarget(label, conf.float(), ignore)
    for thresh in (0.0, 0.6, 0.9):
        assert close(unsupervised_loss(logits, target, thresh), ref_unsup(logits, label, conf.float(), ignore, thresh))
        assert close(mask_ratio(target, thresh), ref_ratio(conf.float(), ignore, thresh))


def test_padding_pixels_get_zero_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B_U, K, H, W, generator=g, requires_grad=True)
    ignore = unlabeled_batch(g)["ignore_mask"]
    target = PseudoTarget(torch.randint(0, K, (B_U, H, W), generator=g), torch.ones(B_U, H, W), ignore)
    unsupervised_loss(logits, target, 0.95).backward()
    pad = (ignore == 255).unsqueeze(1).expand_as(logits)
    assert torch.all(logits.grad[pad] == 0)
    assert torch.all(logits.grad.abs().sum(1)[ignore != 255] > 0)


def test_cutmix_moves_image_and_target_with_the_same_box():
    g = torch.Generator().manual_seed(2)
    u, partner = unlabeled_batch(g), unlabeled_batch(g)
    cutmix_box = u["box_1"]
    assert torch.equal(apply_cutmix(u["strong_1"], partner["strong_1"], cutmix_box),
                       ref_cutmix(u["strong_1"], partner["strong_1"], cutmix_box))
    mine = PseudoTarget(torch.randint(0, K, (B_U, H, W), generator=g), torch.rand(B_U, H, W, generator=g),
                        u["ignore_mask"])
    theirs = PseudoTarget(torch.randint(0, K, (B_U, H, W), generator=g), torch.rand(B_U, H, W, generator=g),
                          torch.full((B_U, H, W), 255))
    mixed = mine.cutmix(theirs, cutmix_box)
    for field_mixed, field_mine, field_theirs in zip(mixed, mine, theirs):
        assert torch.equal(field_mixed, ref_cutmix(field_mine, field_theirs, cutmix_box))
    # the partner's padding comes along inside the box
    assert torch.equal(mixed.ignore_mask == 255, (cutmix_box == 1) | (u["ignore_mask"] == 255))


# ---------------------------------------------------------------------------------------------
# FixMatch


def reference_fixmatch(model, batch, thresh, mix_source, w_x=1.0, w_s=1.0):
    u, x = batch.unlabeled, batch.labeled
    with torch.no_grad():
        label_w, conf_w = ref_pseudo(model.head(model.features(u["weak"])))
        if mix_source == "separate_batch":
            mix = batch.unlabeled_mix
            label_m, conf_m = ref_pseudo(model.head(model.features(mix["weak"])))
            ignore_m, strong_m = mix["ignore_mask"], mix["strong_1"]
        else:
            label_m, conf_m, ignore_m, strong_m = label_w.flip(0), conf_w.flip(0), u["ignore_mask"].flip(0), \
                u["strong_1"].flip(0)
        cutmix_box = u["box_1"]
        img_s = ref_cutmix(u["strong_1"], strong_m, cutmix_box)
        logits_s = model.head(model.features(img_s))
        loss_x = ref_ce(model.head(model.features(x["image"])), x["mask"])
        loss_s = ref_unsup(logits_s, ref_cutmix(label_w, label_m, cutmix_box), ref_cutmix(conf_w, conf_m, cutmix_box),
                           ref_cutmix(u["ignore_mask"], ignore_m, cutmix_box), thresh)
    ratio = ref_ratio(conf_w, u["ignore_mask"], thresh)
    return (w_x * loss_x + w_s * loss_s) / 2, loss_x, loss_s, ratio, img_s


@pytest.mark.parametrize("mix_source", ["separate_batch", "in_batch"])
def test_fixmatch_step_equals_hand_computed_loss(mix_source):
    batch = make_batch()
    method = build(FixMatch, "fixmatch", conf_thresh=0.8, mix_source=mix_source, weight_x=1.5, weight_s=0.7)
    method.train()
    result = method.train_step(batch, ctx())
    expected, loss_x, loss_s, ratio, img_s = reference_fixmatch(method.model, batch, 0.8, mix_source, 1.5, 0.7)
    assert 0 < ratio < 1  # the threshold really selects
    assert close(result.loss, expected)
    assert close(result.logs["loss_x"], loss_x) and close(result.logs["loss_s"], loss_s)
    assert close(result.logs["mask_ratio"], ratio)
    # the strong image the network saw is the CutMix-ed one
    assert torch.equal(method.model.calls[-1][2], img_s)
    result.loss.backward()
    assert method.model.head.weight.grad is not None


def test_forward_passes_separate_batch_vs_in_batch():
    """separate_batch: one eval-mode pass on the partner batch, before the training passes;
    in_batch: none (the weak predictions are reused)."""
    batch = make_batch()
    expected_training = [("forward", True, B_L + B_U), ("forward", True, B_U)]
    for mix_source, extra in (("separate_batch", [("forward", False, B_U)]), ("in_batch", [])):
        method = build(FixMatch, "fixmatch", mix_source=mix_source)
        assert method.needs_mix_batch == (mix_source == "separate_batch")
        method.train()
        method.train_step(batch, ctx())
        calls = [(kind, training, x.shape[0]) for kind, training, x in method.model.calls]
        assert calls == extra + expected_training
        if extra:
            assert torch.equal(method.model.calls[0][2], batch.unlabeled_mix["weak"])
        assert method.model.training  # back in training mode after the eval pass

    expected_training = [("encode", True, B_L + B_U), ("forward", True, 2 * B_U)]
    for mix_source, extra in (("separate_batch", [("forward", False, B_U)]), ("in_batch", [])):
        method = build(UniMatch, "unimatch", mix_source=mix_source)
        method.train()
        method.train_step(batch, ctx())
        assert [(k, t, x.shape[0]) for k, t, x in method.model.calls] == extra + expected_training


def test_batchnorm_layout_matches_official_with_eval_mode_partner():
    """With BatchNorm the output depends on how images are batched: the partner batch is predicted
    in eval mode (running statistics) before the training passes, labelled + weak images share one
    training pass and the strong images get another, as in the official fixmatch.py."""
    model = TinySeg(bn=True)
    with torch.no_grad():
        model.norm.running_mean.fill_(0.3)
        model.norm.running_var.fill_(2.0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    method = build(FixMatch, "fixmatch", model=model, conf_thresh=0.6, mix_source="separate_batch")
    method.train()
    batch = make_batch()
    result = method.train_step(batch, ctx())

    ref = TinySeg(bn=True)
    ref.load_state_dict(initial)
    u, x, mix = batch.unlabeled, batch.labeled, batch.unlabeled_mix
    with torch.no_grad():
        ref.eval()
        label_m, conf_m = ref_pseudo(ref.head(ref.features(mix["weak"])))
        ref.train()
        logits_x, logits_w = ref.head(ref.features(torch.cat((x["image"], u["weak"])))).split([B_L, B_U])
        label_w, conf_w = ref_pseudo(logits_w)
        logits_s = ref.head(ref.features(ref_cutmix(u["strong_1"], mix["strong_1"], u["box_1"])))
    cutmix_box = u["box_1"]
    loss_s = ref_unsup(logits_s, ref_cutmix(label_w, label_m, cutmix_box), ref_cutmix(conf_w, conf_m, cutmix_box),
                       ref_cutmix(u["ignore_mask"], mix["ignore_mask"], cutmix_box), 0.6)
    assert close(result.logs["loss_s"], loss_s)
    assert close(result.loss, (ref_ce(logits_x, x["mask"]) + loss_s) / 2)
    # the eval pass left the running statistics alone: two training passes moved them, as in ref
    assert torch.allclose(model.norm.running_mean, ref.norm.running_mean)
    assert torch.allclose(model.norm.running_var, ref.norm.running_var)


# ---------------------------------------------------------------------------------------------
# UniMatch


def reference_unimatch(model, batch, thresh, mix_source, weights=(1.0, 0.25, 0.25, 0.5), teacher=None):
    u, x = batch.unlabeled, batch.labeled
    labeler = teacher if teacher is not None else model
    with torch.no_grad():
        label_w, conf_w = ref_pseudo(labeler.head(labeler.features(u["weak"])))
        loss_x = ref_ce(model.head(model.features(x["image"])), x["mask"])
        if mix_source == "separate_batch":
            mix = batch.unlabeled_mix
            label_m, conf_m = ref_pseudo(labeler.head(labeler.features(mix["weak"])))
            ignore_m = mix["ignore_mask"]
            strong_m = [mix["strong_1"], mix["strong_2"]]
        else:
            label_m, conf_m, ignore_m = label_w.flip(0), conf_w.flip(0), u["ignore_mask"].flip(0)
            strong_m = [u["strong_1"].flip(0), u["strong_2"].flip(0)]
        losses_s = []
        for k, key in enumerate(("strong_1", "strong_2")):
            cutmix_box = u[f"box_{k + 1}"]
            logits_s = model.head(model.features(ref_cutmix(u[key], strong_m[k], cutmix_box)))
            losses_s.append(ref_unsup(logits_s, ref_cutmix(label_w, label_m, cutmix_box),
                                      ref_cutmix(conf_w, conf_m, cutmix_box),
                                      ref_cutmix(u["ignore_mask"], ignore_m, cutmix_box), thresh))
        loss_fp = ref_unsup(model.perturbed(u["weak"]), label_w, conf_w, u["ignore_mask"], thresh)
    w_x, w_s1, w_s2, w_fp = weights
    total = (w_x * loss_x + w_s1 * losses_s[0] + w_s2 * losses_s[1] + w_fp * loss_fp) / 2
    return total, loss_x, losses_s, loss_fp, ref_ratio(conf_w, u["ignore_mask"], thresh)


@pytest.mark.parametrize("mix_source", ["separate_batch", "in_batch"])
def test_unimatch_step_equals_hand_computed_loss(mix_source):
    batch = make_batch(seed=5)
    method = build(UniMatch, "unimatch", conf_thresh=0.8, mix_source=mix_source)
    method.train()
    result = method.train_step(batch, ctx())
    total, loss_x, losses_s, loss_fp, ratio = reference_unimatch(method.model, batch, 0.8, mix_source)
    assert 0 < ratio < 1
    assert loss_fp != pytest.approx(losses_s[0])
    assert close(result.loss, total)  # (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2
    logs = result.logs
    assert close(logs["loss_x"], loss_x) and close(logs["loss_fp"], loss_fp)
    assert close(logs["loss_s1"], losses_s[0]) and close(logs["loss_s2"], losses_s[1])
    assert close(logs["mask_ratio"], ratio)


def test_unimatch_weights_are_configurable_and_redistributed():
    batch = make_batch(seed=7)
    thresh = 0.7
    # explicit weights: (2 L_x + 0.15 L_s1 + 0.15 L_s2 + 0.1 L_fp) / 2
    method = build(UniMatch, "unimatch", conf_thresh=thresh, weight_x=2.0, weight_s=0.3, weight_fp=0.1,
                   mix_source="separate_batch")
    method.train()
    result = method.train_step(batch, ctx())
    total, *_ = reference_unimatch(method.model, batch, thresh, "separate_batch", weights=(2.0, 0.15, 0.15, 0.1))
    assert close(result.loss, total)

    # no fp stream: the strong views take its weight, (L_x + 0.5 L_s1 + 0.5 L_s2) / 2
    method = build(UniMatch, "unimatch", conf_thresh=thresh, feature_perturbation=False, mix_source="separate_batch")
    method.train()
    result = method.train_step(batch, ctx())
    assert "loss_fp" not in result.logs
    assert [kind for kind, _, _ in method.model.calls if kind == "encode"] == []
    total, *_ = reference_unimatch(method.model, batch, thresh, "separate_batch", weights=(1.0, 0.5, 0.5, 0.0))
    assert close(result.loss, total)

    # one strong view: the instance asks the data for one, (L_x + 0.5 L_s + 0.5 L_fp) / 2
    method = build(UniMatch, "unimatch", conf_thresh=thresh, dual_strong=False, mix_source="separate_batch")
    assert method.num_strong_views == 1 and UniMatch.num_strong_views == 2
    batch_one = make_batch(seed=7)
    for u in (batch_one.unlabeled, batch_one.unlabeled_mix):
        del u["strong_2"], u["box_2"]
    method.train()
    result = method.train_step(batch_one, ctx())
    assert "loss_s2" not in result.logs
    _, loss_x, losses_s, loss_fp, _ = reference_unimatch(method.model, batch, thresh, "separate_batch")
    assert close(result.loss, (loss_x + 0.5 * losses_s[0] + 0.5 * loss_fp) / 2)


@pytest.mark.parametrize("mix_source", ["separate_batch", "in_batch"])
@pytest.mark.parametrize("teacher", ["none", "ema"])
def test_unimatch_without_both_perturbations_is_fixmatch(mix_source, teacher):
    batch = make_batch(seed=11)
    keys = dict(conf_thresh=0.75, mix_source=mix_source, teacher=teacher)
    fixmatch = build(FixMatch, "fixmatch", model=TinySeg(bn=True), **keys)
    unimatch = build(UniMatch, "unimatch", model=TinySeg(bn=True), feature_perturbation=False, dual_strong=False,
                     **keys)
    for method in (fixmatch, unimatch):
        assert method.num_strong_views == 1
        method.train()
    a, b = fixmatch.train_step(batch, ctx()), unimatch.train_step(batch, ctx())
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.logs["loss_s"], b.logs["loss_s1"])
    assert [(k, t, x.shape[0]) for k, t, x in fixmatch.model.calls] == \
           [(k, t, x.shape[0]) for k, t, x in unimatch.model.calls]
    a.loss.backward()
    b.loss.backward()
    for p, q in zip(fixmatch.model.parameters(), unimatch.model.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_feature_perturbation_stream_differs_in_training():
    model = TinySeg()
    model.fp_scale = None  # real dropout2d, UniMatch's own perturb_feature
    x = torch.randn(4, 3, H, W)
    torch.manual_seed(0)
    model.train()
    clean, perturbed = feature_perturbation(model, x, 0.5)
    assert not torch.allclose(clean, perturbed)
    method = build(UniMatch, "unimatch", model=model, conf_thresh=0.0)
    method.train()
    result = method.train_step(make_batch(), ctx())
    assert result.logs["loss_fp"].item() > 0


def test_unimatch_step_with_real_segmodel():
    """The real model contract: the feature perturbation differs from the clean stream in training only, and a
    whole step back-propagates into encoder and head."""
    models = pytest.importorskip("semiseg.models")
    from semiseg.config import ModelConfig

    model = models.build_model(ModelConfig(encoder="resnet18", decoder_channels=16), K)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    clean, perturbed = feature_perturbation(model, x)
    assert not torch.allclose(clean, perturbed)
    model.eval()
    clean, perturbed = feature_perturbation(model, x)
    assert torch.allclose(clean, perturbed)

    g = torch.Generator().manual_seed(0)

    def unl():
        return {"weak": torch.randn(2, 3, 32, 32, generator=g), "strong_1": torch.randn(2, 3, 32, 32, generator=g),
                "strong_2": torch.randn(2, 3, 32, 32, generator=g), "ignore_mask": torch.zeros(2, 32, 32).long(),
                "box_1": torch.zeros(2, 32, 32).long(), "box_2": torch.ones(2, 32, 32).long()}

    batch = Batch({"image": torch.randn(2, 3, 32, 32, generator=g), "mask": torch.randint(0, K, (2, 32, 32))},
                  unl(), unl())
    method = build(UniMatch, "unimatch", model=model, conf_thresh=0.0)
    method.train()
    result = method.train_step(batch, ctx())
    result.loss.backward()
    enc, head = method.param_groups()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    assert set(result.logs) == {"loss_x", "loss_s1", "loss_s2", "loss_fp", "mask_ratio"}


# ---------------------------------------------------------------------------------------------
# EMA teacher


def test_ema_momentum_schedule():
    assert ema_momentum(0, 0.999) == 0.0  # first update: the teacher becomes the student
    assert math.isclose(ema_momentum(9, 0.999), 0.9)
    assert ema_momentum(10**6, 0.996) == 0.996


def test_ema_update_matches_formula_on_params_and_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = EMATeacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.module.training
    # move the student away: new weights and BatchNorm statistics
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(8, 3))
    old = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    new = student.state_dict()
    used = teacher.update(student, iteration=9, momentum=0.95)
    m = 0.9  # min(1 - 1/10, 0.95)
    assert math.isclose(used, m)
    got = teacher.module.state_dict()
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.allclose(got[name], m * old[name] + (1 - m) * new[name], atol=1e-6), name
    assert got["1.num_batches_tracked"].item() == new["1.num_batches_tracked"].item() == 1
    # iteration 0: a plain copy
    teacher.update(student, iteration=0, momentum=0.999)
    for name, value in student.state_dict().items():
        assert torch.allclose(teacher.module.state_dict()[name].float(), value.float(), atol=1e-7)


def test_teacher_is_saved_and_restored():
    method = build(FixMatch, "fixmatch", model=TinySeg(seed=0, bn=True), teacher="ema")
    assert set(method.eval_models()) == {"student", "teacher"}
    assert isinstance(method.eval_models()["teacher"], TinySeg)
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(1.0)
    method.after_step(ctx(iteration=5))  # momentum min(1 - 1/6, 0.996): teacher != student, != init
    state = method.state_dict()
    assert any(k.startswith("teacher.module.") for k in state)
    restored = build(FixMatch, "fixmatch", model=TinySeg(seed=1, bn=True), teacher="ema")
    restored.load_state_dict(state)
    for name, value in method.teacher.state_dict().items():
        assert torch.equal(restored.teacher.state_dict()[name], value)
    assert not torch.equal(method.teacher.module.head.weight, method.model.head.weight)
    # the teacher is not trained by the optimiser
    enc, head = method.param_groups()
    teacher_ids = {id(p) for p in method.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in enc + head}


def make_teacher_differ(method):
    """Teacher confidently predicts class 2 everywhere; the student is left as it is."""
    with torch.no_grad():
        method.teacher.module.head.weight.zero_()
        method.teacher.module.head.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))


@pytest.mark.parametrize("mix_source", ["separate_batch", "in_batch"])
def test_fixmatch_with_teacher_takes_pseudo_labels_from_the_teacher(mix_source):
    batch = make_batch(seed=3)
    method = build(FixMatch, "fixmatch", teacher="ema", conf_thresh=0.9, mix_source=mix_source)
    make_teacher_differ(method)
    method.train()
    result = method.train_step(batch, ctx())
    u = batch.unlabeled
    mix_strong = batch.unlabeled_mix["strong_1"] if mix_source == "separate_batch" else u["strong_1"].flip(0)
    ignore_m = batch.unlabeled_mix["ignore_mask"] if mix_source == "separate_batch" else u["ignore_mask"].flip(0)
    model = method.model
    with torch.no_grad():
        logits_s = model.head(model.features(ref_cutmix(u["strong_1"], mix_strong, u["box_1"])))
    teacher_label = torch.full((B_U, H, W), 2)
    teacher_conf = torch.full((B_U, H, W), math.exp(5) / (2 + math.exp(5)))
    expected = ref_unsup(logits_s, teacher_label, teacher_conf, ref_cutmix(u["ignore_mask"], ignore_m, u["box_1"]), 0.9)
    assert close(result.logs["loss_s"], expected)
    assert close(result.logs["mask_ratio"], 1.0)
    _, _, loss_student, _, _ = reference_fixmatch(model, batch, 0.9, mix_source)
    assert not close(result.logs["loss_s"], loss_student)
    # the student sees labelled + strong images once, in training mode; the teacher does the rest
    assert [(k, t, x.shape[0]) for k, t, x in model.calls] == [("forward", True, B_L + B_U)]
    n_teacher = 2 if mix_source == "separate_batch" else 1
    assert [(k, t) for k, t, _ in method.teacher.module.calls] == [("forward", False)] * n_teacher


def test_unimatch_with_teacher_supervises_fp_stream_with_teacher_labels():
    batch = make_batch(seed=4)
    method = build(UniMatch, "unimatch", teacher="ema", conf_thresh=0.5, mix_source="separate_batch")
    make_teacher_differ(method)
    method.train()
    result = method.train_step(batch, ctx())
    total, loss_x, losses_s, loss_fp, _ = reference_unimatch(method.model, batch, 0.5, "separate_batch",
                                                             teacher=method.teacher.module)
    assert close(result.logs["loss_fp"], loss_fp)
    assert close(result.logs["loss_s1"], losses_s[0]) and close(result.logs["loss_s2"], losses_s[1])
    assert close(result.loss, total)
    # the student still runs the fp pass on labelled + weak images for the fp stream
    assert [(k, t, x.shape[0]) for k, t, x in method.model.calls] == [("encode", True, B_L + B_U),
                                                                       ("forward", True, 2 * B_U)]


def with_true_masks(batch: Batch, seed: int) -> Batch:
    """``batch`` with a true ``"mask"`` on both unlabelled batches (some void pixels), as the data
    layer adds it for ``method.oracle_pseudo_labels``."""
    g = torch.Generator().manual_seed(seed)
    for u in (batch.unlabeled, batch.unlabeled_mix):
        u["mask"] = torch.randint(0, K, (B_U, H, W), generator=g)
        u["mask"][:, 0, :2] = 255  # void, away from the padding
    return batch


@pytest.mark.parametrize("mix_source", ["separate_batch", "in_batch"])
@pytest.mark.parametrize("teacher", ["none", "ema"])
def test_oracle_pseudo_labels_are_the_true_masks_with_void_ignored(mix_source, teacher):
    batch = with_true_masks(make_batch(seed=5), seed=6)
    method = build(FixMatch, "fixmatch", conf_thresh=0.95, mix_source=mix_source, teacher=teacher,
                   oracle_pseudo_labels=True)
    assert method.unlabeled_masks  # the trainer asks the data layer for the masks
    method.train()
    result = method.train_step(batch, ctx())
    u, mix = batch.unlabeled, batch.unlabeled_mix
    partner = mix if mix_source == "separate_batch" else {k: v.flip(0) for k, v in u.items()}
    model = method.model
    with torch.no_grad():
        logits_s = model.head(model.features(ref_cutmix(u["strong_1"], partner["strong_1"], u["box_1"])))
    label = ref_cutmix(u["mask"], partner["mask"], u["box_1"])
    ignore = ref_cutmix(u["ignore_mask"], partner["ignore_mask"], u["box_1"]).clone()
    ignore[label == 255] = 255  # void pixels are left out like padding
    expected = ref_unsup(logits_s, label, torch.ones(B_U, H, W), ignore, 0.95)
    assert close(result.logs["loss_s"], expected)
    assert close(result.logs["mask_ratio"], 1.0)  # confidence 1 on every pixel that is not void or padding
    # no network makes pseudo labels: the student's passes are the usual ones, the teacher runs none
    if teacher == "ema":
        assert method.teacher.module.calls == []
    elif mix_source == "separate_batch":
        assert all(t for _, t, _ in model.calls)  # no eval-mode pass on the partner batch


def test_after_step_updates_teacher_only_when_present():
    method = build(FixMatch, "fixmatch")
    assert method.teacher is None and list(method.eval_models()) == ["student"]
    method.after_step(ctx())  # no-op
    method = build(UniMatch, "unimatch", teacher="ema", ema_momentum=0.5)
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(1.0)
    before = method.teacher.module.head.bias.clone()
    method.after_step(ctx(iteration=100))  # momentum min(0.99, 0.5) = 0.5
    assert torch.allclose(method.teacher.module.head.bias, 0.5 * before + 0.5 * method.model.head.bias)


# ---------------------------------------------------------------------------------------------
# Mean Teacher


def test_sigmoid_rampup():
    assert sigmoid_rampup(5, 0) == 1.0
    assert math.isclose(sigmoid_rampup(0, 10), math.exp(-5))
    assert math.isclose(sigmoid_rampup(5, 10), math.exp(-5 * 0.25))
    assert sigmoid_rampup(20, 10) == 1.0


@pytest.mark.parametrize("consistency", ["ce", "mse"])
@pytest.mark.parametrize("mix_source", ["separate_batch", "in_batch"])
def test_mean_teacher_step(consistency, mix_source):
    batch = make_batch(seed=8)
    method = build(MeanTeacher, "meanteacher", consistency=consistency, mix_source=mix_source, conf_thresh=0.6,
                   unsup_weight=2.0, rampup_iters=10)
    with torch.no_grad():  # a teacher different from the student
        method.teacher.module.head.weight.mul_(-0.5)
    method.train()
    result = method.train_step(batch, ctx(iteration=5))

    u, x, model, teacher = batch.unlabeled, batch.labeled, method.model, method.teacher.module
    with torch.no_grad():
        probs_w = teacher.head(teacher.features(u["weak"])).softmax(1)
        if mix_source == "separate_batch":
            mix = batch.unlabeled_mix
            probs_m, ignore_m, strong_m = teacher.head(teacher.features(mix["weak"])).softmax(1), \
                mix["ignore_mask"], mix["strong_1"]
        else:
            probs_m, ignore_m, strong_m = probs_w.flip(0), u["ignore_mask"].flip(0), u["strong_1"].flip(0)
        cutmix_box = u["box_1"]
        probs_t = ref_cutmix(probs_w, probs_m, cutmix_box)
        ignore_t = ref_cutmix(u["ignore_mask"], ignore_m, cutmix_box)
        logits_s = model.head(model.features(ref_cutmix(u["strong_1"], strong_m, cutmix_box)))
        probs_s = logits_s.softmax(1)
        total, valid = 0.0, 0
        for b in range(B_U):
            for i in range(H):
                for j in range(W):
                    if ignore_t[b, i, j] == 255:
                        continue
                    valid += 1
                    p = [float(v) for v in probs_t[b, :, i, j]]
                    if max(p) < 0.6:
                        continue
                    if consistency == "ce":
                        total += nll(logits_s[b, :, i, j], max(range(K), key=lambda c: p[c]))
                    else:
                        total += sum((float(probs_s[b, c, i, j]) - p[c]) ** 2 for c in range(K))
        loss_u = total / valid
        loss_x = ref_ce(model.head(model.features(x["image"])), x["mask"])
    weight = 2.0 * math.exp(-5 * 0.25)
    assert close(result.logs["loss_u"], loss_u) and loss_u > 0
    assert close(result.loss, loss_x + weight * loss_u)
    assert set(method.eval_models()) == {"student", "teacher"}
    assert method.needs_mix_batch == (mix_source == "separate_batch")


# ---------------------------------------------------------------------------------------------
# Configuration


def test_config_keys_and_defaults():
    cfg = load_config({"method": {"name": "unimatch"}}).method
    assert (cfg.conf_thresh, cfg.mix_source, cfg.teacher, cfg.fp_dropout) == (0.95, "in_batch", "none", 0.5)
    assert (cfg.feature_perturbation, cfg.dual_strong, cfg.weight_x, cfg.weight_s, cfg.weight_fp) == \
           (True, True, 1.0, 0.5, 0.5)
    cfg = load_config({"method": {"name": "fixmatch"}}).method
    assert (cfg.weight_x, cfg.weight_s, cfg.ema_momentum) == (1.0, 1.0, 0.996)
    cfg = load_config({"method": {"name": "meanteacher"}}).method
    assert (cfg.consistency, cfg.conf_thresh, cfg.ema_momentum, cfg.unsup_weight) == ("ce", 0.0, 0.99, 1.0)
    with pytest.raises(ConfigError, match="fp_dropout"):
        load_config({"method": {"name": "fixmatch", "fp_dropout": 0.3}})
    with pytest.raises(ConfigError, match="teacher"):
        load_config({"method": {"name": "meanteacher", "teacher": "ema"}})
    with pytest.raises(ConfigError, match="mix_source"):
        load_config({"method": {"name": "unimatch", "mix_source": "other"}})


def test_steps_under_bfloat16_autocast_compute_float32_losses():
    batch = make_batch(seed=9)
    bf16 = StepContext(iteration=0, total_iters=10, lr=0.01,
                       autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    for method in (build(UniMatch, "unimatch", teacher="ema", conf_thresh=0.5),
                   build(FixMatch, "fixmatch", conf_thresh=0.5, mix_source="in_batch"),
                   build(MeanTeacher, "meanteacher", consistency="mse")):
        method.train()
        result = method.train_step(batch, bf16)
        assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss)
        result.loss.backward()
        method.after_step(bf16)


def test_weak_labels_eval_takes_pseudo_labels_from_an_eval_mode_pass_before_the_training_passes():
    """``method.weak_labels: eval``: one eval-mode pass of the student over the weak view comes
    first (BatchNorm running statistics, before this step's training passes move them); the
    pseudo labels are its argmax, while the training passes stay the official ones."""
    import copy

    batch = make_batch(seed=5)
    model = TinySeg(bn=True)
    with torch.no_grad():
        model.norm.running_mean.fill_(0.4)
        model.norm.running_var.fill_(3.0)
    before = copy.deepcopy(model)
    method = build(FixMatch, "fixmatch", model=model, conf_thresh=0.6, mix_source="in_batch", weak_labels="eval")
    method.train()
    result = method.train_step(batch, ctx())
    u = batch.unlabeled
    assert [(k, t, x.shape[0]) for k, t, x in model.calls] == [("forward", False, B_U), ("forward", True, B_L + B_U),
                                                                ("forward", True, B_U)]
    assert torch.equal(model.calls[0][2], u["weak"])
    before.eval()
    with torch.no_grad():
        label_w, conf_w = ref_pseudo(before.head(before.features(u["weak"])))
        before.train()
        logits_s = before.head(before.features(model.calls[-1][2]))  # train mode: the strong batch's statistics
        train_label, _ = ref_pseudo(before.head(before.features(torch.cat((batch.labeled["image"], u["weak"]))))[B_L:])
    assert not torch.equal(label_w, train_label)  # the two modes label differently here
    box, ignore = u["box_1"], u["ignore_mask"]
    expected = ref_unsup(logits_s, ref_cutmix(label_w, label_w.flip(0), box), ref_cutmix(conf_w, conf_w.flip(0), box),
                         ref_cutmix(ignore, ignore.flip(0), box), 0.6)
    assert close(result.logs["loss_s"], expected)
    assert close(result.logs["mask_ratio"], ref_ratio(conf_w, ignore, 0.6))


@pytest.mark.parametrize("name,keys,source", [("fixmatch", {"teacher": "ema"}, "the EMA teacher"),
                                               ("unimatch_v2", {}, "the EMA teacher"),
                                               ("fixmatch", {"oracle_pseudo_labels": True}, "the true masks")])
def test_weak_labels_eval_is_refused_where_pseudo_labels_come_from_elsewhere(name, keys, source):
    from semiseg.methods.unimatch_v2 import UniMatchV2

    cls = {"fixmatch": FixMatch, "unimatch_v2": UniMatchV2}[name]
    with pytest.raises(ConfigError, match=rf"key 'method.weak_labels': .*takes them from {source}"):
        build(cls, name, weak_labels="eval", **keys)


# ---------------------------------------------------------------------------------------------
# FreeMatch's self-adaptive thresholds (method.adaptive_thresh: freematch)


def test_self_adaptive_thresholds_update_equals_hand_computed_values():
    from semiseg.methods.consistency import SelfAdaptiveThresholds, confident_pixels

    sat = SelfAdaptiveThresholds(3, momentum=0.5)
    assert torch.allclose(sat.thresholds(), torch.full((3,), 1 / 3))  # both start at 1 / K
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]).T.reshape(1, 3, 1, 3)
    ignore = torch.tensor([[[0, 0, 255]]])  # the third pixel is padding: left out of the means
    sat.update(probs, ignore)
    # valid pixels: mean max 0.65, class means (0.4, 0.4, 0.2); m = 0.5 from 1/3
    assert close(sat.global_conf, 0.5 / 3 + 0.5 * 0.65)
    assert torch.allclose(sat.class_prob, torch.tensor([0.5 / 3 + 0.2, 0.5 / 3 + 0.2, 0.5 / 3 + 0.1]))
    g = 0.5 / 3 + 0.325
    assert torch.allclose(sat.thresholds(), torch.tensor([g, g, (0.5 / 3 + 0.1) / (0.5 / 3 + 0.2) * g]))
    assert set(dict(sat.named_buffers())) == {"global_conf", "class_prob"}  # checkpointed with the method
    # a pixel teaches when its confidence reaches its own pseudo label's threshold
    target = PseudoTarget(torch.tensor([[[0, 2, 2]]]), torch.tensor([[[0.45, 0.36, 0.35]]]), torch.zeros(1, 1, 3).long())
    assert confident_pixels(target, sat.thresholds()).tolist() == [[[False, True, False]]]


def ref_unsup_classwise(logits, label, conf, ignore, thresholds):
    total, valid = 0.0, 0
    for b in range(logits.shape[0]):
        for i in range(H):
            for j in range(W):
                if ignore[b, i, j] == 255:
                    continue
                valid += 1
                if conf[b, i, j] >= thresholds[int(label[b, i, j])]:
                    total += nll(logits[b, :, i, j], label[b, i, j])
    return total / valid


def fixmatch_step(**keys):
    """One in-batch FixMatch step on ``make_batch(seed=6)`` with ``keys``: (method, result, batch,
    the weak view's logits, the mixed strong view's logits), the logits recomputed after the step."""
    batch = make_batch(seed=6)
    method = build(FixMatch, "fixmatch", mix_source="in_batch", **keys)
    method.train()
    result = method.train_step(batch, ctx())
    model = method.model
    with torch.no_grad():
        logits_w = model.head(model.features(batch.unlabeled["weak"]))
        logits_s = model.head(model.features(model.calls[-1][2]))
    return method, result, batch, logits_w, logits_s


def test_fixmatch_with_freematch_thresholds_equals_hand_computed_loss():
    """The step updates the thresholds with this batch's weak softmax first, then each pixel of
    the mixed target teaches when its confidence reaches its own class's threshold."""
    method, result, batch, logits_w, logits_s = fixmatch_step(adaptive_thresh="freematch", adaptive_momentum=0.25)
    u = batch.unlabeled
    label_w, conf_w = ref_pseudo(logits_w)
    p = logits_w.double().softmax(1)
    valid = [(b, i, j) for b in range(B_U) for i in range(H) for j in range(W) if u["ignore_mask"][b, i, j] != 255]
    mean_max = sum(float(p[b, :, i, j].max()) for b, i, j in valid) / len(valid)
    mean_class = [sum(float(p[b, c, i, j]) for b, i, j in valid) / len(valid) for c in range(K)]
    tau = 0.25 / K + 0.75 * mean_max
    ptilde = [0.25 / K + 0.75 * x for x in mean_class]
    thresholds = [x / max(ptilde) * tau for x in ptilde]
    assert torch.allclose(method.adaptive.thresholds().double(), torch.tensor(thresholds, dtype=torch.float64))
    box, ignore = u["box_1"], u["ignore_mask"]
    expected = ref_unsup_classwise(logits_s, ref_cutmix(label_w, label_w.flip(0), box),
                                   ref_cutmix(conf_w, conf_w.flip(0), box), ref_cutmix(ignore, ignore.flip(0), box),
                                   thresholds)
    assert close(result.logs["loss_s"], expected)
    kept = sum(1 for b, i, j in valid if conf_w[b, i, j] >= thresholds[int(label_w[b, i, j])])
    assert 0 < kept < len(valid) and close(result.logs["mask_ratio"], kept / len(valid))
    state = method.state_dict()
    assert torch.equal(state["adaptive.class_prob"], method.adaptive.class_prob)  # resumed with the checkpoint
    fresh = build(FixMatch, "fixmatch", mix_source="in_batch", adaptive_thresh="freematch")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.adaptive.thresholds(), method.adaptive.thresholds())


# ---------------------------------------------------------------------------------------------
# ReMixMatch's distribution alignment (method.dist_align: true)


def test_distribution_alignment_averages_and_aligned_probabilities_equal_hand_computed_values():
    from semiseg.methods.consistency import DistributionAlignment

    da = DistributionAlignment(3, momentum=0.5)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]).T.reshape(1, 3, 1, 3)
    ignore = torch.tensor([[[0, 0, 255]]])  # the third pixel is padding: left out of p_model
    labeled = torch.tensor([[[0, 2, 2, 255]]])  # void left out of p_target
    da.update(probs, ignore, labeled)
    # the first batch sets both averages: p_model (0.4, 0.4, 0.2), p_target (1/3, 0, 2/3)
    assert torch.allclose(da.p_model, torch.tensor([0.4, 0.4, 0.2]))
    assert torch.allclose(da.p_target, torch.tensor([1 / 3, 0.0, 2 / 3]))
    da.update(probs, torch.zeros(1, 1, 3, dtype=torch.long), torch.tensor([[[1, 1, 255, 255]]]))
    # then m = 0.5: p_model with all three pixels (1/3, 1/3, 1/3), p_target with (0, 1, 0)
    p_model = [0.5 * 0.4 + 0.5 / 3, 0.5 * 0.4 + 0.5 / 3, 0.5 * 0.2 + 0.5 / 3]
    p_target = [1 / 6, 0.5, 1 / 3]
    assert torch.allclose(da.p_model, torch.tensor(p_model)) and torch.allclose(da.p_target, torch.tensor(p_target))
    aligned = da(probs)
    for j in range(3):
        raw = [float(probs[0, c, 0, j]) * (p_target[c] + 1e-6) / (p_model[c] + 1e-6) for c in range(3)]
        assert torch.allclose(aligned[0, :, 0, j].double(), torch.tensor(raw, dtype=torch.float64) / sum(raw), atol=1e-6)
    # class 0 is over-predicted against the masks and class 1 under: the first pixel's 0.7 for
    # class 0 falls to 0.444 and its 0.2 for class 1 rises to 0.381
    assert torch.allclose(aligned[0, :, 0, 0], torch.tensor([0.4444, 0.3810, 0.1746]), atol=1e-4)
    assert set(dict(da.named_buffers())) == {"p_model", "p_target", "started"}  # checkpointed with the method


def test_distribution_alignment_skips_a_batch_without_pixels_and_starts_on_the_first_with_some():
    from semiseg.methods.consistency import DistributionAlignment

    da = DistributionAlignment(2, momentum=0.9)
    probs = torch.tensor([0.8, 0.2]).view(1, 2, 1, 1)
    da.update(probs, torch.full((1, 1, 1), 255), torch.full((1, 1, 1), 255))  # all padding, all void
    assert torch.equal(da.p_model, torch.full((2,), 0.5)) and not da.started.any()
    da.update(probs, torch.zeros(1, 1, 1, dtype=torch.long), torch.ones(1, 1, 1, dtype=torch.long))
    assert torch.allclose(da.p_model, torch.tensor([0.8, 0.2])) and torch.equal(da.p_target, torch.tensor([0.0, 1.0]))


def test_fixmatch_with_distribution_alignment_equals_hand_computed_loss():
    """The step updates the averages with this batch's weak softmax and labelled masks first; the
    pseudo labels and confidences of the weak view (and of its in-batch partner) are then read
    from the aligned softmax."""
    method, result, batch, logits_w, logits_s = fixmatch_step(dist_align=True, dist_align_momentum=0.25,
                                                              conf_thresh=0.4)
    u = batch.unlabeled
    p = logits_w.double().softmax(1)
    valid = [(b, i, j) for b in range(B_U) for i in range(H) for j in range(W) if u["ignore_mask"][b, i, j] != 255]
    p_model = [sum(float(p[b, c, i, j]) for b, i, j in valid) / len(valid) for c in range(K)]
    labels = [int(x) for x in batch.labeled["mask"].flatten() if x != 255]
    p_target = [labels.count(c) / len(labels) for c in range(K)]
    assert torch.allclose(method.align.p_model.double(), torch.tensor(p_model, dtype=torch.float64))
    assert torch.allclose(method.align.p_target.double(), torch.tensor(p_target, dtype=torch.float64))
    ratio = torch.tensor([(t + 1e-6) / (m + 1e-6) for t, m in zip(p_target, p_model)], dtype=torch.float64)
    q = p * ratio.view(1, K, 1, 1)
    q = q / q.sum(1, keepdim=True)
    conf_w, label_w = q.max(1)
    assert not torch.equal(label_w, p.argmax(1))  # the alignment moved some pseudo labels
    box, ignore = u["box_1"], u["ignore_mask"]
    expected = ref_unsup_classwise(logits_s, ref_cutmix(label_w, label_w.flip(0), box),
                                   ref_cutmix(conf_w, conf_w.flip(0), box), ref_cutmix(ignore, ignore.flip(0), box),
                                   [0.4] * K)
    assert close(result.logs["loss_s"], expected)
    kept = sum(1 for b, i, j in valid if conf_w[b, i, j] >= 0.4)
    assert 0 < kept < len(valid) and close(result.logs["mask_ratio"], kept / len(valid))
    state = method.state_dict()
    fresh = build(FixMatch, "fixmatch", mix_source="in_batch", dist_align=True)
    fresh.load_state_dict(state)  # resumed with the checkpoint
    assert torch.equal(fresh.align.p_model, method.align.p_model) and bool(fresh.align.started.all())


def test_distribution_alignment_is_not_a_key_of_mean_teacher():
    with pytest.raises(ConfigError, match="unknown key 'method.dist_align'"):
        load_config({"method": {"name": "meanteacher", "dist_align": True}})


@pytest.mark.parametrize("method_cls,name,keys", [(UniMatch, "unimatch", {}), (FixMatch, "fixmatch", {"teacher": "ema"})])
def test_distribution_alignment_takes_the_labelled_masks_and_the_pseudo_labelling_networks_softmax(method_cls, name, keys):
    """UniMatch and the EMA teacher's FixMatch feed the averages too: p_target from the labelled
    masks, p_model from the softmax the pseudo labels come from (the teacher's, when there is one)."""
    batch = make_batch(seed=3)
    method = build(method_cls, name, mix_source="in_batch", dist_align=True, **keys)
    method.train()
    net = method.pseudo_labeler
    with torch.no_grad():
        was = net.training
        net.eval()
        teacher_probs = net(batch.unlabeled["weak"]).double().softmax(1)
        net.train(was)
    method.train_step(batch, ctx())
    labels = [int(x) for x in batch.labeled["mask"].flatten() if x != 255]
    assert method.align.p_target.tolist() == pytest.approx([labels.count(c) / len(labels) for c in range(K)])
    if method.teacher is not None:
        valid = batch.unlabeled["ignore_mask"] != 255
        expected = teacher_probs.permute(0, 2, 3, 1)[valid].mean(0)
        assert torch.allclose(method.align.p_model.double(), expected, atol=1e-6)
