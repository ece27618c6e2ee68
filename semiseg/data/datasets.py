"""Dataset layouts, samples and split files.

A dataset is read by the :class:`DatasetReader` registered under its ``data.dataset`` name. A
reader knows four things and nothing else:

* its classes (:class:`DatasetInfo`: names, palette);
* how its masks store labels (:class:`~semiseg.data.io.LabelMap`: void values become 255);
* where a split's images and masks live when no list file is given (``list_split``);
* how a bare id in a community split file becomes an image and a mask (``resolve_id``).

Layouts under ``data.root``:

============  ==============================================================================
folder        ``images/NAME.{png,jpg,...}``, ``masks/NAME.png`` (class indices; the value
              ``data.ignore_index`` is void), optional ``unlabeled/`` (images without masks).
              With ``train.txt`` and ``val.txt`` those lists are the splits. Without either,
              every 10th image with a mask (sorted by name, starting with the first) is held
              out as ``val`` and ``train`` is the rest, plus every image without a mask (in
              ``images/`` or ``unlabeled/``) as unlabelled data. Other splits need a list.
camvid        SegNet layout: ``train/ trainannot/ val/ valannot/ test/ testannot/``; a
              ``<split>.txt`` list is used when present, else files are paired by name. Void 11.
pascal        VOC2012: ``JPEGImages/ID.jpg`` and ``SegmentationClassAug/ID.png`` (SBD-augmented,
              preferred when present) or ``SegmentationClass/ID.png``; splits from
              ``ImageSets/Segmentation/<split>.txt``. Void 255.
cityscapes    ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
              ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (preferred) or
              ``*_gtFine_labelIds.png`` (mapped to the 19 train ids; other ids void).
coco          UniMatch's 81-class layout: ``train2017/ val2017/`` images, ``masks/ID.png``. Void 255.
ade20k        ``ADEChallengeData2016``: ``images/{training,validation}/`` and
              ``annotations/{training,validation}/``; stored 0 is void, 1..150 become 0..149.
synthetic     generated on first use (:mod:`semiseg.data.synthetic`) in the folder layout.
levir_cd      UniMatch's change-detection layout (:mod:`semiseg.data.change`): ``A/NAME.png``,
whu_cd        ``B/NAME.png``, ``label/NAME.png`` (0/255); splits ``splits/levir/...`` /
              ``splits/whu/...`` under the root or the official ones bundled with semiseg.
folder_cd     a user's pairs: ``<split>/{A,B,label}/`` or flat ``{A,B,label}/`` with lists.
acdc          UniMatch's medical layout: ``data/slices/*.h5`` training slices and ``data/*.h5``
              volumes (``image``, ``label``), splits ``splits/acdc/...`` under the root or
              the official ones bundled with semiseg (:mod:`semiseg.data.acdc`).
============  ==============================================================================

For every dataset a ``<split>.txt`` at the root takes precedence over the layout walk.

Split files (the community's format, e.g. UniMatch's ``splits/``): one sample per line, either
``IMAGE MASK`` (paths relative to the dataset root) or one field: an image path (its mask is
found by the layout's rule, if any) or a bare id resolved by the dataset (``2007_000032`` for
Pascal). Blank lines and ``#`` comments are skipped. A path that leaves the dataset root
(``../`` or an absolute path elsewhere) is an error naming the split file and line, and so is an
image listed twice (a duplicate id would silently count double; the message names both lines).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Union

from semiseg.config import DataConfig
from semiseg.data import IGNORE_INDEX
from semiseg.data import classes as C
from semiseg.data.change import CHANGE_CLASSES, CHANGE_LABELS, CHANGE_PALETTE, image_b_for, label_for
from semiseg.data.io import IMAGE_EXTS, LabelMap
from semiseg.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
from semiseg.data.synthetic import ensure_synthetic
from semiseg.errors import ConfigError, DataError

__all__ = ["IGNORE_INDEX", "DatasetInfo", "Sample", "dataset_info", "list_samples", "read_split_file",
           "resolve_root", "find_split_file", "get_reader", "READERS"]

Pair = tuple[Path, Optional[Path]]  # (image, mask or None)


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    class_names: list[str]
    ignore_index: int = IGNORE_INDEX  # the internal void label every dataset is decoded to
    palette: list[tuple[int, int, int]] = field(default_factory=list)  # one colour per class

    def __post_init__(self):
        if not self.palette:
            from semiseg.viz import default_palette

            self.palette = default_palette(self.num_classes)


@dataclass
class Sample:
    """One image of a dataset: its id (the file stem), image path and mask path (None when the
    image has no annotation). ``label_map`` decodes the mask's stored values (None: stored values
    are taken as internal labels)."""

    id: str
    image: Path
    mask: Optional[Path] = None
    label_map: Optional[LabelMap] = field(default=None, repr=False, compare=False)
    # change detection (semiseg.data.change): ``image`` is the image before (A/NAME), this the
    # image after (B/NAME), ``mask`` the change mask (label/NAME); None for other datasets
    image_b: Optional[Path] = None


# ---------------------------------------------------------------------------------------------
# Readers


def _images_in(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted by name; hidden files (``.DS_Store``, and the ``._NAME``
    files macOS writes beside copies on other disks) are not images."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file())


def _first_file(*candidates: Path) -> Optional[Path]:
    return next((p for p in candidates if p.is_file()), None)


class DatasetReader:
    """One dataset layout. Subclasses set the class attributes and override the layout hooks."""

    name: ClassVar[str] = ""
    class_names: ClassVar[tuple[str, ...]] = ()
    palette: ClassVar[Optional[list[tuple[int, int, int]]]] = None
    void_values: ClassVar[tuple[int, ...]] = (IGNORE_INDEX,)  # stored values meaning "not labelled"
    # a one-field line of a split file is a bare name resolved by resolve_id even when it looks
    # like a file name (UniMatch's change-detection lists: "train_369_10.png")
    names_are_ids: ClassVar[bool] = False

    def __init__(self, data_cfg: Optional[DataConfig]):
        self.cfg = data_cfg
        self._label_map = LabelMap.identity(len(self.class_names), self.void_values)

    # --- classes --------------------------------------------------------------------------
    def info(self) -> DatasetInfo:
        names = list(self.class_names)
        cfg = self.cfg
        if cfg is not None and cfg.num_classes is not None and cfg.num_classes != len(names):
            raise ConfigError(f"key 'data.num_classes': dataset '{self.name}' has {len(names)} classes, "
                              f"got {cfg.num_classes} (leave it unset)")
        if cfg is not None and cfg.class_names:
            if len(cfg.class_names) != len(names):
                raise ConfigError(f"key 'data.class_names': expected {len(names)} names for dataset "
                                  f"'{self.name}', got {len(cfg.class_names)}")
            names = list(cfg.class_names)
        return DatasetInfo(self.name, len(names), names, palette=list(self.palette or []))

    def label_map(self, mask: Path) -> LabelMap:
        return self._label_map

    # --- layout ---------------------------------------------------------------------------
    def root(self) -> Path:
        """The dataset folder (absolute); DataError if it does not exist."""
        if self.cfg is None or not self.cfg.root:
            raise ConfigError(f"key 'data.root': dataset '{self.name}' needs data.root, the dataset folder")
        root = Path(self.cfg.root).expanduser().absolute()
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist (data.root={self.cfg.root!r}): expected the "
                            f"folder of the {self.name} dataset")
        return root

    def list_split(self, root: Path, split: str) -> list[Pair]:
        """The (image, mask) pairs of ``split`` found by walking the layout (no list file)."""
        raise DataError(f"{self.name} dataset {root}: no {split}.txt list for split '{split}'")

    def resolve_id(self, root: Path, image_id: str) -> Optional[Pair]:
        """A bare id of a split file -> (image, mask); None if no such image."""
        return None

    def mask_for_image(self, root: Path, image: Path) -> Optional[Path]:
        """The mask belonging to ``image`` by the layout's naming rule, if it exists."""
        return None

    def audit(self, root: Path) -> list[str]:
        """Files the layout would leave out silently or read ambiguously, one line each."""
        return []

    def describe_split(self, root: Path, split: str) -> str:
        """How the images of ``split`` are chosen when there is no ``<split>.txt``."""
        return f"the {self.name} layout under {root}"

    def sample(self, image: Path, mask: Optional[Path]) -> Sample:
        return Sample(image.stem, image, mask, self.label_map(mask) if mask is not None else None)


