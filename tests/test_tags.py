"""Image-level tags: tags files (CSV, JSON), tags derived from masks, tags on the training samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from semiseg.config import load_config
from semiseg.data.datasets import Sample
from semiseg.data.tags import (TagSource, build_tag_source, read_tags_file, resolve_background,
                               tags_from_mask)
from semiseg.errors import ConfigError, DataError
from semiseg.methods.cce import tags_from_labels

NAMES = ["background", "car", "road", "traffic light"]


def test_csv_names_indices_header_and_separators(tmp_path):
    f = tmp_path / "tags.csv"
    f.write_text("image,tags\n"
                 "train/a.png,car;road\n"
                 "b,2,Traffic Light\n"
                 "./c.jpg,1|3\n"
                 "d,\n")
    entries = read_tags_file(f, NAMES)
    assert entries == {"train/a.png": [1, 2], "b": [2, 3], "c.jpg": [1, 3], "d": []}


def test_json_dict_and_list(tmp_path):
    f = tmp_path / "tags.json"
    f.write_text(json.dumps({"a": ["car", 2], "b": "road;traffic light"}))
    assert read_tags_file(f, NAMES) == {"a": [1, 2], "b": [2, 3]}
    g = tmp_path / "list.json"
    g.write_text(json.dumps([{"image": "x/a.png", "tags": [3]}, {"id": "b", "tags": []}]))
    assert read_tags_file(g, NAMES) == {"x/a.png": [3], "b": []}


@pytest.mark.parametrize("content, suffix, needle", [
    ("a,car\nb,bus\n", ".csv", "entry 'b': unknown class 'bus'"),
    ("a,7\n", ".csv", "entry 'a': class index 7 is out of range"),
    ('{"img1": ["car", "plane"]}', ".json", "entry 'img1': unknown class 'plane'"),
])
def test_unknown_class_is_one_line_error_naming_file_and_entry(tmp_path, content, suffix, needle):
    f = tmp_path / f"my_tags{suffix}"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        read_tags_file(f, NAMES)
    msg = str(e.value)
    assert needle in msg and str(f) in msg and "\n" not in msg


def test_tags_from_mask_min_pixels_background_and_ignore():
    mask = np.array([[1, 1, 1, 2],
                     [2, 255, 255, 255],
                     [3, 3, 3, 3]])
    assert tags_from_mask(mask, 4, background=None).tolist() == [False, True, True, True]
    assert tags_from_mask(mask, 4, background=None, min_pixels=3).tolist() == [False, True, False, True]
    assert tags_from_mask(mask, 4, background=0, min_pixels=4).tolist() == [True, False, False, True]
    # the tensor helper agrees with the numpy one
    t = tags_from_labels(torch.from_numpy(mask)[None], 4, 255, background=0, min_pixels=3)
    assert t[0].tolist() == tags_from_mask(mask, 4, background=0, min_pixels=3).tolist()


def test_resolve_background():
    cfg = load_config(None, ["data.dataset=camvid"]).data
    assert resolve_background(cfg, ["sky", "building"]) is None  # auto, CamVid: no background
    assert resolve_background(cfg, ["background", "car"]) == 0
    assert resolve_background(load_config(None, ["data.background_class=null"]).data, ["background"]) is None
    assert resolve_background(load_config(None, ["data.background_class=1"]).data, ["a", "b"]) == 1
    with pytest.raises(ConfigError):
        load_config(None, ["data.tags_min_pixels=0"])


def test_tag_source_lookup_by_path_id_and_mask_fallback(tmp_path):
    from PIL import Image

    root = tmp_path / "root"
    (root / "train").mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (4, 4)).save(root / "train" / f"{name}.png")
    Image.fromarray(np.full((4, 4), 2, dtype=np.uint8)).save(root / "c_mask.png")
    src = TagSource(4, NAMES, background=0, entries={"train/a.png": [1], "b": [3]}, root=root, source="f.csv")
    assert src.for_sample(Sample("a", root / "train" / "a.png")).tolist() == [True, True, False, False]
    assert src.for_sample(Sample("b", root / "train" / "b.png")).tolist() == [True, False, False, True]
    with_mask = Sample("c", root / "train" / "c.png", root / "c_mask.png")
    assert src.for_sample(with_mask).tolist() == [True, False, True, False]
    with pytest.raises(DataError, match="no entry in tags file f.csv"):
        src.for_sample(Sample("d", root / "train" / "d.png"))


def test_train_sets_carry_tags(make_folder_dataset, tmp_path):
    from semiseg.data.build import build_train_sets

    root = make_folder_dataset(n=6, size=(16, 16), num_classes=3, unlabeled=2)
    (root / "tags.csv").write_text("unlabeled/u000.png,class_1\nu001,2\n")
    cfg = load_config(None, ["data.dataset=folder", f"data.root={root}", "data.num_classes=3", "data.crop_size=16",
                             "data.tags=tags.csv", "data.background_class=0"])
    sets = build_train_sets(cfg, num_strong=0, with_unlabeled=True)
    by_id = {sets.unlabeled.samples[i].id: sets.unlabeled[i]["tags"].tolist() for i in range(2)}
    assert by_id == {"u000": [1.0, 1.0, 0.0], "u001": [1.0, 0.0, 1.0]}
    item = sets.labeled[0]
    assert item["tags"].dtype == torch.float32 and item["tags"].shape == (3,)
    from semiseg.data.io import read_mask

    sample = sets.labeled.samples[0]
    assert item["tags"].bool().tolist() == tags_from_mask(read_mask(sample.mask), 3, 0).tolist()
    # no data.tags: no tags key, and a missing tags file is one clear error
    plain = build_train_sets(load_config(cfg, ["data.tags=null"]), 0, True)
    assert "tags" not in plain.labeled[0] and "tags" not in plain.unlabeled[0]
    with pytest.raises(DataError, match="tags file nope.csv not found"):
        build_tag_source(load_config(cfg, ["data.tags=nope.csv"]).data)
