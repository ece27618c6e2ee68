"""Class-aware cross-entropy, progressive cross training (pct), the use_tags switch of FixMatch and
the pseudo-label CLI. References are computed here with explicit loops / closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.config import load_config
from semiseg.errors import ConfigError, DataError
from semiseg.methods.base import Batch, StepContext
from semiseg.methods.cce import (class_aware_cross_entropy, class_aware_pseudo_label, class_aware_softmax,
                                 multilabel_tag_loss)
from semiseg.methods.pct import PCT, DynamicIoU, pct_image_weights


def one_pixel(values):
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------
# CCE


def test_cce_hand_computed():
    logits = one_pixel([1.0, 2.0, 3.0])
    tags = torch.tensor([[1.0, 0.0, 1.0]])
    loss = class_aware_cross_entropy(logits, torch.tensor([[[0]]]), tags)
    # -log(e^1 / (e^1 + e^3)) = log(1 + e^2)
    assert loss.item() == pytest.approx(math.log(1 + math.e ** 2), rel=1e-6)
    loss2 = class_aware_cross_entropy(logits, torch.tensor([[[2]]]), tags)
    assert loss2.item() == pytest.approx(math.log(1 + math.e ** -2), rel=1e-6)


def test_untagged_classes_get_zero_probability():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, 4, generator=g) * 5
    tags = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    p = class_aware_softmax(logits, tags)
    assert torch.all(p[~tags[:, :, None, None].expand_as(p)] == 0)
    assert torch.allclose(p.sum(1), torch.ones(3, 4, 4))
    # and the restricted probabilities are the renormalised plain softmax
    plain = logits.softmax(1) * tags[:, :, None, None]
    assert torch.allclose(p, plain / plain.sum(1, keepdim=True), atol=1e-6)


def test_cce_equals_cross_entropy_when_every_class_is_tagged():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[0, :2] = 255
    tags = torch.ones(2, 4)
    ours = class_aware_cross_entropy(logits, target, tags)
    assert ours.item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item(), rel=1e-6)


def test_cce_is_stable_for_large_logits():
    logits = one_pixel([1000.0, 2000.0, 3000.0]).requires_grad_()
    tags = torch.tensor([[1.0, 0.0, 1.0]])
    loss = class_aware_cross_entropy(logits, torch.tensor([[[0]]]), tags)
    assert loss.item() == pytest.approx(2000.0)  # log(1 + e^2000) = 2000 + tiny
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.flatten().tolist() == pytest.approx([-1.0, 0.0, 1.0])
    # fp16-sized logits too
    big = torch.full((1, 3, 2, 2), 60000.0)
    assert torch.isfinite(class_aware_cross_entropy(big, torch.zeros(1, 2, 2, dtype=torch.long), tags))


def test_pseudo_labels_never_contain_untagged_classes():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 7, 8, 8, generator=g) * 10
    tags = torch.rand(6, 7, generator=g) > 0.6
    tags[0] = False  # an image without tags is not restricted
    labels = class_aware_pseudo_label(logits, tags)
    for i in range(1, 6):
        allowed = set(torch.nonzero(tags[i]).flatten().tolist())
        assert set(labels[i].unique().tolist()) <= allowed
    assert torch.equal(labels[0], logits[0].argmax(0))


def test_multilabel_tag_loss_excludes_background():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1, 0, 0] = 2.0  # max-pooled: [0, 2, 0]
    tags = torch.tensor([[1.0, 1.0, 0.0]])
    expected = (-math.log(torch.sigmoid(torch.tensor(2.0)).item()) - math.log(0.5)) / 2
    assert multilabel_tag_loss(logits, tags, background=0).item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Dynamic evaluation and weights


def test_dynamic_iou_matches_brute_force():
    K, mom = 4, 0.9
    g = torch.Generator().manual_seed(3)
    dyn = DynamicIoU(K, mom)
    tp, gt, pr = [0.0] * K, [1.0] * K, [0.0] * K  # official start: ground-truth count 1
    for _ in range(3):
        pred = torch.randint(0, K, (2, 5, 5), generator=g)
        target = torch.randint(0, K, (2, 5, 5), generator=g)
        target[:, 0] = 255  # ignored pixels count nowhere
        iou = dyn.update(pred, target)
        tp, gt, pr = [mom * v for v in tp], [mom * v for v in gt], [mom * v for v in pr]
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
            if t == 255:
                continue
            gt[t] += 1
            pr[p] += 1
            if p == t:
                tp[t] += 1
        expected = [tp[c] / (gt[c] + pr[c] - tp[c]) for c in range(K)]
        assert iou.tolist() == pytest.approx(expected, rel=1e-5)
    assert dyn.tp.tolist() == pytest.approx(tp) and dyn.gt.tolist() == pytest.approx(gt)
    assert dyn.pred.tolist() == pytest.approx(pr)
    assert set(dict(dyn.named_buffers())) == {"tp", "gt", "pred"}  # saved in checkpoints


def test_pct_image_weights_formula():
    iou = torch.tensor([0.9, 0.5, 0.0, 0.7])
    tags = torch.tensor([[1, 1, 0, 0],   # min(0.9, 0.5)
                         [1, 0, 1, 1],   # class 2 has J = 0: skipped -> min(0.9, 0.7)
                         [0, 0, 1, 0],   # only J = 0 classes -> 1
                         [1, 0, 0, 1]], dtype=torch.float32)
    w = pct_image_weights(tags, iou, power=8)
    assert w.tolist() == pytest.approx([0.5 ** 8, 0.7 ** 8, 1.0, 0.7 ** 8])
    assert pct_image_weights(tags, iou, power=1).tolist() == pytest.approx([0.5, 0.7, 1.0, 0.7])


# ---------------------------------------------------------------------------------------------
# A whole pct step

PCT_TINY = ["method.name=pct", "data.tags=masks", "model.encoder=test_resnet", "model.decoder_channels=16",
            "data.crop_size=32"]


def test_pct_train_step_finite_with_logs_and_both_nets_trained():
    from semiseg.models import build_model

    torch.manual_seed(0)
    cfg = load_config(None, PCT_TINY)
    K = 6
    method = PCT(cfg, build_model(cfg.model, K), K)
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, K, (2, 32, 32), generator=g)
    mask[:, :4] = 255
    tags_s = torch.zeros(2, K)
    for i in range(2):
        tags_s[i, mask[i][mask[i] != 255].unique()] = 1
    ignore = torch.zeros(2, 32, 32, dtype=torch.long)
    ignore[:, :, -6:] = 255
    tags_w = torch.tensor([[1, 0, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.float32)
    batch = Batch(labeled={"image": torch.randn(2, 3, 32, 32, generator=g), "mask": mask, "tags": tags_s},
                  unlabeled={"weak": torch.randn(2, 3, 32, 32, generator=g), "ignore_mask": ignore, "tags": tags_w})
    method.train()
    result = method.train_step(batch, StepContext(iteration=0, total_iters=10, lr=0.01))
    assert torch.isfinite(result.loss)
    assert {"loss_seg", "loss_cls", "loss_pseudo", "loss_pct", "pct_weight", "dyn_mIoU"} <= set(result.logs)
    assert all(math.isfinite(float(v)) for v in result.logs.values())
    result.loss.backward()
    enc, head = method.param_groups()
    ids = {id(p) for p in enc + head}
    assert ids == {id(p) for p in method.model.parameters()} | {id(p) for p in method.pseudo_net.parameters()}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.pseudo_net.parameters())
    assert list(method.eval_models()) == ["hybrid", "pseudo"]
    assert method.dynamic_iou.tp.sum() > 0
    assert "dynamic_iou.tp" in method.state_dict() and any(k.startswith("pseudo_net.") for k in method.state_dict())


def test_pct_needs_tags():
    from semiseg.models import build_model

    cfg = load_config(None, ["method.name=pct", "model.encoder=test_resnet", "model.decoder_channels=16"])
    with pytest.raises(ConfigError, match="data.tags"):
        PCT(cfg, build_model(cfg.model, 3), 3)


# ---------------------------------------------------------------------------------------------
# use_tags: FixMatch pseudo labels restricted to the tags


class Biased(nn.Module):
    """Predicts class 2 everywhere with high confidence (class 0 second)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.copy_(torch.tensor([5.0, 0.0, 10.0]))

    def forward(self, x):
        return self.conv(x)

    def param_groups(self):
        return [], list(self.parameters())