class FolderLayout(DatasetReader):
    """The ``images/`` + ``masks/`` (+ ``unlabeled/``) layout shared by ``folder`` and ``synthetic``."""

    holdout_every = 10  # without list files, every 10th labelled image is the val split

    def list_split(self, root: Path, split: str) -> list[Pair]:
        has_lists = [name for name in ("train.txt", "val.txt") if (root / name).is_file()]
        if has_lists or split not in ("train", "val"):
            raise DataError(f"{self.name} dataset {root}: no {split}.txt list for split '{split}'"
                            + (f" (found {has_lists[0]}; give both train.txt and val.txt, or neither)"
                               if has_lists else ""))
        if not (root / "images").is_dir():
            raise DataError(f"{self.name} dataset {root}: no images/ folder (expected images/, masks/ and "
                            "optional unlabeled/)")
        with_mask, without_mask = [], []
        for image in _images_in(root / "images"):
            mask = self.mask_for_image(root, image)
            (with_mask if mask else without_mask).append((image, mask))
        if split == "val":
            return with_mask[:: self.holdout_every]
        train = [pair for i, pair in enumerate(with_mask) if i % self.holdout_every != 0]
        return train + without_mask + [(image, None) for image in _images_in(root / "unlabeled")]

    def resolve_id(self, root: Path, image_id: str) -> Optional[Pair]:
        for folder in ("images", "unlabeled"):
            image = _first_file(*(root / folder / f"{image_id}{ext}" for ext in IMAGE_EXTS))
            if image is not None:
                return image, self.mask_for_image(root, image)
        return None

    def mask_for_image(self, root: Path, image: Path) -> Optional[Path]:
        if image.parent.name != "images":
            return None
        return _first_file(root / "masks" / f"{image.stem}.png")

    def describe_split(self, root: Path, split: str) -> str:
        if split == "val":
            return (f"every {self.holdout_every}th image of images/ with a mask, sorted by name from the first "
                    "(no val.txt; give train.txt and val.txt to choose)")
        return ("the other images of images/ with a mask, plus every image without one (images/ and "
                "unlabeled/) as unlabelled")

    def audit(self, root: Path) -> list[str]:
        """Masks that would be ignored (JPEG or other non-PNG masks, masks without an image), an
        image name used twice in images/, and a name in both images/ and unlabeled/."""
        problems = []
        images: dict[str, list[Path]] = {}
        for image in _images_in(root / "images"):
            images.setdefault(image.stem, []).append(image)
        unlabeled = {image.stem: image for image in _images_in(root / "unlabeled")}
        for stem, same in images.items():
            if len(same) > 1:
                problems.append(f"images {same[0]} and {same[1]} have the same name: expected one image per name "
                                f"(masks/{stem}.png would be the mask of both)")
            if stem in unlabeled:
                problems.append(f"image {unlabeled[stem]} has the same name as {same[0]}: expected each name once "
                                "in images/ and unlabeled/ (unlabeled/ holds images without masks)")
        masks = root / "masks"
        for mask in (sorted(masks.iterdir()) if masks.is_dir() else []):
            suffix = mask.suffix.lower()
            if mask.name.startswith(".") or suffix not in IMAGE_EXTS or not mask.is_file():
                continue
            if suffix in (".jpg", ".jpeg"):
                problems.append(f"mask {mask} is a JPEG: its lossy compression changes class values along every "
                                f"edge; expected a PNG of class indices, masks/{mask.stem}.png")
            elif suffix != ".png":
                problems.append(f"mask {mask} is not a PNG: expected masks/{mask.stem}.png (other masks are ignored)")
            elif mask.stem not in images:
                hint = (f"; {unlabeled[mask.stem]} is in unlabeled/, whose images have no masks"
                        if mask.stem in unlabeled else "")
                problems.append(f"mask {mask} has no image: expected images/{mask.stem} with one of "
                                f"{', '.join(IMAGE_EXTS)}{hint}")
        return problems


