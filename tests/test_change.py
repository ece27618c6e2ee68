"""UniMatch's remote-sensing change-detection scenario (LEVIR-CD / WHU-CD): the A/B/label layout
and its loaders, the joint transforms, the siamese network, the change metrics, training,
``predict`` on a pair. Everything runs on tiny generated pairs."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg.config import load_config
from semiseg.config.schema import DataConfig
from semiseg.data import change as C
from semiseg.data.cd_synthetic import generate_change
from semiseg.errors import DataError


@pytest.fixture(scope="module")
def cd_root(tmp_path_factory):
    return generate_change(tmp_path_factory.mktemp("levir"), num_train=20, num_val=4, num_test=4, size=40, seed=3)


def data_cfg(root, percent=20, **kw):
    kw.setdefault("crop_size", 32)
    kw.setdefault("scale_range", (0.8, 1.2))
    return DataConfig(dataset="levir_cd", root=str(root), labeled=f"splits/levir/{percent}%/labeled.txt",
                      unlabeled=f"splits/levir/{percent}%/unlabeled.txt", **kw)


def write_pair(root, name, a, b, label):
    for d, arr in (("A", a), ("B", b), ("label", label)):
        (root / d).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / d / name)


# ---------------------------------------------------------------------------------------------
# Data: generator, layout, loaders, errors


def test_generator_writes_the_levir_layout(cd_root):
    names = (cd_root / "splits/levir/train.txt").read_text().split()
    assert len(names) == 20 and names[0] == "train_0.png"
    a = np.array(Image.open(cd_root / "A" / names[0]))
    b = np.array(Image.open(cd_root / "B" / names[0]))
    label = np.array(Image.open(cd_root / "label" / names[0]))
    assert a.shape == b.shape == (40, 40, 3) and label.shape == (40, 40)
    labels = np.concatenate([np.array(Image.open(cd_root / "label" / n)).ravel() for n in names])
    assert set(np.unique(labels)) == {0, 255}
    # a changed region is where a building appears or vanishes: A and B differ much more there
    diffs_in, diffs_out = [], []
    for n in names:
        a = np.array(Image.open(cd_root / "A" / n), np.float32)
        b = np.array(Image.open(cd_root / "B" / n), np.float32)
        lab = np.array(Image.open(cd_root / "label" / n)) == 255
        d = np.abs(a - b).mean(-1)
        diffs_in += d[lab].tolist()
        diffs_out += d[~lab].tolist()
    assert np.mean(diffs_in) > 2 * np.mean(diffs_out)
    for p in (5, 10, 20, 40):  # labelled and unlabelled split train exactly
        lab = (cd_root / f"splits/levir/{p}%/labeled.txt").read_text().split()
        unl = (cd_root / f"splits/levir/{p}%/unlabeled.txt").read_text().split()
        assert sorted(lab + unl) == sorted(names) and not set(lab) & set(unl)
    assert len((cd_root / "splits/levir/20%/labeled.txt").read_text().split()) == 4


def test_loaders_read_the_generated_files(cd_root):
    from semiseg.data.build import build_eval_set, build_train_sets
    from semiseg.models.pretrained import IMAGENET_MEAN, IMAGENET_STD

    sets = build_train_sets(data_cfg(cd_root), num_strong=2, with_unlabeled=True)
    assert sets.info.class_names == ["unchanged", "changed"] and sets.info.num_classes == 2
    assert len(sets.unlabeled) == 16 and len(sets.labeled) == 16  # 4 labelled pairs repeated to 16
    x = sets.labeled[0]
    assert x["image"].shape == (6, 32, 32) and x["mask"].shape == (32, 32)
    assert set(x["mask"].unique().tolist()) <= {0, 1, 255}
    u = sets.unlabeled[0]
    assert u["weak"].shape == u["strong_1"].shape == u["strong_2"].shape == (6, 32, 32)
    assert u["box_1"].shape == u["ignore_mask"].shape == (32, 32)
    ev = build_eval_set(data_cfg(cd_root), "test")
    assert ev.change_detection and len(ev) == 4
    s = ev[1]  # the whole pair: A's normalised pixels, then B's; the label 0/255 -> 0/1
    a = np.array(Image.open(cd_root / "A/test_1.png"), np.float32) / 255
    b = np.array(Image.open(cd_root / "B/test_1.png"), np.float32) / 255
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    np.testing.assert_allclose(s["image"][:3].permute(1, 2, 0).numpy(), (a - mean) / std, atol=1e-5)
    np.testing.assert_allclose(s["image"][3:].permute(1, 2, 0).numpy(), (b - mean) / std, atol=1e-5)
    label = np.array(Image.open(cd_root / "label/test_1.png"))
    np.testing.assert_array_equal(s["mask"].numpy(), label // 255)


def test_bundled_official_splits():
    """The official LEVIR-CD / WHU-CD lists ship with semiseg; a root without splits/ uses them."""
    from semiseg.data.datasets import ChangeReader, find_split_file

    for name, n_train in (("levir", 7120), ("whu", 5947)):
        bundled = ChangeReader.bundled
        train = (bundled / name / "train.txt").read_text().split()
        assert len(train) == n_train
        for p in (5, 10, 20, 40):
            lab = (bundled / name / f"{p}%/labeled.txt").read_text().split()
            unl = (bundled / name / f"{p}%/unlabeled.txt").read_text().split()
            assert sorted(lab + unl) == sorted(train) and not set(lab) & set(unl)
            assert abs(len(lab) / len(train) - p / 100) < 0.01
    found = find_split_file("splits/levir/5%/labeled.txt", __import__("pathlib").Path("/nonexistent"),
                            ChangeReader.bundled)
    assert found == ChangeReader.bundled / "levir/5%/labeled.txt"


def test_pairs_of_different_size_and_non_binary_labels_are_one_line_errors(tmp_path):
    from semiseg.data.build import check_dataset
    from semiseg.config import load_config

    z = np.zeros((16, 16, 3), np.uint8)
    write_pair(tmp_path, "ok.png", z, z, np.zeros((16, 16), np.uint8))
    write_pair(tmp_path, "sizes.png", z, np.zeros((16, 20, 3), np.uint8), np.zeros((16, 16), np.uint8))
    bad = np.zeros((16, 16), np.uint8)
    bad[3, 3] = 1
    write_pair(tmp_path, "nonbinary.png", z, z, bad)
    cfg = load_config({"data": {"dataset": "folder_cd", "root": str(tmp_path)}})
    with pytest.raises(DataError) as e:
        C.load_images(tmp_path / "A/sizes.png")
    msg = str(e.value)
    assert "\n" not in msg and "A/sizes.png" in msg and "B/sizes.png" in msg and "16x16" in msg and "20x16" in msg
    with pytest.raises(DataError) as e:
        C.load_triplet(tmp_path / "A/nonbinary.png", None, tmp_path / "label/nonbinary.png")
    msg = str(e.value)
    assert "\n" not in msg and "label/nonbinary.png" in msg and "[1]" in msg and "255" in msg
    problems = check_dataset(cfg, splits=("train",))
    assert len(problems) == 2
    assert any("sizes.png" in p for p in problems) and any("nonbinary.png" in p for p in problems)


def test_folder_cd_layout_and_unlabelled_pairs(tmp_path):
    from semiseg.data.build import build_eval_set, build_train_sets

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            img = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            write_pair(tmp_path / split, f"p{i}.png", img, img, np.zeros((20, 20), np.uint8))
    (tmp_path / "train/label/p3.png").unlink()  # unlabelled
    cfg = DataConfig(dataset="folder_cd", root=str(tmp_path), crop_size=16)
    sets = build_train_sets(cfg, num_strong=1, with_unlabeled=True)
    assert [s.id for s in sets.labeled.samples[:3]] and len(sets.unlabeled) == 1
    assert sets.unlabeled.samples[0].image_b == tmp_path / "train/B/p3.png"
    assert len(build_eval_set(cfg, "val")) == 2


def test_folder_cd_flat_layout_with_lists(tmp_path):
    from semiseg.data.build import build_eval_set, build_train_sets

    img = np.zeros((20, 20, 3), np.uint8)
    for i in range(5):
        write_pair(tmp_path, f"t{i}.png", img, img, np.zeros((20, 20), np.uint8))
    (tmp_path / "val.txt").write_text("t3.png\nt4.png\n")
    (tmp_path / "train.txt").write_text("t0.png\nt1.png\nt2.png\n")
    cfg = DataConfig(dataset="folder_cd", root=str(tmp_path), crop_size=16)
    sets = build_train_sets(cfg, num_strong=1, with_unlabeled=False)
    assert sorted(s.id for s in sets.labeled.samples) == ["t0", "t1", "t2"]
    ev = build_eval_set(cfg, "val")
    assert [s.id for s in ev.samples] == ["t3", "t4"] and ev.samples[0].image_b == tmp_path / "B/t3.png"


def test_siamese_key_follows_the_dataset():
    from semiseg.errors import ConfigError

    assert load_config({"data": {"dataset": "whu_cd", "root": "x"}}).model.siamese is True
    assert load_config({}).model.siamese is None
    with pytest.raises(ConfigError, match="model.siamese"):
        load_config({"data": {"dataset": "levir_cd", "root": "x"}, "model": {"siamese": False}})
    with pytest.raises(ConfigError, match="model.siamese"):
        load_config({"model": {"siamese": True}})


# ---------------------------------------------------------------------------------------------
# Joint transforms: A, B and the label stay aligned


def _pattern(seed, size=(37, 29)):
    """An image whose red channel encodes the label (blocks), and the label (0/1)."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 2, (h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w].astype(np.uint8)
    img = rng.integers(0, 100, (h, w, 3)).astype(np.uint8)
    img[..., 0] = blocks * 200 + 30
    return img, blocks


