"""Torch datasets (labelled, unlabelled, eval) and reproducible loaders."""

import random

import numpy as np
import pytest
import torch
from conftest import write_png
from PIL import Image

from semiseg.config import load_config
from semiseg.data import IGNORE_INDEX
from semiseg.data.build import LabeledSet, UnlabeledSet, build_eval_set, build_train_sets
from semiseg.data.datasets import list_samples
from semiseg.data.io import load_pair
from semiseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop, hflip, normalize, resize_scale


def seed_all(seed):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Undo ``normalize``: (3, H, W) -> (H, W, 3) 0..255."""
    x = image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return (x * 255).round().permute(1, 2, 0).numpy().astype(int)


def coded_rgb(label: np.ndarray) -> np.ndarray:
    """The image whose colour encodes ``label``: R = 40 + 60 * label, G = 200 - 60 * label, B = 90."""
    return np.stack([40 + 60 * label, 200 - 60 * label, np.full_like(label, 90)], -1).astype(np.uint8)


@pytest.fixture
def colour_coded(tmp_path):
    """A folder dataset whose image colour encodes the label (R = 40 + 60 * label) in 10x10 blocks."""
    root = tmp_path / "coded"
    rng = np.random.default_rng(0)
    for i in range(10):
        label = rng.integers(0, 3, (3, 4)).repeat(10, 0).repeat(10, 1)  # 30 x 40
        write_png(root / "images" / f"im{i}.png", coded_rgb(label))
        write_png(root / "masks" / f"im{i}.png", label.astype(np.uint8))
    return root


def interior(mask: np.ndarray, r: int = 3) -> np.ndarray:
    """Pixels at least ``r`` from a label edge or the border (two resizes blur edges by ~2 px)."""
    h, w = mask.shape
    padded = np.pad(mask, r, constant_values=-1)
    return np.all([padded[dy:dy + h, dx:dx + w] == mask for dy in range(2 * r + 1) for dx in range(2 * r + 1)], 0)


@pytest.mark.parametrize("resize", [None, (48, 36)])
def test_labeled_crops_keep_labels_on_their_pixels(colour_coded, folder_config, resize):
    cfg = folder_config(colour_coded, crop_size=40, resize=resize)
    dataset = LabeledSet(list_samples(cfg, "train"), cfg)
    checked = 0
    for seed in range(12):
        seed_all(seed)
        item = dataset[seed % len(dataset)]
        assert item["image"].shape == (3, 40, 40) and item["mask"].shape == (40, 40)
        assert item["image"].dtype == torch.float32 and item["mask"].dtype == torch.long
        mask, rgb = item["mask"].numpy(), to_uint8(item["image"])
        assert set(np.unique(mask)) <= {0, 1, 2, IGNORE_INDEX}
        assert np.array_equal(mask == IGNORE_INDEX, np.abs(rgb).sum(-1) == 0)  # padding: black image, 255 mask
        inside = interior(mask) & (mask != IGNORE_INDEX)
        assert np.abs(rgb[..., 0][inside] - (40 + 60 * mask[inside])).max(initial=0) <= 1
        checked += inside.sum()
    assert checked > 12 * 40 * 40 / 4


def test_strong_labeled_changes_colours_not_geometry(colour_coded, folder_config):
    cfg = folder_config(colour_coded, crop_size=24)
    samples = list_samples(cfg, "train")
    plain, strong = LabeledSet(samples, cfg), LabeledSet(samples, cfg, strong=True)
    changed = 0
    for seed in range(6):
        seed_all(seed)
        a = plain[0]
        seed_all(seed)
        b = strong[0]
        assert torch.equal(a["mask"], b["mask"])  # geometry is drawn first, identically
        changed += not torch.equal(a["image"], b["image"])
    assert changed >= 4


@pytest.mark.parametrize("num_strong", [0, 1, 2])
def test_unlabeled_views_and_ignore_mask(colour_coded, folder_config, num_strong):
    cfg = folder_config(colour_coded, crop_size=64, scale_range=(0.5, 1.0))  # always padded
    for mask in (colour_coded / "masks").iterdir():
        mask.write_bytes(b"")  # unlabelled masks are never read
    dataset = UnlabeledSet(list_samples(cfg, "train"), cfg, num_strong=num_strong)
    seed_all(0)
    item = dataset[0]
    expected = {"id", "weak", "ignore_mask", "skipped"} | {f"{k}_{i}" for k in ("strong", "box")
                                                         for i in range(1, num_strong + 1)}
    assert set(item) == expected
    assert item["skipped"] == ""  # every file of this set could be read
    ignore = item["ignore_mask"].numpy()
    assert item["ignore_mask"].dtype == torch.long and set(np.unique(ignore)) == {0, IGNORE_INDEX}
    assert np.array_equal(ignore == IGNORE_INDEX, np.abs(to_uint8(item["weak"])).sum(-1) == 0)
    for i in range(1, num_strong + 1):
        assert item[f"strong_{i}"].shape == (3, 64, 64)
        assert item[f"box_{i}"].shape == (64, 64) and set(item[f"box_{i}"].unique().tolist()) <= {0, 1}


def test_unlabeled_true_masks_follow_the_same_crops_with_void_apart_from_padding(colour_coded, folder_config):
    """``with_masks`` (method.oracle_pseudo_labels) adds the crop's true mask and changes no other
    output: the same draws give the same views, and the mask is the labelled pipeline's."""
    import dataclasses

    from semiseg.errors import DataError

    for mask_file in (colour_coded / "masks").iterdir():  # a void block in every mask
        m = np.array(Image.open(mask_file))
        m[:10, :10] = 255
        write_png(mask_file, m)
    cfg = folder_config(colour_coded, crop_size=48, scale_range=(0.5, 1.5))  # padded on some draws
    samples = list_samples(cfg, "train")
    plain, masked = UnlabeledSet(samples, cfg, num_strong=2), UnlabeledSet(samples, cfg, num_strong=2, with_masks=True)
    labeled = LabeledSet(samples, cfg)
    saw_void = saw_pad = 0
    for seed in range(8):
        i = seed % len(samples)
        seed_all(seed)
        a = plain[i]
        seed_all(seed)
        b = masked[i]
        seed_all(seed)
        ref = labeled[i]
        assert set(b) == set(a) | {"mask"}
        for key in a:
            if key not in ("id", "skipped"):
                assert torch.equal(a[key], b[key]), key
        assert torch.equal(b["mask"], ref["mask"])  # void and padding are both 255 here
        pad = b["ignore_mask"] == IGNORE_INDEX
        assert torch.equal(pad, a["ignore_mask"] == IGNORE_INDEX)  # the ignore mask marks padding only
        saw_void += int(((b["mask"] == IGNORE_INDEX) & ~pad).sum())
        saw_pad += int(pad.sum())
    assert saw_void > 0 and saw_pad > 0
    unmasked = [dataclasses.replace(s, mask=None) if i == 2 else s for i, s in enumerate(samples)]
    with pytest.raises(DataError, match=r"'method.oracle_pseudo_labels': needs the masks of the unlabelled images; "
                                        rf".*{samples[2].image.name} has none"):
        UnlabeledSet(unmasked, cfg, with_masks=True)