class FolderReader(FolderLayout):
    """A user's folder; classes from ``data.num_classes`` / ``data.class_names``, void value
    ``data.ignore_index``.

    Constructed with ``data_cfg=None`` it reads the layout without knowing the classes (mask
    values are then not checked); :func:`read_split_file` uses that for a bare root.
    """

    name = "folder"

    def __init__(self, data_cfg: Optional[DataConfig]):
        self.cfg = data_cfg
        self._label_map = None
        if data_cfg is not None:
            n = data_cfg.num_classes
            if n is None:
                raise ConfigError("key 'data.num_classes': dataset 'folder' needs data.num_classes (the number of "
                                  "classes in its masks)")
            if n > 255:
                raise ConfigError(f"key 'data.num_classes': at most 255 classes fit 8-bit labels, got {n}")
            if data_cfg.ignore_index < n:
                raise ConfigError(f"key 'data.ignore_index': {data_cfg.ignore_index} is one of the {n} classes; "
                                  f"expected the void value of the masks (>= {n}, default 255)")
            self._label_map = LabelMap.identity(n, (data_cfg.ignore_index,))

    def info(self) -> DatasetInfo:
        n = self.cfg.num_classes
        names = list(self.cfg.class_names) if self.cfg.class_names else [f"class_{i}" for i in range(n)]
        if len(names) != n:
            raise ConfigError(f"key 'data.class_names': expected {n} names (data.num_classes), got {len(names)}")
        return DatasetInfo(self.name, n, names)


