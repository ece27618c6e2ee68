"""A folder dataset loses nothing silently: a JPEG mask, a mask without an image and a name in
both images/ and unlabeled/ are errors for training and problems for ``check-data``, which also
says what it found (labelled, unlabelled and val images, and how val was chosen) and, for a
stray mask value, when to set ``data.ignore_index``. macOS ``._NAME`` files are not images; an
EXIF-rotated photo is reported as such."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_png
from PIL import Image

from semiseg.cli import main
from semiseg.config import load_config
from semiseg.data.datasets import list_samples
from semiseg.data.io import read_mask
from semiseg.errors import DataError


def folder(root, *extra) -> list[str]:
    return ["--set", "data.dataset=folder", "--set", f"data.root={root}", "--set", "data.num_classes=3",
            "--set", "data.labeled=null", *sum((["--set", e] for e in extra), [])]


def check_data(capsys, root, *extra) -> tuple[int, list[str], str]:
    capsys.readouterr()
    rc = main(["check-data", "synthetic", *folder(root, *extra)])
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err


def train_split(root):
    cfg = load_config("synthetic", [x for x in folder(root) if x != "--set"])
    return list_samples(cfg.data, "train")


def test_check_data_says_what_it_found_and_how_val_was_chosen(make_folder_dataset, capsys):
    root = make_folder_dataset(n=12, unlabeled=3)
    rc, lines, _ = check_data(capsys, root)
    assert rc == 0 and lines[-1] == "no problems found"
    assert lines[1].startswith("train: 10 labelled + 3 unlabelled images")
    assert lines[2].startswith("val: 2 images (every 10th image of images/ with a mask, sorted by name")
    # with list files: what they list, and the images they leave out
    (root / "train.txt").write_text("".join(f"images/img{i:03d}.png\n" for i in range(2, 12)) + "unlabeled/u000.png\n")
    (root / "val.txt").write_text("images/img000.png\nimages/img001.png\n")
    rc, lines, _ = check_data(capsys, root)
    assert lines[1].startswith("train: 10 labelled + 1 unlabelled images (listed in")
    assert lines[2].startswith(f"val: 2 images (listed in {root / 'val.txt'}")
    assert lines[3].startswith("note: 2 images of images/ and unlabeled/ are in neither train.txt nor val.txt")
    assert "u001.png" in lines[3]


@pytest.mark.parametrize("make_problem,fragments", [
    (lambda root: (root / "masks" / "img003.png").rename(root / "masks" / "img003.jpg"),
     ["img003.jpg", "JPEG"]),
    (lambda root: write_png(root / "masks" / "ghost.png", np.zeros((16, 24), np.uint8)),
     ["ghost.png", "has no image"]),
    (lambda root: write_png(root / "unlabeled" / "img004.png", np.zeros((16, 24, 3), np.uint8)),
     ["unlabeled/img004.png", "img004.png", "same name"]),
    (lambda root: write_png(root / "images" / "img005.jpg", np.zeros((16, 24, 3), np.uint8)),
     ["img005.jpg", "img005.png", "same name"]),
])
def test_files_that_would_be_lost_silently_are_flagged(make_folder_dataset, capsys, make_problem, fragments):
    root = make_folder_dataset(n=12, unlabeled=2)
    make_problem(root)
    rc, lines, err = check_data(capsys, root)
    assert rc == 1 and "1 problem(s) found" in err
    flagged = [x for x in lines if all(f in x for f in fragments)]
    assert len(flagged) == 1, lines
    with pytest.raises(DataError) as e:  # and training refuses to start, naming the file
        train_split(root)
    assert all(f in str(e.value) for f in fragments) and "check-data" in str(e.value)


def test_a_jpeg_mask_is_refused_wherever_it_is_named(tmp_path):
    path = tmp_path / "mask.jpg"
    Image.fromarray(np.ones((8, 8), np.uint8)).save(path)
    with pytest.raises(DataError, match=r"mask .*mask\.jpg is a JPEG"):
        read_mask(path)


def test_macos_resource_files_are_not_images(make_folder_dataset, capsys):
    root = make_folder_dataset(n=12)
    for folder_name in ("images", "masks"):
        (root / folder_name / "._img000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "images" / ".DS_Store").write_bytes(b"\x00")
    rc, lines, _ = check_data(capsys, root)
    assert rc == 0, lines
    assert lines[1].startswith("train: 10 labelled") and lines[2].startswith("val: 2 images")
    assert not [s for s in train_split(root) if s.image.name.startswith(".")]


def test_exif_rotation_is_named_as_the_cause_of_a_size_mismatch(make_folder_dataset, capsys):
    root = make_folder_dataset(n=12)
    photo = Image.fromarray(np.zeros((16, 24, 3), np.uint8))  # stored 24x16, like its mask
    exif = photo.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 16x24
    (root / "images" / "img003.png").unlink()
    photo.save(root / "images" / "img003.jpg", exif=exif)
    rc, lines, _ = check_data(capsys, root)
    flagged = [x for x in lines if "img003.jpg" in x]
    assert rc == 1 and len(flagged) == 1
    assert "EXIF orientation" in flagged[0] and "rotated 90 degrees clockwise" in flagged[0]
    assert "16x24 as shown" in flagged[0] and "img003.png is 24x16" in flagged[0]


def test_a_stray_mask_value_gets_one_hint_and_repeats_are_summarised(make_folder_dataset, capsys):
    root = make_folder_dataset(n=12, void=True)
    for mask in sorted((root / "masks").iterdir()):  # CamVid-like: void stored as 3, not 255
        values = np.array(Image.open(mask))
        values[values == 255] = 3
        Image.fromarray(values).save(mask)
    rc, lines, err = check_data(capsys, root)
    assert rc == 1 and "12 problem(s) found" in err
    problems = [x for x in lines if "has values [3]" in x]
    assert len(problems) == 3  # three shown, then one line for the other nine
    assert "... and 9 more like these (--all lists every one)" in lines
    assert lines[-1].startswith("hint: 12 mask(s) hold the value 3") and "set data.ignore_index=3" in lines[-1]
    rc, lines, _ = check_data(capsys, root, "data.ignore_index=3")
    assert rc == 0 and lines[-1] == "no problems found"
    capsys.readouterr()
    main(["check-data", "synthetic", *folder(root), "--all"])
    assert capsys.readouterr().out.count("has values [3]") == 12
