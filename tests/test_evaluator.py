import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from semiseg.config import EvalConfig
from semiseg.engine.evaluator import center_crop_box, evaluate, predict_logits, window_starts

K = 3


class Pointwise(nn.Module):
    """A 1x1 conv: translation- and flip-equivariant, even at the borders."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, K, 1)

    def forward(self, x):
        return self.conv(x)


class ColumnRamp(nn.Module):
    """Logit of class 0 = the column index inside the input; other classes 0 (not flip-equivariant)."""

    def forward(self, x):
        b, _, h, w = x.shape
        out = torch.zeros(b, K, h, w)
        out[:, 0] = torch.arange(w, dtype=torch.float32).view(1, 1, w)
        return out


class Recorder(nn.Module):
    """Predicts class 0 everywhere; records input sizes, mode and inference-mode state."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, K, 1)
        self.calls = []

    def forward(self, x):
        self.calls.append((tuple(x.shape[-2:]), self.training, torch.is_inference_mode_enabled()))
        out = torch.zeros(x.shape[0], K, *x.shape[-2:])
        out[:, 0] = 1
        return out


class ListSet(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_set(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, (h, w) in enumerate(sizes):
        mask = torch.randint(0, K, (h, w), generator=g)
        mask[0, :] = 255
        items.append({"image": torch.randn(3, h, w, generator=g), "mask": mask, "id": f"img{i}"})
    return ListSet(items)


def cfg(**kw):
    return EvalConfig(**kw)


# ------------------------------------------------------------------ geometry


@pytest.mark.parametrize("size,crop,stride", [(37, 16, 10), (32, 16, 8), (16, 16, 10), (10, 16, 10), (100, 33, 22)])
def test_windows_are_full_crops_covering_every_pixel(size, crop, stride):
    starts = window_starts(size, crop, stride)
    assert starts[0] == 0 and starts == sorted(set(starts))
    covered = torch.zeros(max(size, crop), dtype=torch.bool)
    for s in starts:
        covered[s:s + crop] = True
        assert s + crop <= max(size, crop)
    assert covered[:size].all()


def test_center_crop_box():
    assert center_crop_box(100, 60, 32) == (34, 14, 32, 32)
    assert center_crop_box(20, 60, 32) == (0, 14, 20, 32)


# ------------------------------------------------------------------ predict_logits


@pytest.mark.parametrize("h,w,stride", [(37, 53, None), (40, 41, 5), (10, 12, None), (50, 45, 40)])
def test_sliding_window_equals_whole_image_for_equivariant_model(h, w, stride):
    model = Pointwise().eval()
    x = torch.randn(2, 3, h, w)
    with torch.inference_mode():
        whole = predict_logits(model, x, cfg(mode="original"), K)
        slide = predict_logits(model, x, cfg(mode="sliding_window", stride=stride), K, crop_size=16)
    assert slide.shape == (2, K, h, w)
    torch.testing.assert_close(slide.softmax(1), whole.softmax(1), rtol=1e-5, atol=1e-6)


def test_sliding_window_feeds_only_full_crops():
    model = Recorder()
    with torch.inference_mode():
        predict_logits(model, torch.randn(1, 3, 37, 53), cfg(mode="sliding_window"), K, crop_size=16)
    sizes = {c[0] for c in model.calls}
    assert sizes == {(16, 16)}
    assert len(model.calls) == len(window_starts(37, 16, 10)) * len(window_starts(53, 16, 10))


def test_center_crop_predicts_the_crop_only():
    model = Pointwise().eval()
    x = torch.randn(1, 3, 40, 50)
    with torch.inference_mode():
        whole = predict_logits(model, x, cfg(mode="original"), K)
        crop = predict_logits(model, x, cfg(mode="center_crop"), K, crop_size=24)
        small = predict_logits(model, x[:, :, :20], cfg(mode="center_crop"), K, crop_size=24)
    t, l, h, w = center_crop_box(40, 50, 24)
    assert crop.shape == (1, K, 24, 24)
    torch.testing.assert_close(crop, whole[:, :, t:t + h, l:l + w])
    assert small.shape == (1, K, 20, 24)  # shorter than the crop: padded for the pass, padding dropped


def test_flip_tta_is_identity_for_flip_equivariant_model():
    model = Pointwise().eval()
    x = torch.randn(2, 3, 21, 30)
    with torch.inference_mode():
        plain = predict_logits(model, x, cfg(), K)
        flipped = predict_logits(model, x, cfg(flip=True), K)
    torch.testing.assert_close(flipped.softmax(1), plain.softmax(1), rtol=1e-5, atol=1e-6)


def test_flip_tta_flips_the_prediction_back():
    x = torch.zeros(1, 3, 4, 6)
    with torch.inference_mode():
        out = predict_logits(ColumnRamp(), x, cfg(flip=True), K)
    ramp = torch.zeros(1, K, 4, 6)
    ramp[:, 0] = torch.arange(6.0)
    expected = (ramp.softmax(1) + ramp.flip(-1).softmax(1)) / 2  # the mirrored pass, mirrored back
    torch.testing.assert_close(out.softmax(1), expected)


@pytest.mark.parametrize("mode", ["original", "sliding_window", "center_crop"])
def test_multi_scale_shape_and_constant_image(mode):
    model = Pointwise().eval()
    x = torch.ones(2, 3, 33, 47) * torch.tensor([0.3, -1.0, 2.0]).view(1, 3, 1, 1)
    e = cfg(mode=mode, scales=[0.5, 0.75, 1.0, 1.5], flip=True)
    with torch.inference_mode():
        out = predict_logits(model, x, e, K, crop_size=16)
        ref = predict_logits(model, x, cfg(mode="original"), K)
    expected = (2, K, 16, 16) if mode == "center_crop" else (2, K, 33, 47)
    assert out.shape == expected
    assert torch.isfinite(out).all()
    # a constant image looks the same at every scale: TTA changes nothing
    torch.testing.assert_close(out.softmax(1), ref.softmax(1)[:, :, :expected[2], :expected[3]],
                               rtol=1e-5, atol=1e-6)


def test_crop_modes_need_a_crop_size():
    with pytest.raises(ValueError, match="crop size"):
        predict_logits(Pointwise(), torch.randn(1, 3, 8, 8), cfg(mode="sliding_window"), K)


# ------------------------------------------------------------------ evaluate


def test_evaluate_perfect_model_and_result_keys():
    class Oracle(nn.Module):  # reads the class from channel 0 of the image
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), K).permute(0, 3, 1, 2).float() * 10

    ds = make_set([(12, 9), (7, 7)])
    for item in ds.items:
        item["image"][0] = item["mask"].clamp(max=K - 1).float()
    r = evaluate(Oracle(), ds, cfg(), K, progress=False)
    assert set(r) >= {"mIoU", "per_class_iou", "pixel_acc", "mean_acc", "confusion"}
    assert r["mIoU"] == pytest.approx(100.0) and r["pixel_acc"] == pytest.approx(100.0)
    labelled = sum(int((it["mask"] != 255).sum()) for it in ds.items)
    assert sum(map(sum, r["confusion"])) == labelled
    assert len(r["confusion"]) == K and all(len(row) == K for row in r["confusion"])


