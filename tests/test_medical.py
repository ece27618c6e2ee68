"""UniMatch's medical scenario (ACDC): the h5 layout and its loaders, the transforms, the UNet,
the Dice losses, the 3D evaluation. Everything runs on tiny generated volumes."""

import random
import sys

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")

from semiseg.config.schema import DataConfig  # noqa: E402
from semiseg.data import acdc as A  # noqa: E402
from semiseg.data.acdc_synthetic import generate_acdc  # noqa: E402
from semiseg.errors import DataError, SemisegError  # noqa: E402


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    return generate_acdc(tmp_path_factory.mktemp("acdc"), train_patients=7, val_patients=1, test_patients=1,
                         slices=3, height=24, width=28, seed=1)


def data_cfg(root, cases=3, **kw):
    return DataConfig(dataset="acdc", root=str(root), labeled=f"splits/acdc/{cases}/labeled.txt",
                      unlabeled=f"splits/acdc/{cases}/unlabeled.txt", crop_size=16, **kw)


# ---------------------------------------------------------------------------------------------
# Data: generator, layout, loaders


def test_generator_writes_the_official_layout(acdc_root):
    vol = acdc_root / "data" / "patient008_frame01.h5"
    with h5py.File(vol, "r") as f:
        image, label = f["image"][()], f["label"][()]
    assert image.shape == label.shape == (3, 24, 28)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(np.unique(label)) == {0, 1, 2, 3}
    # the myocardium is a ring: the LV disc is inside it, the LV never touches the background
    lv = label[0] == 3
    ys, xs = np.nonzero(lv)
    for y, x in zip(ys, xs):
        assert all(label[0, y + dy, x + dx] in (2, 3) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)))
    labeled = (acdc_root / "splits/acdc/1/labeled.txt").read_text().split()
    assert labeled == [f"data/slices/patient001_frame0{f}_slice_{s}.h5" for f in (1, 2) for s in range(3)]
    assert len((acdc_root / "splits/acdc/3/unlabeled.txt").read_text().split()) == 4 * 2 * 3
    with h5py.File(acdc_root / labeled[4], "r") as f:  # a slice equals its volume's slice
        with h5py.File(acdc_root / "data/patient001_frame02.h5", "r") as v:
            np.testing.assert_array_equal(f["image"][()], v["image"][1])
            np.testing.assert_array_equal(f["label"][()], v["label"][1])


def test_loaders_read_the_generated_files(acdc_root):
    from semiseg.data.build import build_eval_set, build_train_sets

    sets = build_train_sets(data_cfg(acdc_root), num_strong=2, with_unlabeled=True)
    assert sets.info.class_names == ["background", "RV", "Myo", "LV"]
    assert len(sets.unlabeled) == 24 and len(sets.labeled) == 24  # 18 labelled slices repeated to 24
    x = sets.labeled[0]
    assert x["image"].shape == (1, 16, 16) and x["image"].dtype == torch.float32
    assert x["mask"].shape == (16, 16) and set(x["mask"].unique().tolist()) <= {0, 1, 2, 3}
    u = sets.unlabeled[0]
    assert set(u) >= {"weak", "strong_1", "strong_2", "box_1", "box_2", "ignore_mask"}
    assert u["weak"].shape == u["strong_1"].shape == (1, 16, 16)
    assert (u["ignore_mask"] == 0).all()
    # the weak view is the 8-bit quantised image, in [0, 1]
    assert torch.allclose(u["weak"] * 255, (u["weak"] * 255).round(), atol=1e-4)
    val = build_eval_set(data_cfg(acdc_root), "val")
    assert getattr(val, "volumetric", False) and len(val) == 2
    v = val[0]
    assert v["image"].shape == v["mask"].shape == (3, 24, 28) and v["mask"].dtype == torch.int64
    assert len(build_eval_set(data_cfg(acdc_root), "valtest")) == 4


