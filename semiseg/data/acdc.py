"""ACDC, the semi-supervised medical scenario of UniMatch (``more-scenarios/medical``).

Layout under ``data.root`` (SSL4MIS's processed ACDC, which official UniMatch reads)::

    data/slices/patientNNN_frameFF_slice_S.h5    training slices: ``image`` (H, W) float in [0, 1],
                                                  ``label`` (H, W) in 0..3
    data/patientNNN_frameFF.h5                    validation / test volumes: ``image`` (D, H, W),
                                                  ``label`` (D, H, W)

Classes: 0 background, 1 RV (right ventricle), 2 Myo (myocardium), 3 LV (left ventricle).

Splits are UniMatch's files, one path per line relative to the root: ``splits/acdc/{1,3,7}/
labeled.txt`` and ``unlabeled.txt`` (the labelled-case settings), ``train_slices.txt``,
``val.txt``, ``test.txt``, ``valtest.txt``. A ``splits/acdc/...`` file under the root (the
generator of :mod:`semiseg.data.acdc_synthetic` writes one) wins; otherwise the official files
bundled with semiseg (``semiseg/data/acdc_splits/``) are used, so a config naming
``splits/acdc/3/labeled.txt`` works on the real folder as downloaded. ``data.val_split`` /
``eval --split``: ``val``, ``test``, ``valtest`` (volumes); ``train``: ``train_slices.txt``.

The training sets follow official ``dataset/acdc.py`` (reference only, not copied):

* geometry, the same for image and label: with probability 1/2 a random 90-degree rotation
  (``k`` in 0..3) and a flip along a random axis; else with probability 1/2 a rotation by an
  integer angle in [-20, 20) degrees (nearest neighbour, same size, zero fill); then a
  nearest-neighbour zoom to ``data.crop_size`` squared (order 0);
* labelled (``train_l``): ``{"image": (1, S, S) float, "mask": (S, S) long}``, nothing else;
* unlabelled (``train_u``): the image quantised to 8 bits (``uint8(x * 255) / 255``), the weak
  view; each of the strong views: with p 0.8 colour jitter (brightness, contrast, saturation 0.5,
  hue 0.25: on a grayscale image only brightness and contrast act), Gaussian blur (p 0.5, sigma
  U(0.1, 2)), and its own CutMix box (p 0.5); ``ignore_mask`` is all 0 (the zoom never pads).

Deviations: rotation and zoom use PIL's nearest-neighbour resampling instead of
``scipy.ndimage`` (order 0 both; pixel centres may round differently by one pixel at the border);
images are not normalised by ``data.mean``/``data.std`` (the h5 images are already in [0, 1],
as official).

h5py is imported on first read (``pip install 'semiseg[medical]'``). A file that cannot be read,
lacks ``image``/``label``, is empty, has mismatched image/label shapes or a label value outside
0..3 is a :class:`~semiseg.errors.DataError` of one line naming the file.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision import transforms as T

from semiseg.data.classes import ACDC_CLASSES, ACDC_PALETTE  # noqa: F401  (re-exported)
from semiseg.data.datasets import Sample
from semiseg.data.io import load_or_substitute
from semiseg.data.transforms import cutmix_box
from semiseg.errors import DataError, SemisegError


def require_h5py():
    """The h5py module; a one-line error saying how to install it otherwise."""
    try:
        import h5py
    except ImportError:
        raise SemisegError("the acdc dataset reads HDF5 files with h5py, which is not installed: "
                           "pip install 'semiseg[medical]'") from None
    return h5py


def read_h5(path: str | Path, ndim: int, num_classes: int = len(ACDC_CLASSES)) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32, label int64)`` of one ACDC file (``ndim`` 2: a slice, 3: a volume);
    DataError naming the file if it is unreadable, lacks ``image``/``label``, is empty, has
    another shape or a label value outside ``0..num_classes-1``."""
    h5py = require_h5py()
    what = "slice" if ndim == 2 else "volume"
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise DataError(f"{what} {path} has no '{missing[0]}' dataset: expected 'image' and 'label'")
            image = np.asarray(f["image"][()], dtype=np.float32)
            label = np.asarray(f["label"][()])
    except DataError:
        raise
    except Exception as e:  # OSError from h5py for a truncated or non-HDF5 file, and friends
        raise DataError(f"{what} {path} cannot be read ({type(e).__name__}: {e}): expected an HDF5 file "
                        "with 'image' and 'label'") from None
    if image.size == 0 or label.size == 0:
        raise DataError(f"{what} {path} is empty (image {image.shape}, label {label.shape})")
    if image.ndim != ndim or image.shape != label.shape:
        raise DataError(f"{what} {path}: image {image.shape} and label {label.shape}: expected two "
                        f"{ndim}-D arrays of the same shape")
    if not np.isfinite(image).all():
        raise DataError(f"{what} {path}: the image holds NaN or infinite values")
    bad = label[(label < 0) | (label >= num_classes) | (label != np.round(label))] if label.dtype.kind == "f" \
        else label[(label < 0) | (label >= num_classes)]
    if bad.size:
        raise DataError(f"{what} {path}: label value {bad.flat[0]} is not a class: expected 0..{num_classes - 1} "
                        f"({', '.join(ACDC_CLASSES[:num_classes])})")
    return image, label.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Geometry (image and label always together)