class SyntheticReader(FolderLayout):
    """The built-in procedural dataset, generated on first use in the folder layout."""

    name = "synthetic"
    class_names = SYNTHETIC_CLASSES

    def root(self) -> Path:
        return ensure_synthetic(self.cfg).absolute()


class CamVidReader(DatasetReader):
    name = "camvid"
    class_names = C.CAMVID_CLASSES
    palette = C.CAMVID_PALETTE
    void_values = (11,)

    def list_split(self, root: Path, split: str) -> list[Pair]:
        if not (root / split).is_dir():
            raise DataError(f"camvid dataset {root}: split '{split}' has neither {split}.txt nor {split}/")
        return [(image, self.mask_for_image(root, image)) for image in _images_in(root / split)]

    def resolve_id(self, root: Path, image_id: str) -> Optional[Pair]:
        image = _first_file(*(root / split / f"{image_id}.png" for split in ("train", "val", "test")))
        return (image, self.mask_for_image(root, image)) if image else None

    def mask_for_image(self, root: Path, image: Path) -> Optional[Path]:
        return _first_file(root / f"{image.parent.name}annot" / image.name)

    def describe_split(self, root: Path, split: str) -> str:
        return f"the images of {root / split}/ with their masks in {root / (split + 'annot')}/"


class PascalReader(DatasetReader):
    name = "pascal"
    class_names = C.PASCAL_CLASSES
    palette = C.voc_palette(21)

    def list_split(self, root: Path, split: str) -> list[Pair]:
        ids_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not ids_file.is_file():
            raise DataError(f"pascal dataset {root}: split '{split}' has neither {split}.txt nor {ids_file}")
        pairs = []
        for image_id in ids_file.read_text().split():
            pair = self.resolve_id(root, image_id)
            if pair is None:
                raise DataError(f"{ids_file}: image {root / 'JPEGImages' / image_id}.jpg does not exist")
            pairs.append(pair)
        return pairs

    def resolve_id(self, root: Path, image_id: str) -> Optional[Pair]:
        image = _first_file(root / "JPEGImages" / f"{image_id}.jpg")
        return (image, self.mask_for_image(root, image)) if image else None

    def mask_for_image(self, root: Path, image: Path) -> Optional[Path]:
        return _first_file(*(root / folder / f"{image.stem}.png"
                             for folder in ("SegmentationClassAug", "SegmentationClass")))