@pytest.mark.parametrize("seed", range(12))
def test_joint_geometry_keeps_a_b_and_label_aligned(seed):
    """No rescale: crop (with padding) and flip move A, B = 255 - A and the label identically."""
    img, blocks = _pattern(seed)
    a, b, mask = Image.fromarray(img), Image.fromarray(255 - img), Image.fromarray(blocks)
    cfg = DataConfig(crop_size=33, scale_range=(1.0, 1.0))
    random.seed(seed)
    (a2, b2), m2 = C.joint_geometry((a, b), mask, cfg)
    a2, b2, m2 = np.array(a2), np.array(b2), np.array(m2)
    pad = m2 == 255
    assert pad.any()  # 29 rows padded to 33
    assert (a2[pad] == 0).all() and (b2[pad] == 0).all()
    np.testing.assert_array_equal(a2[~pad], 255 - b2[~pad])
    np.testing.assert_array_equal(m2[~pad], (a2[..., 0][~pad] > 128).astype(np.uint8))


@pytest.mark.parametrize("seed", range(8))
def test_joint_rescale_keeps_the_pair_identical(seed):
    """With a random rescale, two equal dates stay equal and the label follows the image."""
    img, blocks = _pattern(seed, (64, 48))
    cfg = DataConfig(crop_size=40, scale_range=(0.5, 2.0))
    random.seed(seed)
    (a2, b2), m2 = C.joint_geometry((Image.fromarray(img), Image.fromarray(img.copy())), Image.fromarray(blocks), cfg)
    a2, b2, m2 = np.array(a2), np.array(b2), np.array(m2)
    np.testing.assert_array_equal(a2, b2)
    valid = m2 != 255
    agree = (m2[valid] == (a2[..., 0][valid] > 128)).mean()
    assert agree > 0.9  # bilinear image vs nearest label: only block edges may disagree


