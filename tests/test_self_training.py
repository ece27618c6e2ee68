"""Offline self-training beyond ST (semiseg.self_training): CBST's class-balanced pseudo labels and
ST++'s reliable images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from semiseg.config import load_config
from semiseg.data import IGNORE_INDEX
from semiseg.errors import ConfigError
from semiseg.self_training import (HISTOGRAM_BINS, balanced_labels, class_thresholds, image_miou, split_reliable,
                                   write_class_balanced_labels)


class ByColour(nn.Module):
    """Three-class logits that are a fixed linear function of the pixel's colour: confidences
    that vary from pixel to pixel, and every class predicted somewhere."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            weight = torch.tensor([[2.0, -1.0, 0.0], [-1.0, 2.0, 0.5], [0.0, -0.5, 1.5]])
            self.conv.weight.copy_(weight[:, :, None, None])
            self.conv.bias.copy_(torch.tensor([0.5, 0.0, -0.5]))

    def forward(self, x):
        return self.conv(x)


def test_class_thresholds_hand_computed():
    """Bins of width 0.1: class 0 has 6 pixels at 0.9-1.0 and 4 at 0.5-0.6; class 1 none."""
    hist = np.zeros((2, 10), dtype=np.int64)
    hist[0, 9], hist[0, 5] = 6, 4
    assert class_thresholds(hist, 0.5).tolist() == [0.9, 1.0]  # the top bin already holds 60%
    assert class_thresholds(hist, 0.6).tolist() == [0.9, 1.0]
    assert class_thresholds(hist, 0.7).tolist() == [0.5, 1.0]
    assert class_thresholds(hist, 1.0).tolist() == [0.5, 1.0]
    hist[0, 0] = 5  # confidences in [0, 0.1): the lowest edge is kept above zero
    assert class_thresholds(hist, 1.0)[0] == pytest.approx(1e-6)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5])
def test_class_thresholds_reject_a_bad_fraction(keep):
    with pytest.raises(ConfigError, match=f"keep-per-class {keep}: expected a fraction in \\(0, 1\\]"):
        class_thresholds(np.ones((2, 10)), keep)


def test_balanced_labels_divide_by_the_thresholds():
    """Pixel 0: 0.6 / 0.9 < 0.4 / 0.35, so the rare class 1 wins (CBST's counterweight); pixel 1:
    class 0 above its threshold; pixel 2: neither ratio reaches 1, ignored."""
    probs = torch.tensor([[0.6, 0.95, 0.7], [0.4, 0.05, 0.3]])[:, None, :]  # (K=2, H=1, W=3)
    labels = balanced_labels(probs, torch.tensor([0.9, 0.35]))
    assert labels.tolist() == [[1, 0, IGNORE_INDEX]]


def _reference_cbst(probs: list[torch.Tensor], keep: float) -> tuple[list[torch.Tensor], np.ndarray]:
    """CBST as its official code computes it: the thresholds from the sorted confidences."""
    conf = torch.cat([p.max(0).values.flatten() for p in probs])
    pred = torch.cat([p.argmax(0).flatten() for p in probs])
    k = np.ones(probs[0].shape[0])
    for c in range(len(k)):
        values = conf[pred == c].sort(descending=True).values
        if len(values):
            k[c] = float(values[max(math.ceil(len(values) * keep) - 1, 0)])
    return [balanced_labels(p, torch.from_numpy(k).float()) for p in probs], k


@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_class_balanced_labels_match_sorted_thresholds(make_folder_dataset, tmp_path, keep):
    """The written PNGs against CBST computed from sorted confidences: the thresholds agree to a
    histogram bin and the labels on nearly every pixel; every class keeps at least ``keep`` of
    its predicted pixels, and ``keep=1`` ignores no pixel."""
    from semiseg.engine.evaluator import predict_logits
    from semiseg.pseudo_label import split_samples
    from semiseg.pseudo_label import network_input

    root = make_folder_dataset(n=8, size=(24, 32), num_classes=3, unlabeled=4)
    cfg = load_config(None, ["data.dataset=folder", f"data.root={root}", "data.num_classes=3", "data.crop_size=16"])
    samples = split_samples(cfg, "unlabeled")
    net = ByColour().eval()
    written, thresholds = write_class_balanced_labels(cfg, net, samples, tmp_path / "pl", 3, keep)
    assert [p.name for p in written] == [f"{s.id}.png" for s in samples]
    assert not list((tmp_path / "pl").glob(".cbst-*"))  # the temporary predictions are gone

    with torch.no_grad():
        probs = [predict_logits(net, network_input(cfg, s)[0], cfg.eval, 3).half().float()[0].softmax(0)
                 for s in samples]
    expected, k = _reference_cbst(probs, keep)
    assert (thresholds <= k + 1e-6).all() and (k - thresholds < 1.0 / HISTOGRAM_BINS + 1e-3).all()
    got = [torch.from_numpy(np.array(Image.open(p)).astype(np.int64)) for p in written]
    assert tuple(got[0].shape) == Image.open(samples[0].image).size[::-1]  # the original (H, W)
    agree = sum(int((g == e).sum()) for g, e in zip(got, expected)) / sum(g.numel() for g in got)
    assert agree > 0.97
    conf = torch.cat([p.max(0).values.flatten() for p in probs])
    pred = torch.cat([p.argmax(0).flatten() for p in probs])
    labels = torch.cat([g.flatten() for g in got])
    assert set(pred.unique().tolist()) == {0, 1, 2}
    for c in range(3):  # the pixels predicted as c at or above its threshold keep a label
        mine = pred == c
        kept = (labels[mine] != IGNORE_INDEX).float().mean().item()
        assert kept >= keep - 1e-6
        assert (conf[mine] >= float(thresholds[c])).float().mean().item() >= keep - 1e-6
    if keep == 1.0:
        assert (labels != IGNORE_INDEX).all()
    else:
        assert 0.2 < (labels == IGNORE_INDEX).float().mean().item() < 0.6