class CityscapesReader(DatasetReader):
    name = "cityscapes"
    class_names = C.CITYSCAPES_CLASSES
    palette = C.CITYSCAPES_PALETTE

    def __init__(self, data_cfg: Optional[DataConfig]):
        super().__init__(data_cfg)  # the train-id map (labelTrainIds files, void 255)
        self._label_id_map = LabelMap.from_table(C.CITYSCAPES_ID_TO_TRAIN_ID, range(C.CITYSCAPES_NUM_IDS),
                                                 f"a Cityscapes labelId in [0, {C.CITYSCAPES_NUM_IDS})")

    def label_map(self, mask: Path) -> LabelMap:
        return self._label_id_map if mask.name.endswith("_labelIds.png") else self._label_map

    def list_split(self, root: Path, split: str) -> list[Pair]:
        folder = root / "leftImg8bit" / split
        if not folder.is_dir():
            raise DataError(f"cityscapes dataset {root}: split '{split}' has neither {split}.txt nor {folder}")
        return [(image, self.mask_for_image(root, image)) for image in sorted(folder.glob("*/*_leftImg8bit.png"))]

    def resolve_id(self, root: Path, image_id: str) -> Optional[Pair]:
        base = image_id.removesuffix("_leftImg8bit")
        city = base.split("_")[0]
        image = _first_file(*(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png"
                              for split in ("train", "val", "test")))
        return (image, self.mask_for_image(root, image)) if image else None

    def mask_for_image(self, root: Path, image: Path) -> Optional[Path]:
        base = image.name.removesuffix("_leftImg8bit.png")
        folder = root / "gtFine" / image.parent.parent.name / image.parent.name
        return _first_file(folder / f"{base}_gtFine_labelTrainIds.png", folder / f"{base}_gtFine_labelIds.png")


class CocoReader(DatasetReader):
    name = "coco"
    class_names = C.COCO_CLASSES
    split_dirs = {"train": "train2017", "val": "val2017"}

    def list_split(self, root: Path, split: str) -> list[Pair]:
        folder = root / self.split_dirs.get(split, split)
        if not folder.is_dir():
            raise DataError(f"coco dataset {root}: split '{split}' has neither {split}.txt nor {folder}")
        return [(image, self.mask_for_image(root, image)) for image in _images_in(folder)]

    def resolve_id(self, root: Path, image_id: str) -> Optional[Pair]:
        image = _first_file(*(root / folder / f"{image_id}.jpg" for folder in self.split_dirs.values()))
        return (image, self.mask_for_image(root, image)) if image else None

    def mask_for_image(self, root: Path, image: Path) -> Optional[Path]:
        masks = root / "masks"
        return _first_file(masks / f"{image.stem}.png", masks / image.parent.name / f"{image.stem}.png")


