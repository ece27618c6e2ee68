#!/usr/bin/env python
"""How good are a trained network's pseudo labels on the unlabelled pool, per confidence threshold?

Self-training (FixMatch, UniMatch, Mean Teacher, the memory-bank method) learns from the pixels
whose confidence passes ``method.conf_thresh``. Whether that can pay depends on how many pixels
pass, how often they are right, and which classes they cover. This script answers that for a run
(the network that would start self-training, e.g. a track-S supervised run for track W) on an
image list whose masks exist but are never used for training -- CamVid's unlabelled pool
``splits/1_8/unlabeled.txt`` has them -- and prints one Markdown row per threshold:

    python benchmarks/pseudo_label_quality.py runs/bench/S-supervised-1_8-s0

Columns: the share of non-void pixels kept (confidence >= threshold), the accuracy of the kept
pixels, the mIoU of the kept pseudo labels against the masks (pixels not kept count as missed),
and the share of kept pixels that belong to the rarest half of the classes by ground-truth pixel count
(how much of the training signal reaches them). Below the table, the most frequent confident
errors at ``--errors-at`` (default 0.95): for each (true class, pseudo label) pair, the share of
the true class's pixels that enter the loss with that wrong label -- the errors self-training
would reinforce. ``--json`` writes every figure, the per-class counts and each threshold's
confusion matrix of the kept pixels (``confusion_of_kept[true][pseudo]``).

``--as-trained N`` scores the pseudo labels the way a training step makes them instead: N
batches of the run's own training crops (``data.crop_size`` at ``data.scale_range``, flipped;
``train.batch_size`` labelled and unlabelled images, seeded), the unlabelled crops' true masks
kept aside for scoring, labelled twice: ``train``, the network in training mode on
``cat(labelled, weak)`` as FixMatch's and UniMatch's step (BatchNorm batch statistics, dropout
on; the statistics are restored after each batch), and ``eval``, an eval-mode pass over the weak
crops (``method.weak_labels: eval``). One table per mode:

    python benchmarks/pseudo_label_quality.py runs/bench-v2/supervised-1_16-s0 --as-trained 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(run: str, image_list: str, thresholds: list[float], data_root: str | None = None) -> dict:
    from semiseg.api import build_method_from_checkpoint
    from semiseg.data.build import EvalSet
    from semiseg.data.datasets import dataset_info, read_split_file
    from semiseg.engine.evaluator import predict_logits
    from semiseg.engine.metrics import ConfusionMatrix

    overrides = [f"data.root={data_root}"] if data_root else []
    cfg, method, meta = build_method_from_checkpoint(run, overrides)
    network = method.inference_model("auto").eval()
    k, ignore = method.num_classes, dataset_info(cfg.data).ignore_index
    list_path = Path(image_list)
    if not list_path.is_absolute():
        list_path = Path(cfg.data.root) / list_path
    samples = read_split_file(list_path, cfg.data)
    missing = [s.image for s in samples if s.mask is None]
    if missing:
        raise SystemExit(f"{list_path}: image {missing[0]} has no mask; pseudo-label quality needs masks to score")
    dataset = EvalSet(samples, cfg.data)
    eval_cfg = cfg.eval.model_copy(update={"mode": "original", "flip": False, "scales": [1.0]})
    # one matrix per threshold over the kept pixels, [true class, pseudo label]; every figure derives from it
    matrices = [ConfusionMatrix(k, ignore) for _ in thresholds]
    gt = torch.zeros(k, dtype=torch.long)
    with torch.inference_mode():
        for item in dataset:
            logits = predict_logits(network, item["image"][None], eval_cfg, k)[0].float()
            conf, label = logits.softmax(0).max(0)
            mask = item["mask"].long()
            gt += torch.bincount(mask[mask != ignore], minlength=k)[:k]
            for matrix, t in zip(matrices, thresholds):
                matrix.update(label, mask.masked_fill(conf < t, ignore))
    return {"run": str(run), "images": len(dataset), "list": str(list_path), "class_names": meta.get("class_names"),
            **summarize(matrices, gt, thresholds)}


def summarize(matrices, gt: torch.Tensor, thresholds: list[float]) -> dict:
    """The figures of one confusion matrix of kept pixels per threshold (``[true, pseudo]``) and
    the ground-truth pixel count per class ``gt``."""
    k = gt.numel()
    rare = torch.argsort(gt)[: k // 2]
    rows = []
    for matrix, t in zip(matrices, thresholds):
        confusion = matrix.matrix
        tp, kept_gt = confusion.diag(), confusion.sum(1)
        kept = confusion.sum().item()
        union = gt + confusion.sum(0) - tp
        present = union > 0  # as the evaluator: classes absent from both do not count
        iou = tp.double() / union.clamp(min=1).double()
        rows.append({
            "threshold": t,
            "kept": kept / max(1, gt.sum().item()),
            "accuracy_of_kept": tp.sum().item() / max(1, kept),
            "mIoU_of_kept": 100 * iou[present].mean().item(),
            "rare_share_of_kept": kept_gt[rare].sum().item() / max(1, kept),
            "per_class_iou": (100 * iou).tolist(),
            "per_class_kept_share_of_gt": (kept_gt.double() / gt.clamp(min=1).double()).tolist(),
            "confusion_of_kept": confusion.tolist(),
        })
    return {"rare_classes": rare.tolist(), "gt_pixels": gt.tolist(), "gt_share": (gt.double() / gt.sum()).tolist(),
            "rows": rows}


def measure_as_trained(run: str, thresholds: list[float], batches: int, data_root: str | None = None,
                       seed: int = 0, overrides: tuple[str, ...] = ()) -> dict:
    """Pseudo-label quality on ``batches`` training batches, labelled as a step labels them
    (``train``) and by an eval-mode pass (``eval``); see the module docstring. ``overrides``:
    config keys of the run to change first (``data.labeled=...``)."""
    from semiseg.api import build_method_from_checkpoint
    from semiseg.data.build import build_train_sets
    from semiseg.data.datasets import dataset_info
    from semiseg.engine.metrics import ConfusionMatrix
    from semiseg.engine.sampling import Stream

    overrides = ([f"data.root={data_root}"] if data_root else []) + list(overrides)
    cfg, method, meta = build_method_from_checkpoint(run, overrides)
    network = method.inference_model("auto")
    k, ignore = method.num_classes, dataset_info(cfg.data).ignore_index
    sets = build_train_sets(cfg, num_strong=0, with_unlabeled=True, unlabeled_masks=True)
    if sets.unlabeled is None:
        raise SystemExit(f"{run}: its config has no unlabelled images to label (data.unlabeled)")
    size = cfg.train.batch_size
    labeled = Stream(sets.labeled, size, seed, name="labelled").iterate_from(0)
    unlabeled = Stream(sets.unlabeled, size, seed + 1, name="unlabelled").iterate_from(0)
    modes = ("train", "eval")
    matrices = {m: [ConfusionMatrix(k, ignore) for _ in thresholds] for m in modes}
    gt = torch.zeros(k, dtype=torch.long)
    saved = {name: b.clone() for name, b in network.named_buffers()}
    with torch.no_grad():
        for _, x, u in zip(range(batches), labeled, unlabeled):
            mask = u["mask"].long()
            gt += torch.bincount(mask[mask != ignore], minlength=k)[:k]
            network.eval()
            logits = {"eval": network(u["weak"])}
            network.train()  # the step's layout: labelled and weak crops in one training-mode pass
            logits["train"] = network(torch.cat((x["image"], u["weak"])))[x["image"].shape[0]:]
            for name, b in network.named_buffers():  # the batch statistics must not leak into the next
                b.copy_(saved[name])
            for m in modes:
                conf, label = logits[m].float().softmax(1).max(1)
                for matrix, t in zip(matrices[m], thresholds):
                    matrix.update(label, mask.masked_fill(conf < t, ignore))
    network.eval()
    return {"run": str(run), "batches": batches, "crop_size": cfg.data.crop_size, "batch_size": size,
            "class_names": meta.get("class_names"),
            "modes": {m: summarize(matrices[m], gt, thresholds) for m in modes}}


def print_table(out: dict, thresholds: list[float], errors_at: float) -> None:
    names = out["class_names"] or [str(c) for c in range(len(out["gt_share"]))]
    print("| threshold | pixels kept | accuracy of kept | mIoU of kept | rare classes' share of kept |")
    print("| --- | --- | --- | --- | --- |")
    for r in out["rows"]:
        print(f"| {r['threshold']:g} | {100 * r['kept']:.1f}% | {100 * r['accuracy_of_kept']:.1f}% | "
              f"{r['mIoU_of_kept']:.2f} | {100 * r['rare_share_of_kept']:.1f}% |")
    row = out["rows"][thresholds.index(errors_at)]
    errors = confident_errors(row, out["gt_pixels"], names)
    print(f"\nMost frequent confident errors at threshold {errors_at:g} (share of the true class's pixels "
          "that enter the loss with the wrong label):")
    print("; ".join(f"{t} as {q} {100 * share:.1f}%" for t, q, share in errors) or "none")


def confident_errors(row: dict, gt_pixels: list[int], names: list[str], top: int = 5) -> list[tuple[str, str, float]]:
    """The ``top`` (true class, pseudo label) pairs that send the largest share of the true class's
    pixels into the loss with the wrong label at this row's threshold, largest first."""
    k = len(gt_pixels)
    pairs = [(row["confusion_of_kept"][i][j] / gt_pixels[i], names[i], names[j])
             for i in range(k) for j in range(k) if i != j and gt_pixels[i] and row["confusion_of_kept"][i][j]]
    return [(t, p, share) for share, t, p in sorted(pairs, key=lambda x: -x[0])[:top]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (its best checkpoint) or checkpoint file")
    p.add_argument("--list", default="splits/1_8/unlabeled.txt", help="image list, relative to data.root")
    p.add_argument("--thresholds", default="0,0.5,0.7,0.8,0.9,0.95,0.99")
    p.add_argument("--data-root", help="override data.root of the run's config")
    p.add_argument("--errors-at", type=float, default=0.95,
                   help="threshold at which to list the most frequent confident errors (one of --thresholds)")
    p.add_argument("--as-trained", type=int, metavar="N", default=0,
                   help="score N training batches labelled as the step labels them (train mode) and in eval mode")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    thresholds = [float(x) for x in args.thresholds.split(",")]
    if args.errors_at not in thresholds:
        raise SystemExit(f"--errors-at {args.errors_at:g}: not one of --thresholds {args.thresholds}")
    if args.as_trained:
        out = measure_as_trained(args.run, thresholds, args.as_trained, args.data_root)
        if args.json:
            print(json.dumps(out, indent=1))
            return 0
        for mode, summary in out["modes"].items():
            names = out["class_names"] or [str(c) for c in range(len(summary["gt_share"]))]
            how = ("training mode on labelled + weak crops, as the step" if mode == "train"
                   else "eval mode on the weak crops (method.weak_labels: eval)")
            print(f"\n{out['run']}: {out['batches']} training batches of {out['batch_size']} crops of "
                  f"{out['crop_size']}, labelled in {how} (rarest half of the classes: "
                  f"{', '.join(names[c] for c in summary['rare_classes'])})\n")
            print_table({**summary, "class_names": out["class_names"]}, thresholds, args.errors_at)
        return 0
    out = measure(args.run, args.list, thresholds, args.data_root)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    names = out["class_names"] or [str(c) for c in range(len(out["gt_share"]))]
    rare = ", ".join(names[c] for c in out["rare_classes"])
    print(f"{out['run']} on {out['images']} images of {out['list']} (rarest half of the classes: {rare})\n")
    print_table(out, thresholds, args.errors_at)
    return 0

if __name__ == "__main__":
    sys.exit(main())