def test_strong_views_share_geometry_but_draw_photometry_per_date(cd_root, tmp_path):
    """The unlabelled set: both dates of a pair get the same crop and flip (the weak view of a
    pair whose dates are equal has equal halves), but each date gets its own colour draws."""
    from semiseg.data.datasets import list_samples

    img = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    write_pair(tmp_path, "same.png", img, img, np.zeros((40, 40), np.uint8))
    cfg = DataConfig(dataset="folder_cd", root=str(tmp_path), crop_size=32, scale_range=(0.8, 1.2))
    ds = C.ChangeUnlabeledSet(list_samples(cfg, "train"), cfg, num_strong=2)
    differs = 0
    for seed in range(10):
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        u = ds[0]
        wa, wb = C.split_pair(u["weak"])
        torch.testing.assert_close(wa, wb)
        for k in (1, 2):
            sa, sb = C.split_pair(u[f"strong_{k}"])
            differs += int(not torch.allclose(sa, sb))
    assert differs >= 10  # with p 0.8 jitter per date, most strong views have unequal halves


def test_cutmix_moves_both_dates_and_the_label_together():
    from semiseg.data.mixing import cutmix

    x = torch.arange(2 * 6 * 4 * 4, dtype=torch.float32).view(2, 6, 4, 4)
    y = -x
    box = torch.zeros(2, 4, 4, dtype=torch.long)
    box[:, 1:3, 2:4] = 1
    mixed = cutmix(x, y, box)
    for i in range(2):
        for c in range(6):  # every channel of A (0..2) and B (3..5) mixed by the same box
            for r in range(4):
                for col in range(4):
                    want = y[i, c, r, col] if box[i, r, col] else x[i, c, r, col]
                    assert mixed[i, c, r, col] == want