def random_rot_flip(img: np.ndarray, label: np.ndarray, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """A rotation by ``k * 90`` degrees (k in 0..3), then a flip along a random axis."""
    k, axis = rng.randrange(4), rng.randrange(2)
    img, label = np.rot90(img, k), np.rot90(label, k)
    return np.flip(img, axis=axis).copy(), np.flip(label, axis=axis).copy()


def rotate_nearest(a: np.ndarray, angle: float) -> np.ndarray:
    """``a`` rotated by ``angle`` degrees about its centre, same size, nearest neighbour, zero fill."""
    mode = "F" if a.dtype.kind == "f" else "I"
    img = Image.fromarray(a.astype(np.float32 if mode == "F" else np.int32))
    out = np.asarray(img.rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=0))
    return out.astype(a.dtype)


def random_rotate(img: np.ndarray, label: np.ndarray, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """A rotation by an integer angle in [-20, 20) degrees, the same for image and label."""
    angle = rng.randrange(-20, 20)
    return rotate_nearest(img, angle), rotate_nearest(label, angle)


def zoom_nearest(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` resized to ``size x size`` by nearest neighbour (order 0)."""
    if a.shape == (size, size):
        return a.copy()
    mode = "F" if a.dtype.kind == "f" else "I"
    img = Image.fromarray(a.astype(np.float32 if mode == "F" else np.int32))
    return np.asarray(img.resize((size, size), resample=Image.NEAREST)).astype(a.dtype)


def weak_geometry(img: np.ndarray, label: np.ndarray, size: int, rng: random.Random
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Official order: p 1/2 rot90 + flip, else p 1/2 a small rotation; then zoom to ``size``."""
    if rng.random() > 0.5:
        img, label = random_rot_flip(img, label, rng)
    elif rng.random() > 0.5:
        img, label = random_rotate(img, label, rng)
    return zoom_nearest(img, size), zoom_nearest(label, size)


_JITTER = T.ColorJitter(0.5, 0.5, 0.5, 0.25)


def strong_intensity(img: Image.Image) -> Image.Image:
    """One strong view of an 8-bit grayscale image: colour jitter (p 0.8), then blur (p 0.5)."""
    if random.random() < 0.8:
        img = _JITTER(img)
    if random.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))
    return img


def _tensor(img: np.ndarray | Image.Image, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) * scale).unsqueeze(0).contiguous()


# ---------------------------------------------------------------------------------------------
# Torch datasets


class _SliceSet(Dataset):
    def __init__(self, samples: list[Sample], crop_size: int):
        self.samples = samples
        self.size = crop_size

    def __len__(self) -> int:
        return len(self.samples)

    def _rng(self) -> random.Random:
        # the global RNG, which the loaders seed per worker (as the other training sets)
        return random.Random(random.getrandbits(64))

    def __getitem__(self, index: int) -> dict:
        return load_or_substitute(self.samples, index, self._load)


class ACDCLabeledSet(_SliceSet):
    """Labelled slices: weak geometry only, ``{"image": (1, S, S), "mask": (S, S), "id"}``."""

    def _load(self, sample: Sample) -> dict:
        img, label = read_h5(sample.image, 2)
        img, label = weak_geometry(img, label, self.size, self._rng())
        return {"image": _tensor(img), "mask": torch.from_numpy(label.astype(np.int64)), "id": sample.id}


class ACDCUnlabeledSet(_SliceSet):
    """Unlabelled slices: the weak view and ``num_strong`` strong views with their CutMix boxes.
    The label is read (the files hold one) but returned only with ``with_masks`` (``"mask"``,
    the weak view's geometry: the diagnostics ``method.oracle_pseudo_labels`` and
    ``benchmarks/pseudo_label_quality.py --as-trained``)."""

    def __init__(self, samples: list[Sample], crop_size: int, num_strong: int = 2, with_masks: bool = False):
        if num_strong not in (0, 1, 2):
            raise ValueError(f"num_strong must be 0, 1 or 2, got {num_strong}")
        super().__init__(samples, crop_size)
        self.num_strong = num_strong
        self.with_masks = with_masks

    def _load(self, sample: Sample) -> dict:
        img, label = read_h5(sample.image, 2)
        img, label = weak_geometry(img, label, self.size, self._rng())
        pil = Image.fromarray((np.clip(img, 0.0, 1.0) * 255).astype(np.uint8))
        out = {"id": sample.id, "weak": _tensor(pil, 1 / 255.0),
               "ignore_mask": torch.zeros(self.size, self.size, dtype=torch.long)}
        if self.with_masks:
            out["mask"] = torch.from_numpy(label.astype(np.int64))
        for k in range(1, self.num_strong + 1):  # per view: intensity draw, then its box (official order)
            out[f"strong_{k}"] = _tensor(strong_intensity(pil), 1 / 255.0)
            out[f"box_{k}"] = cutmix_box(self.size, p=0.5)
        return out


class ACDCVolumeSet(Dataset):
    """Whole volumes for scoring: ``{"image": (D, H, W) float, "mask": (D, H, W) long, "id",
    "path"}``; :func:`semiseg.engine.evaluator.evaluate` scores them slice by slice in 3D
    (``volumetric``). An unreadable volume gives ``{"skipped": message}``."""

    volumetric = True

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            img, label = read_h5(sample.image, 3)
        except DataError as e:
            return {"skipped": str(e), "id": sample.id, "path": str(sample.image)}
        return {"image": torch.from_numpy(img), "mask": torch.from_numpy(label), "id": sample.id,
                "path": str(sample.image)}
