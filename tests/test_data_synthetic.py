"""The built-in synthetic dataset: deterministic, cached atomically, balanced, colour-blind."""

import filecmp

import numpy as np
import pytest

import semiseg.data.synthetic as synthetic
from semiseg.config import DataConfig, SyntheticConfig
from semiseg.data.datasets import dataset_info, list_samples
from semiseg.data.synthetic import CLASS_NAMES, ensure_synthetic, generate, render

SMALL = {"num_train": 6, "num_val": 2, "image_size": 48}


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_same_parameters_give_identical_bytes(tmp_path):
    a = generate(tmp_path / "a", SyntheticConfig(**SMALL, seed=3))
    b = generate(tmp_path / "b", SyntheticConfig(**SMALL, seed=3))
    c = generate(tmp_path / "c", SyntheticConfig(**SMALL, seed=4))
    assert files(a) == files(b) and len(files(a)) == 2 * 8 + 3
    match, mismatch, errors = filecmp.cmpfiles(a, b, files(a), shallow=False)
    assert not mismatch and not errors
    assert not filecmp.cmp(a / "images" / "train_00000.png", c / "images" / "train_00000.png", shallow=False)


def test_ensure_synthetic_generates_once_into_a_keyed_folder(tmp_path):
    cfg = DataConfig(root=str(tmp_path), synthetic=SyntheticConfig(**SMALL))
    root = ensure_synthetic(cfg)
    assert root.parent == tmp_path and root.name.startswith("synthetic-")
    stamp = (root / "images" / "train_00000.png").stat().st_mtime_ns
    assert ensure_synthetic(cfg) == root
    assert (root / "images" / "train_00000.png").stat().st_mtime_ns == stamp  # not regenerated
    other = ensure_synthetic(DataConfig(root=str(tmp_path), synthetic=SyntheticConfig(**SMALL, seed=1)))
    assert other != root
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left
    train, val = list_samples(cfg, "train"), list_samples(cfg, "val")
    assert len(train) == 6 and len(val) == 2 and all(s.mask is not None for s in train + val)
    assert dataset_info(cfg).class_names == list(CLASS_NAMES)


def test_interrupted_generation_is_not_taken_for_a_dataset(tmp_path, monkeypatch):
    cfg = DataConfig(root=str(tmp_path), synthetic=SyntheticConfig(**SMALL))
    real_render, calls = synthetic.render, []

    def dying_render(rng, size):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_render(rng, size)

    monkeypatch.setattr(synthetic, "render", dying_render)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(cfg)
    assert list(tmp_path.iterdir()) == []  # neither a half-written dataset nor a temp folder
    monkeypatch.setattr(synthetic, "render", real_render)
    root = ensure_synthetic(cfg)
    assert len(list((root / "images").iterdir())) == 8


@pytest.fixture(scope="module")
def rendered():
    draws = [render(np.random.Generator(np.random.PCG64([0, 0, i])), 96) for i in range(80)]
    return np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws])


def test_every_class_is_well_represented(rendered):
    _, masks = rendered
    share = np.bincount(masks.ravel(), minlength=len(CLASS_NAMES)) / masks.size
    assert share.shape == (6,) and 0.4 < share[0] < 0.75  # background
    assert (share[1:] > 0.04).all()
    present = np.array([(masks == c).any((1, 2)).mean() for c in range(1, len(CLASS_NAMES))])
    assert (present > 0.4).all()  # each object class is in many images


def test_colour_does_not_reveal_the_class(rendered):
    """Every class draws its colours from one distribution: class-mean colours are alike, and
    labelling each pixel by its nearest class-mean colour scores below always saying background."""
    images, masks = rendered
    pixels, labels = images.reshape(-1, 3).astype(float), masks.ravel()
    means = np.array([pixels[labels == c].mean(0) for c in range(len(CLASS_NAMES))])
    assert np.abs(means - means.mean(0)).max() < 20
    nearest = np.argmin(((pixels[:, None] - means[None]) ** 2).sum(-1), 1)
    iou = [((nearest == c) & (labels == c)).sum() / ((nearest == c) | (labels == c)).sum() for c in range(6)]
    all_background = (labels == 0).mean() / len(CLASS_NAMES)
    assert np.mean(iou) < all_background
