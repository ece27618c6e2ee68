"""Image-level class tags: reading a tags file, deriving tags from masks.

Tags are the weak supervision of semi-and-weakly supervised segmentation (Wang et al., Pattern
Recognition 2022): a multi-hot vector over the ``K`` classes per image. Where they come from is
``data.tags``:

* unset: no tags (the batches carry no ``tags`` key);
* ``masks``: derived from each image's mask -- a class is present when it has at least
  ``data.tags_min_pixels`` pixels (the benchmark protocol: the weak images' masks are read only
  for their tags, never as pixel labels);
* a file (found under the data root first, then from the working directory), either

  - CSV: one image per row, ``IMAGE,TAGS...``; ``IMAGE`` is the image path relative to the data
    root (``train/0001TP_006690.png``), its file name or its id (the file stem); the tags are
    class names or indices, one per column and/or separated by ``;`` or ``|`` inside a column
    (``img1,car;road``). A first row whose first field is ``image``/``id``/``path``/``file``/
    ``filename``/``name`` is a header;
  - JSON: ``{"IMAGE": ["car", "road"], ...}`` (a list of names/indices, or one ``"car;road"``
    string), or a list of ``{"image": IMAGE, "tags": [...]}`` objects.

  An unknown class name or an index outside ``[0, K)`` is a one-line :class:`DataError` naming
  the file and the entry. Images without an entry fall back to their mask when they have one,
  else are an error naming the image and the file.

The strong (pixel-labelled) images always take their tags from their own mask.

``data.background_class`` is the class that is always present (``0`` for Pascal/COCO);
``null`` for datasets without one (CamVid). The default ``auto`` means 0 when the dataset's first
class is called ``background`` (Pascal, COCO, the synthetic data), else none.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from semiseg.data import IGNORE_INDEX
from semiseg.errors import ConfigError, DataError

HEADER_FIELDS = {"image", "id", "path", "file", "filename", "name"}
_SEPARATORS = re.compile(r"[;|]")


def resolve_background(data_cfg, class_names: list[str]) -> Optional[int]:
    """``data.background_class`` as an index or None (``auto``: 0 if class 0 is ``background``)."""
    value = getattr(data_cfg, "background_class", "auto")
    if value == "auto":
        return 0 if class_names and class_names[0].strip().lower() in ("background", "_background_", "bg") else None
    if value is None:
        return None
    if not 0 <= int(value) < len(class_names):
        raise ConfigError(f"key 'data.background_class': {value} is not a class index in [0, {len(class_names)})")
    return int(value)


def multi_hot(indices: Iterable[int], num_classes: int, background: Optional[int] = None) -> np.ndarray:
    """``(K,)`` bool vector with ``indices`` (and the background, when defined) set."""
    tags = np.zeros(num_classes, dtype=bool)
    tags[list(indices)] = True
    if background is not None:
        tags[background] = True
    return tags


def tags_from_mask(labels: np.ndarray, num_classes: int, background: Optional[int] = None,
                   min_pixels: int = 1, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``(K,)`` bool tags of an ``(H, W)`` label map: classes with at least ``min_pixels`` pixels
    (the ignore label and values outside ``[0, K)`` are not classes), plus the background."""
    values = np.asarray(labels).reshape(-1).astype(np.int64)
    values = values[(values != ignore_index) & (values >= 0) & (values < num_classes)]
    counts = np.bincount(values, minlength=num_classes)[:num_classes]
    present = np.flatnonzero(counts >= max(1, int(min_pixels)))
    return multi_hot(present, num_classes, background)


# ---------------------------------------------------------------------------------------------
# Tags files


