"""Split files (both line formats, paths confined to the root) and labelled/unlabelled partitions."""

import numpy as np
import pytest
from conftest import write_png

from semiseg.config import DataConfig
from semiseg.data.datasets import list_samples, read_split_file
from semiseg.data.splits import make_split, present_classes, resolve_labeled, write_split
from semiseg.errors import ConfigError, DataError


def names(samples):
    return [s.id for s in samples]


# ------------------------------------------------------------------------------ split files
def test_split_file_accepts_pairs_ids_and_image_paths(make_folder_dataset, folder_config, tmp_path):
    root = make_folder_dataset(n=6, unlabeled=2)
    split = tmp_path / "mixed.txt"
    split.write_text("# a comment\n"
                     "images/img000.png masks/img000.png\n"
                     "\n"
                     "img001\n"                   # bare id: resolved by the folder layout
                     "images/img002.png\n"        # image path: mask found by the layout rule
                     "u001\n"                     # an unlabelled image: no mask
                     f"{root}/images/img003.png {root}/masks/img003.png\n")  # absolute, inside the root
    samples = read_split_file(split, folder_config(root))
    assert names(samples) == ["img000", "img001", "img002", "u001", "img003"]
    assert [s.mask.name if s.mask else None for s in samples] == ["img000.png", "img001.png", "img002.png", None,
                                                                  "img003.png"]
    assert all(s.image.is_file() for s in samples)
    assert samples[0].label_map is not None  # masks will be decoded with the dataset's classes
    # With a bare root the same file reads the same images.
    assert names(read_split_file(split, root)) == names(samples)


@pytest.mark.parametrize("line", ["../outside.png masks/img000.png", "images/../../outside.png",
                                  "images/img000.png ../masks/img000.png", "/etc/passwd"])
def test_split_file_rejects_paths_outside_the_root(make_folder_dataset, tmp_path, line):
    root = make_folder_dataset(n=3)
    split = tmp_path / "bad.txt"
    split.write_text("images/img000.png masks/img000.png\n\n" + line + "\n")
    with pytest.raises(DataError) as err:
        read_split_file(split, root)
    msg = str(err.value)
    assert str(split) in msg and "line 3" in msg and "outside the dataset root" in msg and "\n" not in msg


@pytest.mark.parametrize("text,expected", [
    ("images/img000.png masks/img000.png extra\n", "line 1: expected 'IMAGE MASK' or one id, got 3 fields"),
    ("images/missing.png masks/img000.png\n", "line 1: image"),
    ("nosuchid\n", "line 1: no image with id 'nosuchid'"),
    ("# only a comment\n", "lists no images"),
])
def test_split_file_errors_name_the_file_and_line(make_folder_dataset, tmp_path, text, expected):
    root = make_folder_dataset(n=3)
    split = tmp_path / "bad.txt"
    split.write_text(text)
    with pytest.raises(DataError, match=expected) as err:
        read_split_file(split, root)
    assert str(split) in str(err.value)


def test_split_file_is_found_under_the_root_first(make_folder_dataset, tmp_path, monkeypatch):
    root = make_folder_dataset(n=3)
    (root / "splits").mkdir()
    (root / "splits" / "l.txt").write_text("img000\n")
    monkeypatch.chdir(tmp_path)
    assert names(read_split_file("splits/l.txt", root)) == ["img000"]
    (tmp_path / "cwd.txt").write_text("img001\n")
    assert names(read_split_file("cwd.txt", root)) == ["img001"]
    with pytest.raises(DataError, match="split file nothere.txt not found"):
        read_split_file("nothere.txt", root)


def make_pascal(root, ids, aug=True):
    rng = np.random.default_rng(0)
    for i in ids:
        write_png(root / "JPEGImages" / f"{i}.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).rename(
            root / "JPEGImages" / f"{i}.jpg")
        write_png(root / "SegmentationClass" / f"{i}.png", np.zeros((8, 8), np.uint8))
        if aug:
            write_png(root / "SegmentationClassAug" / f"{i}.png", np.ones((8, 8), np.uint8))
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


def test_pascal_ids_resolve_to_jpeg_and_prefer_augmented_masks(tmp_path):
    root = make_pascal(tmp_path / "VOC2012", ["2007_000032", "2007_000039"])
    cfg = DataConfig(dataset="pascal", root=str(root))
    (tmp_path / "labeled.txt").write_text("2007_000039\n"
                                          "JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png\n")
    samples = read_split_file(tmp_path / "labeled.txt", cfg)
    assert [s.image.name for s in samples] == ["2007_000039.jpg", "2007_000032.jpg"]
    assert samples[0].mask.parent.name == "SegmentationClassAug"  # id line: SBD masks preferred
    assert samples[1].mask.parent.name == "SegmentationClass"  # explicit pair: taken as written
    assert names(list_samples(cfg, "train")) == ["2007_000032", "2007_000039"]
    plain = make_pascal(tmp_path / "plain", ["2008_000001"], aug=False)
    (sample,) = list_samples(DataConfig(dataset="pascal", root=str(plain)), "train")
    assert sample.mask.parent.name == "SegmentationClass"  # no SBD masks: the VOC ones