def test_strong_views_follow_the_data_keys_of_the_photometric_augmentation(colour_coded, folder_config):
    cfg = folder_config(colour_coded, crop_size=24, strong_jitter_p=0.0, strong_grayscale_p=0.0, strong_blur_p=0.0)
    seed_all(0)
    item = UnlabeledSet(list_samples(cfg, "train"), cfg, num_strong=2)[0]
    assert torch.equal(item["strong_1"], item["weak"]) and torch.equal(item["strong_2"], item["weak"])
    gray = folder_config(colour_coded, crop_size=24, strong_jitter_p=0.0, strong_grayscale_p=1.0, strong_blur_p=0.0)
    seed_all(0)
    image = LabeledSet(list_samples(gray, "train"), gray, strong=True)[0]["image"]
    rgb = to_uint8(image)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_eval_set_returns_whole_resized_images(colour_coded, folder_config):
    cfg = folder_config(colour_coded, resize=(20, 15))
    item = build_eval_set(cfg, "val")[0]
    assert item["image"].shape == (3, 15, 20) and item["mask"].shape == (15, 20)
    assert item["path"].endswith("im0.png") and item["id"] == "im0"
    full = build_eval_set(folder_config(colour_coded), "val")[0]
    assert full["image"].shape == (3, 30, 40)


def test_labeled_set_is_repeated_to_the_unlabeled_length(make_folder_dataset, folder_config):
    root = make_folder_dataset(n=22)  # 19 train images after the holdout
    cfg = load_config({"data": {"dataset": "folder", "root": str(root), "num_classes": 3, "labeled": 4,
                                "crop_size": 16}})
    sets = build_train_sets(cfg, num_strong=2, with_unlabeled=True)
    assert len(sets.unlabeled) == 15 and len(sets.labeled) == 15
    ids = [s.id for s in sets.labeled.samples]
    assert len(set(ids)) == 4 and all(3 <= ids.count(i) <= 4 for i in set(ids))  # ceil(15/4) copies, truncated
    assert sets.info.num_classes == 3
    alone = build_train_sets(cfg, num_strong=0, with_unlabeled=False)
    assert len(alone.labeled) == 4 and alone.unlabeled is None