@pytest.mark.parametrize("use_tags", [False, True])
def test_use_tags_restricts_fixmatch_pseudo_labels(monkeypatch, use_tags):
    import semiseg.methods.fixmatch as fm

    import semiseg.methods.consistency as consistency_module

    captured = []
    real = consistency_module.unsupervised_loss

    def spy(logits, target, conf_thresh):
        captured.append(target)
        return real(logits, target, conf_thresh)

    monkeypatch.setattr(consistency_module, "unsupervised_loss", spy)
    cfg = load_config(None, ["method.name=fixmatch", "method.mix_source=in_batch", "method.conf_thresh=0",
                             "data.tags=masks", f"method.use_tags={str(use_tags).lower()}"])
    method = fm.FixMatch(cfg, Biased(), 3)
    u = {"weak": torch.zeros(2, 3, 4, 4), "strong_1": torch.zeros(2, 3, 4, 4),
         "ignore_mask": torch.zeros(2, 4, 4, dtype=torch.long), "box_1": torch.zeros(2, 4, 4, dtype=torch.long),
         "tags": torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])}
    batch = Batch(labeled={"image": torch.zeros(1, 3, 4, 4), "mask": torch.zeros(1, 4, 4, dtype=torch.long)},
                  unlabeled=u)
    method.train_step(batch, StepContext(0, 1, 0.01))
    labels = captured[0].pseudo_label
    if use_tags:
        assert labels[0].unique().tolist() == [0] and labels[1].unique().tolist() == [1]
        assert captured[0].confidence[1].min().item() == pytest.approx(1.0)
    else:
        assert labels.unique().tolist() == [2]


