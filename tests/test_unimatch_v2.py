"""UniMatch V2 on small fixed tensors: complementary channel dropout, the step's loss against a
reference written with explicit loops from the official ``unimatch_v2.py`` arithmetic, the EMA
teacher, the configuration, and a short end-to-end run that resumes exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semiseg.methods.perturbations as perturbations
from semiseg.config import load_config
from semiseg.errors import ConfigError
from semiseg.methods.base import Batch, StepContext
from semiseg.methods.perturbations import complementary_channel_masks, complementary_dropout
from semiseg.methods.unimatch_v2 import UniMatchV2

from conftest import loop_references, tiny  # noqa: E402

_refs = loop_references()  # explicit-loop references on 5 x 6 images of 3 classes, as here
ref_pseudo, ref_cutmix, ref_unsup, ref_ce, close, box = (_refs.ref_pseudo, _refs.ref_cutmix, _refs.ref_unsup,
                                                         _refs.ref_ce, _refs.close, _refs.box)
K, H, W = _refs.K, _refs.H, _refs.W  # classes, image size
B_L, B_U = 2, 4  # labelled / unlabelled batch sizes


class TwoFeatureSeg(nn.Module):
    """The SegModel contract with three encoder features (4, 4 and 6 channels), of which the head
    reads the first and the last (``in_index``), like DeepLabV3+'s low-level and deepest ones.
    No BatchNorm: an image's logits do not depend on the rest of the batch. Every ``forward`` and
    ``encode`` is recorded as (kind, training, batch size); ``decode`` keeps its last input."""

    neck = None

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 6, 1)])
        self.head = nn.Conv2d(10, K, 1)
        with torch.no_grad():
            self.head.weight.mul_(4.0)  # spread the confidences around the thresholds used below
        self.head.in_index = (0, 2)
        self.calls: list[tuple[str, bool, int]] = []
        self.decoded: list[torch.Tensor] = []

    @property
    def decoder(self):
        return self.head

    def encode(self, x):
        self.calls.append(("encode", self.training, x.shape[0]))
        f0 = F.relu(self.enc[0](x))
        f1 = torch.tanh(self.enc[1](f0))
        return [f0, f1, F.relu(self.enc[2](f1))]

    def decode(self, feats, out_size=None):
        self.decoded = [f.detach().clone() for f in feats]
        return self.head(torch.cat((feats[0], feats[2]), dim=1))

    def forward(self, x):
        self.calls.append(("forward", self.training, x.shape[0]))
        f0 = F.relu(self.enc[0](x))
        f2 = F.relu(self.enc[2](torch.tanh(self.enc[1](f0))))
        return self.head(torch.cat((f0, f2), dim=1))

    def param_groups(self):
        return list(self.enc.parameters()), list(self.head.parameters())


def fixed_masks(num_pairs, widths, kept_fraction=0.5, device=None):
    """Deterministic complementary masks: pair 0 keeps all channels; pair i > 0 gives channel c
    to the first view when (c + i) is even."""
    masks = {}
    for width in dict.fromkeys(widths):
        first = torch.tensor([[2.0 if (c + i) % 2 == 0 else 0.0 for c in range(width)] for i in range(num_pairs)])
        second = 2.0 - first
        first[0], second[0] = 1.0, 1.0
        masks[width] = torch.cat((first, second))
    return masks


def unlabeled_batch(g):
    ignore_mask = torch.zeros(B_U, H, W, dtype=torch.long)
    ignore_mask[:, -1, :] = 255
    ignore_mask[0, :, -2:] = 255
    return {
        "weak": torch.randn(B_U, 3, H, W, generator=g),
        "strong_1": torch.randn(B_U, 3, H, W, generator=g),
        "strong_2": torch.randn(B_U, 3, H, W, generator=g),
        "ignore_mask": ignore_mask,
        "box_1": torch.stack([box(0, 0, 3, 3), box(1, 2, 4, 4), box(2, 1, 2, 5), box(0, 0, 0, 0)]),
        "box_2": torch.stack([box(2, 3, 3, 3), box(0, 0, 5, 2), box(1, 1, 1, 1), box(0, 0, 5, 6)]),
    }


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, K, (B_L, H, W), generator=g)
    mask[0, 0, :] = 255
    return Batch({"image": torch.randn(B_L, 3, H, W, generator=g), "mask": mask}, unlabeled_batch(g),
                 unlabeled_batch(g))


def ctx(iteration=0):
    return StepContext(iteration=iteration, total_iters=100, lr=0.01)


def build(**keys):
    cfg = load_config({"method": {"name": "unimatch_v2", **keys}})
    method = UniMatchV2(cfg, TwoFeatureSeg(), K)
    with torch.no_grad():  # a teacher that differs from the student
        for p in method.teacher.module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return method


# ---------------------------------------------------------------------------------------------
# Independent references (explicit loops)


def ref_strong_logits(model, images, masks):
    """Logits of each image with the masks applied channel by channel to features 0 and 2."""
    out = []
    for n in range(images.shape[0]):
        f0 = F.relu(model.enc[0](images[n:n + 1]))
        f2 = F.relu(model.enc[2](torch.tanh(model.enc[1](f0))))
        f0 = torch.stack([f0[0, c] * float(masks[4][n, c]) for c in range(4)])[None]
        f2 = torch.stack([f2[0, c] * float(masks[6][n, c]) for c in range(6)])[None]
        out.append(model.head(torch.cat((f0, f2), dim=1)))
    return torch.cat(out)


def reference_v2(method, batch, thresh, mix_source, weight_x=1.0, weight_s=1.0):
    u, x = batch.unlabeled, batch.labeled
    student, teacher = method.model, method.teacher.module
    with torch.no_grad():
        label_w, conf_w = ref_pseudo(teacher(u["weak"]))
        if mix_source == "separate_batch":
            mix = batch.unlabeled_mix
            label_m, conf_m = ref_pseudo(teacher(mix["weak"]))
            ignore_m, strong_m = mix["ignore_mask"], [mix["strong_1"], mix["strong_2"]]
        else:
            label_m, conf_m, ignore_m = label_w.flip(0), conf_w.flip(0), u["ignore_mask"].flip(0)
            strong_m = [u["strong_1"].flip(0), u["strong_2"].flip(0)]
        mixed = [ref_cutmix(u[f"strong_{k}"], strong_m[k - 1], u[f"box_{k}"]) for k in (1, 2)]
        logits = ref_strong_logits(student, torch.cat(mixed), fixed_masks(B_U, [4, 6]))
        losses_s = []
        for k, pred in zip((1, 2), logits.chunk(2)):
            b = u[f"box_{k}"]
            losses_s.append(ref_unsup(pred, ref_cutmix(label_w, label_m, b), ref_cutmix(conf_w, conf_m, b),
                                      ref_cutmix(u["ignore_mask"], ignore_m, b), thresh))
        loss_x = ref_ce(student(x["image"]), x["mask"])
    valid = [(b, i, j) for b in range(B_U) for i in range(H) for j in range(W) if u["ignore_mask"][b, i, j] != 255]
    ratio = sum(1 for b, i, j in valid if conf_w[b, i, j] >= thresh) / len(valid)
    loss_s = (losses_s[0] + losses_s[1]) / 2
    return (weight_x * loss_x + weight_s * loss_s) / 2, loss_x, losses_s, ratio


# ---------------------------------------------------------------------------------------------
# Complementary channel dropout


def test_complementary_masks_keep_every_channel_in_exactly_one_view():
    torch.manual_seed(0)
    masks = complementary_channel_masks(8, [16, 16, 32], kept_fraction=0.5)
    assert sorted(masks) == [16, 32]  # one mask per distinct width
    kept_by_width = []
    for width, mask in masks.items():
        assert mask.shape == (16, width)
        first, second = mask[:8], mask[8:]
        kept = [i for i in range(8) if bool((first[i] == 1).all())]
        kept_by_width.append(kept)
        assert len(kept) == 4  # int(8 * 0.5) pairs keep every channel in both views
        for i in range(8):
            if i in kept:
                assert bool((second[i] == 1).all())
            else:  # each channel doubled in exactly one of the two views
                assert set(first[i].tolist()) <= {0.0, 2.0}
                assert torch.equal(first[i] + second[i], torch.full((width,), 2.0))
                assert 0 < int((first[i] == 2).sum()) < width
    assert kept_by_width[0] == kept_by_width[1]  # the same pairs keep all channels at every width
    assert all(not bool((m == 1).all()) for m in complementary_channel_masks(4, [64], kept_fraction=0.0).values())
    assert all(bool((m == 1).all()) for m in complementary_channel_masks(4, [64], kept_fraction=1.0).values())


def test_complementary_masks_are_unbiased():
    torch.manual_seed(1)
    draws = torch.stack([complementary_channel_masks(16, [64], kept_fraction=0.0)[64] for _ in range(200)])
    assert draws.shape == (200, 32, 64)
    # each view's mask has expectation 1 (a channel is doubled with probability 1/2) ...
    assert abs(float(draws[:, :16].mean()) - 1.0) < 0.01 and abs(float(draws[:, 16:].mean()) - 1.0) < 0.01
    # ... and channels are independent Bernoulli draws, not one pattern
    assert 0.45 < float((draws[:, :16] == 2).float().mean(dim=(0, 1)).min())
    assert float((draws[:, :16] == 2).float().mean(dim=(0, 1)).max()) < 0.55


def test_complementary_dropout_masks_the_features_the_head_reads(monkeypatch):
    monkeypatch.setattr(perturbations, "complementary_channel_masks", fixed_masks)
    model = TwoFeatureSeg().train()
    x = torch.randn(2 * B_U, 3, H, W)
    logits = complementary_dropout(model, x)
    assert [c for c in model.calls] == [("encode", True, 2 * B_U)]  # the two views encoded together
    clean = [f.detach() for f in model.encode(x)]
    masks = fixed_masks(B_U, [4, 6])
    assert torch.equal(model.decoded[0], clean[0] * masks[4][:, :, None, None])
    assert torch.equal(model.decoded[1], clean[1])  # not read by the head: untouched
    assert torch.equal(model.decoded[2], clean[2] * masks[6][:, :, None, None])
    assert torch.allclose(logits, ref_strong_logits(model, x, masks), atol=1e-5)
    # eval mode: no perturbation
    model.eval()
    assert torch.equal(complementary_dropout(model, x), model(x))
    with pytest.raises(ValueError, match="odd batch of 3"):
        complementary_dropout(model.train(), x[:3])


# ---------------------------------------------------------------------------------------------
# The step


@pytest.mark.parametrize("mix_source", ["in_batch", "separate_batch"])
def test_unimatch_v2_step_equals_hand_computed_loss(mix_source, monkeypatch):
    monkeypatch.setattr(perturbations, "complementary_channel_masks", fixed_masks)
    batch = make_batch(seed=3)
    method = build(conf_thresh=0.7, mix_source=mix_source)
    method.train()
    result = method.train_step(batch, ctx())
    calls = list(method.model.calls)
    total, loss_x, losses_s, ratio = reference_v2(method, batch, 0.7, mix_source)
    assert 0 < ratio < 1 and losses_s[0] != pytest.approx(losses_s[1])
    assert close(result.loss, total)  # (L_x + (L_s1 + L_s2) / 2) / 2
    logs = result.logs
    assert close(logs["loss_x"], loss_x) and close(logs["mask_ratio"], ratio)
    assert close(logs["loss_s1"], losses_s[0]) and close(logs["loss_s2"], losses_s[1])
    assert close(logs["loss_s"], (losses_s[0] + losses_s[1]) / 2)
    # the student: the labelled batch alone, then both strong views in one encoding; never the weak view
    assert calls == [("forward", True, B_L), ("encode", True, 2 * B_U)]


def test_unimatch_v2_weights_and_ablation(monkeypatch):
    monkeypatch.setattr(perturbations, "complementary_channel_masks", fixed_masks)
    batch = make_batch(seed=4)
    method = build(conf_thresh=0.6, weight_x=2.0, weight_s=0.5)
    method.train()
    total, *_ = reference_v2(method, batch, 0.6, "in_batch", weight_x=2.0, weight_s=0.5)
    assert close(method.train_step(batch, ctx()).loss, total)

    # comp_drop off: a plain pass over the strong views (every mask 1)
    monkeypatch.setattr(perturbations, "complementary_channel_masks",
                        lambda n, widths, *a, **k: {w: torch.ones(2 * n, w) for w in widths})
    plain = build(conf_thresh=0.6, comp_drop=False)
    plain.train()
    result = plain.train_step(batch, ctx())
    assert plain.model.calls == [("forward", True, B_L), ("forward", True, 2 * B_U)]
    ones = build(conf_thresh=0.6)
    ones.train()
    assert torch.allclose(result.loss, ones.train_step(batch, ctx()).loss, atol=1e-6)


def test_unimatch_v2_pseudo_labels_come_from_the_teacher_in_eval_mode():
    batch = make_batch(seed=5)
    method = build(conf_thresh=0.0)
    method.train()
    seen = []
    method.teacher.module.register_forward_hook(lambda m, i, o: seen.append((m.training, i[0].shape[0])))
    method.train_step(batch, ctx())
    assert seen == [(False, B_U)]  # one eval-mode teacher pass over the weak view
    # with a separate partner batch, a second teacher pass over it
    seen.clear()
    method = build(conf_thresh=0.0, mix_source="separate_batch")
    method.teacher.module.register_forward_hook(lambda m, i, o: seen.append((m.training, i[0].shape[0])))
    method.train()
    method.train_step(batch, ctx())
    assert seen == [(False, B_U), (False, B_U)]


def test_unimatch_v2_ema_update_follows_the_official_formula():
    method = build()
    old = {k: v.clone() for k, v in method.teacher.module.state_dict().items()}
    student = {k: v.clone() for k, v in method.model.state_dict().items()}
    method.after_step(ctx(iteration=9))  # momentum min(1 - 1/10, 0.996) = 0.9
    for k, v in method.teacher.module.state_dict().items():
        assert torch.allclose(v, 0.9 * old[k] + 0.1 * student[k], atol=1e-6), k
    before = {k: v.clone() for k, v in method.teacher.module.state_dict().items()}
    method.after_step(ctx(iteration=5000))  # momentum capped at 0.996
    for k, v in method.teacher.module.state_dict().items():
        assert torch.allclose(v, 0.996 * before[k] + 0.004 * student[k], atol=1e-6), k
    assert list(method.eval_models()) == ["student", "teacher"]


def test_unimatch_v2_config():
    cfg = load_config({"method": {"name": "unimatch_v2"}}).method
    assert (cfg.conf_thresh, cfg.mix_source, cfg.teacher, cfg.ema_momentum) == (0.95, "in_batch", "ema", 0.996)
    assert (cfg.comp_drop, cfg.comp_drop_kept, cfg.weight_x, cfg.weight_s) == (True, 0.5, 1.0, 1.0)
    with pytest.raises(ConfigError, match="method.teacher"):
        load_config({"method": {"name": "unimatch_v2", "teacher": "none"}})
    with pytest.raises(ConfigError, match="method.comp_drop_kept"):
        load_config({"method": {"name": "unimatch_v2", "comp_drop_kept": 1.5}})
    with pytest.raises(ConfigError, match="fp_dropout"):  # V1's fp stream is gone
        load_config({"method": {"name": "unimatch_v2", "fp_dropout": 0.5}})


# ---------------------------------------------------------------------------------------------
# The real network and the trainer

TINY = tiny("train.iters=4", "train.lr=0.01", "method.name=unimatch_v2", "method.conf_thresh=0.0")


def test_unimatch_v2_on_deeplabv3plus_perturbs_both_features_and_trains():
    from semiseg.config import ModelConfig
    from semiseg.models import build_model

    model = build_model(ModelConfig(encoder="resnet18", decoder_channels=16), K).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    a = complementary_dropout(model, x)
    torch.manual_seed(1)
    b = complementary_dropout(model, x)
    assert a.shape == (4, K, 32, 32) and not torch.allclose(a, b)


def test_unimatch_v2_training_resumes_exactly(tmp_path):
    from semiseg.engine.checkpoint import load_checkpoint
    from semiseg.engine.trainer import Trainer

    cfg = lambda: load_config(None, TINY + ["train.device=cpu"])  # bit-exact resumption is the CPU's  # noqa: E731
    full = Trainer(cfg(), tmp_path / "full", progress=False).fit()
    Trainer(cfg(), tmp_path / "cut", progress=False).fit(stop_after=2)
    resumed = Trainer(cfg(), tmp_path / "cut", resume=True, progress=False).fit()
    a, _ = load_checkpoint(full.run_dir / "checkpoints" / "last.safetensors")
    b, _ = load_checkpoint(resumed.run_dir / "checkpoints" / "last.safetensors")
    assert any(k.startswith("model.teacher.") for k in a) and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["model"]) for r in rows if r["type"] == "eval"] == \
        [(2, "student"), (2, "teacher"), (4, "student"), (4, "teacher")]


VIT = ["model.encoder=vit_small_patch14_dinov2", "model.head=dpt", "model.encoder_kwargs.img_size=28",
       "model.encoder_kwargs.embed_dim=32", "model.encoder_kwargs.depth=4", "model.encoder_kwargs.num_heads=2",
       "data.crop_size=28", "train.optimizer=adamw", "train.lr=0.0001", "train.head_lr_mult=40.0"]


def test_unimatch_v2_trains_a_vit_with_the_dpt_head(tmp_path):
    from semiseg.engine.trainer import Trainer

    result = Trainer(load_config(None, TINY + VIT + ["train.iters=2", "train.eval_every=2"]), tmp_path / "vit",
                     progress=False).fit()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    assert [r["iter"] for r in train] == [1, 2] and all(math.isfinite(r["loss_s"]) for r in train)
    assert {r["model"] for r in rows if r["type"] == "eval"} == {"student", "teacher"}


def test_a_crop_that_is_not_a_multiple_of_the_patch_is_refused_in_one_line(tmp_path, capsys):
    from semiseg.cli import main

    overrides = [a for o in TINY + VIT + ["data.crop_size=30"] for a in ("--set", o)]
    assert main(["train", "synthetic", *overrides, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.crop_size" in err[0] and "30 is not a multiple of the encoder's patch size 14" in err[0]
    assert "use e.g. 28 or 42" in err[0] and not (tmp_path / "r").exists()