class ADE20KReader(DatasetReader):
    name = "ade20k"
    class_names = C.ADE20K_CLASSES
    split_dirs = {"train": "training", "val": "validation"}

    def __init__(self, data_cfg: Optional[DataConfig]):
        super().__init__(data_cfg)
        # Stored 0 is "other" (void); stored 1..150 are the classes.
        self._label_map = LabelMap.from_table({v: v - 1 for v in range(1, 151)}, [0],
                                              "0 (void) or a class in [1, 150]")

    def list_split(self, root: Path, split: str) -> list[Pair]:
        folder = root / "images" / self.split_dirs.get(split, split)
        if not folder.is_dir():
            raise DataError(f"ade20k dataset {root}: split '{split}' has neither {split}.txt nor {folder}")
        return [(image, self.mask_for_image(root, image)) for image in _images_in(folder)]

    def resolve_id(self, root: Path, image_id: str) -> Optional[Pair]:
        image = _first_file(*(root / "images" / folder / f"{image_id}.jpg" for folder in self.split_dirs.values()))
        return (image, self.mask_for_image(root, image)) if image else None

    def mask_for_image(self, root: Path, image: Path) -> Optional[Path]:
        return _first_file(root / "annotations" / image.parent.name / f"{image.stem}.png")


class ACDCReader(DatasetReader):
    """UniMatch's ACDC layout (:mod:`semiseg.data.acdc`): every sample is one HDF5 file holding
    both ``image`` and ``label`` (its ``mask`` is the file itself). Split lists are
    ``splits/acdc/<name>.txt`` under the root, else the official ones bundled with semiseg."""

    name = "acdc"
    class_names = C.ACDC_CLASSES
    palette = C.ACDC_PALETTE
    bundled = Path(__file__).parent / "acdc_splits"  # holds acdc/1/labeled.txt, acdc/val.txt, ...
    split_files = {"train": "train_slices.txt", "val": "val.txt", "test": "test.txt", "valtest": "valtest.txt"}

    def split_file(self, root: Path, relative: str) -> Optional[Path]:
        """``splits/acdc/<relative>`` under the root, else the bundled official file."""
        return _first_file(root / "splits" / "acdc" / relative, self.bundled / "acdc" / relative)

    def list_split(self, root: Path, split: str) -> list[Pair]:
        listed = self.split_file(root, self.split_files.get(split, f"{split}.txt"))
        if listed is None:
            raise DataError(f"acdc dataset {root}: no list for split '{split}' (expected splits/acdc/"
                            f"{self.split_files.get(split, split + '.txt')}; splits: {', '.join(self.split_files)})")
        return [(s.image, s.mask) for s in _read_split(listed, root, self)]

    def mask_for_image(self, root: Path, image: Path) -> Optional[Path]:
        return image if image.suffix == ".h5" else None

    def describe_split(self, root: Path, split: str) -> str:
        listed = self.split_file(root, self.split_files.get(split, f"{split}.txt"))
        return f"listed in {listed}" if listed else f"no list for '{split}'"

    def sample(self, image: Path, mask: Optional[Path]) -> Sample:
        return Sample(image.stem, image, mask, None)


class ChangeReader(DatasetReader):
    """A change-detection layout (:mod:`semiseg.data.change`): a sample is the pair
    ``A/NAME``, ``B/NAME`` (``Sample.image``, ``Sample.image_b``) with ``label/NAME`` as its
    mask (0/255 -> 0/1). Split lines are bare file names."""

    class_names = CHANGE_CLASSES
    palette = CHANGE_PALETTE
    names_are_ids = True
    bundled = Path(__file__).parent / "cd_splits"  # holds levir/5%/labeled.txt, whu/test.txt, ...
    splits_dir: ClassVar[str] = ""

    def label_map(self, mask: Path) -> LabelMap:
        return CHANGE_LABELS

    def split_file(self, root: Path, relative: str) -> Optional[Path]:
        """``splits/<name>/<relative>`` under the root, else the bundled official file."""
        return _first_file(root / "splits" / self.splits_dir / relative, self.bundled / self.splits_dir / relative)

    def list_split(self, root: Path, split: str) -> list[Pair]:
        listed = self.split_file(root, f"{split}.txt")
        if listed is None:
            raise DataError(f"{self.name} dataset {root}: no list for split '{split}' (expected splits/"
                            f"{self.splits_dir}/{split}.txt; splits: train, val, test)")
        return [(s.image, s.mask) for s in _read_split(listed, root, self)]

    def resolve_id(self, root: Path, image_id: str) -> Optional[Pair]:
        # a bare name (UniMatch's lists), or a path under the root ("A/NAME.png", as 'semiseg split' writes)
        image = root / image_id if "/" in image_id and (root / image_id).is_file() else root / "A" / image_id
        if not image.is_file():
            image = _first_file(*(root / "A" / f"{image_id}{ext}" for ext in IMAGE_EXTS)) or image
            if not image.is_file():
                return None
        return image, self.mask_for_image(root, image)

    def mask_for_image(self, root: Path, image: Path) -> Optional[Path]:
        return _first_file(label_for(image))

    def describe_split(self, root: Path, split: str) -> str:
        listed = self.split_file(root, f"{split}.txt")
        return f"listed in {listed}" if listed else f"no list for '{split}'"

    def sample(self, image: Path, mask: Optional[Path]) -> Sample:
        return Sample(image.stem, image, mask, CHANGE_LABELS if mask is not None else None, image_b=image_b_for(image))


