"""Property-based checks of augmentation and mixing that the example-based tests
(``test_data_transforms.py``, ``test_data_mixing.py``) leave open: ignore regions of the
*source* mask survive crop/flip/rescale on the right pixels, CutMix boxes are one
in-bounds rectangle, and CutMix/ClassMix move images, labels and ignore maps with one mask
for arbitrary shapes and label maps."""

from __future__ import annotations

import random

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from semiseg.data import IGNORE_INDEX
from semiseg.data.mixing import classmix, classmix_mask, classmix_masks, cutmix
from semiseg.data.transforms import crop, cutmix_box, hflip, normalize, resize_scale

FAST = settings(max_examples=30, deadline=None)


def _coordinate_image(w, h):
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx, yy, np.full_like(xx, 255)], -1).astype(np.uint8))


@FAST
@given(w=st.integers(4, 40), h=st.integers(4, 40), size=st.integers(6, 32), flip=st.booleans(),
       box=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
       seed=st.integers(0, 2**16))
def test_ignore_region_of_the_source_mask_follows_its_pixels(w, h, size, flip, box, seed):
    """A mask with an ignore rectangle: after crop + flip, every non-padding output pixel holds
    the mask value of the source pixel its image colour names, ignore included."""
    x0, x1 = sorted((int(box[0] * w), int(box[1] * w)))
    y0, y1 = sorted((int(box[2] * h), int(box[3] * h)))
    yy, xx = np.mgrid[0:h, 0:w]
    src = ((xx + yy) % 7).astype(np.uint8)
    src[y0:y1, x0:x1] = IGNORE_INDEX
    random.seed(seed)
    img, mask = crop(_coordinate_image(w, h), Image.fromarray(src), size)
    img, mask = hflip(img, mask, p=1.0 if flip else 0.0)
    rgb, m = np.asarray(img).astype(int), np.asarray(mask).astype(int)
    real = rgb[..., 2] == 255  # padding is black
    assert np.array_equal(m[~real], np.full((~real).sum(), IGNORE_INDEX))
    assert np.array_equal(m[real], src[rgb[..., 1][real], rgb[..., 0][real]])
    assert (m[real] == IGNORE_INDEX).sum() == ((src == IGNORE_INDEX)[rgb[..., 1][real], rgb[..., 0][real]]).sum()


@FAST
@given(w=st.integers(8, 40), h=st.integers(8, 40), lo=st.floats(0.5, 1.0), hi=st.floats(1.0, 2.0),
       seed=st.integers(0, 2**16))
def test_rescale_never_invents_labels_and_keeps_ignore(w, h, lo, hi, seed):
    """Nearest-neighbour mask resizing: output values are a subset of the input's, and an
    all-ignore mask stays all-ignore (no interpolated values between a class and 255)."""
    rng = np.random.default_rng(seed)
    src = rng.choice(np.array([0, 3, IGNORE_INDEX], np.uint8), size=(h, w))
    random.seed(seed)
    _, mask = resize_scale(_coordinate_image(w, h), Image.fromarray(src), (lo, hi))
    assert set(np.unique(np.asarray(mask))) <= set(np.unique(src))
    _, mask = resize_scale(_coordinate_image(w, h), Image.fromarray(np.full((h, w), IGNORE_INDEX, np.uint8)),
                           (lo, hi))
    assert (np.asarray(mask) == IGNORE_INDEX).all()
    _, y = normalize(_coordinate_image(w, h), Image.fromarray(src))
    assert y.dtype == torch.long and torch.equal(y, torch.from_numpy(src.astype(np.int64)))


@FAST
@given(size=st.integers(4, 64), p=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_cutmix_box_is_one_rectangle_inside_the_image(size, p, seed):
    random.seed(seed)
    np.random.seed(seed)
    box = cutmix_box(size, p=p).numpy()
    assert box.shape == (size, size) and set(np.unique(box)) <= {0, 1}
    if p == 0.0:
        assert not box.any()
    ys, xs = np.nonzero(box)
    if len(ys):  # the ones fill exactly their bounding box
        assert box[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
        assert box.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)


labels = st.integers(1, 3).flatmap(lambda b: st.tuples(st.integers(2, 12), st.integers(2, 12)).flatmap(
    lambda hw: st.lists(st.sampled_from([0, 1, 2, 3, 4, IGNORE_INDEX]), min_size=b * hw[0] * hw[1],
                        max_size=b * hw[0] * hw[1]).map(lambda v: torch.tensor(v).view(b, *hw))))


@FAST
@given(label_a=labels, seed=st.integers(0, 2**16))
def test_cutmix_moves_image_label_and_ignore_together(label_a, seed):
    g = torch.Generator().manual_seed(seed)
    label_b = label_a[torch.randperm(label_a.shape[0], generator=g)].flip(-1)
    box = (torch.rand(label_a.shape, generator=g) < 0.5).long()
    # images whose channels encode their labels
    img_a, img_b = (lbl.float().unsqueeze(1).expand(-1, 3, -1, -1) for lbl in (label_a, label_b))
    mixed_img, mixed_lbl = cutmix(img_a, img_b, box), cutmix(label_a, label_b, box)
    for c in range(3):
        assert torch.equal(mixed_img[:, c].long(), mixed_lbl)
    ignore = cutmix(label_a == IGNORE_INDEX, label_b == IGNORE_INDEX, box)
    assert torch.equal(ignore, mixed_lbl == IGNORE_INDEX)
    assert torch.equal(mixed_lbl[box.bool()], label_b[box.bool()])
    assert torch.equal(mixed_lbl[~box.bool()], label_a[~box.bool()])


@FAST
@given(label=labels, exclude=st.sampled_from([(), (IGNORE_INDEX,), (0, IGNORE_INDEX)]), seed=st.integers(0, 2**16))
def test_classmix_masks_are_whole_classes_half_of_the_candidates(label, exclude, seed):
    g = torch.Generator().manual_seed(seed)
    masks = classmix_masks(label, exclude=exclude, generator=g)
    assert masks.shape == label.shape and masks.dtype == torch.bool
    for lbl, m in zip(label, masks):
        present = set(torch.unique(lbl).tolist())
        candidates = present - set(exclude)
        chosen = set(lbl[m].tolist())
        assert chosen <= candidates
        assert len(chosen) == (len(candidates) + 1) // 2
        assert torch.equal(m, torch.isin(lbl, torch.tensor(sorted(chosen), dtype=lbl.dtype)))
    # pasting: image and label use the same mask, so the pasted labels stay on their pixels
    target = torch.full_like(label, 1)
    src_img = label.float().unsqueeze(1).expand(-1, 3, -1, -1)
    tgt_img = target.float().unsqueeze(1).expand(-1, 3, -1, -1)
    mixed_lbl = classmix(label, target, masks)
    assert torch.equal(classmix(src_img, tgt_img, masks)[:, 0].long(), mixed_lbl)
    assert torch.equal(mixed_lbl[masks], label[masks]) and (mixed_lbl[~masks] == 1).all()


@FAST
@given(label=labels, seed=st.integers(0, 2**16))
def test_classmix_mask_is_reproducible_from_its_generator(label, seed):
    a = classmix_mask(label[0], generator=torch.Generator().manual_seed(seed))
    b = classmix_mask(label[0], generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a, b)