def test_evaluate_restores_modes_and_runs_in_inference_mode():
    model = nn.Sequential(Recorder(), nn.Identity())
    model.train()
    model[1].eval()  # a submodule deliberately frozen in eval mode keeps it
    evaluate(model, make_set([(8, 8)]), cfg(), K, progress=False)
    assert model[0].calls and all(not training and inference for _, training, inference in model[0].calls)
    assert model.training and model[0].training and not model[1].training

    model.eval()
    evaluate(model, make_set([(8, 8)]), cfg(), K, progress=False)
    assert not model.training


def test_evaluate_center_crop_scores_only_the_crop():
    h, w, crop = 20, 30, 8
    mask = torch.ones(h, w, dtype=torch.long)  # class 1 outside the crop ...
    t, l, ch, cw = center_crop_box(h, w, crop)
    mask[t:t + ch, l:l + cw] = 0  # ... class 0 inside; the model predicts 0 everywhere
    ds = ListSet([{"image": torch.randn(3, h, w), "mask": mask, "id": "a"}])
    r = evaluate(Recorder(), ds, cfg(mode="center_crop"), K, crop_size=crop, progress=False)
    assert r["confusion"][0][0] == crop * crop and sum(map(sum, r["confusion"])) == crop * crop
    assert r["mIoU"] == pytest.approx(100.0)
    r = evaluate(Recorder(), ds, cfg(mode="original"), K, progress=False)
    assert r["mIoU"] < 100


def test_evaluate_batches_of_mixed_sizes_match_batch_size_one():
    model = Pointwise().eval()
    ds = make_set([(10, 12), (10, 12), (9, 14), (10, 12), (9, 14)])
    one = evaluate(model, ds, cfg(), K, progress=False)
    three = evaluate(model, ds, cfg(batch_size=3), K, progress=False)
    assert one["confusion"] == three["confusion"]
    # an already-collated DataLoader is accepted too
    loader = DataLoader(make_set([(10, 12)] * 4), batch_size=2)
    r = evaluate(model, loader, cfg(), K, progress=False)
    assert sum(map(sum, r["confusion"])) == 4 * 9 * 12


_DIST_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_evaluator import Pointwise, make_set, cfg, K
    from semiseg.engine.evaluator import evaluate
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
    r = evaluate(Pointwise().eval(), make_set({sizes!r}), cfg(batch_size=2), K, progress=False)
    if rank == 0:
        json.dump(r["confusion"], open({out!r}, "w"))
    dist.destroy_process_group()
""")


def test_evaluate_distributed_covers_each_image_once(tmp_path):
    sizes = [(10, 12), (9, 14), (10, 12), (11, 8), (10, 12)]  # 5 images on 2 ranks: uneven shards
    script = tmp_path / "run.py"
    out = tmp_path / "out.json"
    script.write_text(_DIST_SCRIPT.format(tests=os.path.dirname(__file__), store=str(tmp_path / "store"),
                                          sizes=sizes, out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    single = evaluate(Pointwise().eval(), make_set(sizes), cfg(), K, progress=False)
    assert json.loads(out.read_text()) == single["confusion"]
