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


def test_rot90_flip_matches_numpy():
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    rng = random.Random(3)
    r = random.Random(3)
    k, axis = r.randrange(4), r.randrange(2)
    img, lab = A.random_rot_flip(a.astype(np.float32), a, rng)
    np.testing.assert_array_equal(lab, np.flip(np.rot90(a, k), axis=axis))
