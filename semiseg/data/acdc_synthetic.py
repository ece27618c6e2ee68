"""A small generated stand-in for ACDC, in the real on-disk layout (:mod:`semiseg.data.acdc`).

Each "patient" has two frames (``frame01`` end-diastole, ``frame02`` end-systole, the smaller
ventricle); each frame is a short-axis stack of ``slices`` images of ``height x width`` with

* LV (3): a disc, bright (blood pool);
* Myo (2): the ring around it, dark, about as dark as the background tissue;
* RV (1): a crescent hugging the myocardium on one side, bright;

radii shrink from base to apex, centres and radii vary per patient, the background is a smooth
random texture plus noise, and every volume is min-max scaled to [0, 1] (as SSL4MIS's
processed ACDC). Written as UniMatch reads them::

    data/patientNNN_frameFF.h5                     image, label (D, H, W)
    data/slices/patientNNN_frameFF_slice_S.h5      image, label (H, W), every slice of the
                                                   training patients
    splits/acdc/{1,3,7}/labeled.txt, unlabeled.txt the slices of the first 1, 3, 7 training
                                                   patients / of the others
    splits/acdc/train_slices.txt, val.txt, test.txt, valtest.txt

``python -m semiseg.data.acdc_synthetic OUT`` (or :func:`generate_acdc`) writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from semiseg.data.acdc import require_h5py


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int = 6) -> np.ndarray:
    """A smooth random field in [0, 1]: coarse noise upsampled bilinearly."""
    h, w = shape
    coarse = rng.random((cells + 1, cells + 1))
    ys, xs = np.linspace(0, cells, h), np.linspace(0, cells, w)
    y0, x0 = np.floor(ys).astype(int).clip(0, cells - 1), np.floor(xs).astype(int).clip(0, cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a, b = coarse[y0][:, x0], coarse[y0][:, x0 + 1]
    c, d = coarse[y0 + 1][:, x0], coarse[y0 + 1][:, x0 + 1]
    return (a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx)


def heart_slice(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float], r_lv: float,
                thickness: float, rv_side: float) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32, label uint8)`` of one short-axis slice (see the module docstring)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = centre
    dist = np.hypot(yy - cy, xx - cx)
    label = np.zeros(shape, np.uint8)
    # RV: an ellipse beside the heart, cut by the myocardium's outer circle (a crescent)
    ry, rx = 1.3 * (r_lv + thickness), 0.9 * (r_lv + thickness)
    oy, ox = cy + 0.9 * (r_lv + thickness) * np.sin(rv_side), cx + 0.9 * (r_lv + thickness) * np.cos(rv_side)
    rv = ((yy - oy) / ry) ** 2 + ((xx - ox) / rx) ** 2 <= 1.0
    label[rv] = 1
    label[dist <= r_lv + thickness] = 2
    label[dist <= r_lv] = 3
    tissue = 0.25 + 0.25 * _smooth_noise(rng, shape)
    intensity = np.select([label == 3, label == 2, label == 1], [0.85, 0.3, 0.7], default=0.0)
    image = np.where(label > 0, intensity, tissue) + rng.normal(0.0, 0.06, shape)
    return image.astype(np.float32), label


def heart_volume(rng: np.random.Generator, shape: tuple[int, int], slices: int, systole: bool,
                 patient: dict) -> tuple[np.ndarray, np.ndarray]:
    """A stack of ``slices`` short-axis slices from base (largest) to apex."""
    images, labels = [], []
    for s in range(slices):
        shrink = 1.0 - 0.5 * s / max(1, slices - 1)
        r_lv = patient["r_lv"] * shrink * (0.7 if systole else 1.0)
        thickness = patient["thickness"] * (1.3 if systole else 1.0)
        img, lab = heart_slice(rng, shape, patient["centre"], r_lv, thickness, patient["rv_side"])
        images.append(img)
        labels.append(lab)
    image = np.stack(images)
    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
    return image.astype(np.float32), np.stack(labels)


def generate_acdc(root: str | Path, train_patients: int = 10, val_patients: int = 2, test_patients: int = 2,
                  slices: int = 6, height: int = 72, width: int = 80, seed: int = 0) -> Path:
    """Write the generated dataset under ``root`` (created; existing files are overwritten)."""
    if train_patients < 7:
        raise ValueError(f"train_patients must be at least 7 (the 7-case split), got {train_patients}")
    h5py = require_h5py()
    root = Path(root)
    (root / "data" / "slices").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = train_patients + val_patients + test_patients
    ids = [f"patient{n:03d}" for n in range(1, total + 1)]
    train, val, test = ids[:train_patients], ids[train_patients:train_patients + val_patients], ids[-test_patients:]
    slice_paths: dict[str, list[str]] = {}
    volume_paths: dict[str, list[str]] = {}
    for pid in ids:
        patient = {"centre": (height / 2 + rng.uniform(-0.12, 0.12) * height,
                              width / 2 + rng.uniform(-0.12, 0.12) * width),
                   "r_lv": rng.uniform(0.1, 0.16) * min(height, width),
                   "thickness": rng.uniform(0.04, 0.07) * min(height, width),
                   "rv_side": rng.uniform(0.75, 1.25) * np.pi}
        for frame, systole in (("frame01", False), ("frame02", True)):
            image, label = heart_volume(rng, (height, width), slices, systole, patient)
            name = f"{pid}_{frame}"
            with h5py.File(root / "data" / f"{name}.h5", "w") as f:
                f["image"], f["label"] = image, label
            volume_paths.setdefault(pid, []).append(f"data/{name}.h5")
            if pid in train:
                for s in range(slices):
                    rel = f"data/slices/{name}_slice_{s}.h5"
                    with h5py.File(root / rel, "w") as f:
                        f["image"], f["label"] = image[s], label[s]
                    slice_paths.setdefault(pid, []).append(rel)

    splits = root / "splits" / "acdc"

    def write(rel: str, lines: list[str]) -> None:
        (splits / rel).parent.mkdir(parents=True, exist_ok=True)
        (splits / rel).write_text("".join(f"{line}\n" for line in lines))

    for cases in (1, 3, 7):
        write(f"{cases}/labeled.txt", [p for pid in train[:cases] for p in slice_paths[pid]])
        write(f"{cases}/unlabeled.txt", [p for pid in train[cases:] for p in slice_paths[pid]])
    write("train_slices.txt", [p for pid in train for p in slice_paths[pid]])
    write("val.txt", [p for pid in val for p in volume_paths[pid]])
    write("test.txt", [p for pid in test for p in volume_paths[pid]])
    write("valtest.txt", [p for pid in val + test for p in volume_paths[pid]])
    params = dict(train_patients=train_patients, val_patients=val_patients, test_patients=test_patients,
                  slices=slices, height=height, width=width, seed=seed)
    (root / "params.json").write_text(json.dumps(params))
    return root


def ensure_acdc_synthetic(root: str | Path, **params) -> Path:
    """``root`` holding the generated dataset with ``params``, generated first if absent."""
    root = Path(root)
    marker = root / "params.json"
    if marker.is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        generate_acdc(tmp, **params)
        try:
            os.rename(tmp, root)
        except OSError:
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="write a small generated ACDC-layout dataset")
    p.add_argument("out")
    p.add_argument("--train-patients", type=int, default=10)
    p.add_argument("--slices", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    root = generate_acdc(a.out, train_patients=a.train_patients, slices=a.slices, seed=a.seed)
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
