"""Command line: ``semiseg <verb> ...`` (also ``python -m semiseg`` and under ``torchrun``).

Every user error is printed as one line on stderr and exits non-zero (2 for config errors);
nothing already written is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from semiseg.errors import SemisegError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.iters=500")


# ----------------------------------------------------------------------------------- verbs
def cmd_train(args) -> int:
    from semiseg.config import load_config
    from semiseg.engine.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    if args.resume and not args.out:
        raise SemisegError("--resume needs --out RUN_DIR (the run to continue)")
    trainer = Trainer(cfg, args.out, resume=args.resume, config_name=Path(args.config).stem)
    result = trainer.fit()
    if trainer.dist.is_main:
        if result.stopped_early:
            print(f"stopped at iteration {result.iteration}; resume with: semiseg train {args.config} "
                  f"--out {result.run_dir} --resume" + "".join(f" --set {o}" for o in args.overrides))
        else:
            miou = result.metrics.get("mIoU")
            print(f"run directory: {result.run_dir}" + (f"\nmIoU: {miou:.2f}" if miou is not None else ""))
    return 0


def cmd_eval(args) -> int:
    import torch

    from semiseg.api import build_method_from_checkpoint
    from semiseg.data.build import build_eval_set
    from semiseg.engine.evaluator import evaluate
    from semiseg.engine.metrics import format_table

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, method, meta = build_method_from_checkpoint(args.checkpoint, args.overrides, device)
    dataset = build_eval_set(cfg, args.split)
    names = meta.get("class_names") or [f"class_{i}" for i in range(method.num_classes)]
    crop = cfg.eval.crop_size or cfg.data.crop_size
    which = args.model or cfg.eval.model
    net = method.inference_model(which)
    res = evaluate(net, dataset, cfg.eval, method.num_classes, device=torch.device(device), crop_size=crop,
                   progress=not args.json, num_workers=cfg.data.workers)
    if args.json:
        out = {"mIoU": res["mIoU"], "per_class_iou": dict(zip(names, res["per_class_iou"])),
               "pixel_acc": res["pixel_acc"], "mean_acc": res.get("mean_acc"), "split": args.split,
               "images": len(dataset), "checkpoint": str(args.checkpoint), "model": which,
               "eval_mode": cfg.eval.mode}
        print(json.dumps(out))
    else:
        print(f"{args.checkpoint} on split '{args.split}' ({len(dataset)} images, eval.mode={cfg.eval.mode})")
        print(format_table(res, names))
    return 0


def _walk_images(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            files.append(p)
        else:
            raise SemisegError(f"predict: input {p} does not exist")
    if not files:
        raise SemisegError(f"predict: no images found in {' '.join(inputs)}")
    return files


def cmd_predict(args) -> int:
    from semiseg.api import load_model
    from semiseg.data.io import read_image
    from semiseg.viz import colorize, overlay

    model = load_model(args.checkpoint, which=args.model or "auto", overrides=args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = _walk_images(args.inputs)
    for f in files:
        image = read_image(f)
        pred = model.predict(image)
        from PIL import Image

        Image.fromarray(pred.astype("uint8"), mode="L").save(out / f"{f.stem}.png")
        overlay(image, colorize(pred, model.palette, model.num_classes)).save(out / f"{f.stem}_overlay.png")
    print(f"wrote {len(files)} masks and overlays to {out}")
    return 0


def cmd_split(args) -> int:
    from semiseg.config import load_config
    from semiseg.data.datasets import dataset_info, list_samples
    from semiseg.data.splits import make_split, write_split

    cfg = load_config(args.config, args.overrides)
    if args.list:
        from semiseg.data.datasets import read_split_file

        samples = read_split_file(args.list, cfg.data)
    else:
        samples = list_samples(cfg.data, cfg.data.train_split)
    labeled_spec = args.labeled
    labeled, unlabeled = make_split(samples, labeled_spec, seed=args.seed, balanced=args.balanced,
                                    num_classes=dataset_info(cfg.data).num_classes)
    root = _data_root(cfg)
    write_split(args.out, labeled, unlabeled, root)
    print(f"wrote {len(labeled)} labelled and {len(unlabeled)} unlabelled images to {args.out}/labeled.txt "
          f"and {args.out}/unlabeled.txt")
    return 0


def _data_root(cfg):
    from semiseg.data.datasets import resolve_root

    return resolve_root(cfg.data)


def cmd_check_data(args) -> int:
    from semiseg.config import load_config
    from semiseg.data.build import check_dataset

    cfg = load_config(args.config, args.overrides)
    problems = check_dataset(cfg)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print("no problems found")
    return 0


def cmd_pseudo_label(args) -> int:
    """Stage two of pct: tag-restricted pseudo-label PNGs (semiseg.pseudo_label)."""
    import torch

    from semiseg.api import build_method_from_checkpoint
    from semiseg.data.datasets import dataset_info
    from semiseg.data.tags import resolve_background
    from semiseg.pseudo_label import score_with_tags, split_samples, write_pseudo_labels

    if not args.out and not args.score:
        raise SemisegError("pseudo-label: give --out DIR (write PNGs) and/or --score (mIoU with tags)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, method, _meta = build_method_from_checkpoint(args.checkpoint, args.overrides, device)
    net = method.inference_model(args.model or cfg.eval.model)
    if args.out:
        written = write_pseudo_labels(cfg, net, split_samples(cfg, args.split), args.out, method.num_classes,
                                      device, progress=True)
        print(f"wrote {len(written)} pseudo labels to {args.out}")
    if args.score:
        background = resolve_background(cfg.data, list(dataset_info(cfg.data).class_names))
        res = score_with_tags(cfg, net, args.split, method.num_classes, device, background)
        print(json.dumps({"mIoU_with_tags": res["mIoU"], "pixel_acc": res["pixel_acc"], "split": args.split,
                          "images": res["images"], "model": args.model or cfg.eval.model}))
    return 0


def cmd_bench(args) -> int:
    from semiseg.bench import main as bench_main
    from semiseg.config import load_config

    return bench_main(load_config(args.config, args.overrides), args.steps, args.warmup, args.json)


def cmd_demo(args) -> int:
    from semiseg.demo import run_demo

    return run_demo(out=args.out, iters=args.iters, methods=args.methods.split(","))


def cmd_report(args) -> int:
    from semiseg.report import write_report

    path = write_report(args.run_dir, out=args.out, num_images=args.images, evaluate=not args.no_eval)
    print(f"wrote {path}")
    return 0


def cmd_sweep(args) -> int:
    from semiseg.sweep import main as sweep_main

    return sweep_main(args)


def cmd_export(args) -> int:
    from semiseg.export import export_onnx

    path = export_onnx(args.checkpoint, args.out, which=args.model or "auto", opset=args.opset, size=args.size,
                       dynamic=not args.static, overrides=args.overrides, verify=args.verify)
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from semiseg import __version__

    parser = argparse.ArgumentParser(prog="semiseg", description="Semi-supervised semantic segmentation.")
    parser.add_argument("--version", action="version", version=f"semiseg {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("train", help="train a model from a config")
    p.add_argument("config")
    _add_set(p)
    p.add_argument("--out", help="run directory (default: a new timestamped folder under runs/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a checkpoint or run directory")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="val")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--model", choices=["auto", "student", "teacher"], help="which network of the run to score")
    _add_set(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="write masks and overlays for images or folders")
    p.add_argument("checkpoint")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--model", choices=["auto", "student", "teacher"])
    _add_set(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("split", help="make a labelled/unlabelled partition")
    p.add_argument("config")
    p.add_argument("--labeled", required=True, help="a count (46) or a fraction (1/8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balanced", action="store_true", help="every class appears in the labelled part")
    p.add_argument("--list", help="split file to partition (default: the dataset's training list)")
    p.add_argument("--out", required=True)
    _add_set(p)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("check-data", help="scan every image and mask of a config's dataset")
    p.add_argument("config")
    _add_set(p)
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("bench", help="time training steps of a config (s/step, images/s, memory, FLOPs, MFU)")
    p.add_argument("config")
    _add_set(p)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="train on the built-in synthetic data and compare methods")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--methods", default="supervised,unimatch")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pseudo-label", help="pct stage two: write tag-restricted pseudo-label PNGs")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="unlabeled",
                   help="unlabeled (default: the weak images), labeled, a split name or a split file")
    p.add_argument("--out", help="folder for <id>.png pseudo labels (then: --set data.extra_labels=DIR)")
    p.add_argument("--score", action="store_true", help="print the mIoU with ground-truth-derived tags")
    p.add_argument("--model", help="which network of the run (pct: hybrid, the default, or pseudo)")
    _add_set(p)
    p.set_defaults(func=cmd_pseudo_label)

    p = sub.add_parser("report", help="write RUN_DIR/report.html: curves, per-class IoU, confusion, samples")
    p.add_argument("run_dir")
    p.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    p.add_argument("--images", type=int, default=4, help="validation images shown with their predictions")
    p.add_argument("--no-eval", action="store_true", help="curves only: skip the fresh evaluation")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sweep", help="train methods x labelled-set sizes x seeds and plot mIoU vs. labels")
    p.add_argument("config")
    p.add_argument("--labeled", required=True, help="comma-separated data.labeled values, e.g. 23,46,92")
    p.add_argument("--methods", default="supervised,unimatch", help="comma-separated method names")
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    p.add_argument("--out", help="sweep folder (default: runs/sweep-CONFIG)")
    p.add_argument("--dry-run", action="store_true", help="print the train commands, one per line; run nothing")
    _add_set(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("export", help="export the inference network of a checkpoint (ONNX)")
    p.add_argument("checkpoint")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", required=True, help="file to write, e.g. model.onnx")
    p.add_argument("--model", help="which network of the run (default: eval.model of its config)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--size", type=int, help="side of the example input used for tracing (default: crop size)")
    p.add_argument("--static", action="store_true", help="fixed input size instead of dynamic batch/H/W")
    p.add_argument("--verify", action="store_true", help="compare onnxruntime with PyTorch after writing")
    _add_set(p)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SemisegError as e:
        print(f"semiseg: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("semiseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