def test_image_miou_hand_computed():
    """Class 0: 1 of 2 pixels; class 1: 2 of 3; class 2 in neither map, left out of the mean."""
    ref, pred = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    assert image_miou(pred, ref, 3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert image_miou(ref, ref, 3) == 1.0


def test_split_reliable_ranks_and_cuts_half():
    scores = {"a": 0.5, "b": 0.9, "c": float("nan"), "d": 0.7, "e": 0.7}
    assert split_reliable(scores, 0.5) == (["b", "d"], ["e", "a", "c"])  # ties keep their order, NaN last
    assert split_reliable(scores, 0.2) == (["b"], ["d", "e", "a", "c"])
    with pytest.raises(ConfigError, match="--fraction 1.0: expected a fraction in \\(0, 1\\)"):
        split_reliable(scores, 1.0)


def _tiny_run(make_folder_dataset, tmp_path):
    import semiseg

    torch.set_num_threads(1)
    root = make_folder_dataset(n=8, size=(32, 32), num_classes=3, unlabeled=4)
    overrides = ["data.dataset=folder", f"data.root={root}", "data.num_classes=3", "data.crop_size=32",
                 "data.workers=0", "model.encoder=test_resnet", "model.decoder_channels=16",
                 "train.batch_size=2", "train.iters=3", "train.eval_every=0", "train.checkpoint_every=1",
                 "train.keep_last=5", "train.log_every=1", "method.name=supervised"]
    run = semiseg.train(None, overrides=overrides, out=tmp_path / "run", progress=False)
    return root, run.run_dir / "checkpoints"


def test_select_reliable_cli_writes_split_files(make_folder_dataset, tmp_path, capsys):
    """Two checkpoints of one run: half of the four unlabelled images are reliable; the split
    files read back as the same images; the scores are ST++'s (one checkpoint against itself: 1)."""
    from semiseg.cli import main
    from semiseg.data.datasets import read_split_file

    root, ckpts = _tiny_run(make_folder_dataset, tmp_path)
    first, last = str(ckpts / "iter_0000001.safetensors"), str(ckpts / "iter_0000003.safetensors")
    out = tmp_path / "sel"
    assert main(["select-reliable", first, last, "--out", str(out)]) == 0
    assert "2 reliable and 2 other images" in capsys.readouterr().out
    summary = json.loads((out / "reliability.json").read_text())
    assert summary["checkpoints"] == [first, last] and summary["fraction"] == 0.5
    ranked = list(summary["scores"])
    values = list(summary["scores"].values())
    assert values == sorted(values, reverse=True) and all(0.0 <= v <= 1.0 for v in values)
    cfg = load_config(None, ["data.dataset=folder", f"data.root={root}", "data.num_classes=3"])
    reliable = read_split_file(out / "reliable.txt", cfg.data)
    other = read_split_file(out / "unreliable.txt", cfg.data)
    assert [s.id for s in reliable] == ranked[:2] and [s.id for s in other] == ranked[2:]
    assert sorted(ranked) == ["u000", "u001", "u002", "u003"]
    assert all(s.image.is_file() for s in reliable + other)

    assert main(["select-reliable", last, last, "--out", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "reliability.json").read_text())
    assert set(same["scores"].values()) == {1.0}
    # the reliable half, labelled, joins the labelled set like any pseudo labels
    assert main(["pseudo-label", last, "--no-tags", "--split", str(out / "reliable.txt"),
                 "--out", str(tmp_path / "pl")]) == 0
    assert sorted(p.stem for p in (tmp_path / "pl").glob("*.png")) == sorted(ranked[:2])


def test_select_reliable_and_keep_per_class_errors(make_folder_dataset, tmp_path, capsys):
    """One line and a non-zero exit each (2 for a bad value, 1 for a missing flag); the flags'
    errors come before any checkpoint loads (the paths do not exist)."""
    from semiseg.cli import main

    out = str(tmp_path / "x")
    assert main(["select-reliable", "missing.safetensors", "--out", out, "--fraction", "1.5"]) == 2
    assert "--fraction 1.5: expected a fraction in (0, 1)" in capsys.readouterr().err
    assert main(["pseudo-label", "missing", "--out", out, "--keep-per-class", "0.5"]) == 1
    assert "--keep-per-class (class-balanced self-training labels) needs --no-tags" in capsys.readouterr().err
    assert main(["pseudo-label", "missing", "--out", out, "--no-tags", "--keep-per-class", "2"]) == 2
    assert "keep-per-class 2.0: expected a fraction in (0, 1]" in capsys.readouterr().err
    root, ckpts = _tiny_run(make_folder_dataset, tmp_path)
    last = str(ckpts / "iter_0000003.safetensors")
    assert main(["select-reliable", last, "--out", out]) == 2
    assert "got 1 checkpoint(s), expected at least two" in capsys.readouterr().err
    assert main(["pseudo-label", last, "--out", str(tmp_path / "cb"), "--no-tags", "--keep-per-class", "0.5"]) == 0
    assert "class-balanced pseudo labels" in capsys.readouterr().out
    values = set()
    for p in (tmp_path / "cb").glob("*.png"):
        values |= set(np.unique(np.array(Image.open(p))).tolist())
    assert values <= {0, 1, 2, IGNORE_INDEX} and IGNORE_INDEX in values
