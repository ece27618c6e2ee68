"""The built-in dataset: procedural textured shapes, a small but real semi-supervised problem.

Every image (``image_size`` x ``image_size`` RGB) shows a background and 3-7 overlapping
objects. Six classes, told apart by texture and, less reliably, by outline:

=====  ============  ===================================================================
index  class         texture (inside its outline)
=====  ============  ===================================================================
0      background    a smooth two-colour gradient, plus flat distractor shapes and strokes
1      stripes       sinusoidal grating, random orientation, period 4-10 px (ellipses)
2      checkerboard  rotated checkerboard, cells 3-6 px (rotated rectangles)
3      dots          rotated lattice of disks, spacing 5-9 px (triangles)
4      blobs         thresholded smooth noise, patches of ~6-12 px (wavy star shapes)
5      grid          thin lines in two directions, spacing 5-10 px (pentagons, hexagons)
=====  ============  ===================================================================

Colour carries no information: the two colours of every texture and of the background are
drawn from one distribution (uniform RGB, pairs at least 80 apart), so no colour threshold
separates the classes. Clutter makes the problem hard enough that 10-20 labelled images
underfit it: objects overlap (the mask shows what is visible), 0-2 flat-coloured distractor
shapes with the objects' outlines and 2-6 thin strokes are drawn among and over them and
labelled background, texture scales and orientations vary per object, a soft illumination
field multiplies the whole image and Gaussian pixel noise is added.

Generation is deterministic: image ``i`` of split ``s`` draws from numpy's PCG64 seeded with
``(seed, s, i)``, so the same parameters give byte-identical files. :func:`ensure_synthetic`
writes the ``folder`` layout (``images/``, ``masks/``, ``train.txt``, ``val.txt``,
``params.json``) under ``data.root`` (or ``$SEMISEG_CACHE``, else ``~/.cache/semiseg``) in a
subfolder named by a hash of the parameters. It generates into a temporary folder renamed into
place when complete, so an interrupted generation is never mistaken for a finished one, and
concurrent processes (one per rank) agree on one copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("background", "stripes", "checkerboard", "dots", "blobs", "grid")
GENERATOR_VERSION = 1  # bump when the images change, so old caches are not reused
SPLITS = ("train", "val")

_OUTLINE = {1: "ellipse", 2: "rectangle", 3: "triangle", 4: "wavy", 5: "polygon"}


# ---------------------------------------------------------------------------------------------
# Drawing primitives: all work on float pixel-centre grids (yy, xx) of one image.


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours from the one distribution every class shares, at least 80 apart."""
    while True:
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if np.linalg.norm(a - b) >= 80:
            return a, b


def _rotated(yy, xx, angle):
    c, s = np.cos(angle), np.sin(angle)
    return xx * c + yy * s, -xx * s + yy * c


def _smooth_noise(rng, size: int, cell: float) -> np.ndarray:
    """Gaussian noise on a coarse grid of ``cell`` px, bicubically upsampled: a smooth field."""
    k = max(2, int(round(size / cell)) + 1)
    coarse = rng.standard_normal((k, k)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))


def _outline(rng, family: str, yy, xx, cy, cx, radius) -> np.ndarray:
    """Boolean mask of one shape centred at (cy, cx) with a random rotation."""
    u, v = _rotated(yy - cy, xx - cx, rng.uniform(0, 2 * np.pi))
    if family in ("ellipse", "rectangle"):
        b = radius * rng.uniform(0.5, 1.0)
        if family == "ellipse":
            return (u / radius) ** 2 + (v / b) ** 2 <= 1
        return (np.abs(u) <= radius * 0.85) & (np.abs(v) <= b * 0.85)
    angle, dist = np.arctan2(v, u), np.hypot(u, v)
    if family == "wavy":
        r = np.ones_like(angle)
        for k in range(2, 6):
            r += rng.uniform(0, 0.12) * np.sin(k * angle + rng.uniform(0, 2 * np.pi))
        return dist <= radius * r
    n, radius = (3, radius * 1.35) if family == "triangle" else (int(rng.integers(5, 7)), radius)
    sector = 2 * np.pi / n  # regular polygon in polar form: r(a) = R cos(pi/n) / cos(a mod sector - pi/n)
    return dist * np.cos(np.mod(angle, sector) - sector / 2) <= radius * np.cos(sector / 2)


