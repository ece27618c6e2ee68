"""CutMix and ClassMix: one mask mixes images and their targets; ClassMix picks half the classes."""

import pytest
import torch

from semiseg.data.mixing import classmix, classmix_mask, classmix_masks, cutmix


def test_cutmix_takes_b_inside_the_box_for_images_and_maps():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    box = torch.zeros(2, 8, 8, dtype=torch.long)
    box[0, 2:5, 1:7] = 1
    box[1, :, :4] = 1
    mixed = cutmix(a, b, box)
    inside = box.bool().unsqueeze(1).expand_as(a)
    assert torch.equal(mixed[inside], b[inside]) and torch.equal(mixed[~inside], a[~inside])

    label_a, label_b = torch.zeros(2, 8, 8, dtype=torch.long), torch.ones(2, 8, 8, dtype=torch.long)
    conf_a, conf_b = torch.full((2, 8, 8), 0.2), torch.full((2, 8, 8), 0.9)
    assert torch.equal(cutmix(label_a, label_b, box), box)
    assert torch.equal(cutmix(conf_a, conf_b, box) == 0.9, box.bool())
    # The same box on an image and its label: every pixel keeps its own label.
    image_label = torch.stack([label_a, label_b], 1).float()  # channel k holds source k's label
    mixed_image = cutmix(image_label[:, :1].expand(-1, 3, -1, -1), image_label[:, 1:].expand(-1, 3, -1, -1), box)
    assert torch.equal(mixed_image[:, 0].long(), cutmix(label_a, label_b, box))


@pytest.mark.parametrize("present,expected", [([3], 1), ([1, 4], 1), ([0, 1, 2], 2), ([0, 2, 5, 7], 2),
                                              ([1, 2, 3, 4, 5], 3)])
def test_classmix_mask_chooses_half_the_classes_rounded_up(present, expected):
    label = torch.tensor(present).repeat_interleave(4).view(-1, 4)
    for seed in range(10):
        mask = classmix_mask(label, generator=torch.Generator().manual_seed(seed))
        chosen = set(label[mask].tolist())
        assert len(chosen) == expected and chosen <= set(present)
        assert torch.equal(mask, torch.isin(label, torch.tensor(sorted(chosen))))  # whole classes


def test_classmix_mask_never_chooses_excluded_classes_and_varies():
    label = torch.tensor([[0, 0, 2, 2], [5, 5, 7, 7], [0, 2, 5, 7]])
    seen = set()
    for seed in range(30):
        mask = classmix_mask(label, exclude=[0], generator=torch.Generator().manual_seed(seed))
        chosen = set(label[mask].tolist())
        assert 0 not in chosen and len(chosen) == 2  # 3 candidates -> 2
        seen |= chosen
    assert seen == {2, 5, 7}
    assert not classmix_mask(torch.zeros(3, 3, dtype=torch.long), exclude=[0]).any()


def test_classmix_pastes_source_pixels_where_the_mask_is_set():
    source, target = torch.full((1, 3, 4, 4), 1.0), torch.zeros(1, 3, 4, 4)
    labels = torch.tensor([[[1, 1, 2, 2]] * 4])
    masks = classmix_masks(labels, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (1, 4, 4)
    mixed = classmix(source, target, masks)
    assert torch.equal(mixed[:, 0].bool(), masks)
    assert torch.equal(classmix(labels, torch.zeros_like(labels), masks), labels * masks)


def test_mix_with_next_takes_the_next_images_pixels_under_its_own_mask():
    from semiseg.data.mixing import mix_with_next

    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 2, 2).clone()  # image j is all j
    labels = torch.arange(3).view(3, 1, 1).expand(3, 2, 2).clone()
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    masks[1, 0, 0] = masks[0, 1, 1] = True  # image 1's mask: pixel (0, 0); image 0's: (1, 1)
    mixed_images, mixed_labels = mix_with_next([images, labels], masks)
    assert mixed_labels[0, 0, 0] == 1 and mixed_labels[0].sum() == 1  # image 0 gets image 1's pixel
    assert mixed_labels[2, 1, 1] == 0 and mixed_labels[2].sum() == 6  # image 2 gets image 0's (cyclic)
    assert torch.equal(mixed_labels[1], labels[1])  # image 2's mask is empty
    assert torch.equal(mixed_images[:, 0], mixed_labels.float())


def test_batch_normalisation_round_trip():
    from semiseg.data.batch_transforms import denormalize, gaussian_blur, normalize

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = torch.rand(2, 3, 5, 5)
    assert torch.allclose(normalize(denormalize(x, mean, std), mean, std), x, atol=1e-6)
    flat = torch.full((2, 3, 5, 5), 0.5)
    assert torch.allclose(gaussian_blur(flat, (0.1, 1.5), 23), flat)  # kernel shrunk to fit, constant kept
