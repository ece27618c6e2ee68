"""Dataset layouts: which files form each split, and how each dataset's masks become labels."""

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_png

from semiseg.config import DataConfig
from semiseg.data import IGNORE_INDEX
from semiseg.data.build import build_eval_set
from semiseg.data.datasets import dataset_info, list_samples, read_split_file
from semiseg.data.io import load_pair
from semiseg.data.splits import resolve_labeled
from semiseg.errors import ConfigError, DataError


def decoded(sample) -> np.ndarray:
    return np.asarray(load_pair(sample.image, sample.mask, sample.label_map)[1])


def image(path, h=4, w=6):
    return write_png(path, np.full((h, w, 3), 128, np.uint8))


# ------------------------------------------------------------------------------ folder
def test_folder_without_lists_holds_out_every_tenth_image(make_folder_dataset, folder_config):
    root = make_folder_dataset(n=25, unlabeled=2)
    image(root / "images" / "zz_nomask.png")
    cfg = folder_config(root)
    val = list_samples(cfg, "val")
    train = list_samples(cfg, "train")
    assert [s.id for s in val] == ["img000", "img010", "img020"]
    assert len(train) == 22 + 1 + 2 and not {s.id for s in val} & {s.id for s in train}
    assert [s.id for s in train if s.mask is None] == ["zz_nomask", "u000", "u001"]
    with pytest.raises(DataError, match="no test.txt list for split 'test'"):
        list_samples(cfg, "test")


def test_folder_with_lists_uses_them_and_needs_both(make_folder_dataset, folder_config):
    root = make_folder_dataset(n=12, lists=True)
    cfg = folder_config(root)
    assert len(list_samples(cfg, "train")) == 10 and len(list_samples(cfg, "val")) == 2
    (root / "val.txt").unlink()
    with pytest.raises(DataError, match="no val.txt.*found train.txt"):
        list_samples(cfg, "val")


def test_folder_void_value_and_info(make_folder_dataset, folder_config):
    root = make_folder_dataset(n=4, num_classes=3)
    write_png(root / "masks" / "img000.png", np.array([[0, 2, 9, 9]] * 16, np.uint8).repeat(6, 1))
    cfg = folder_config(root, ignore_index=9)
    sample = next(s for s in list_samples(cfg, "val") if s.id == "img000")
    assert set(np.unique(decoded(sample))) == {0, 2, IGNORE_INDEX}
    info = dataset_info(cfg)
    assert info.num_classes == 3 and info.class_names == ["class_0", "class_1", "class_2"]
    assert info.ignore_index == IGNORE_INDEX and len(info.palette) == 3
    assert dataset_info(folder_config(root, class_names=["a", "b", "c"])).class_names == ["a", "b", "c"]


@pytest.mark.parametrize("keys,message", [
    ({"num_classes": None}, "data.num_classes': dataset 'folder' needs"),
    ({"class_names": ["a"]}, "data.class_names': expected 3 names"),
    ({"ignore_index": 1}, "data.ignore_index': 1 is one of the 3 classes"),
])
def test_folder_config_errors(tmp_path, folder_config, keys, message):
    with pytest.raises(ConfigError, match=message):
        dataset_info(folder_config(tmp_path, **keys))


def test_missing_root_and_empty_split_are_data_errors(tmp_path, folder_config):
    with pytest.raises(DataError, match=f"data root {tmp_path / 'nope'} does not exist"):
        list_samples(folder_config(tmp_path / "nope"), "train")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "images").mkdir()
    with pytest.raises(DataError, match="split 'val' of the folder dataset .* has no images"):
        list_samples(folder_config(tmp_path / "empty"), "val")
    with pytest.raises(ConfigError, match="dataset 'camvid' needs data.root"):
        list_samples(DataConfig(dataset="camvid"), "train")


def test_eval_set_needs_masks(make_folder_dataset, folder_config):
    root = make_folder_dataset(n=4, unlabeled=1)
    (root / "test.txt").write_text("unlabeled/u000.png\n")
    with pytest.raises(DataError, match="u000.png of split 'test' has no mask"):
        build_eval_set(folder_config(root), "test")


# ------------------------------------------------------------------------------ public layouts
def test_camvid_layout_pairs_by_name_and_maps_void(tmp_path):
    root = tmp_path / "camvid"
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            image(root / split / f"{split}{i}.png")
            write_png(root / f"{split}annot" / f"{split}{i}.png", np.array([[0, 10, 11, 3, 3, 3]] * 4, np.uint8))
    image(root / "test" / "t0.png")  # no annotations: unlabelled
    cfg = DataConfig(dataset="camvid", root=str(root))
    train = list_samples(cfg, "train")
    assert [s.id for s in train] == ["train0", "train1", "train2"]
    assert decoded(train[0])[0].tolist() == [0, 10, IGNORE_INDEX, 3, 3, 3]
    assert list_samples(cfg, "test")[0].mask is None
    assert dataset_info(cfg).class_names[0] == "sky" and dataset_info(cfg).num_classes == 11
    (tmp_path / "ids.txt").write_text("train1\nval0\n")
    assert [s.mask.parent.name for s in read_split_file(tmp_path / "ids.txt", cfg)] == ["trainannot", "valannot"]
    with pytest.raises(ConfigError, match="dataset 'camvid' has 11 classes, got 12"):
        dataset_info(DataConfig(dataset="camvid", root=str(root), num_classes=12))


