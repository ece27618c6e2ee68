#!/usr/bin/env python
"""How much of a run's score do its BatchNorm running statistics cost?

In self-training the strongly augmented views (colour jitter, grayscale, blur, CutMix) pass
through the student in train mode, so the BatchNorm running statistics that evaluation uses are
a mixture of clean and strongly augmented batches. This script scores one run's final network
twice on a split: as training left it, and after its BatchNorm statistics are recomputed on
clean images (every image of ``--calib`` at the protocol's base resize, no augmentation, in
batches of ``--batch``; a cumulative average, weights untouched). A supervised run is the
control: its statistics saw only weakly augmented labelled crops. One Markdown row per state::

    python benchmarks/bn_recalibration_probe.py runs/bench-v2/fixmatch-1_16-s0
    python benchmarks/bn_recalibration_probe.py runs/bench-v2/meanteacher-1_16-s0 --network teacher

``--network`` picks which of the method's networks is scored and recalibrated (``auto``: the one
its evaluation reports first). An EMA teacher's statistics are the EMA of the student's, which
saw the strong views, never a batch of clean unlabelled images: recalibrating the teacher is the
probe for that.

A run directory is read at ``checkpoints/last.safetensors``; pass a checkpoint file to score
another.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def recalibrate(network, dataset, batch: int = 8) -> int:
    """Recompute every BatchNorm's running mean/var of ``network`` as the average over batches of
    ``dataset``'s images (whole images, train-mode BatchNorm, no gradient); returns the number of
    batches. The network is left in eval mode."""
    import torch
    from torch import nn

    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise SystemExit("the network has no BatchNorm layer: nothing to recalibrate")
    network.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
        m.train()
    n = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch):
            items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
            images = torch.stack([it["image"] for it in items if "image" in it])
            network(images)
            n += 1
    network.eval()
    return n


def probe(checkpoint: str, split: str = "val", calib: str = "train", batch: int = 8,
          data_root: str | None = None, progress: bool = False, network: str = "auto") -> list[dict]:
    from semiseg.api import build_method_from_checkpoint
    from semiseg.data.build import build_eval_set
    from semiseg.data.datasets import dataset_info
    from semiseg.engine.evaluator import evaluate

    path = Path(checkpoint)
    if path.is_dir():
        last = path / "checkpoints" / "last.safetensors"
        if not last.exists():
            raise SystemExit(f"{checkpoint}: no checkpoints/last.safetensors; pass a checkpoint file")
        path = last
    overrides = [f"data.root={data_root}"] if data_root else []
    cfg, method, meta = build_method_from_checkpoint(path, overrides)
    name = method.model_name(network)  # a one-line error naming the method's networks otherwise
    network = method.inference_model(name).eval()
    info = dataset_info(cfg.data)
    scored = build_eval_set(cfg, split)
    eval_cfg = cfg.eval.model_copy(update={"flip": False, "scales": [1.0]})
    rows = []
    r = evaluate(network, scored, eval_cfg, info.num_classes, info.ignore_index, crop_size=cfg.data.crop_size,
                 progress=progress)
    rows.append({"state": "as trained", "network": name, "mIoU": r["mIoU"], "pixel_acc": r["pixel_acc"],
                 "per_class_iou": r["per_class_iou"]})
    batches = recalibrate(network, build_eval_set(cfg, calib), batch)
    r = evaluate(network, scored, eval_cfg, info.num_classes, info.ignore_index, crop_size=cfg.data.crop_size,
                 progress=progress)
    rows.append({"state": f"BatchNorm recomputed on '{calib}' ({batches} batches of {batch})", "network": name,
                 "mIoU": r["mIoU"],
                 "pixel_acc": r["pixel_acc"], "per_class_iou": r["per_class_iou"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run directory or checkpoint file")
    p.add_argument("--split", default="val", help="the split to score (default val)")
    p.add_argument("--calib", default="train", help="the split whose images recompute the statistics (default train)")
    p.add_argument("--batch", type=int, default=8, help="images per calibration batch (default 8)")
    p.add_argument("--data-root", help="override data.root of the run")
    p.add_argument("--network", default="auto",
                   help="which of the method's networks to probe: student, teacher, ... (default auto: the one it reports)")
    p.add_argument("--json", help="also write every figure here")
    args = p.parse_args(argv)
    from semiseg.errors import SemisegError

    try:
        rows = probe(args.checkpoint, args.split, args.calib, args.batch, args.data_root,
                     progress=sys.stderr.isatty(), network=args.network)
    except SemisegError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.checkpoint}, {args.split}, network {rows[0]['network']}")
    print("| BatchNorm statistics | mIoU | pixel acc |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r['state']} | {r['mIoU']:.2f} | {r['pixel_acc']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