@pytest.mark.parametrize("balance", [False, True])
def test_extra_labels_join_the_labelled_set_and_balance_repeats_the_true_masks(make_folder_dataset, tmp_path,
                                                                               balance):
    """``data.extra_labels``: the unlabelled images with a pseudo-label PNG are labelled with it;
    ``data.extra_labels_balance``: the true masks come ceil(10 / 4) = 3 times (ST++'s list)."""
    root = make_folder_dataset(n=22)  # 19 train images after the holdout: 4 labelled, 15 not
    keys = {"dataset": "folder", "root": str(root), "num_classes": 3, "labeled": 4, "crop_size": 16}
    base = build_train_sets(load_config({"data": keys}), num_strong=2, with_unlabeled=True)
    true_ids = sorted({s.id for s in base.labeled.samples})
    pseudo_ids = [s.id for s in base.unlabeled.samples][:10]
    for i in pseudo_ids:
        write_png(tmp_path / "pl" / f"{i}.png", np.full((16, 24), 2, np.uint8))
    cfg = load_config({"data": {**keys, "extra_labels": str(tmp_path / "pl"), "extra_labels_balance": balance}})
    sets = build_train_sets(cfg, num_strong=0, with_unlabeled=False)
    ids = [s.id for s in sets.labeled.samples]
    assert {i: ids.count(i) for i in true_ids} == {i: 3 if balance else 1 for i in true_ids}
    assert {i: ids.count(i) for i in pseudo_ids} == {i: 1 for i in pseudo_ids}
    assert len(ids) == 4 * (3 if balance else 1) + 10
    pseudo = sets.labeled[ids.index(pseudo_ids[0])]["mask"]
    assert set(pseudo.unique().tolist()) <= {2, IGNORE_INDEX}  # the PNG's labels, not the image's mask
    with_rest = build_train_sets(cfg, num_strong=2, with_unlabeled=True)
    assert sorted(s.id for s in with_rest.unlabeled.samples) == sorted(s.id for s in base.unlabeled.samples[10:])


def test_extra_labels_strong_augments_the_pseudo_labelled_crops_only(colour_coded, folder_config):
    """``data.extra_labels_strong``: photometric changes and cutout on the crops whose mask is a
    pseudo label; the ground-truth crops keep their colours and every label."""
    cfg = folder_config(colour_coded, crop_size=24, scale_range=(1.0, 1.0), strong_jitter_p=1.0)
    samples = list_samples(cfg, "train")
    dataset = LabeledSet(samples, cfg, pseudo_images=frozenset({samples[0].image}))
    erased = 0
    for seed in range(12):
        seed_all(seed)
        true, pseudo = dataset[1], dataset[0]
        mask, rgb = true["mask"].numpy(), to_uint8(true["image"])
        assert IGNORE_INDEX not in mask
        assert np.abs(rgb[..., 0][interior(mask)] - (40 + 60 * mask[interior(mask)])).max() <= 1
        p_mask, p_rgb = pseudo["mask"].numpy(), to_uint8(pseudo["image"])
        inside = interior(p_mask) & (p_mask != IGNORE_INDEX)
        assert np.abs(p_rgb[..., 0][inside] - (40 + 60 * p_mask[inside])).max() > 1  # jittered
        erased += IGNORE_INDEX in p_mask
    assert 3 <= erased <= 10  # cutout with p = 0.5


@pytest.fixture
def rare_class(tmp_path):
    """A folder dataset of 60x160 images: class 0 above, class 1 below, and a 4x4 block of class 2
    (0.17% of the pixels); the red channel encodes the label (R = 40 + 60 * label)."""
    root = tmp_path / "rare"
    for i in range(4):
        label = np.zeros((60, 160), np.uint8)
        label[30:] = 1
        label[8 + 10 * i:12 + 10 * i, 140:144] = 2
        write_png(root / "images" / f"im{i}.png", coded_rgb(label))
        write_png(root / "masks" / f"im{i}.png", label)
    return root


def test_class_uniform_crops_hold_the_rare_class_a_third_of_the_time(rare_class, folder_config):
    def rare_share(p):
        cfg = folder_config(rare_class, crop_size=16, scale_range=(1.0, 1.0), class_uniform_p=p)
        dataset, found = LabeledSet(list_samples(cfg, "train"), cfg), 0
        for seed in range(150):
            seed_all(seed)
            item = dataset[seed % len(dataset)]
            mask, rgb = item["mask"].numpy(), to_uint8(item["image"])
            assert np.abs(rgb[..., 0] - (40 + 60 * mask)).max() <= 1  # labels stay on their pixels
            found += bool((mask == 2).any())
        return found / 150

    uniform, half, balanced = rare_share(0.0), rare_share(0.5), rare_share(1.0)
    assert uniform <= 0.1  # a 16x16 crop of a 60x160 image meets the 4x4 block about 5% of the time
    assert balanced >= 0.35  # a third of the draws pick class 2 and always hold it; the others may
    assert uniform < half < balanced


def test_class_uniform_p_zero_draws_the_crops_of_unimatch(colour_coded, folder_config):
    """With ``data.class_uniform_p: 0`` no extra random number is drawn: the crops are those of
    UniMatch's rescale, crop and flip, so earlier runs repeat exactly."""
    cfg = folder_config(colour_coded, crop_size=24)
    dataset = LabeledSet(list_samples(cfg, "train"), cfg)
    for seed in range(6):
        seed_all(seed)
        item = dataset[seed]
        seed_all(seed)
        sample = dataset.samples[seed]
        img, mask = resize_scale(*load_pair(sample.image, sample.mask, sample.label_map), cfg.scale_range)
        img, mask = hflip(*crop(img, mask, 24))
        image, mask = normalize(img, mask, cfg.mean, cfg.std)
        assert torch.equal(item["image"], image) and torch.equal(item["mask"], mask)