# ---------------------------------------------------------------------------------------------
# The siamese network


def tiny_model(head="deeplabv3plus", **kw):
    from semiseg.models.segmodel import build_model

    cfg = load_config({"data": {"dataset": "levir_cd", "root": "x"},
                       "model": {"encoder": "test_resnet", "decoder_channels": 8, "head": head, **kw}})
    torch.manual_seed(0)
    return build_model(cfg.model, 2).eval()


def test_siamese_encoder_differences_the_features_of_one_shared_encoder():
    model = tiny_model()
    inner = model.encoder.encoder
    assert sum(1 for n, _ in model.named_parameters() if n.startswith("encoder.")) == \
        sum(1 for _ in inner.parameters())  # one set of weights for both dates
    torch.manual_seed(1)
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.encode(torch.cat((a, b), 1))
        fa, fb = inner(a), inner(b)
        assert len(feats) == len(fa)
        for f, p, q in zip(feats, fa, fb):
            torch.testing.assert_close(f, (p - q).abs())
        want = model.decode([(p - q).abs() for p, q in zip(fa, fb)], out_size=(32, 32))
        torch.testing.assert_close(model(torch.cat((a, b), 1)), want)
        # |f_A - f_B| is symmetric: swapping the dates changes nothing
        torch.testing.assert_close(model(torch.cat((b, a), 1)), want)
    with pytest.raises(ValueError, match="pair stacked on the channel axis"):
        model(a)


def test_feature_perturbation_drops_channels_of_the_differenced_features():
    """UniMatch's FP stream on the siamese network: the dropout acts on |f_A - f_B| of the
    features the head reads (low level and deepest for DeepLabV3+), as official."""
    from semiseg.methods.perturbations import feature_perturbation

    model = tiny_model()
    assert model.decoder.in_index == (0, len(model.feature_channels) - 1)
    torch.manual_seed(2)
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    calls = []

    def drop(f):  # a fixed channel mask: the first half of the channels zeroed
        calls.append(f.clone())
        g = f.clone()
        g[:, : f.shape[1] // 2] = 0
        return g

    with torch.no_grad():
        logits, logits_fp = feature_perturbation(model, torch.cat((a, b), 1), drop=drop)
        diffs = [(p - q).abs() for p, q in zip(model.encoder.encoder(a), model.encoder.encoder(b))]
        assert len(calls) == 2
        torch.testing.assert_close(calls[0], diffs[0])
        torch.testing.assert_close(calls[1], diffs[-1])
        # the two streams are decoded in one batch (eval mode: BN statistics do not mix)
        want_fp = model.decode([drop(f) if i in (0, len(diffs) - 1) else f for i, f in enumerate(diffs)],
                               out_size=(32, 32))
        torch.testing.assert_close(logits_fp, want_fp)
        torch.testing.assert_close(logits, model.decode(diffs, out_size=(32, 32)))


def test_pspnet_head_reads_the_deepest_differenced_feature():
    from semiseg.methods.perturbations import feature_perturbation

    model = tiny_model("pspnet", output_stride=8)
    deepest = len(model.feature_channels) - 1
    assert model.decoder.in_index == (deepest,)
    torch.manual_seed(3)
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 2, 32, 32)
        seen = []
        feature_perturbation(model, x, drop=lambda f: seen.append(f.shape) or f * 0)
        assert seen == [model.encode(x)[deepest].shape]
        # pyramid pooling by hand: the 1-bin branch of a constant map is that constant
        head = model.decoder
        f = torch.full((1, model.feature_channels[-1], 4, 4), 0.5)
        pooled = head.pools[0](f)
        torch.testing.assert_close(pooled, head.pools[0][1](torch.full((1, f.shape[1], 1, 1), 0.5)))


