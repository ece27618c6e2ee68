"""Reading images and masks, with the per-file checks a user can act on.

Images are returned as RGB PIL images: grayscale, RGBA and palette files are converted (not
rejected) and a JPEG's EXIF orientation is applied (``ImageOps.exif_transpose``), so a photo
is used the way viewers show it. Masks are taken *as stored* (no EXIF rotation: an annotation
tool writes the pixels it labelled).

A mask holds one class value per pixel: 8-bit grayscale, palette PNGs (the palette indices,
as in Pascal VOC), 16-bit PNGs, or RGB with three equal channels. Its values are decoded to
the internal labels (``0..num_classes-1``, 255 = ignore) by the dataset's :class:`LabelMap`,
which also rejects values the dataset does not define.

Every failure is a :class:`~semiseg.errors.DataError` whose one-line message names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageOps

from semiseg.data import IGNORE_INDEX
from semiseg.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _reason(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def read_image(path: str | Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied; DataError if it cannot be decoded."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            return ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:  # any decoding failure (zero bytes, truncated, not an image, ...)
        raise DataError(f"image {path} cannot be read ({_reason(e)}): expected a valid image file") from None


def read_mask(path: str | Path) -> np.ndarray:
    """The raw values of a mask file as an (H, W) int64 array, as stored (no EXIF rotation).

    Palette images give their indices, 16-bit images their 16-bit values, RGB(A) images their
    first channel if all three channels are equal.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask {path} does not exist")
    try:
        with Image.open(path) as m:
            m.load()
            mode, fmt = m.mode, m.format
            values = np.array(m)
    except Exception as e:
        raise DataError(f"mask {path} cannot be read ({_reason(e)}): expected a valid PNG of class indices") from None
    if fmt == "JPEG":
        raise DataError(f"mask {path} is a JPEG: its lossy compression changes class values along every edge; "
                        "expected a PNG of class indices")
    if mode in ("RGB", "RGBA"):
        rgb = values[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
            raise DataError(f"mask {path} is a colour image (RGB with unequal channels): expected one class index "
                            "per pixel (a grayscale or palette PNG)")
        values = rgb[..., 0]
    elif mode == "LA":
        values = values[..., 0]
    elif mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        raise DataError(f"mask {path} has image mode {mode}: expected a grayscale, palette or 16-bit PNG of class "
                        "indices")
    return values.astype(np.int64)


class LabelMap:
    """How a dataset's stored mask values become internal labels.

    ``lut[v]`` is the label of stored value ``v`` (0..255): a class index, 255 (ignore) or -1
    (a value the dataset does not define). Values outside 0..255 (16-bit masks) are never valid.
    """

    def __init__(self, lut: np.ndarray, expected: str):
        self.lut = np.asarray(lut, dtype=np.int16)
        assert self.lut.shape == (256,)
        self.expected = expected  # for messages: "a class in [0, 11) or the void value 11"

    @classmethod
    def identity(cls, num_classes: int, void: Iterable[int] = (IGNORE_INDEX,)) -> "LabelMap":
        """Classes stored as 0..num_classes-1; each ``void`` value is mapped to the ignore label."""
        lut = np.full(256, -1, dtype=np.int16)
        lut[:num_classes] = np.arange(num_classes)
        void = sorted(set(void))
        for v in void:
            lut[v] = IGNORE_INDEX
        names = " or ".join(str(v) for v in void)
        return cls(lut, f"a class in [0, {num_classes})" + (f" or the void value {names}" if void else ""))

    @classmethod
    def from_table(cls, table: dict[int, int], defined: Iterable[int], expected: str) -> "LabelMap":
        """Stored value -> class from ``table``; other ``defined`` values are void, the rest invalid."""
        lut = np.full(256, -1, dtype=np.int16)
        lut[list(defined)] = IGNORE_INDEX
        for stored, label in table.items():
            lut[stored] = label
        return cls(lut, expected)

    def invalid_values(self, raw: np.ndarray) -> list[int]:
        """The distinct stored values this dataset does not define."""
        in_range = (raw >= 0) & (raw < 256)
        bad = ~in_range | (self.lut[np.where(in_range, raw, 0)] < 0)
        return np.unique(raw[bad]).tolist() if bad.any() else []

    def decode(self, raw: np.ndarray, path: str | Path = "<mask>") -> np.ndarray:
        """(H, W) stored values -> (H, W) uint8 internal labels; DataError naming the bad values."""
        bad = self.invalid_values(raw)
        if bad:
            shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
            raise DataError(f"mask {path} has values [{shown}]: expected {self.expected}")
        return self.lut[raw].astype(np.uint8)


_ROTATIONS = {5: "transposed", 6: "rotated 90 degrees clockwise", 7: "transversed",
              8: "rotated 90 degrees counter-clockwise"}


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation tag of an image file (1, upright, when it has none or cannot be read)."""
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def check_same_size(image: Image.Image, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    """``image`` (EXIF orientation applied) and ``mask`` have the same size; a DataError naming
    both files otherwise, saying so when the image's EXIF rotation is what makes them differ."""
    if mask.shape != (image.height, image.width):
        orientation = exif_orientation(image_path)
        if orientation in _ROTATIONS and mask.shape == (image.width, image.height):
            raise DataError(f"image {image_path} is {image.width}x{image.height} as shown: its EXIF orientation says "
                            f"{_ROTATIONS[orientation]} (the stored pixels are {image.height}x{image.width}); its mask "
                            f"{mask_path} is {mask.shape[1]}x{mask.shape[0]}, the stored size: expected the mask "
                            "rotated the same way, or the image saved upright without the EXIF orientation")
        raise DataError(f"image {image_path} is {image.width}x{image.height} but its mask {mask_path} is "
                        f"{mask.shape[1]}x{mask.shape[0]}: expected the same size")


_STORED_VALUES = LabelMap(np.arange(256), "values in [0, 255]")  # no label map: values kept as stored


def decode_mask(raw: np.ndarray, label_map: Optional[LabelMap], path: Path) -> np.ndarray:
    """Stored values -> uint8 internal labels; without a label map the values are kept (0..255)."""
    return (label_map if label_map is not None else _STORED_VALUES).decode(raw, path)


def load_pair(image_path: Path, mask_path: Optional[Path], label_map: Optional[LabelMap]
              ) -> tuple[Image.Image, Image.Image]:
    """An image and its decoded mask, with every per-file check.

    Returns the RGB image and the mask as an 8-bit ``L`` image of internal labels.
    """
    image = read_image(image_path)
    if mask_path is None:
        raise DataError(f"image {image_path} has no mask: expected a labelled image here")
    raw = read_mask(mask_path)
    check_same_size(image, raw, image_path, mask_path)
    return image, Image.fromarray(decode_mask(raw, label_map, mask_path))


def load_or_substitute(samples: list, index: int, load) -> dict:
    """``load(samples[index])``; if that sample's files cannot be used (DataError), the next
    usable sample of the list takes its place (same augmentation seed, so runs stay reproducible).
    The result's ``"skipped"`` holds the messages of the unusable files, one per line ("" if none)."""
    problems: list[str] = []
    for offset in range(len(samples)):
        try:
            out = load(samples[(index + offset) % len(samples)])
        except DataError as e:
            problems.append(str(e))
            continue
        out["skipped"] = "\n".join(problems)
        return out
    raise DataError(f"none of the {len(samples)} images of this set can be used; the first: {problems[0]}")
