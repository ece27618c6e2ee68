"""A small generated stand-in for LEVIR-CD / WHU-CD, in the real on-disk layout (:mod:`semiseg.data.change`).

Every tile is a pair of ``size x size`` RGB images of the same place at two dates:

* the ground: a smooth random texture of fields (green to brown) plus pixel noise, the same at
  both dates up to a global illumination / colour shift drawn per date and fresh noise;
* buildings: axis-aligned rectangles with a roof colour (grey, red, blue-grey) and a dark
  shadow edge. Some stand at both dates (unchanged; their roof colour may drift slightly),
  some appear only in B (built) and some only in A (demolished: the ground shows again);
* the change mask (``label/``) is 255 on the buildings that appear or vanish, 0 elsewhere.

Written as UniMatch reads LEVIR-CD::

    A/{train,val,test}_N.png, B/..., label/...
    splits/<name>/train.txt, val.txt, test.txt
    splits/<name>/{5%,10%,20%,40%}/labeled.txt, unlabeled.txt   (the first p% of train.txt, seeded shuffle)

``python -m semiseg.data.cd_synthetic OUT`` (or :func:`generate_change`) writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PERCENTS = (5, 10, 20, 40)
ROOFS = np.array([[150, 150, 155], [170, 70, 55], [95, 110, 135], [200, 195, 185]], np.float32)


def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    coarse = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, size)
    i = np.floor(t).astype(int).clip(0, cells - 1)
    f = t - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _rect(rng: np.random.Generator, size: int, taken: np.ndarray):
    """A free rectangle (y0, y1, x0, x1) with a one-pixel margin, or None after a few tries."""
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(size // 10, size // 4 + 1, 2))
        y, x = int(rng.integers(1, size - h - 1)), int(rng.integers(1, size - w - 1))
        if not taken[y - 1:y + h + 1, x - 1:x + w + 1].any():
            taken[y - 1:y + h + 1, x - 1:x + w + 1] = True
            return y, y + h, x, x + w
    return None


def _draw(img: np.ndarray, box, roof: np.ndarray) -> None:
    y0, y1, x0, x1 = box
    img[y0:y1, x0:x1] = roof
    img[y1 - 1:y1 + 1, x0 + 1:x1 + 1] *= 0.45  # shadow on the bottom and right edges
    img[y0 + 1:y1 + 1, x1 - 1:x1 + 1] *= 0.45


def change_pair(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A uint8 (S, S, 3), B uint8 (S, S, 3), label uint8 (S, S) in {0, 255})``."""
    fields = _smooth(rng, size, 4)
    green, brown = np.array([70, 120, 50], np.float32), np.array([150, 125, 85], np.float32)
    ground = green * (1 - fields[..., None]) + brown * fields[..., None]
    ground += (_smooth(rng, size, 12)[..., None] - 0.5) * 30
    taken = np.zeros((size, size), bool)
    kinds = (["same"] * int(rng.integers(1, 4)) + ["built"] * int(rng.integers(0, 3))
             + ["gone"] * int(rng.integers(0, 2)))
    dates = [ground.copy(), ground.copy()]
    label = np.zeros((size, size), np.uint8)
    for kind in kinds:
        box = _rect(rng, size, taken)
        if box is None:
            continue
        roof = ROOFS[rng.integers(len(ROOFS))] + rng.normal(0, 8, 3)
        if kind in ("same", "gone"):
            _draw(dates[0], box, roof)
        if kind in ("same", "built"):
            _draw(dates[1], box, roof + (rng.normal(0, 10, 3) if kind == "same" else 0))
        if kind != "same":
            y0, y1, x0, x1 = box
            label[y0:y1, x0:x1] = 255
    out = []
    for img in dates:  # a per-date illumination and colour shift, fresh noise
        img = img * rng.uniform(0.8, 1.2) + rng.normal(0, 8, 3) + rng.normal(0, 6, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out[0], out[1], label


def generate_change(out: str | Path, num_train: int = 80, num_val: int = 16, num_test: int = 16, size: int = 64,
                    seed: int = 0, splits_name: str = "levir") -> Path:
    """Write the dataset under ``out`` (see the module docstring); returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for d in ("A", "B", "label"):
        (out / d).mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {}
    for split, n in (("train", num_train), ("val", num_val), ("test", num_test)):
        names[split] = []
        for i in range(n):
            name = f"{split}_{i}.png"
            a, b, label = change_pair(rng, size)
            Image.fromarray(a).save(out / "A" / name)
            Image.fromarray(b).save(out / "B" / name)
            Image.fromarray(label).save(out / "label" / name)
            names[split].append(name)
    splits = out / "splits" / splits_name
    splits.mkdir(parents=True, exist_ok=True)
    for split, listed in names.items():
        (splits / f"{split}.txt").write_text("\n".join(listed) + "\n")
    order = list(names["train"])
    np.random.default_rng(seed + 1).shuffle(order)
    for p in PERCENTS:
        k = max(1, round(len(order) * p / 100))
        (splits / f"{p}%").mkdir(exist_ok=True)
        (splits / f"{p}%" / "labeled.txt").write_text("\n".join(order[:k]) + "\n")
        (splits / f"{p}%" / "unlabeled.txt").write_text("\n".join(order[k:]) + "\n")
    return out


def ensure_change_synthetic(out: str | Path, **kwargs) -> Path:
    """The generated dataset at ``out``, written once (atomically: a temporary folder renamed)."""
    out = Path(out)
    stamp = out / "generated.json"
    params = {"num_train": 80, "num_val": 16, "num_test": 16, "size": 64, "seed": 0, "splits_name": "levir", **kwargs}
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    generate_change(tmp, **params)
    (tmp / "generated.json").write_text(json.dumps(params))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="write a small generated LEVIR-CD-layout dataset")
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=80)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate_change(args.out, num_train=args.train, size=args.size, seed=args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