# ---------------------------------------------------------------------------------------------
# Change metrics


def test_change_scores_equal_hand_computed_values():
    from semiseg.engine.metrics import ConfusionMatrix, change_scores

    target = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 0, 1]])
    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    # counted pixels 9: TN 4 (gt 0 pred 0), FP 1, FN 2, TP 2
    assert cm.matrix.tolist() == [[4, 1], [2, 2]]
    s = change_scores(cm.matrix)
    assert s["changed_iou"] == pytest.approx(100 * 2 / 5)
    assert s["unchanged_iou"] == pytest.approx(100 * 4 / 7)
    assert s["precision"] == pytest.approx(100 * 2 / 3)
    assert s["recall"] == pytest.approx(100 * 2 / 4)
    p, r = 2 / 3, 2 / 4
    assert s["f1"] == pytest.approx(100 * 2 * p * r / (p + r))
    assert s["overall_acc"] == pytest.approx(100 * 6 / 9)
    assert np.isnan(change_scores([[5, 0], [0, 0]])["precision"])  # nothing predicted changed
    with pytest.raises(ValueError, match="2 x 2"):
        change_scores(torch.zeros(3, 3))


def test_evaluate_adds_the_change_scores_for_pairs(cd_root):
    """A network that predicts "changed" exactly where the label says so scores 100; one that
    never predicts a change scores changed IoU 0 and the unchanged share as accuracy."""
    from semiseg.config.schema import EvalConfig
    from semiseg.data.build import build_eval_set
    from semiseg.engine.evaluator import evaluate

    ds = build_eval_set(data_cfg(cd_root), "test")
    masks = {s["image"].sum().item(): s["mask"] for s in (ds[i] for i in range(len(ds)))}

    class Oracle(torch.nn.Module):
        def forward(self, x):
            m = torch.stack([masks[img.sum().item()] for img in x])
            return torch.stack((1 - m, m), 1).float()

    class Never(torch.nn.Module):
        def forward(self, x):
            return torch.stack((torch.ones_like(x[:, 0]), torch.zeros_like(x[:, 0])), 1)

    res = evaluate(Oracle(), ds, EvalConfig(), 2, progress=False)
    assert res["changed_iou"] == res["f1"] == res["overall_acc"] == res["unchanged_iou"] == 100.0
    res = evaluate(Never(), ds, EvalConfig(), 2, progress=False)
    changed = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert res["changed_iou"] == 0.0 and res["recall"] == 0.0
    assert res["overall_acc"] == pytest.approx(100 * (total - changed) / total)


# ---------------------------------------------------------------------------------------------
# Training, eval --json, predict on a pair, the demo


@pytest.fixture(scope="module")
def trained_runs(cd_root, tmp_path_factory):
    """Two-iteration supervised, FixMatch, UniMatch and UniMatch V2 runs on the generated pairs."""
    from semiseg.engine.trainer import Trainer

    out, metrics = tmp_path_factory.mktemp("runs"), {}
    for method in ("supervised", "fixmatch", "unimatch", "unimatch_v2"):
        cfg = load_config({
            "data": {"dataset": "levir_cd", "root": str(cd_root), "labeled": "splits/levir/20%/labeled.txt",
                     "unlabeled": "splits/levir/20%/unlabeled.txt", "crop_size": 32, "scale_range": [0.8, 1.2],
                     "val_split": "test", "workers": 0},
            "model": {"encoder": "test_resnet", "decoder_channels": 8},
            "method": {"name": method, **({"conf_thresh": 0.0} if method != "supervised" else {})},
            "train": {"iters": 2, "batch_size": 2, "eval_every": 2, "threads": 1}})
        metrics[method] = Trainer(cfg, out / method).fit().metrics
    return out, metrics