class LevirCDReader(ChangeReader):
    name = "levir_cd"
    splits_dir = "levir"


class WhuCDReader(ChangeReader):
    name = "whu_cd"
    splits_dir = "whu"


class FolderCDReader(ChangeReader):
    """A user's pairs: ``<root>/<split>/{A,B,label}/``, else flat ``<root>/{A,B,label}/`` (every
    pair is ``train``; other splits need ``<split>.txt``). A pair without a label is unlabelled."""

    name = "folder_cd"

    def split_file(self, root: Path, relative: str) -> Optional[Path]:
        return None

    def list_split(self, root: Path, split: str) -> list[Pair]:
        folder = root / split if (root / split / "A").is_dir() else (root if split == "train" else None)
        if folder is None or not (folder / "A").is_dir():
            raise DataError(f"folder_cd dataset {root}: no {split}/A/ folder nor {split}.txt list for split "
                            f"'{split}' (expected {split}/A/, {split}/B/, {split}/label/, or A/, B/, label/ with "
                            f"{split}.txt)")
        return [(image, self.mask_for_image(root, image)) for image in _images_in(folder / "A")]

    def describe_split(self, root: Path, split: str) -> str:
        if (root / split / "A").is_dir():
            return f"the pairs of {root / split}/A, B, label"
        return f"every pair of {root}/A, B, label"


READERS: dict[str, type[DatasetReader]] = {
    r.name: r for r in (FolderReader, SyntheticReader, CamVidReader, PascalReader, CityscapesReader, CocoReader,
                        ADE20KReader, ACDCReader, LevirCDReader, WhuCDReader, FolderCDReader)
}


def get_reader(data_cfg: DataConfig) -> DatasetReader:
    return READERS[data_cfg.dataset](data_cfg)


# ---------------------------------------------------------------------------------------------
# Public entry points


def dataset_info(data_cfg: DataConfig) -> DatasetInfo:
    """Classes, names and palette of the configured dataset (reads no files)."""
    return get_reader(data_cfg).info()


def resolve_root(data_cfg: DataConfig) -> Path:
    """The dataset folder; for ``synthetic`` the generated cache folder (generated if needed)."""
    return get_reader(data_cfg).root()


def list_samples(data_cfg: DataConfig, split: str, audit: bool = True) -> list[Sample]:
    """Every sample of ``split``: ``<root>/<split>.txt`` if present, else the dataset's layout.

    With ``audit``, a layout problem that would silently lose data (a JPEG mask, a mask without
    an image, see :meth:`DatasetReader.audit`) is a DataError naming the file."""
    reader = get_reader(data_cfg)
    root = reader.root()
    if audit:
        problems = reader.audit(root)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise DataError(f"{problems[0]}{more}; 'semiseg check-data' lists every problem")
    listed = root / f"{split}.txt"
    if listed.is_file():
        samples = _read_split(listed, root, reader)
    else:
        samples = [reader.sample(image, mask) for image, mask in reader.list_split(root, split)]
    if not samples:
        raise DataError(f"split '{split}' of the {reader.name} dataset at {root} has no images")
    return samples


