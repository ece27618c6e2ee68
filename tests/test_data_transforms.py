"""Augmentations keep images and masks aligned, pad with the ignore label, and draw CutMix boxes
with UniMatch's statistics."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from semiseg.data import IGNORE_INDEX
from semiseg.data.transforms import (base_resize, blur, class_point, crop, cutmix_box, cutout, hflip, normalize,
                                     resize_scale, strong_photometric)

FAST = settings(max_examples=40, deadline=None)


def coordinate_pair(w: int, h: int):
    """Image with R = x, G = y, B = 255 (never the black padding) and mask = (x + 2y) % 200."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx, yy, np.full_like(xx, 255)], -1).astype(np.uint8)
    return Image.fromarray(rgb), Image.fromarray(((xx + 2 * yy) % 200).astype(np.uint8))


def block_pair(w: int, h: int, block: int = 12):
    """Piecewise-constant image whose colour encodes the mask's label: label b -> R = 3b, G = 255 - 3b."""
    yy, xx = np.mgrid[0:h, 0:w]
    label = (yy // block) * 8 + xx // block  # < 64 for sizes up to 96
    rgb = np.stack([3 * label, 255 - 3 * label, np.full_like(label, 100)], -1).astype(np.uint8)
    return Image.fromarray(rgb), Image.fromarray(label.astype(np.uint8))


def uniform_interior(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood in ``mask`` has one value: away from label edges and
    from the border (where a crop may have cut a label edge off)."""
    h, w = mask.shape
    padded = np.pad(mask.astype(int), radius, constant_values=-1)
    same = np.ones_like(mask, bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy:dy + h, dx:dx + w] == mask
    return same


@FAST
@given(w=st.integers(4, 48), h=st.integers(4, 48), size=st.integers(8, 40), flip=st.booleans(),
       seed=st.integers(0, 2**16))
def test_crop_and_flip_move_image_and_mask_together(w, h, size, flip, seed):
    img, mask = coordinate_pair(w, h)
    random.seed(seed)
    img, mask = crop(img, mask, size)
    img, mask = hflip(img, mask, p=1.0 if flip else 0.0)
    rgb, m = np.asarray(img).astype(int), np.asarray(mask).astype(int)
    assert rgb.shape == (size, size, 3) and m.shape == (size, size)
    padded = rgb.sum(-1) == 0
    assert np.array_equal(padded, m == IGNORE_INDEX)
    assert np.array_equal(m[~padded], ((rgb[..., 0] + 2 * rgb[..., 1]) % 200)[~padded])


@FAST
@given(w=st.integers(4, 48), h=st.integers(4, 48), size=st.integers(8, 40), fx=st.floats(0, 1, exclude_max=True),
       fy=st.floats(0, 1, exclude_max=True), seed=st.integers(0, 2**16))
def test_crop_covering_a_pixel_contains_it_and_moves_image_and_mask_together(w, h, size, fx, fy, seed):
    img, mask = coordinate_pair(w, h)
    cx, cy = int(fx * w), int(fy * h)
    random.seed(seed)
    img, mask = crop(img, mask, size, cover=(cx, cy))
    rgb, m = np.asarray(img).astype(int), np.asarray(mask).astype(int)
    assert rgb.shape == (size, size, 3) and m.shape == (size, size)
    padded = rgb.sum(-1) == 0
    assert np.array_equal(padded, m == IGNORE_INDEX)
    assert np.array_equal(m[~padded], ((rgb[..., 0] + 2 * rgb[..., 1]) % 200)[~padded])
    assert ((rgb[..., 0] == cx) & (rgb[..., 1] == cy) & ~padded).sum() == 1  # the pixel is in the crop


def test_crop_covering_a_pixel_draws_every_position_that_contains_it():
    img, mask = coordinate_pair(40, 30)
    corners = set()
    for seed in range(400):
        random.seed(seed)
        out, _ = crop(img, mask, 16, cover=(20, 3))
        corners.add(tuple(int(v) for v in np.asarray(out)[0, 0, :2]))  # the crop's top-left (x, y)
    assert corners == {(x, y) for x in range(5, 21) for y in range(0, 4)}


def test_class_point_draws_a_class_uniformly_then_one_of_its_pixels():
    labels = np.zeros((40, 40), np.uint8)
    labels[30:32, 5:7] = 5  # 4 pixels of a rare class beside 1000-odd of class 0
    labels[:10] = IGNORE_INDEX
    mask = Image.fromarray(labels)
    drawn = []
    for seed in range(600):
        random.seed(seed)
        x, y = class_point(mask)
        drawn.append(labels[y, x])
    assert IGNORE_INDEX not in drawn
    assert 240 <= drawn.count(5) <= 360 and drawn.count(0) == 600 - drawn.count(5)
    assert class_point(Image.fromarray(np.full((8, 8), IGNORE_INDEX, np.uint8))) is None


@FAST
@given(w=st.integers(24, 96), h=st.integers(24, 96), lo=st.floats(0.5, 1.0), hi=st.floats(1.0, 2.0),
       size=st.integers(16, 64), seed=st.integers(0, 2**16))
def test_rescale_crop_flip_keep_labels_on_their_pixels(w, h, lo, hi, size, seed):
    img, mask = block_pair(w, h)
    random.seed(seed)
    img, mask = resize_scale(img, mask, (lo, hi))
    img, mask = crop(img, mask, size)
    img, mask = hflip(img, mask)
    rgb, m = np.asarray(img).astype(int), np.asarray(mask).astype(int)
    padded = m == IGNORE_INDEX
    assert np.array_equal(padded, rgb.sum(-1) == 0)
    inside = uniform_interior(m) & ~padded
    assert inside.any()
    # Away from label edges bilinear (image) and nearest (mask) agree exactly.
    assert np.array_equal(rgb[..., 0][inside], 3 * m[inside])
    assert np.array_equal(rgb[..., 1][inside], 255 - 3 * m[inside])


@FAST
@given(w=st.integers(8, 200), h=st.integers(8, 200), lo=st.floats(0.3, 1.0), hi=st.floats(1.0, 2.5),
       seed=st.integers(0, 2**16))
def test_resize_scale_long_side_in_range_and_aspect_kept(w, h, lo, hi, seed):
    img, mask = block_pair(w, h)
    random.seed(seed)
    out, out_mask = resize_scale(img, mask, (lo, hi))
    ow, oh = out.size
    assert out_mask.size == out.size
    long_in, long_out = max(w, h), max(ow, oh)
    assert int(long_in * lo) <= long_out <= int(long_in * hi)
    assert abs(ow / max(oh, 1) - w / h) <= (w / h) / min(ow, oh) + 1e-9  # short side rounded
    assert set(np.unique(np.asarray(out_mask))) <= set(np.unique(np.asarray(mask)))  # nearest: no new labels


def test_crop_pads_right_and_bottom_with_ignore():
    img, mask = coordinate_pair(10, 6)
    random.seed(0)
    img, mask = crop(img, mask, 16)
    m, rgb = np.asarray(mask), np.asarray(img)
    assert (m[:6, :10] != IGNORE_INDEX).all() and (m[6:, :] == IGNORE_INDEX).all() and (m[:, 10:] == IGNORE_INDEX).all()
    assert (rgb[6:] == 0).all() and (rgb[:, 10:] == 0).all()
    # Unlabelled images pad a blank mask the same way: the result is the ignore mask.
    img, blank = coordinate_pair(10, 6)[0], Image.new("L", (10, 6), 0)
    _, ignore = crop(img, blank, 16)
    assert (np.asarray(ignore) == 255).sum() == 16 * 16 - 60 and set(np.unique(np.asarray(ignore))) == {0, 255}


def test_base_resize_to_fixed_size_and_nearest_mask():
    img, mask = block_pair(48, 36)
    out, out_mask = base_resize(img, mask, (24, 18))
    assert out.size == (24, 18) and out_mask.size == (24, 18)
    assert set(np.unique(np.asarray(out_mask))) <= set(np.unique(np.asarray(mask)))
    assert base_resize(img, None, (24, 18))[1] is None
    same, same_mask = base_resize(img, mask, None)
    assert same is img and same_mask is mask


def test_normalize_values_and_types():
    img = Image.fromarray(np.full((4, 5, 3), 255, np.uint8))
    mask = Image.fromarray(np.full((4, 5), 7, np.uint8))
    x, y = normalize(img, mask, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    assert x.dtype == torch.float32 and x.shape == (3, 4, 5)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 2.0, 0.5]))
    assert y.dtype == torch.long and y.shape == (4, 5) and (y == 7).all()
    assert normalize(img)[1] is None


def test_hflip_probability():
    img, mask = coordinate_pair(8, 4)
    random.seed(1)
    flips = sum(np.asarray(hflip(img, mask)[0])[0, 0, 0] == 7 for _ in range(2000))
    assert 900 < flips < 1100


def test_strong_photometric_keeps_geometry_and_blur_is_optional():
    img, _ = block_pair(32, 32)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    views = [strong_photometric(img) for _ in range(20)]
    assert all(v.size == img.size and v.mode == "RGB" for v in views)
    assert any(not np.array_equal(np.asarray(v), np.asarray(img)) for v in views)
    assert blur(img, p=0.0) is img


def test_strong_photometric_keys_default_to_unimatch_and_each_can_be_switched_off():
    from PIL import ImageFilter

    from semiseg.config import DataConfig
    from semiseg.errors import ConfigError

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))

    def views(cfg, n=12):
        random.seed(3), np.random.seed(3), torch.manual_seed(3)
        return [np.asarray(strong_photometric(img, cfg)) for _ in range(n)]

    assert all(np.array_equal(a, b) for a, b in zip(views(None), views(DataConfig())))  # the same draws
    assert all(np.array_equal(v, np.asarray(img)) for v in views(
        DataConfig(strong_jitter_p=0, strong_grayscale_p=0, strong_blur_p=0)))
    gray = views(DataConfig(strong_jitter_p=0, strong_grayscale_p=1, strong_blur_p=0), n=3)
    assert all((v[..., 0] == v[..., 1]).all() and (v[..., 1] == v[..., 2]).all() for v in gray)
    blurred = views(DataConfig(strong_jitter_p=0, strong_grayscale_p=0, strong_blur_p=1,
                               strong_blur_sigma=(1.5, 1.5)), n=2)
    expected = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=1.5)))
    assert all(np.array_equal(v, expected) for v in blurred)
    with pytest.raises(ConfigError, match=r"data.strong_blur_sigma.*expected 0 < min <= max, got \[2.0, 1.0\]"):
        from semiseg.config import load_config

        load_config(None, ["data.strong_blur_sigma=[2.0,1.0]"])


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_cutmix_box_statistics(p):
    size, n = 64, 1500
    random.seed(0), np.random.seed(0)
    boxes = [cutmix_box(size, p=p) for _ in range(n)]
    assert all(b.shape == (size, size) and b.dtype == torch.long and set(b.unique().tolist()) <= {0, 1}
               for b in boxes)
    used = [b for b in boxes if b.any()]
    assert abs(len(used) / n - p) < 0.05
    areas = []
    for b in used:
        rows, cols = b.any(1).nonzero().flatten(), b.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        # one solid rectangle, inside the image
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w and b.sum() == h * w
        areas.append(h * w / size**2)
        assert 0.01 <= areas[-1] <= 0.4
        assert 0.3 * 0.7 <= h / w <= (1 / 0.3) / 0.7  # aspect U(0.3, 1/0.3), sides truncated
    if used:
        assert 0.16 < np.mean(areas) < 0.22  # E[U(0.02, 0.4)] = 0.21, minus truncation


def test_cutout_erases_one_rectangle_and_ignores_its_labels():
    """ST++'s cutout: the noise-filled pixels are exactly the ignored ones, one solid rectangle
    of 2-40% of the image; with probability 1 - p nothing changes."""
    random.seed(0), np.random.seed(0)
    img = Image.fromarray(np.full((30, 40, 3), 7, np.uint8))
    mask = Image.fromarray(np.full((30, 40), 1, np.uint8))
    used = 0
    for _ in range(300):
        out, out_mask = cutout(img, mask, p=0.5)
        pixels, labels = np.array(out), np.array(out_mask)
        ignored = labels == IGNORE_INDEX
        assert set(np.unique(labels).tolist()) <= {1, IGNORE_INDEX}
        if not ignored.any():
            assert out is img and out_mask is mask
            continue
        used += 1
        assert np.array_equal((pixels != 7).any(-1) | ignored, ignored)  # noise only inside the box
        assert (pixels[ignored] != 7).mean() > 0.9  # uniform noise rarely hits the old value
        rows, cols = ignored.any(1).nonzero()[0], ignored.any(0).nonzero()[0]
        assert ignored.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert 0.01 <= ignored.mean() <= 0.4
    assert 120 <= used <= 180
    assert np.array(img).max() == 7 and np.array(mask).max() == 1  # the inputs are not written to