def test_train_and_eval_json_on_generated_pairs(trained_runs, capsys):
    """supervised, FixMatch, UniMatch and UniMatch V2 train on the generated pairs; the logged and the
    eval --json scores hold the change scores, consistent with the confusion matrix."""
    import json

    from semiseg.cli import main
    from semiseg.engine.logging import read_metrics

    runs, metrics = trained_runs
    for name, m in metrics.items():
        for key in ("changed_iou", "unchanged_iou", "overall_acc"):
            assert 0.0 <= m[key] <= 100.0, (name, key)
        assert m["changed_iou"] == pytest.approx(m["per_class_iou"][1])
        rows = [r for r in read_metrics(runs / name) if r.get("type") == "eval"]
        assert rows and "changed_iou" in rows[-1] and "f1" in rows[-1]
    # UniMatch ran its four streams (labelled, two strong views, the FP stream) on 6-channel pairs
    rows = [r for r in read_metrics(runs / "unimatch") if r.get("type") == "train"]
    assert rows and {"loss_s1", "loss_s2", "loss_fp"} <= set(rows[-1])
    capsys.readouterr()
    assert main(["eval", str(runs / "unimatch"), "--json", "--split", "test"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["images"] == 4 and out["split"] == "test"
    assert set(out["per_class_iou"]) == {"unchanged", "changed"}
    for key in ("changed_iou", "unchanged_iou", "f1", "precision", "recall", "overall_acc"):
        assert key in out
    assert out["changed_iou"] == pytest.approx(out["per_class_iou"]["changed"])
    assert out["overall_acc"] == pytest.approx(out["pixel_acc"])
    assert main(["eval", str(runs / "unimatch"), "--split", "test"]) == 0
    table = capsys.readouterr().out
    assert "changed IoU" in table and "F1" in table and "overall acc" in table


def test_predict_on_a_pair_of_files_and_of_folders(trained_runs, cd_root, tmp_path, capsys):
    from semiseg.api import load_model
    from semiseg.cli import main

    runs, _ = trained_runs
    run = runs / "supervised"
    a, b = cd_root / "A/test_2.png", cd_root / "B/test_2.png"
    assert main(["predict", str(run), str(a), str(b), "--out", str(tmp_path / "one")]) == 0
    mask = np.array(Image.open(tmp_path / "one/test_2.png"))
    assert mask.shape == (40, 40) and set(np.unique(mask)) <= {0, 255}
    want = load_model(run).predict_pair(Image.open(a).convert("RGB"), Image.open(b).convert("RGB"))
    np.testing.assert_array_equal(mask, want * 255)
    assert Image.open(tmp_path / "one/test_2_overlay.png").size == (40, 40)
    assert main(["predict", str(run), str(cd_root / "A"), str(cd_root / "B"), "--out", str(tmp_path / "all")]) == 0
    assert len(list((tmp_path / "all").glob("*_overlay.png"))) == 28
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "all/test_2.png")), mask)
    capsys.readouterr()
    assert main(["predict", str(run), str(a), "--out", str(tmp_path / "bad")]) != 0
    assert "takes a pair" in capsys.readouterr().err
    folder = tmp_path / "Bmissing"
    folder.mkdir()
    assert main(["predict", str(run), str(cd_root / "A"), str(folder), "--out", str(tmp_path / "bad2")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any("has no namesake" in line for line in err)


def test_change_demo_trains_both_methods_and_prints_change_iou(cd_root, tmp_path, monkeypatch, capsys):
    import semiseg.data.cd_synthetic as gen
    from semiseg import demo

    cfg = demo.change_config("unimatch", cd_root, 200)  # the demo's recipe: official threshold and augmentation
    assert (cfg.method.conf_thresh, cfg.model.siamese, cfg.data.scale_range, cfg.data.dataset) == \
        (0.95, True, (0.8, 1.2), "levir_cd")
    assert cfg.data.labeled == "splits/levir/10%/labeled.txt" and cfg.data.val_split == "test"
    assert cfg.method.mix_source == "in_batch"  # scaled down (the shipped recipe: separate_batch, as official)

    def tiny(method, root, iters):
        c = original(method, root, iters)
        c.data.crop_size = 32
        c.model.decoder_channels = 8
        c.train.batch_size = 2
        c.train.threads = 1
        return c

    original = demo.change_config
    monkeypatch.setattr(demo, "change_config", tiny)
    monkeypatch.setattr(gen, "ensure_change_synthetic", lambda root: cd_root)
    assert demo.run_demo(out=tmp_path, iters=1, scenario="change") == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("supervised ", "unimatch "))]
    assert [r[0] for r in rows] == ["supervised", "unimatch"] and all(len(r) >= 8 for r in rows)
    assert "gain of unimatch over supervised" in out and "changed IoU" in out