def test_cityscapes_label_ids_are_mapped_to_train_ids(tmp_path):
    root = tmp_path / "cityscapes"
    for name, city in (("aachen_000000_000019", "aachen"), ("bonn_000001_000019", "bonn")):
        image(root / "leftImg8bit" / "train" / city / f"{name}_leftImg8bit.png")
    gt = root / "gtFine" / "train"
    write_png(gt / "aachen" / "aachen_000000_000019_gtFine_labelIds.png",
              np.array([[7, 26, 33, 0, 1, 4]] * 4, np.uint8))
    write_png(gt / "bonn" / "bonn_000001_000019_gtFine_labelIds.png", np.full((4, 6), 40, np.uint8))
    write_png(gt / "bonn" / "bonn_000001_000019_gtFine_labelTrainIds.png",
              np.array([[0, 18, 255, 5, 5, 5]] * 4, np.uint8))
    cfg = DataConfig(dataset="cityscapes", root=str(root))
    a, b = list_samples(cfg, "train")
    assert decoded(a)[0].tolist() == [0, 13, 18, 255, 255, 255]  # road, car, bicycle, void x3
    assert b.mask.name.endswith("_labelTrainIds.png")  # preferred over labelIds
    assert decoded(b)[0].tolist() == [0, 18, 255, 5, 5, 5]
    (tmp_path / "ids.txt").write_text("bonn_000001_000019\n")
    assert read_split_file(tmp_path / "ids.txt", cfg)[0].image == b.image
    with pytest.raises(DataError, match="values \\[40\\]: expected a Cityscapes labelId"):
        load_pair(b.image, b.mask.with_name("bonn_000001_000019_gtFine_labelIds.png"), a.label_map)


def test_ade20k_shifts_classes_and_ignores_zero(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        image(root / "images" / split / f"ADE_{split}_1.png").rename(root / "images" / split / f"ADE_{split}_1.jpg")
        write_png(root / "annotations" / split / f"ADE_{split}_1.png", np.array([[0, 1, 150, 7, 7, 7]] * 4, np.uint8))
    cfg = DataConfig(dataset="ade20k", root=str(root))
    (sample,) = list_samples(cfg, "val")
    assert decoded(sample)[0].tolist() == [255, 0, 149, 6, 6, 6]
    assert dataset_info(cfg).num_classes == 150 and dataset_info(cfg).class_names[0] == "wall"


def test_coco_layout_and_unimatch_split_lines(tmp_path):
    root = tmp_path / "coco"
    image(root / "train2017" / "000000000009.png").rename(root / "train2017" / "000000000009.jpg")
    write_png(root / "masks" / "000000000009.png", np.array([[0, 80, 255, 1, 1, 1]] * 4, np.uint8))
    cfg = DataConfig(dataset="coco", root=str(root))
    (sample,) = list_samples(cfg, "train")
    assert decoded(sample)[0].tolist() == [0, 80, 255, 1, 1, 1]
    (tmp_path / "l.txt").write_text("train2017/000000000009.jpg masks/000000000009.png\n")
    assert read_split_file(tmp_path / "l.txt", cfg) == [sample]
    assert dataset_info(cfg).num_classes == 81


# ------------------------------------------------------------------------------ real CamVid
def camvid_root() -> Path:
    return Path(os.environ.get("SEMISEG_CAMVID") or Path(__file__).resolve().parents[2] / "shared/data/camvid")


@pytest.mark.camvid
def test_real_camvid_splits_and_labels():
    root = camvid_root()
    if not (root / "train.txt").is_file():
        pytest.skip(f"CamVid not found at {root} (set SEMISEG_CAMVID)")
    cfg = DataConfig(dataset="camvid", root=str(root), labeled="splits/1_8/labeled.txt",
                     unlabeled="splits/1_8/unlabeled.txt")
    train, val = list_samples(cfg, "train"), list_samples(cfg, "val")
    assert len(train) == 367 and len(val) == 101
    assert all(s.mask is not None for s in train + val)
    labels = set()
    for sample in train[::60] + val[::50]:
        labels |= set(np.unique(decoded(sample)).tolist())
    assert labels <= set(range(11)) | {IGNORE_INDEX} and IGNORE_INDEX in labels and len(labels) >= 10
    labeled, unlabeled = resolve_labeled(cfg, train)
    assert len(labeled) == 46 and len(unlabeled) == 321
    assert not {s.image for s in labeled} & {s.image for s in unlabeled}
