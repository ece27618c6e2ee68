"""Per-file checks: bad files fail with one line naming the file; odd but valid files are read."""

import io

import numpy as np
import pytest
from conftest import write_png
from PIL import Image

from semiseg.config import DataConfig
from semiseg.data.build import check_dataset
from semiseg.data.io import LabelMap, load_pair, read_image, read_mask
from semiseg.errors import DataError

H, W = 6, 8
MAP3 = LabelMap.identity(3)  # classes 0..2, void 255


def png_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def rgb():
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def mask(value=1, shape=(H, W), dtype=np.uint8):
    return np.full(shape, value, dtype)


def checker(a, b):
    return np.where(np.indices((H, W)).sum(0) % 2, a, b).astype(np.uint8)


# (name, image file writer, mask file writer, expected error fragments or None)
BAD_INPUTS = [
    ("truncated png", lambda p: p.write_bytes(png_bytes(rgb())[:60]), lambda p: write_png(p, mask()),
     ["image", "img.png", "cannot be read"]),
    ("zero-byte image", lambda p: p.write_bytes(b""), lambda p: write_png(p, mask()),
     ["image", "img.png", "cannot be read"]),
    ("not an image", lambda p: p.write_text("hello"), lambda p: write_png(p, mask()), ["img.png", "cannot be read"]),
    ("size mismatch", lambda p: write_png(p, rgb()), lambda p: write_png(p, mask(shape=(H, W + 1))),
     ["img.png is 8x6", "msk.png is 9x6", "same size"]),
    ("out-of-range mask", lambda p: write_png(p, rgb()), lambda p: write_png(p, checker(1, 7)),
     ["msk.png", "values [7]", "a class in [0, 3) or the void value 255"]),
    ("16-bit out of range", lambda p: write_png(p, rgb()), lambda p: write_png(p, mask(300, dtype=np.uint16)),
     ["msk.png", "values [300]"]),
    ("colour mask", lambda p: write_png(p, rgb()), lambda p: write_png(p, rgb()), ["msk.png", "colour image"]),
    ("corrupt mask", lambda p: write_png(p, rgb()), lambda p: p.write_bytes(b"\x89PNG\r\n"),
     ["msk.png", "cannot be read"]),
]


@pytest.mark.parametrize("name,write_image,write_mask,expected", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_files_raise_one_line_naming_the_file(tmp_path, name, write_image, write_mask, expected):
    image, msk = tmp_path / "img.png", tmp_path / "msk.png"
    write_image(image)
    write_mask(msk)
    with pytest.raises(DataError) as err:
        load_pair(image, msk, MAP3)
    msg = str(err.value)
    assert "\n" not in msg
    for fragment in expected:
        assert fragment in msg


def save(image: Image.Image, path):
    image.save(path)
    return path


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_grayscale_rgba_palette_images_are_converted_to_rgb(tmp_path, mode):
    source = Image.fromarray(rgb()).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        source = Image.fromarray((np.asarray(source).astype(np.uint16) * 256))
    image = read_image(save(source, tmp_path / "x.png"))
    assert image.mode == "RGB" and image.size == (W, H)


def test_palette_mask_reads_indices_not_colours(tmp_path):
    indices = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 3
    m = Image.fromarray(indices, mode="P")
    m.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    assert np.array_equal(read_mask(save(m, tmp_path / "m.png")), indices)


def test_sixteen_bit_and_equal_channel_rgb_masks_are_accepted(tmp_path):
    write_png(tmp_path / "img.png", rgb())
    values = (np.arange(H * W) % 3).reshape(H, W)
    write_png(tmp_path / "m16.png", values.astype(np.uint16))
    assert Image.open(tmp_path / "m16.png").mode.startswith("I")
    _, decoded = load_pair(tmp_path / "img.png", tmp_path / "m16.png", MAP3)
    assert np.array_equal(np.asarray(decoded), values)
    write_png(tmp_path / "mrgb.png", np.repeat(values[..., None], 3, -1).astype(np.uint8))
    _, decoded = load_pair(tmp_path / "img.png", tmp_path / "mrgb.png", MAP3)
    assert np.array_equal(np.asarray(decoded), values)


def test_void_value_is_mapped_to_255_and_undefined_values_rejected():
    camvid_like = LabelMap.identity(11, void=(11,))
    raw = np.array([[0, 10, 11]])
    assert camvid_like.decode(raw).tolist() == [[0, 10, 255]]
    assert camvid_like.invalid_values(np.array([[12, 255, 3, -1, 70000]])) == [-1, 12, 255, 70000]


def test_exif_rotated_jpeg_is_transposed(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb()).save(tmp_path / "photo.jpg", exif=exif.tobytes())
    assert Image.open(tmp_path / "photo.jpg").size == (W, H)
    assert read_image(tmp_path / "photo.jpg").size == (H, W)


def test_check_dataset_lists_every_bad_file(make_folder_dataset):
    root = make_folder_dataset(n=12, num_classes=3, lists=True)
    (root / "images" / "img001.png").write_bytes(b"")  # zero bytes
    write_png(root / "masks" / "img002.png", mask(5, shape=(16, 24)))  # class 5 of 3
    write_png(root / "masks" / "img003.png", mask(shape=(3, 3)))  # size mismatch
    write_png(root / "masks" / "img011.png", mask(9, shape=(16, 24)))  # in val.txt
    cfg = DataConfig(dataset="folder", root=str(root), num_classes=3)
    problems = check_dataset(cfg)
    assert len(problems) == 4
    for fragment, line in zip(["img001.png cannot be read", "img002.png has values [5]", "img003.png is 3x3",
                               "img011.png has values [9]"], problems):
        assert fragment in line
    (root / "images" / "img001.png").unlink()
    assert any("img001.png does not exist" in p for p in check_dataset(cfg))
    assert check_dataset(DataConfig(dataset="folder", root=str(make_folder_dataset(n=4, lists=True)),
                                    num_classes=3)) == []
