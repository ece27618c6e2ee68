#!/usr/bin/env python
"""What does an AllSpark network predict when its labelled branch reads other keys and values?

In training, AllSpark's labelled images are rebuilt by channel-wise cross-attention to the
unlabelled images of the batch, or to the semantic memory once it is in use (after
``method.memory_warmup_iters``). At evaluation, and in the pass that makes the pseudo labels,
there is no unlabelled batch: the official code (and semiseg) runs the labelled branch with the
image's own channels as keys and values. If the cross-attention has learned to read memory
channels, that eval-mode input is one it never saw in training. This script scores one run's
network on a split with the same weights and three key/value sources for the labelled branch:

* ``image``  the image's own channels (what evaluation does);
* ``memory`` the run's semantic memory, as the labelled branch reads it in training;
* ``self``   the unlabelled branch (channel-wise self-attention) instead of the labelled one.

The memory holds channel vectors of the training crop's patch count, so every source is scored
in sliding-window mode with windows of ``data.crop_size`` (the same windows for all three);
``image`` and ``self`` are also scored on the whole image (``original``, the protocol's
scoring). One Markdown row per source::

    python benchmarks/allspark_kv_probe.py runs/bench/W-allspark-1_8-s0

A run directory is read at ``checkpoints/last.safetensors`` (the memory as training left it);
pass a checkpoint file to score another.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCES = ("image", "memory", "self")


@contextmanager
def kv_source(neck, source: str) -> Iterator[None]:
    """Within the block, the eval-mode labelled branch of ``neck`` reads keys/values from
    ``source`` (one of :data:`SOURCES`)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    original = neck.cross_attention
    if source == "memory":
        def cross(queries, sources, shared=True):
            return original(queries, neck.memory.as_tokens().to(queries.dtype), shared=True)
        neck.cross_attention = cross
    elif source == "self":
        neck.cross_attention = lambda queries, sources, shared=True: neck.self_attention(queries)
    try:
        yield
    finally:
        neck.__dict__.pop("cross_attention", None)


def probe(checkpoint: str, split: str = "val", data_root: str | None = None, progress: bool = False) -> list[dict]:
    from semiseg.api import build_method_from_checkpoint
    from semiseg.data.build import build_eval_set
    from semiseg.data.datasets import dataset_info
    from semiseg.engine.evaluator import evaluate
    from semiseg.models.allspark_neck import AllSparkNeck

    path = Path(checkpoint)
    if path.is_dir():
        last = path / "checkpoints" / "last.safetensors"
        if not last.exists():
            raise SystemExit(f"{checkpoint}: no checkpoints/last.safetensors; pass a checkpoint file")
        path = last
    overrides = [f"data.root={data_root}"] if data_root else []
    cfg, method, meta = build_method_from_checkpoint(path, overrides)
    network = method.inference_model("auto").eval()
    neck = getattr(network, "neck", None)
    if not isinstance(neck, AllSparkNeck):
        raise SystemExit(f"{checkpoint}: the network has no AllSpark neck (method {cfg.method.name!r})")
    info = dataset_info(cfg.data)
    dataset = build_eval_set(cfg, split)
    crop = cfg.data.crop_size
    rows = []
    for mode in ("sliding_window", "original"):
        eval_cfg = cfg.eval.model_copy(update={"mode": mode, "flip": False, "scales": [1.0], "crop_size": crop})
        for source in SOURCES:
            if mode == "original" and source == "memory":
                continue  # the memory's channels have the training crop's patch count
            with kv_source(neck, source):
                r = evaluate(network, dataset, eval_cfg, info.num_classes, info.ignore_index, crop_size=crop,
                             progress=progress)
            rows.append({"mode": mode, "source": source, "mIoU": r["mIoU"], "pixel_acc": r["pixel_acc"],
                         "per_class_iou": r["per_class_iou"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="an AllSpark run directory or checkpoint file")
    p.add_argument("--split", default="val", help="the split to score (default val)")
    p.add_argument("--data-root", help="override data.root of the run")
    p.add_argument("--json", help="also write every figure here")
    args = p.parse_args(argv)
    rows = probe(args.checkpoint, args.split, args.data_root, progress=sys.stderr.isatty())
    print(f"{args.checkpoint}, {args.split}")
    print("| scoring | labelled-branch keys/values | mIoU | pixel acc |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['source']} | {r['mIoU']:.2f} | {r['pixel_acc']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