def test_export_traces_the_six_channel_pair(trained_runs, tmp_path):
    pytest.importorskip("onnxruntime")
    from semiseg.export import export_onnx

    runs, _ = trained_runs
    logs = []
    export_onnx(runs / "supervised", tmp_path / "m.onnx", verify=True, log=logs.append)
    assert "x6x" in logs[0]


# ---------------------------------------------------------------------------------------------
# UniMatch on pairs equals the loop reference of tests/test_methods_consistency.py


class _TinyPairEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from semiseg.models.unet import FeatureInfo

        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.feature_info = FeatureInfo([4], [1])

    def forward(self, x):
        return [torch.relu(self.conv(x))]


class _TinyHead(torch.nn.Module):
    in_index = (0,)

    def __init__(self, k):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, k, 1)
        with torch.no_grad():
            self.conv.weight.mul_(4.0)

    def forward(self, feats):
        return self.conv(feats[0]), feats[0]


@pytest.mark.parametrize("mix_source", ["separate_batch", "in_batch"])
def test_unimatch_step_on_pairs_equals_the_loop_reference(mix_source):
    """A siamese SegModel (no BatchNorm, so images are independent) under UniMatch: the loss
    equals the explicit-loop reference, whose CutMix moves all six channels of a pair with one
    box and whose FP stream is the head on the perturbed |f_A - f_B|."""
    from semiseg.methods.unimatch import UniMatch
    from semiseg.models.segmodel import SegModel
    from semiseg.models.siamese import SiameseEncoder

    from conftest import loop_references

    tmc = loop_references()
    torch.manual_seed(0)
    model = SegModel(SiameseEncoder(_TinyPairEncoder()), _TinyHead(tmc.K), tmc.K)
    model.fp_scale = torch.tensor([2.0, 0.0, 2.0, 0.0]).view(1, 4, 1, 1)
    model.fp_drop = lambda f: f * model.fp_scale
    from types import SimpleNamespace

    def diff(x):  # |f_A - f_B| by hand, from the shared encoder
        inner = model.encoder.encoder
        return (inner(x[:, :3])[0] - inner(x[:, 3:])[0]).abs()

    ref = SimpleNamespace(features=diff, head=lambda f: model.decoder([f])[0],
                          perturbed=lambda x: model.decoder([diff(x) * model.fp_scale])[0])

    batch = tmc.make_batch(seed=5)
    g = torch.Generator().manual_seed(9)
    for part in (batch.labeled, batch.unlabeled, batch.unlabeled_mix):  # B: a second date per image
        for key in ("image", "weak", "strong_1", "strong_2"):
            if key in part:
                part[key] = torch.cat((part[key], torch.randn(part[key].shape, generator=g)), 1)
    method = tmc.build(UniMatch, "unimatch", model=model, conf_thresh=0.8, mix_source=mix_source)
    method.train()
    result = method.train_step(batch, tmc.ctx())
    total, loss_x, losses_s, loss_fp, ratio = tmc.reference_unimatch(ref, batch, 0.8, mix_source)
    assert 0 < ratio < 1
    assert tmc.close(result.loss, total)
    assert tmc.close(result.logs["loss_fp"], loss_fp) and tmc.close(result.logs["loss_s1"], losses_s[0])


def cd_root_of(runs):
    from semiseg.config import load_config

    return Path(load_config(runs / "supervised" / "config.yaml").data.root)


def test_report_shows_the_change_scores_and_image_b(trained_runs):
    from semiseg.report import evaluate_best

    runs, _ = trained_runs
    ev = evaluate_best(runs / "supervised", num_images=2, progress=False)
    image, gt, pred = ev["triples"][0]
    assert image.shape == (40, 40, 3)  # image B of the pair, de-normalised
    assert ev["result"]["skipped"] == [] and "changed_iou" in ev["result"] and "f1" in ev["result"]
    # the shown image is B: A's pixels differ from it somewhere in the generated test pairs
    b = np.array(Image.open(cd_root_of(runs) / "B/test_0.png"))
    assert np.abs(image.astype(int) - b.astype(int)).max() <= 2
