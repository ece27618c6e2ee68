#!/usr/bin/env python
"""How right is a folder of pseudo-label PNGs (``semiseg pseudo-label --out DIR``)?

Scores ``DIR/<id>.png`` against the true masks of the images of a run's unlabelled pool, which
CamVid's splits keep on disk but no training run reads, and prints one JSON line: mIoU, pixel
accuracy, per-class IoU and the share of every class's pixels the labels give it (pseudo pixel
count / true pixel count, over non-void pixels). Pixels a label leaves ignored (255, as
class-balanced labels do) are left out of the IoU; ``labelled_share`` is the share of the
non-void pixels that have a label, overall and per true class. Used for the offline self-training runs of
BENCHMARKS.md:

    python benchmarks/score_pseudo_labels.py runs/st/pl-1_16-s0 --run runs/st/supervised-1_16-s0-variant \\
        --json benchmarks/results/self_training_v2_pl_1_16_s0.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semiseg.config import load_config  # noqa: E402
from semiseg.data import IGNORE_INDEX  # noqa: E402
from semiseg.data.datasets import dataset_info  # noqa: E402
from semiseg.data.io import decode_mask, read_mask  # noqa: E402
from semiseg.engine.metrics import ConfusionMatrix  # noqa: E402
from semiseg.errors import DataError  # noqa: E402
from semiseg.pseudo_label import split_samples  # noqa: E402


def score(folder: Path, cfg, split: str = "unlabeled") -> dict:
    info = dataset_info(cfg.data)
    k = info.num_classes
    cm = ConfusionMatrix(k, IGNORE_INDEX)
    true_px, kept_px, pseudo_px, scored = np.zeros(k), np.zeros(k), np.zeros(k), 0
    for s in split_samples(cfg, split):
        png = folder / f"{s.id}.png"
        if not png.is_file():
            continue
        if s.mask is None:
            raise DataError(f"image {s.image} has no mask on disk: scoring pseudo labels needs the true masks")
        truth = decode_mask(read_mask(s.mask), s.label_map, s.mask).astype(np.int64)
        pred = read_mask(png).astype(np.int64)
        if pred.shape != truth.shape:
            raise DataError(f"pseudo label {png} is {pred.shape[1]}x{pred.shape[0]}, its mask {s.mask} is "
                            f"{truth.shape[1]}x{truth.shape[0]}: expected the image's original size")
        valid = truth != IGNORE_INDEX
        labelled = valid & (pred != IGNORE_INDEX)  # class-balanced labels leave pixels ignored
        cm.update(torch.from_numpy(pred)[None], torch.from_numpy(np.where(labelled, truth, IGNORE_INDEX))[None])
        true_px += np.bincount(truth[valid], minlength=k)[:k]
        kept_px += np.bincount(truth[labelled], minlength=k)[:k]
        pseudo_px += np.bincount(pred[labelled], minlength=k)[:k]
        scored += 1
    if not scored:
        raise DataError(f"no <id>.png in {folder} for any image of split '{split}'")
    res = cm.compute()
    names = list(info.class_names)
    return {"folder": str(folder), "images": scored, "mIoU": res["mIoU"], "pixel_acc": res["pixel_acc"],
            "per_class_iou": dict(zip(names, [None if v is None else round(v, 2) for v in res["per_class_iou"]])),
            "pixel_share_ratio": dict(zip(names, [round(float(p / t), 3) if t else None
                                                  for p, t in zip(pseudo_px, true_px)])),
            "labelled_share": round(float(kept_px.sum() / true_px.sum()), 4) if true_px.sum() else None,
            "labelled_share_per_class": dict(zip(names, [round(float(c / t), 3) if t else None
                                                         for c, t in zip(kept_px, true_px)]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--run", required=True, help="the run whose config names the data and the split")
    p.add_argument("--split", default="unlabeled")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    cfg = load_config(Path(args.run) / "config.yaml")
    out = score(args.folder, cfg, args.split)
    line = json.dumps(out)
    print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