# ------------------------------------------------------------------------------ partitions
def test_resolve_labeled_by_count_is_seeded_and_nested(make_folder_dataset, folder_config):
    root = make_folder_dataset(n=40)
    cfg = folder_config(root, labeled=8, split_seed=3)
    train = list_samples(cfg, "train")  # 36 after the val holdout
    labeled, unlabeled = resolve_labeled(cfg, train)
    assert len(labeled) == 8 and len(unlabeled) == len(train) - 8
    assert set(names(labeled)).isdisjoint(names(unlabeled))
    assert names(resolve_labeled(cfg, train)[0]) == names(labeled)  # deterministic
    other = resolve_labeled(folder_config(root, labeled=8, split_seed=4), train)[0]
    assert names(other) != names(labeled)
    fewer = resolve_labeled(folder_config(root, labeled=4, split_seed=3), train)[0]
    assert set(names(fewer)) <= set(names(labeled))  # same seed: smaller splits are nested


def test_resolve_labeled_by_fraction_rounds(make_folder_dataset, folder_config):
    root = make_folder_dataset(n=12, lists=True)  # train.txt has 10 images
    cfg = folder_config(root, labeled="1/4")
    labeled, unlabeled = resolve_labeled(cfg, list_samples(cfg, "train"))
    assert len(labeled) == round(10 / 4) and len(unlabeled) == 10 - len(labeled)


def test_resolve_labeled_count_too_large_is_a_config_error(make_folder_dataset, folder_config):
    root = make_folder_dataset(n=12, lists=True)
    cfg = folder_config(root, labeled=11)
    with pytest.raises(ConfigError, match="data.labeled.*11.*only 10"):
        resolve_labeled(cfg, list_samples(cfg, "train"))


def test_resolve_labeled_from_split_files(make_folder_dataset, folder_config):
    root = make_folder_dataset(n=12, lists=True)
    (root / "l.txt").write_text("images/img003.png masks/img003.png\nimg005\n")
    (root / "u.txt").write_text("img001\nimages/img002.png masks/img002.png\n")
    cfg = folder_config(root, labeled="l.txt")
    labeled, unlabeled = resolve_labeled(cfg, list_samples(cfg, "train"))
    assert names(labeled) == ["img003", "img005"]
    assert len(unlabeled) == 8 and not {"img003", "img005"} & set(names(unlabeled))  # the rest of train
    cfg = folder_config(root, labeled="l.txt", unlabeled="u.txt")
    assert names(resolve_labeled(cfg, list_samples(cfg, "train"))[1]) == ["img001", "img002"]


def test_resolve_labeled_none_uses_every_mask_and_unlabeled_folder(make_folder_dataset, folder_config):
    root = make_folder_dataset(n=10, unlabeled=3)
    cfg = folder_config(root)
    labeled, unlabeled = resolve_labeled(cfg, list_samples(cfg, "train"))
    assert len(labeled) == 9 and all(s.mask for s in labeled)
    assert names(unlabeled) == ["u000", "u001", "u002"]


def test_labelled_split_without_masks_is_an_error(make_folder_dataset, folder_config):
    root = make_folder_dataset(n=4, unlabeled=2)
    (root / "l.txt").write_text("u000\n")
    cfg = folder_config(root, labeled="l.txt")
    with pytest.raises(DataError, match="u000.png has no mask"):
        resolve_labeled(cfg, list_samples(cfg, "train"))


def rare_class_dataset(make_folder_dataset, folder_config):
    """20 images of classes {0, 1}; classes 2, 3 and 4 each occur in exactly one image."""
    root = make_folder_dataset(n=20, num_classes=2, lists=True)
    for image_index, cls in ((4, 2), (11, 3), (16, 4)):
        mask = np.zeros((16, 24), np.uint8)
        mask[:4, :4] = cls
        write_png(root / "masks" / f"img{image_index:03d}.png", mask)
    (root / "train.txt").write_text("".join(f"images/img{i:03d}.png masks/img{i:03d}.png\n" for i in range(20)))
    cfg = folder_config(root, num_classes=5)
    return cfg, list_samples(cfg, "train")


@pytest.mark.parametrize("seed", range(5))
def test_balanced_split_covers_every_class(make_folder_dataset, folder_config, seed):
    cfg, samples = rare_class_dataset(make_folder_dataset, folder_config)
    labeled, unlabeled = make_split(samples, "4", seed=seed, balanced=True, num_classes=5)
    assert len(labeled) == 4 and len(unlabeled) == 16
    assert set().union(*(present_classes(s) for s in labeled)) == {0, 1, 2, 3, 4}
    plain = [make_split(samples, 4, seed=s)[0] for s in range(5)]  # unbalanced draws usually miss one
    assert any(set().union(*(present_classes(s) for s in lab)) != {0, 1, 2, 3, 4} for lab in plain)


def test_balanced_split_too_small_to_cover_is_a_config_error(make_folder_dataset, folder_config):
    _, samples = rare_class_dataset(make_folder_dataset, folder_config)
    with pytest.raises(ConfigError, match="3 images cannot show every class.*cover needs 4"):
        make_split(samples, 3, seed=0, balanced=True, num_classes=5)  # {0,2} {3} {4} and {1}


def test_write_split_round_trips(make_folder_dataset, folder_config, tmp_path):
    root = make_folder_dataset(n=10, unlabeled=2)
    cfg = folder_config(root)
    labeled, unlabeled = make_split(list_samples(cfg, "train"), "1/3", seed=1)
    lab_file, unl_file = write_split(tmp_path / "out", labeled, unlabeled, root)
    lines = unl_file.read_text().splitlines()
    assert "images/" in lines[0] and " masks/" in lines[0]  # unlabelled lines keep known masks
    assert lines[-1] == "unlabeled/u001.png"  # no mask known: one field
    assert read_split_file(lab_file, cfg) == labeled and read_split_file(unl_file, cfg) == unlabeled