def describe_split(data_cfg: DataConfig, split: str) -> str:
    """How the images of ``split`` are chosen: its list file, or the layout's rule."""
    reader = get_reader(data_cfg)
    root = reader.root()
    listed = root / f"{split}.txt"
    return f"listed in {listed}" if listed.is_file() else reader.describe_split(root, split)


def find_split_file(path: str | Path, root: Path, bundled: Optional[Path] = None) -> Path:
    """A split file named in a config or on the command line: an absolute path as is; a relative
    one under the dataset root first (``splits/1_8/labeled.txt`` of CamVid), else from the
    working directory (a copy of UniMatch's ``splits/``), else (``bundled``, ACDC) from the
    official split files shipped with semiseg: ``splits/X`` as ``bundled/X``."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path(root) / p, p]
    if bundled is not None and not p.is_absolute() and p.parts[:1] == ("splits",):
        candidates.append(bundled.joinpath(*p.parts[1:]))
    found = _first_file(*candidates)
    if found is None:
        raise DataError(f"split file {path} not found (looked for {' and '.join(str(c) for c in candidates)})")
    return found


def read_split_file(path: str | Path, root: Union[str, Path, DataConfig]) -> list[Sample]:
    """Samples listed in a split file (both line formats, see the module docstring).

    ``root`` is the dataset folder, or the :class:`DataConfig` of the dataset; with a config,
    bare ids are resolved by that dataset's layout and masks are decoded with its label map.
    """
    if isinstance(root, DataConfig):
        reader = get_reader(root)
        root = reader.root()
    else:
        reader = FolderReader(None)
        root = Path(root).expanduser().absolute()
    return _read_split(find_split_file(path, root, getattr(reader, "bundled", None)), root, reader)


def _looks_like_path(field_: str) -> bool:
    return "/" in field_ or "\\" in field_ or Path(field_).suffix.lower() in IMAGE_EXTS


def _inside_root(root: Path, field_: str, where: str) -> Path:
    """``root/field_`` normalised; DataError if it leaves the root (symlinks inside are allowed)."""
    base = os.path.abspath(root)
    full = os.path.normpath(os.path.join(base, field_))  # an absolute field_ replaces base
    if os.path.commonpath([base, full]) != base:
        raise DataError(f"{where}: {field_!r} resolves outside the dataset root {root}")
    return Path(full)


def _read_split(split_file: Path, root: Path, reader: DatasetReader) -> list[Sample]:
    try:
        lines = split_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"split file {split_file} cannot be read ({e}): expected a text file") from None
    samples = []
    seen: dict[Path, int] = {}  # image -> first line: a repeated image is an error, not a silent double weight
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"split file {split_file} line {lineno}"
        if len(fields) > 2:
            raise DataError(f"{where}: expected 'IMAGE MASK' or one id, got {len(fields)} fields")
        if len(fields) == 2:
            image, mask = (_inside_root(root, f, where) for f in fields)
        elif _looks_like_path(fields[0]) and not reader.names_are_ids:
            image = _inside_root(root, fields[0], where)
            mask = reader.mask_for_image(root, image)
        else:
            pair = reader.resolve_id(root, fields[0])
            if pair is None:
                raise DataError(f"{where}: no image with id {fields[0]!r} in the {reader.name} layout under {root}")
            image, mask = pair
        if not image.is_file():
            raise DataError(f"{where}: image {image} does not exist")
        if image in seen:
            raise DataError(f"{where}: duplicate id {fields[0]!r} (image {image} is already listed on line "
                            f"{seen[image]}): expected each image once")
        seen[image] = lineno
        samples.append(reader.sample(image, mask))
    if not samples:
        raise DataError(f"split file {split_file} lists no images")
    return samples