def _class_index(token, class_names: list[str], where: str) -> int:
    k = len(class_names)
    text = str(token).strip()
    if isinstance(token, bool):
        raise DataError(f"{where}: unknown class {token!r} (expected a class name or an index in [0, {k}))")
    if isinstance(token, int) or re.fullmatch(r"[+-]?\d+", text):
        index = int(text)
        if not 0 <= index < k:
            raise DataError(f"{where}: class index {index} is out of range (expected an index in [0, {k}))")
        return index
    lowered = [n.strip().lower() for n in class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    shown = ", ".join(class_names[:12]) + (", ..." if k > 12 else "")
    raise DataError(f"{where}: unknown class {text!r} (expected one of: {shown}; or an index in [0, {k}))")


def _split_cells(cells: Iterable) -> list:
    tokens = []
    for cell in cells:
        if isinstance(cell, str):
            tokens += [t.strip() for t in _SEPARATORS.split(cell) if t.strip()]
        else:
            tokens.append(cell)
    return tokens


def normalize_key(key: str) -> str:
    """A tags-file key as compared with images: stripped, forward slashes, no leading ``./``."""
    key = str(key).strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def _raw_entries(path: Path) -> list[tuple[str, list]]:
    """(key, list of class tokens) per entry of a CSV or JSON tags file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"tags file {path} cannot be read ({e}): expected a CSV or JSON text file") from None
    if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"tags file {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if isinstance(data, dict):
            items = list(data.items())
        elif isinstance(data, list):
            items = []
            for i, obj in enumerate(data):
                key = obj.get("image", obj.get("id")) if isinstance(obj, dict) else None
                tags = (obj.get("tags", obj.get("classes", obj.get("labels"))) if isinstance(obj, dict) else None)
                if key is None or tags is None:
                    raise DataError(f"tags file {path}: entry {i}: expected an object with 'image' (or 'id') "
                                    "and 'tags'")
                items.append((key, tags))
        else:
            raise DataError(f"tags file {path}: expected a JSON object IMAGE -> tags or a list of objects")
        return [(str(k), _split_cells(v if isinstance(v, list) else [v])) for k, v in items]
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)
            and not r[0].strip().startswith("#")]
    if rows and rows[0][0].strip().lower() in HEADER_FIELDS:
        rows = rows[1:]
    return [(row[0], _split_cells(row[1:])) for row in rows]


def read_tags_file(path: str | Path, class_names: list[str]) -> dict[str, list[int]]:
    """``{normalized key: sorted class indices}`` of a CSV or JSON tags file (see the module
    docstring); DataError naming the file and the entry for an unknown class."""
    path = Path(path)
    entries: dict[str, list[int]] = {}
    for key, tokens in _raw_entries(path):
        where = f"tags file {path}: entry {normalize_key(key)!r}"
        entries[normalize_key(key)] = sorted({_class_index(t, class_names, where) for t in tokens})
    if not entries:
        raise DataError(f"tags file {path} lists no images")
    return entries


# ---------------------------------------------------------------------------------------------
# Per-sample tags


class TagSource:
    """The tags of the samples of one dataset config (``data.tags``): ``for_labels`` for an
    already-decoded mask, ``for_sample`` for any sample (file entry, else its mask)."""

    def __init__(self, num_classes: int, class_names: list[str], background: Optional[int], min_pixels: int = 1,
                 entries: Optional[dict[str, list[int]]] = None, root: Optional[Path] = None,
                 source: str = "masks"):
        self.num_classes = num_classes
        self.class_names = class_names
        self.background = background
        self.min_pixels = min_pixels
        self.entries = entries
        self.root = Path(root) if root is not None else None
        self.source = source
        self._cache: dict[str, np.ndarray] = {}

    def for_labels(self, labels: np.ndarray) -> np.ndarray:
        return tags_from_mask(labels, self.num_classes, self.background, self.min_pixels)

    def _keys(self, sample) -> list[str]:
        keys = []
        if self.root is not None:
            keys.append(normalize_key(os.path.relpath(os.path.abspath(sample.image), os.path.abspath(self.root))))
        return keys + [sample.id, Path(sample.image).name]

    def lookup(self, sample) -> Optional[np.ndarray]:
        """The tags file's entry for ``sample`` (by relative path, id or file name), or None."""
        if self.entries is None:
            return None
        for key in self._keys(sample):
            if key in self.entries:
                return multi_hot(self.entries[key], self.num_classes, self.background)
        return None

    def for_sample(self, sample) -> np.ndarray:
        key = str(sample.image)
        if key not in self._cache:
            tags = self.lookup(sample)
            if tags is None:
                if sample.mask is None:
                    raise DataError(f"image {sample.image} has no entry in tags file {self.source} and no mask "
                                    "to derive its tags from")
                from semiseg.data.io import decode_mask, read_mask

                tags = self.for_labels(decode_mask(read_mask(sample.mask), sample.label_map, sample.mask))
            self._cache[key] = tags
        return self._cache[key]


def build_tag_source(data_cfg, info=None) -> Optional[TagSource]:
    """The :class:`TagSource` of ``data.tags`` (None when unset)."""
    spec = getattr(data_cfg, "tags", None)
    if spec is None:
        return None
    from semiseg.data.datasets import dataset_info, resolve_root

    info = info or dataset_info(data_cfg)
    background = resolve_background(data_cfg, list(info.class_names))
    min_pixels = getattr(data_cfg, "tags_min_pixels", 1)
    root = resolve_root(data_cfg)
    if str(spec).strip().lower() == "masks":
        return TagSource(info.num_classes, list(info.class_names), background, min_pixels, root=root)
    given = Path(spec).expanduser()
    candidates = [given] if given.is_absolute() else [root / given, given]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise DataError(f"tags file {spec} not found (key 'data.tags'; looked for "
                        f"{' and '.join(str(c) for c in candidates)}); expected a CSV or JSON file, or 'masks'")
    return TagSource(info.num_classes, list(info.class_names), background, min_pixels,
                     entries=read_tags_file(path, list(info.class_names)), root=root, source=str(path))