def _texture(rng, cls: int, yy, xx, size: int, scale: float) -> np.ndarray:
    """Mixing weight in [0, 1] between a texture's two colours, over the whole image."""
    u, v = _rotated(yy, xx, rng.uniform(0, np.pi))
    if cls == 1:  # stripes
        period = rng.uniform(4, 10) * scale
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    if cls == 2:  # checkerboard
        cell = rng.uniform(3, 6) * scale
        return ((np.floor(u / cell + rng.uniform()) + np.floor(v / cell + rng.uniform())) % 2).astype(float)
    if cls == 3:  # dot lattice
        spacing = rng.uniform(5, 9) * scale
        du = np.mod(u / spacing + rng.uniform(), 1) - 0.5
        dv = np.mod(v / spacing + rng.uniform(), 1) - 0.5
        return (np.hypot(du, dv) < rng.uniform(0.25, 0.38)).astype(float)
    if cls == 4:  # blobs
        return (_smooth_noise(rng, size, rng.uniform(6, 12) * scale) > 0).astype(float)
    if cls == 5:  # grid of thin lines
        spacing, width = rng.uniform(5, 10) * scale, rng.uniform(0.8, 1.5) * scale
        du = np.mod(u + rng.uniform() * spacing, spacing)
        dv = np.mod(v + rng.uniform() * spacing, spacing)
        return (np.minimum(np.minimum(du, spacing - du), np.minimum(dv, spacing - dv)) < width / 2).astype(float)
    raise ValueError(f"no texture for class {cls}")


def _paint(rgb: np.ndarray, where: np.ndarray, weight, colours) -> None:
    a, b = colours
    w = np.broadcast_to(np.asarray(weight, dtype=np.float32), where.shape)[where][:, None]
    rgb[where] = a * (1 - w) + b * w


def _stroke(yy, xx, p0, p1, width) -> np.ndarray:
    """Pixels within width/2 of the segment p0-p1."""
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1])) <= width / 2


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image: ``(size, size, 3)`` uint8 RGB and its ``(size, size)`` uint8 class mask."""
    scale = size / 96
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    rgb = np.empty((size, size, 3), dtype=np.float32)
    label = np.zeros((size, size), dtype=np.uint8)

    # Background: a smooth gradient between two colours in a random direction.
    ramp, _ = _rotated(yy, xx, rng.uniform(0, 2 * np.pi))
    _paint(rgb, np.ones_like(label, bool), (ramp - ramp.min()) / np.ptp(ramp), _colour_pair(rng))

    # Objects and flat distractors (background), in random depth order.
    layers = [int(c) for c in rng.integers(1, len(CLASS_NAMES), rng.integers(3, 8))]
    layers += [0] * int(rng.integers(0, 3))
    for cls in rng.permutation(layers):
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        radius = rng.uniform(0.14, 0.30) * size * (0.7 if cls == 0 else 1.0)
        family = _OUTLINE[cls] if cls else _OUTLINE[int(rng.integers(1, len(CLASS_NAMES)))]
        inside = _outline(rng, family, yy, xx, cy, cx, radius)
        weight = _texture(rng, cls, yy, xx, size, scale) if cls else 0.0
        _paint(rgb, inside, weight, _colour_pair(rng))
        label[inside] = cls

    # Thin strokes over everything, labelled background.
    for _ in range(int(rng.integers(2, 7))):
        p0, p1 = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
        on = _stroke(yy, xx, p0, p1, rng.uniform(1.0, 2.5) * scale)
        rgb[on] = rng.uniform(0, 255, 3)
        label[on] = 0

    illumination = 1 + 0.15 * _smooth_noise(rng, size, 32 * scale)
    rgb = rgb * illumination[..., None] + rng.normal(0, rng.uniform(3, 10), rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), label


# ---------------------------------------------------------------------------------------------
# The cached dataset


def _params(synthetic_cfg) -> dict:
    return {"generator_version": GENERATOR_VERSION, **synthetic_cfg.model_dump()}


def generate(out_dir: str | Path, synthetic_cfg) -> Path:
    """Write the dataset described by ``synthetic_cfg`` (a SyntheticConfig) into ``out_dir``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    counts = {"train": synthetic_cfg.num_train, "val": synthetic_cfg.num_val}
    for split_index, split in enumerate(SPLITS):
        lines = []
        for i in range(counts[split]):
            rng = np.random.Generator(np.random.PCG64([synthetic_cfg.seed, split_index, i]))
            image, mask = render(rng, synthetic_cfg.image_size)
            name = f"{split}_{i:05d}.png"
            Image.fromarray(image).save(out / "images" / name)
            Image.fromarray(mask).save(out / "masks" / name)
            lines.append(f"images/{name} masks/{name}\n")
        (out / f"{split}.txt").write_text("".join(lines))
    params = {**_params(synthetic_cfg), "class_names": list(CLASS_NAMES)}
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    return out


def cache_dir(data_cfg) -> Path:
    """Where the dataset for these parameters lives (it may not exist yet)."""
    base = data_cfg.root or os.environ.get("SEMISEG_CACHE") or "~/.cache/semiseg"
    key = hashlib.sha256(json.dumps(_params(data_cfg.synthetic), sort_keys=True).encode()).hexdigest()[:12]
    return Path(base).expanduser() / f"synthetic-{key}"


def ensure_synthetic(data_cfg) -> Path:
    """The root of the generated dataset, generating it first if it is not there yet."""
    root = cache_dir(data_cfg)
    if (root / "params.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        generate(tmp, data_cfg.synthetic)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "params.json").is_file():  # not "another process finished first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