def test_use_tags_needs_data_tags():
    import semiseg.methods.fixmatch as fm

    cfg = load_config(None, ["method.name=fixmatch", "method.use_tags=true"])
    with pytest.raises(ConfigError, match="method.use_tags"):
        fm.FixMatch(cfg, Biased(), 3)


# ---------------------------------------------------------------------------------------------
# End to end: pct training, pseudo-label CLI, stage two with data.extra_labels


def test_pseudo_label_cli_writes_pngs_within_tags(make_folder_dataset, tmp_path, capsys):
    import semiseg
    from PIL import Image

    from semiseg.cli import main
    from semiseg.data.build import build_train_sets

    torch.set_num_threads(1)
    root = make_folder_dataset(n=6, size=(32, 32), num_classes=3, unlabeled=3)
    (root / "tags.csv").write_text("image,tags\nu000,1\nu001,class_2\nunlabeled/u002.png,1;2\n")
    overrides = ["data.dataset=folder", f"data.root={root}", "data.num_classes=3", "data.crop_size=32",
                 "data.workers=0", "data.tags=tags.csv", "data.background_class=0", "model.encoder=test_resnet",
                 "model.decoder_channels=16", "train.batch_size=2", "train.iters=2", "train.eval_every=2",
                 "train.log_every=1", "method.name=pct"]
    run = semiseg.train(None, overrides=overrides, out=tmp_path / "run", progress=False)
    out = tmp_path / "pl"
    assert main(["pseudo-label", str(run.run_dir), "--out", str(out)]) == 0
    allowed = {"u000": {0, 1}, "u001": {0, 2}, "u002": {0, 1, 2}}
    for image_id, classes in allowed.items():
        png = np.array(Image.open(out / f"{image_id}.png"))
        assert png.shape == (32, 32)
        assert set(np.unique(png).tolist()) <= classes
    assert main(["pseudo-label", str(run.run_dir), "--out", str(tmp_path / "st"), "--no-tags"]) == 0
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["u000.png", "u001.png", "u002.png"]
    assert main(["pseudo-label", str(run.run_dir), "--split", "val", "--score", "--model", "pseudo"]) == 0
    assert '"mIoU_with_tags"' in capsys.readouterr().out
    # stage two: the pseudo labels join the labelled set
    cfg2 = load_config(None, overrides[:-1] + [f"data.extra_labels={out}", "data.tags=null"])
    sets = build_train_sets(cfg2, 0, False)
    assert {"u000", "u001", "u002"} <= {s.id for s in sets.labeled.samples}


@pytest.mark.parametrize("use_tags", [True, False])
def test_self_training_labels_take_every_class_and_read_no_tags(make_folder_dataset, tmp_path, use_tags):
    """``semiseg pseudo-label --no-tags`` (``use_tags=False``): the plain argmax, where the tags
    would have kept class 2 (the network's choice) out of u000 and u001."""
    from PIL import Image

    from semiseg.pseudo_label import split_samples, write_pseudo_labels

    root = make_folder_dataset(n=6, size=(16, 16), num_classes=3, unlabeled=3)
    (root / "tags.csv").write_text("image,tags\nu000,1\nu001,0\nu002,1;2\n")
    cfg = load_config(None, ["data.dataset=folder", f"data.root={root}", "data.num_classes=3", "data.crop_size=16",
                             "data.tags=tags.csv", "data.background_class=0"])
    written = write_pseudo_labels(cfg, Biased(), split_samples(cfg, "unlabeled"), tmp_path / "pl", 3,
                                  use_tags=use_tags)
    labels = {p.stem: set(np.unique(np.array(Image.open(p))).tolist()) for p in written}
    if use_tags:
        assert labels == {"u000": {0}, "u001": {0}, "u002": {2}}  # 0 is the background, always tagged
    else:
        assert labels == {"u000": {2}, "u001": {2}, "u002": {2}}


def test_self_training_labels_need_no_mask_or_tags_file(make_folder_dataset, tmp_path):
    """Without ``data.tags`` the tags come from each image's mask; images without one fail with
    a message unless the tags are not read at all."""
    from semiseg.pseudo_label import split_samples, write_pseudo_labels

    root = make_folder_dataset(n=6, size=(16, 16), num_classes=3, unlabeled=2)
    cfg = load_config(None, ["data.dataset=folder", f"data.root={root}", "data.num_classes=3", "data.crop_size=16"])
    samples = split_samples(cfg, "unlabeled")
    with pytest.raises(DataError, match="u000.png has no entry in tags file masks and no mask"):
        write_pseudo_labels(cfg, Biased(), samples, tmp_path / "a", 3)
    assert len(write_pseudo_labels(cfg, Biased(), samples, tmp_path / "b", 3, use_tags=False)) == 2