def test_real_folder_without_splits_uses_the_bundled_official_files(tmp_path):
    from semiseg.data.datasets import find_split_file, get_reader

    (tmp_path / "data").mkdir()
    cfg = DataConfig(dataset="acdc", root=str(tmp_path))
    reader = get_reader(cfg)
    val = reader.split_file(tmp_path, "val.txt")
    assert val is not None and val.parent.parent.name == "acdc_splits"
    lines = val.read_text().split()
    assert len(lines) == 20 and lines[0] == "data/patient028_frame01.h5"
    labeled = find_split_file("splits/acdc/7/labeled.txt", tmp_path, reader.bundled)
    assert len(labeled.read_text().split()) == 136
    with pytest.raises(DataError, match="patient028_frame01.h5 does not exist"):
        reader.list_split(tmp_path, "val")


def _write(path, **arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v


@pytest.mark.parametrize("case, message", [
    ("garbage", "cannot be read"),
    ("no_label", "has no 'label'"),
    ("empty", "is empty"),
    ("bad_value", "label value 5 is not a class"),
    ("shape", "expected two 2-D arrays"),
])
def test_bad_slice_is_one_line_naming_the_file(tmp_path, case, message):
    path = tmp_path / f"{case}.h5"
    img = np.zeros((8, 8), np.float32)
    if case == "garbage":
        path.write_bytes(b"not an hdf5 file")
    elif case == "no_label":
        _write(path, image=img)
    elif case == "empty":
        _write(path, image=np.zeros((0, 8), np.float32), label=np.zeros((0, 8), np.uint8))
    elif case == "bad_value":
        lab = np.zeros((8, 8), np.uint8)
        lab[3, 3] = 5
        _write(path, image=img, label=lab)
    else:
        _write(path, image=img, label=np.zeros((8, 9), np.uint8))
    with pytest.raises(DataError, match=message) as e:
        A.read_h5(path, 2)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_h5py_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(SemisegError, match=r"pip install 'semiseg\[medical\]'"):
        A.read_h5("x.h5", 2)


# ---------------------------------------------------------------------------------------------
# Transforms keep image and label aligned


@pytest.mark.parametrize("seed", range(12))
def test_weak_geometry_keeps_image_and_label_aligned(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(9, 30)), int(rng.integers(9, 30))
    label = rng.integers(0, 4, (h, w)).astype(np.int64)
    image = label.astype(np.float32) / 3.0  # the image encodes the label: alignment is equality
    out_img, out_lab = A.weak_geometry(image, label, 16, random.Random(seed))
    assert out_img.shape == out_lab.shape == (16, 16) and out_lab.dtype == np.int64
    np.testing.assert_array_equal(np.round(out_img * 3).astype(np.int64), out_lab)


def test_each_geometric_branch_keeps_alignment_and_moves_pixels():
    label = np.zeros((10, 12), np.int64)
    label[1:3, 2:7] = 3
    image = label.astype(np.float32) / 3
    for branch in (A.random_rot_flip, A.random_rotate):
        moved = False
        for seed in range(8):
            i, m = branch(image, label, random.Random(seed))
            np.testing.assert_array_equal(np.round(i * 3).astype(np.int64), m)
            moved |= m.shape != label.shape or not np.array_equal(m, label)
        assert moved
    z = A.zoom_nearest(label, 20)
    assert z.shape == (20, 20) and set(np.unique(z)) == {0, 3}


@pytest.mark.parametrize("seed", range(4))
def test_labelled_slices_get_geometry_only_and_strong_views_keep_the_weak_geometry(acdc_root, monkeypatch, seed):
    """Labelled: no intensity change (every output value is an input value or the zero fill);
    unlabelled: with the intensity draws switched off, each strong view equals the weak view."""
    from semiseg.data.build import build_train_sets

    random.seed(seed)
    sets = build_train_sets(data_cfg(acdc_root), num_strong=2, with_unlabeled=True)
    sample = sets.labeled.samples[seed]
    image, _ = A.read_h5(sample.image, 2)
    out = sets.labeled[seed]["image"].numpy()
    allowed = set(np.round(image.ravel(), 6)) | {0.0}
    assert set(np.round(out.ravel(), 6)) <= allowed

    monkeypatch.setattr(A, "strong_intensity", lambda img: img)
    u = sets.unlabeled[seed]
    assert torch.equal(u["strong_1"], u["weak"]) and torch.equal(u["strong_2"], u["weak"])
    assert u["box_1"].shape == (16, 16) and set(u["box_1"].unique().tolist()) <= {0, 1}



@pytest.mark.parametrize("seed", range(6))
def test_unlabelled_masks_on_request_follow_the_weak_views_geometry(tmp_path, seed):
    """``with_masks`` (the oracle and ``pseudo_label_quality --as-trained``): the slice's label
    comes back as ``"mask"`` under the weak view's rotation, flip and zoom. The image here is its
    label / 3, so the weak view (8-bit) must read back as the mask pixel for pixel."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 4, (20, 24)).astype(np.uint8)
    path = tmp_path / "s.h5"
    _write(path, image=label.astype(np.float32) / 3, label=label)
    from semiseg.data.datasets import Sample

    random.seed(seed)
    u = A.ACDCUnlabeledSet([Sample(image=path, mask=None, id="s")], 16, num_strong=1, with_masks=True)[0]
    assert u["mask"].shape == (16, 16) and u["mask"].dtype == torch.long
    assert torch.equal(torch.round(u["weak"][0] * 3).long(), u["mask"])
    assert "mask" not in A.ACDCUnlabeledSet([Sample(image=path, mask=None, id="s")], 16, num_strong=1)[0]

def test_strong_intensity_changes_values_not_geometry():
    from PIL import Image

    img = np.zeros((16, 16), np.uint8)
    img[4:12, 4:12] = 200
    random.seed(0)
    np.random.seed(0)
    changed = 0
    for _ in range(10):
        out = np.asarray(A.strong_intensity(Image.fromarray(img)))
        assert out.shape == img.shape
        changed += not np.array_equal(out, img)
        # jitter and blur keep the square where it was: its centre is never darker than the far corner
        assert out[8, 8] >= out[0, 0]
    assert changed >= 5


def test_rot90_flip_matches_numpy():
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    rng = random.Random(3)
    r = random.Random(3)
    k, axis = r.randrange(4), r.randrange(2)
    img, lab = A.random_rot_flip(a.astype(np.float32), a, rng)
    np.testing.assert_array_equal(lab, np.flip(np.rot90(a, k), axis=axis))


# ---------------------------------------------------------------------------------------------
# The medical UNet


def unet_cfg(**kw):
    from semiseg.config.schema import ModelConfig

    return ModelConfig(encoder="unet", head="unet", in_channels=1, **kw)


def test_unet_is_the_official_network_and_feeds_feature_perturbation():
    from semiseg.methods.perturbations import feature_perturbation
    from semiseg.models import build_model

    model = build_model(unet_cfg(), 4)
    assert sum(p.numel() for p in model.parameters()) == 1_813_764  # official UNet(in_chns=1, class_num=4)
    small = build_model(unet_cfg(unet_channels=[4, 4, 8, 8, 8]), 4)
    assert small.decoder.in_index == (0, 1, 2, 3, 4) and small.feature_reductions == [1, 2, 4, 8, 16]
    x = torch.randn(2, 1, 32, 32)
    assert small(x).shape == (2, 4, 32, 32)
    feats = small.encode(x)
    assert [f.shape[1:] for f in feats] == [(4, 32, 32), (4, 16, 16), (8, 8, 8), (8, 4, 4), (8, 2, 2)]
    small.eval()
    dropped = []

    def drop(f):  # every feature the decoder reads is perturbed, each through the drop
        dropped.append(f.shape[1:])
        return torch.zeros_like(f)

    clean, fp = feature_perturbation(small, x, drop=drop)
    assert len(dropped) == 5
    assert torch.allclose(clean, small(x), atol=1e-5) and not torch.allclose(fp, clean)


def test_unet_config_errors():
    from semiseg.config import load_config
    from semiseg.errors import ConfigError
    from semiseg.models import build_model, check_input_size

    with pytest.raises(ConfigError, match="model.head"):
        build_model(unet_cfg().model_copy(update={"head": "deeplabv3plus"}), 4)
    with pytest.raises(ConfigError, match="model.pretrained"):
        build_model(unet_cfg(pretrained=True), 4)
    with pytest.raises(ConfigError, match="not a multiple of 16"):
        check_input_size(build_model(unet_cfg(unet_channels=[4, 4, 4, 4, 4]), 4), 40, "data.crop_size")
    with pytest.raises(ConfigError, match="model.in_channels"):
        load_config({"data": {"dataset": "acdc"}})


# ---------------------------------------------------------------------------------------------
# Dice losses: hand-computed values and a loop reference


def test_dice_loss_equals_hand_computed_value():
    from semiseg.methods.losses import dice_loss

    # two pixels, two classes: p = (0.8, 0.2) and (0.4, 0.6), targets 0 and 1
    probs = torch.tensor([[0.8, 0.4], [0.2, 0.6]]).view(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    s = 1e-5
    # class 0: I = 0.8, Z = 0.64 + 0.16, Y = 1; class 1: I = 0.6, Z = 0.04 + 0.36, Y = 1
    expected = ((1 - (1.6 + s) / (1.8 + s)) + (1 - (1.2 + s) / (1.4 + s))) / 2
    assert float(dice_loss(probs, target)) == pytest.approx(expected, abs=1e-6)
    # only the first pixel kept: class 0 has I = 0.8, Z = 0.64, Y = 1; class 1 I = 0, Z = 0.04, Y = 0
    keep = torch.tensor([[[True, False]]])
    expected = ((1 - (1.6 + s) / (0.64 + 1 + s)) + (1 - s / (0.04 + s))) / 2
    assert float(dice_loss(probs, target, keep)) == pytest.approx(expected, abs=1e-6)
    # nothing kept: zero, not NaN
    assert float(dice_loss(probs, target, torch.zeros_like(keep))) == 0.0


def ref_dice(probs, target, keep):
    """Official DiceLoss by explicit loops (classes, then pixels)."""
    b, k, h, w = probs.shape
    total = 0.0
    for c in range(k):
        inter = z = y = 0.0
        for n in range(b):
            for i in range(h):
                for j in range(w):
                    if not keep[n, i, j]:
                        continue
                    p, t = float(probs[n, c, i, j]), float(target[n, i, j] == c)
                    inter, z, y = inter + p * t, z + p * p, y + t * t
        total += 1 - (2 * inter + 1e-5) / (z + y + 1e-5)
    return total / k


def test_ce_dice_and_unsupervised_dice_match_loop_references():
    from semiseg.methods.consistency import PseudoTarget, unsupervised_dice_loss
    from semiseg.methods.losses import CEDiceLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g) * 3
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    target[0, 0, :2] = 255  # ignored: left out of CE and Dice
    keep = target != 255
    ce = sum(float(-logits[n, :, i, j].log_softmax(0)[target[n, i, j]])
             for n in range(2) for i in range(3) for j in range(5) if keep[n, i, j]) / int(keep.sum())
    probs = logits.softmax(1)
    expected = (ce + ref_dice(probs, target, keep)) / 2
    assert float(CEDiceLoss()(logits, target)) == pytest.approx(expected, rel=1e-5)

    conf, label = probs.max(1)
    ignore = torch.zeros_like(label)
    ignore[1, -1] = 255  # padding never teaches
    thresh = float(conf.median())
    target_u = PseudoTarget(label, conf, ignore)
    logits_s = torch.randn(2, 4, 3, 5, generator=g)
    kept = (conf >= thresh) & (ignore != 255)
    assert 0 < int(kept.sum()) < kept.numel()
    expected = ref_dice(logits_s.softmax(1), label, kept)
    assert float(unsupervised_dice_loss(logits_s, target_u, thresh)) == pytest.approx(expected, rel=1e-5)


class TinyMedSeg(torch.nn.Module):
    """The SegModel contract on one 3x3 conv + classifier, one input channel, no BatchNorm."""

    neck = None

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.head.weight.mul_(4.0)
        self.head.in_index = (0,)
        self.mask = torch.tensor([2.0, 0.0, 2.0, 0.0]).view(1, 4, 1, 1)

    @property
    def decoder(self):
        return self.head

    def encode(self, x):
        return [torch.relu(self.enc(x))]

    def decode(self, feats, out_size=None):
        return self.head(feats[0])

    def forward(self, x):
        return self.decode(self.encode(x))

    def param_groups(self):
        return list(self.enc.parameters()), list(self.head.parameters())


def medical_batch(seed=0, b=3, h=6, w=7):
    from semiseg.methods.base import Batch

    g = torch.Generator().manual_seed(seed)

    def box():
        out = torch.zeros(b, h, w, dtype=torch.long)
        out[:, 1:4, 2:5] = 1
        out[0] = 0
        return out

    u = {"weak": torch.rand(b, 1, h, w, generator=g), "strong_1": torch.rand(b, 1, h, w, generator=g),
         "strong_2": torch.rand(b, 1, h, w, generator=g), "box_1": box(), "box_2": box().flip(2),
         "ignore_mask": torch.zeros(b, h, w, dtype=torch.long)}
    x = {"image": torch.rand(2, 1, h, w, generator=g), "mask": torch.randint(0, 4, (2, h, w), generator=g)}
    return Batch(x, u, None)


def test_unimatch_medical_step_equals_hand_computed_loss():
    """(L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2 with L_x = (CE + Dice) / 2 and the unlabelled
    terms Dice over the confident pixels (official more-scenarios/medical/unimatch.py)."""
    from semiseg.config import load_config
    from semiseg.methods.base import StepContext
    from semiseg.methods.unimatch import UniMatch

    thresh = 0.3
    cfg = load_config({"train": {"loss": "ce_dice"},
                       "method": {"name": "unimatch", "loss_u": "dice", "conf_thresh": thresh,
                                  "mix_source": "in_batch"}})
    model = TinyMedSeg()
    method = UniMatch(cfg, model, 4)
    method.perturb_feature = lambda f: f * model.mask
    method.train()
    batch = medical_batch()
    result = method.train_step(batch, StepContext(iteration=0, total_iters=10, lr=0.01))

    u, x = batch.unlabeled, batch.labeled
    with torch.no_grad():
        logits_x = model(x["image"])
        ce = float(torch.nn.functional.cross_entropy(logits_x, x["mask"]))
        loss_x = (ce + ref_dice(logits_x.softmax(1), x["mask"], torch.ones_like(x["mask"], dtype=torch.bool))) / 2
        conf_w, label_w = model(u["weak"]).softmax(1).max(1)
        losses_s = []
        for k in (1, 2):
            bx = u[f"box_{k}"]
            img = torch.where(bx.unsqueeze(1) == 1, u[f"strong_{k}"].flip(0), u[f"strong_{k}"])
            label = torch.where(bx == 1, label_w.flip(0), label_w)
            conf = torch.where(bx == 1, conf_w.flip(0), conf_w)
            losses_s.append(ref_dice(model(img).softmax(1), label, conf >= thresh))
        fp = model.head(model.encode(u["weak"])[0] * model.mask)
        loss_fp = ref_dice(fp.softmax(1), label_w, conf_w >= thresh)
    expected = (loss_x + 0.25 * losses_s[0] + 0.25 * losses_s[1] + 0.5 * loss_fp) / 2
    assert 0 < float((conf_w >= thresh).float().mean()) < 1
    assert float(result.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(result.logs["loss_fp"]) == pytest.approx(loss_fp, rel=1e-5)
    assert float(result.logs["loss_x"]) == pytest.approx(loss_x, rel=1e-5)


def test_fixmatch_takes_the_dice_loss_too():
    from semiseg.config import load_config
    from semiseg.methods.base import StepContext
    from semiseg.methods.fixmatch import FixMatch

    batch = medical_batch(1)
    losses = {}
    for loss_u in ("ce", "dice"):
        cfg = load_config({"method": {"name": "fixmatch", "loss_u": loss_u, "conf_thresh": 0.0,
                                      "mix_source": "in_batch"}})
        method = FixMatch(cfg, TinyMedSeg(), 4)
        method.train()
        losses[loss_u] = float(method.train_step(batch, StepContext(0, 10, 0.01)).logs["loss_s"])
    assert 0 < losses["dice"] < 1 and losses["dice"] != pytest.approx(losses["ce"])


# ---------------------------------------------------------------------------------------------
# 3D evaluation


def test_volume_dice_equals_hand_computed_value():
    from semiseg.engine.evaluator import volume_dice

    gt = torch.zeros(2, 3, 3, dtype=torch.long)
    gt[0, 0, :] = 1  # RV: 3 voxels
    gt[1, 1:, 1:] = 3  # LV: 4 voxels; Myo absent
    pred = gt.clone()
    pred[0, 0, 0] = 0  # RV: 2 of 3 found
    pred[1, 1, 1] = 2  # one LV voxel called Myo
    rv, myo, lv = volume_dice(pred, gt, 4)
    assert rv == pytest.approx(200 * 2 / (2 + 3))
    assert myo == 0.0  # predicted, absent from the ground truth
    assert lv == pytest.approx(200 * 3 / (3 + 4))
    assert volume_dice(gt, gt, 4)[1] == 100.0  # absent from both: perfect


class Oracle(torch.nn.Module):
    """Predicts ``round(3 x)`` (the generated test volumes below encode the label in the image), or
    ``constant`` everywhere; records the input sizes."""

    def __init__(self, constant=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.constant, self.sizes = constant, []

    def forward(self, x):
        self.sizes.append(tuple(x.shape))
        cls = torch.full_like(x[:, 0], self.constant).long() if self.constant is not None else (x[:, 0] * 3).round().long()
        return torch.nn.functional.one_hot(cls.clamp(0, 3), 4).permute(0, 3, 1, 2).float() * 10


class VolumeSet(torch.utils.data.Dataset):
    volumetric = True

    def __init__(self, volumes):
        self.volumes = volumes

    def __len__(self):
        return len(self.volumes)

    def __getitem__(self, i):
        label = self.volumes[i]
        if label is None:
            return {"skipped": "volume x.h5 cannot be read"}
        return {"image": label.float() / 3, "mask": label}


def test_evaluate_scores_volumes_slice_by_slice_in_3d():
    from semiseg.config.schema import EvalConfig
    from semiseg.engine.evaluator import evaluate

    g = torch.Generator().manual_seed(0)
    vols = [torch.randint(0, 4, (3, 8, 8), generator=g), torch.randint(0, 3, (2, 8, 8), generator=g), None]
    oracle = Oracle()
    res = evaluate(oracle, VolumeSet(vols), EvalConfig(), 4, crop_size=8, progress=False)
    assert oracle.sizes == [(3, 1, 8, 8), (2, 1, 8, 8)]  # each volume's slices in one batch
    assert res["per_class_dice"] == [None, 100.0, 100.0, 100.0] and res["mDice"] == 100.0
    assert res["volumes"] == 2 and res["skipped"] == ["volume x.h5 cannot be read"] and res["mIoU"] == 100.0

    res = evaluate(Oracle(constant=3), VolumeSet(vols[:2]), EvalConfig(), 4, crop_size=8, progress=False)
    lv = [200 * int((v == 3).sum()) / (v.numel() + int((v == 3).sum())) for v in vols[:2]]
    # RV and Myo never predicted: 0; the LV of the second volume is absent: predicted everywhere, 0
    assert res["per_class_dice"][1:] == [0.0, 0.0, pytest.approx(sum(lv) / 2)]
    assert res["mDice"] == pytest.approx(sum(lv) / 2 / 3)

    resized = Oracle()
    evaluate(resized, VolumeSet([torch.zeros(2, 6, 10, dtype=torch.long)]), EvalConfig(), 4, crop_size=16,
             progress=False)
    assert resized.sizes == [(2, 1, 16, 16)]  # slices resized to the crop, predictions back to 6 x 10


@pytest.fixture(scope="module")
def trained_runs(acdc_root, tmp_path_factory):
    """Two-iteration supervised and UniMatch runs on the generated files (UNet, Dice losses)."""
    from semiseg.config import load_config
    from semiseg.engine.trainer import Trainer

    out, metrics = tmp_path_factory.mktemp("runs"), {}
    for method in ("supervised", "unimatch"):
        cfg = load_config({
            "data": {"dataset": "acdc", "root": str(acdc_root), "labeled": "splits/acdc/1/labeled.txt",
                     "unlabeled": "splits/acdc/1/unlabeled.txt", "crop_size": 16, "workers": 0},
            "model": {"encoder": "unet", "head": "unet", "in_channels": 1, "unet_channels": [4, 4, 4, 4, 4]},
            "method": {"name": method, **({"loss_u": "dice", "conf_thresh": 0.0} if method == "unimatch" else {})},
            "train": {"iters": 2, "batch_size": 2, "loss": "ce_dice", "eval_every": 2, "threads": 1,
                      "channels_last": False}})
        metrics[method] = Trainer(cfg, out / method).fit().metrics
    return out, metrics


def test_train_and_eval_json_on_generated_acdc(trained_runs, capsys):
    """supervised and UniMatch train on the generated files; eval --json reports mDice per class."""
    import json

    from semiseg.cli import main

    runs, metrics = trained_runs
    for m in metrics.values():
        assert 0.0 <= m["mDice"] <= 100.0 and len(m["per_class_dice"]) == 4
    capsys.readouterr()
    assert main(["eval", str(runs / "unimatch"), "--json", "--split", "test"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["per_class_dice"]) == {"RV", "Myo", "LV"} and out["volumes"] == 2
    assert out["mDice"] == pytest.approx(sum(out["per_class_dice"].values()) / 3)
    assert "mIoU" in out and out["split"] == "test"


def test_predict_refuses_and_export_traces_one_channel(trained_runs, tmp_path, capsys):
    from PIL import Image

    from semiseg.cli import main

    runs, _ = trained_runs
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    assert main(["predict", str(runs / "unimatch"), str(tmp_path / "x.png"), "--out", str(tmp_path / "p")]) != 0
    assert "1-channel acdc data" in capsys.readouterr().err
    pytest.importorskip("onnxruntime")
    from semiseg.export import export_onnx

    logs = []
    export_onnx(runs / "unimatch", tmp_path / "m.onnx", verify=True, log=logs.append)
    assert "2x1x32x48" in logs[0]


def test_report_of_a_medical_run_scores_volumes_and_shows_middle_slices(trained_runs):
    """``semiseg report`` on a volume split: the 3D Dice line beside mIoU, sample rows from the
    volumes' middle slices (a volume is not an image batch)."""
    import json
    import re

    from semiseg.report import write_report

    runs, _ = trained_runs
    page = write_report(runs / "unimatch").read_text()
    dice = re.search(r"3D Dice over (\d+) volumes: <b>mDice ([0-9.]+)</b> \(RV [0-9.]+, Myo [0-9.]+, LV [0-9.]+\)", page)
    assert dice, page[:2000]
    evals = [json.loads(x) for x in (runs / "unimatch" / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    best = max(r["mDice"] for r in evals if r.get("model", "student") == "student")  # the best checkpoint's
    assert float(dice.group(2)) == pytest.approx(best, abs=0.005)
    assert "Validation images" in page


def test_check_data_names_a_bad_slice(tmp_path):
    from semiseg.data.build import check_dataset

    root = generate_acdc(tmp_path / "acdc", train_patients=7, val_patients=1, test_patients=1, slices=2,
                         height=16, width=16)
    assert check_dataset(data_cfg(root)) == []
    bad = root / "data/slices/patient004_frame01_slice_1.h5"
    with h5py.File(bad, "r+") as f:
        label = f["label"][()]
        label[0, 0] = 7
        f["label"][...] = label
    problems = check_dataset(data_cfg(root))
    assert len(problems) == 1 and str(bad) in problems[0] and "label value 7" in problems[0]


def test_medical_demo_trains_both_methods_and_prints_dice(acdc_root, tmp_path, monkeypatch, capsys):
    import semiseg.data.acdc_synthetic as gen
    from semiseg import demo

    cfg = demo.medical_config("unimatch", acdc_root, 150)  # the demo's recipe: the official losses and threshold
    assert (cfg.train.loss, cfg.method.loss_u, cfg.method.conf_thresh, cfg.model.encoder) == ("ce_dice", "dice", 0.95,
                                                                                              "unet")
    assert cfg.data.labeled == "splits/acdc/1/labeled.txt" and cfg.data.val_split == "valtest"
    assert demo.medical_config("supervised", acdc_root, 150).method.name == "supervised"

    def tiny(method, root, iters):  # the same path at test size
        c = original(method, root, iters)
        c.data.crop_size = 16
        c.model.unet_channels = [4, 4, 4, 4, 4]
        c.train.batch_size = 2
        c.train.threads = 1
        return c

    original = demo.medical_config
    monkeypatch.setattr(demo, "medical_config", tiny)
    monkeypatch.setattr(gen, "ensure_acdc_synthetic", lambda root: acdc_root)
    assert demo.run_demo(out=tmp_path, iters=1, scenario="medical") == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("supervised ", "unimatch "))]
    assert [r[0] for r in rows] == ["supervised", "unimatch"] and all(len(r) >= 6 for r in rows)
    assert "gain of unimatch over supervised" in out and "mDice" in out



def test_medical_demo_on_a_real_folder_trains_on_it_with_the_protocols_optimiser(acdc_root, tmp_path, monkeypatch,
                                                                                 capsys):
    """``--data-root``: the folder given (here a generated one in the real layout) instead of
    generated volumes, the 1-case split scored on val, AdamW at 1e-3 in fp32 (the ACDC-CPU
    protocol's optimiser); a folder without slices, or --data-root with another scenario, is
    refused with one line."""
    from semiseg import demo
    from semiseg.cli import main

    cfg = demo.real_medical_config("unimatch", acdc_root, 600)
    assert (cfg.data.root, cfg.data.val_split, cfg.data.labeled) == (str(acdc_root), "val", "splits/acdc/1/labeled.txt")
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.precision, cfg.method.loss_u) == ("adamw", 0.001, "fp32", "dice")
    original = demo.real_medical_config

    def tiny(method, root, iters):
        c = original(method, root, iters)
        c.data.crop_size, c.model.unet_channels, c.train.batch_size, c.train.threads = 16, [4, 4, 4, 4, 4], 2, 1
        return c

    monkeypatch.setattr(demo, "real_medical_config", tiny)
    monkeypatch.setattr("semiseg.data.acdc_synthetic.ensure_acdc_synthetic",
                        lambda root: pytest.fail("generated data with --data-root"))
    assert main(["demo", "--scenario", "medical", "--data-root", str(acdc_root), "--iters", "1",
                 "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert f"real ACDC: {acdc_root}" in out and "gain of unimatch over supervised" in out and "--split val" in out
    assert (tmp_path / "demo" / "unimatch" / "config.yaml").read_text().count("optimizer: adamw") == 1
    assert main(["demo", "--scenario", "medical", "--data-root", str(tmp_path), "--out", str(tmp_path / "d2")]) != 0
    err = capsys.readouterr().err.strip()
    assert f"--data-root {tmp_path}: no data/slices/*.h5 there" in err and "\n" not in err
    assert main(["demo", "--scenario", "change", "--data-root", str(acdc_root)]) != 0
    assert "--data-root is the real ACDC folder of --scenario medical" in capsys.readouterr().err

def test_hd95_equals_hand_computed_values():
    pytest.importorskip("scipy")
    from semiseg.config.schema import EvalConfig
    from semiseg.engine.evaluator import evaluate, hd95

    a = torch.zeros(1, 1, 8, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[0, 0, 0], b[0, 0, 3] = True, True
    assert hd95(a, b) == pytest.approx(3.0)  # one voxel each, 3 apart
    a[0, 0, 4] = True
    b[:] = False
    b[0, 0, 0] = True
    # distances pooled from both sides: a->b [0, 4], b->a [0]; 95th percentile of [0, 0, 4] = 0.9 * 4
    assert hd95(a, b) == pytest.approx(3.6)
    assert hd95(a, torch.zeros_like(a)) is None

    g = torch.Generator().manual_seed(0)
    vol = torch.randint(0, 4, (2, 8, 8), generator=g)
    res = evaluate(Oracle(), VolumeSet([vol]), EvalConfig(hd95=True), 4, crop_size=8, progress=False)
    assert res["per_class_hd95"] == [None, 0.0, 0.0, 0.0] and res["mHD95"] == 0.0
    assert "mHD95" not in evaluate(Oracle(), VolumeSet([vol]), EvalConfig(), 4, crop_size=8, progress=False)


def test_train_without_h5py_stops_with_one_line_before_any_worker(acdc_root, monkeypatch, tmp_path, capsys):
    """h5py missing: `semiseg train` on acdc exits non-zero with the install hint on one line
    (before, the ImportError surfaced inside a loader worker as a traceback)."""
    from semiseg.cli import main

    monkeypatch.setitem(sys.modules, "h5py", None)
    rc = main(["train", "acdc", "--set", f"data.root={acdc_root}", "--set", "data.workers=2",
               "--set", "data.crop_size=32",
               "--set", "train.iters=1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.count("\n") == 0 and "pip install 'semiseg[medical]'" in err and "Traceback" not in err
