"""Command line: ``semiseg <verb> ...`` (also ``python -m semiseg`` and under ``torchrun``).

Every user error is printed as one line on stderr and exits non-zero (2 for config errors);
nothing already written is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from semiseg.errors import ConfigError, DataError, SemisegError, SemisegWarning

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.iters=500")


# ----------------------------------------------------------------------------------- verbs
def cmd_train(args) -> int:
    from semiseg.config import load_config

    if args.resume:
        if not args.out:
            raise SemisegError("--resume needs --out RUN_DIR (the run to continue)")
        from semiseg.engine.trainer import config_differences, resume_config

        # the run's own saved config, changed only by --set of the keys a resume may change
        cfg, _changes = resume_config(args.out, overrides=args.overrides)
        if args.config:  # allowed for old resume commands, but it must describe this run
            given = load_config(args.config, args.overrides)
            diff = config_differences(given, cfg)
            if diff:
                key, there, here = diff[0]
                raise ConfigError(f"--resume continues the run's own config ({Path(args.out) / 'config.yaml'}): "
                                  f"{args.config} has {key}={there!r}, the run {here!r}; leave the config out "
                                  f"(semiseg train --out {args.out} --resume), or change an allowed key with --set")
    else:
        if not args.config:
            raise SemisegError("train: give a CONFIG (a YAML file or a built-in name such as camvid), or "
                               "--out RUN_DIR --resume to continue a run")
        cfg = load_config(args.config, args.overrides)  # a config error is reported before torch loads
    from semiseg.engine.trainer import Trainer

    name = Path(args.config).stem if args.config else "run"
    trainer = Trainer(cfg, args.out, resume=args.resume, config_name=name)
    result = trainer.fit()
    if trainer.dist.is_main:
        if result.stopped_early:
            print(f"stopped at iteration {result.iteration}; resume with: semiseg train --out {result.run_dir} "
                  "--resume")
        else:
            miou = result.metrics.get("mIoU")
            mdice = result.metrics.get("mDice")
            print(f"run directory: {result.run_dir}" + (f"\nmIoU: {miou:.2f}" if miou is not None else "")
                  + (f"\nmDice: {mdice:.2f}" if mdice is not None else ""))
    return 0


def _threads(args, cfg) -> int:
    """``--threads`` if given, else the run's ``train.threads`` (``--set train.threads=N``)."""
    from semiseg.engine.precision import set_threads

    return set_threads(args.threads if getattr(args, "threads", None) else cfg.train.threads)


def _threads_arg(value: str):
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of threads or 'auto', got {value!r}")
    return n


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_threads_arg, metavar="N",
                   help="CPU threads (default: the run's train.threads; 'auto' = torch's default, one per core). "
                        "On a machine shared with other jobs, 1 is often several times faster")


def cmd_eval(args) -> int:
    import torch

    from semiseg.api import build_method_from_checkpoint, check_classes, inference_layout
    from semiseg.data.build import build_eval_set
    from semiseg.engine.evaluator import evaluate
    from semiseg.engine.metrics import format_table

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, method, meta = build_method_from_checkpoint(args.checkpoint, args.overrides, device)
    check_classes(cfg, method.num_classes, args.checkpoint)
    inference_layout(method, cfg)
    _threads(args, cfg)
    dataset = build_eval_set(cfg, args.split)
    names = meta.get("class_names") or [f"class_{i}" for i in range(method.num_classes)]
    crop = cfg.eval.crop_size or cfg.data.crop_size
    which = method.model_name(args.model or cfg.eval.model)
    net = method.inference_model(which)
    res = evaluate(net, dataset, cfg.eval, method.num_classes, device=torch.device(device), crop_size=crop,
                   progress=True, num_workers=cfg.data.workers, desc=f"eval {which} on '{args.split}'")
    skipped = res.get("skipped", [])
    for message in skipped:
        _warn(f"skipped: {message}")
    if len(skipped) == len(dataset):
        raise DataError(f"none of the {len(dataset)} images of split '{args.split}' could be read; the first: "
                        f"{skipped[0]}")
    scored = len(dataset) - len(skipped)
    if args.json:
        out = {"mIoU": res["mIoU"], "per_class_iou": dict(zip(names, res["per_class_iou"])),
               "pixel_acc": res["pixel_acc"], "mean_acc": res.get("mean_acc"), "split": args.split,
               "images": scored, "skipped": skipped, "checkpoint": str(args.checkpoint), "model": which,
               "eval_mode": cfg.eval.mode}
        if "changed_iou" in res:  # image pairs (change detection)
            out.update({k: res[k] for k in ("changed_iou", "unchanged_iou", "f1", "precision", "recall",
                                            "overall_acc")})
        if "mDice" in res:  # volumes (acdc), scored in 3D as the paper reports them
            out.update(mDice=res["mDice"], per_class_dice=dict(zip(names[1:], res["per_class_dice"][1:])),
                       volumes=res["volumes"], eval_mode="volumes")
            if "mHD95" in res:
                out.update(mHD95=res["mHD95"], per_class_hd95=dict(zip(names[1:], res["per_class_hd95"][1:])))
        print(json.dumps(out))
    else:
        print(f"{args.checkpoint} ({which}) on split '{args.split}' ({scored} images"
              + (f", {len(skipped)} unreadable skipped" if skipped else "") + f", eval.mode={cfg.eval.mode})")
        print(format_table(res, names))
        if "changed_iou" in res:
            from semiseg.engine.metrics import format_change

            print(format_change(res))
        if "mDice" in res:
            print("\n".join(f"Dice {n}: {d:.2f}" for n, d in zip(names[1:], res["per_class_dice"][1:]))
                  + f"\nmDice: {res['mDice']:.2f} ({res['volumes']} volumes, 3D)")
            if res.get("mHD95") is not None:
                print(f"mHD95: {res['mHD95']:.2f} voxels")
    return 0


def _warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"semiseg: warning: {message}", file=sys.stderr)


def _hidden(path: Path) -> bool:
    """Hidden files and folders, and the ``._NAME`` files macOS writes beside copies on other disks."""
    return any(part.startswith(".") for part in path.parts if part not in (".", ".."))


def _walk_images(inputs: list[str], exclude: Optional[Path] = None) -> list[tuple[Path, Path]]:
    """``(image, path relative to the folder common to the inputs)`` for every image given or
    found (recursively) in a folder given, each once; nothing under ``exclude`` (the output
    folder). Paths are taken as given (symlinks are not followed), so a tree of links keeps its
    layout."""
    import os

    found: dict[Path, tuple[Path, Path]] = {}  # real path -> (file, relative path from its base)
    bases: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            base, files = Path(os.path.abspath(p)), []
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if f.suffix.lower() in IMAGE_EXTS and not _hidden(rel) and f.is_file():
                    files.append((f, rel))
        elif p.is_file():
            base, files = Path(os.path.abspath(p.parent)), [(p, Path(p.name))]
        else:
            raise DataError(f"predict: input {p} does not exist")
        bases.append(base)
        for f, rel in files:
            real = f.resolve()
            if exclude is not None and any(path.is_relative_to(ex) for path in (real, Path(os.path.abspath(f)))
                                           for ex in (exclude.resolve(), Path(os.path.abspath(exclude)))):
                continue
            found.setdefault(real, (f, base / rel))
    if not found:
        raise DataError(f"predict: no images found in {' '.join(inputs)} (expected {', '.join(IMAGE_EXTS)} files)")
    # relative to the folder common to every input, so that a/x.png and b/x.png stay apart
    common = Path(os.path.commonpath([str(b) for b in set(bases)]))
    return [(f, full.relative_to(common)) for f, full in found.values()]


def _output_names(files: list[tuple[Path, Path]]) -> dict[Path, Path]:
    """image -> output stem (relative, without suffix). ``x.png`` and ``x.jpg`` of one folder
    would both give ``x``: such names keep their extension (``x.jpg`` -> ``x_jpg``)."""
    stems = [rel.with_suffix("") for _, rel in files]
    clash = {s for s in stems if stems.count(s) > 1}
    names = {}
    for (f, rel), stem in zip(files, stems):
        names[f] = stem.with_name(f"{stem.name}_{rel.suffix[1:].lower()}") if stem in clash else stem
    taken: dict[Path, Path] = {}
    for f, name in names.items():
        if name in taken:
            raise DataError(f"predict: {f} and {taken[name]} would both be written as {name}.png: rename one")
        taken[name] = f
    return names


def cmd_predict(args) -> int:
    from PIL import Image
    from tqdm import tqdm

    from semiseg.api import load_model
    from semiseg.data.io import read_image
    from semiseg.viz import colorize, overlay

    out = Path(args.out)
    model = load_model(args.checkpoint, which=args.model or "auto", overrides=args.overrides)
    if model.cfg.model.siamese:  # change detection: pairs of images, before and after
        return _predict_pairs(model, args, out)
    files = _walk_images(args.inputs, exclude=out)  # never read what an earlier run wrote there
    names = _output_names(files)
    if model.cfg.model.in_channels != 3:
        raise SemisegError(f"predict reads RGB image files, but {args.checkpoint} was trained on "
                           f"{model.cfg.model.in_channels}-channel {model.cfg.data.dataset} data: score its volumes "
                           f"with 'semiseg eval {args.checkpoint} --split test'")
    _threads(args, model.cfg)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, []
    for f, _rel in tqdm(files, desc="predict", unit="image", dynamic_ncols=True, leave=False, mininterval=1.0):
        try:
            image = read_image(f)
        except DataError as e:
            skipped.append(f)
            _warn(f"skipped: {e}")
            continue
        pred = model.predict(image)
        target = out / names[f]
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred.astype("uint8"), mode="L").save(target.with_name(target.name + ".png"))
        overlay(image, colorize(pred, model.palette, model.num_classes)).save(
            target.with_name(target.name + "_overlay.png"))
        written += 1
    print(f"wrote {written} masks and overlays to {out}")
    if skipped:
        raise DataError(f"{len(skipped)} of {len(files)} images could not be read and were skipped (named above)")
    return 0


def _pairs(inputs: list[str], out: Path) -> list[tuple[Path, Path, Path]]:
    """``(A, B, output stem)`` of a change-detection ``predict``: two files (one pair), or two
    folders whose images are matched by relative path (every image of the first needs its
    namesake in the second)."""
    if len(inputs) != 2:
        raise DataError(f"predict: a change-detection network takes a pair: two image files (before, after) or two "
                        f"folders of images matched by name (A/ and B/), got {len(inputs)} inputs")
    first, second = (Path(i) for i in inputs)
    for p in (first, second):
        if not p.exists():
            raise DataError(f"predict: input {p} does not exist")
    if first.is_file() and second.is_file():
        return [(first, second, Path(first.stem))]
    if not (first.is_dir() and second.is_dir()):
        raise DataError(f"predict: {first} and {second} must be two image files or two folders, not one of each")
    pairs = []
    for a, rel in _walk_images([str(first)], exclude=out):
        b = second / rel
        if not b.is_file():
            raise DataError(f"predict: {a} has no namesake {b} in {second}: expected the same file names in both "
                            "folders")
        pairs.append((a, b, rel.with_suffix("")))
    if not pairs:
        raise DataError(f"predict: no images in {first}")
    return pairs


def _predict_pairs(model, args, out: Path) -> int:
    """Change masks (``NAME.png``: 0 unchanged, 255 changed, as LEVIR-CD's labels) and overlays
    (``NAME_overlay.png``: image B with the changed pixels tinted red) of image pairs."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from semiseg.data.change import load_images
    from semiseg.viz import overlay

    pairs = _pairs(args.inputs, out)
    _threads(args, model.cfg)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, []
    for a_path, b_path, stem in tqdm(pairs, desc="predict", unit="pair", dynamic_ncols=True, leave=False,
                                     mininterval=1.0):
        try:
            a, b = load_images(a_path, b_path)
        except DataError as e:
            skipped.append(a_path)
            _warn(f"skipped: {e}")
            continue
        change = model.predict_pair(a, b)
        target = out / stem
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((change * 255).astype("uint8"), mode="L").save(target.with_name(target.name + ".png"))
        tint = np.asarray(b, dtype=np.uint8).copy()
        tint[change == 1] = (255, 0, 0)
        overlay(b, Image.fromarray(tint)).save(target.with_name(target.name + "_overlay.png"))
        written += 1
    print(f"wrote {written} change masks (0 unchanged, 255 changed) and overlays to {out}")
    if skipped:
        raise DataError(f"{len(skipped)} of {len(pairs)} pairs could not be read and were skipped (named above)")
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


def _group_problems(problems: list[str], show: int = 3) -> list[str]:
    """Problems that differ only in the file they name (131 masks holding the same stray value)
    are shown ``show`` at a time, then one line counting the rest."""
    import re

    groups: dict[str, list[str]] = {}
    for line in problems:
        groups.setdefault(re.sub(r"\S*/\S*", "<file>", line), []).append(line)
    out = []
    for lines in groups.values():
        out += lines if len(lines) <= show + 2 else lines[:show] + [
            f"... and {len(lines) - show} more like these (--all lists every one)"]
    return out


def cmd_check_data(args) -> int:
    from semiseg.config import load_config

    cfg = load_config(args.config, args.overrides)  # a config error is reported before torch loads
    from semiseg.data.build import check_dataset, dataset_summary

    hints: list[str] = []
    problems = check_dataset(cfg, hints=hints)
    try:
        for line in dataset_summary(cfg):
            print(line)
    except SemisegError as e:
        if str(e) not in problems:
            problems.append(str(e))
    for line in problems if args.all else _group_problems(problems):
        print(line)
    for line in hints:
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
    from semiseg.self_training import check_keep, write_class_balanced_labels

    if not args.out and not args.score:
        raise SemisegError("pseudo-label: give --out DIR (write PNGs) and/or --score (mIoU with tags)")
    if args.keep_per_class is not None and not args.no_tags:
        raise SemisegError("pseudo-label --keep-per-class (class-balanced self-training labels) needs --no-tags")
    if args.keep_per_class is not None:
        check_keep(args.keep_per_class)  # a bad fraction fails before the checkpoint loads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, method, _meta = build_method_from_checkpoint(args.checkpoint, args.overrides, device)
    net = method.inference_model(args.model or cfg.eval.model)
    if args.out and args.keep_per_class is not None:
        written, thresholds = write_class_balanced_labels(cfg, net, split_samples(cfg, args.split), args.out,
                                                          method.num_classes, args.keep_per_class, device,
                                                          progress=True)
        names = list(dataset_info(cfg.data).class_names)
        print(f"wrote {len(written)} class-balanced pseudo labels to {args.out}; thresholds: "
              + ", ".join(f"{n} {t:.3f}" for n, t in zip(names, thresholds)))
    elif args.out:
        written = write_pseudo_labels(cfg, net, split_samples(cfg, args.split), args.out, method.num_classes,
                                      device, progress=True, use_tags=not args.no_tags)
        print(f"wrote {len(written)} pseudo labels to {args.out}")
    if args.score:
        background = resolve_background(cfg.data, list(dataset_info(cfg.data).class_names))
        res = score_with_tags(cfg, net, args.split, method.num_classes, device, background)
        print(json.dumps({"mIoU_with_tags": res["mIoU"], "pixel_acc": res["pixel_acc"], "split": args.split,
                          "images": res["images"], "model": args.model or cfg.eval.model}))
    return 0


def cmd_select_reliable(args) -> int:
    """ST++'s reliable images (semiseg.self_training.select_reliable)."""
    import torch

    from semiseg.api import build_method_from_checkpoint
    from semiseg.pseudo_label import split_samples
    from semiseg.self_training import select_reliable, split_reliable

    split_reliable({}, args.fraction)  # a bad fraction fails before any checkpoint loads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    nets, cfg, num_classes = [], None, None
    for checkpoint in args.checkpoints:
        cfg_k, method, _meta = build_method_from_checkpoint(checkpoint, args.overrides, device)
        if num_classes is not None and method.num_classes != num_classes:
            raise SemisegError(f"select-reliable: {checkpoint} has {method.num_classes} classes, "
                               f"expected {num_classes} as the checkpoints before it")
        cfg, num_classes = cfg_k, method.num_classes  # the data and test-time keys: the last checkpoint's
        nets.append(method.inference_model(args.model or cfg_k.eval.model))
    summary = select_reliable(cfg, nets, split_samples(cfg, args.split), num_classes, args.out, args.fraction,
                              device, progress=True, checkpoints=args.checkpoints)
    print(f"{summary['reliable']} reliable and {summary['unreliable']} other images: "
          f"{args.out}/reliable.txt, {args.out}/unreliable.txt, {args.out}/reliability.json")
    return 0


def cmd_bench(args) -> int:
    from semiseg.config import load_config

    cfg = load_config(args.config, args.overrides)  # a config error is reported before torch loads
    from semiseg.bench import main as bench_main

    return bench_main(cfg, args.steps, args.warmup, args.json, args.fixed_batch)


def cmd_demo(args) -> int:
    from semiseg.demo import run_demo

    return run_demo(out=args.out, iters=args.iters, methods=args.methods.split(",") if args.methods else None,
                    scenario=args.scenario, data_root=args.data_root)


def cmd_report(args) -> int:
    from semiseg.report import write_report

    path = write_report(args.run_dir, out=args.out, num_images=args.images, evaluate=not args.no_eval,
                        threads=args.threads, progress=True)
    print(f"wrote {path}")
    return 0


def cmd_sweep(args) -> int:
    from semiseg.sweep import main as sweep_main

    return sweep_main(args)


def cmd_export(args) -> int:
    from semiseg.export import export_onnx

    path = export_onnx(args.checkpoint, args.out, which=args.model or "auto", opset=args.opset, size=args.size,
                       dynamic=not args.static, overrides=args.overrides, verify=args.verify, log=print)
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from semiseg import __version__

    parser = argparse.ArgumentParser(prog="semiseg", description="Semi-supervised semantic segmentation.")
    parser.add_argument("--version", action="version", version=f"semiseg {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("train", help="train a model from a config")
    p.add_argument("config", nargs="?", help="YAML file or built-in config name (not needed with --resume)")
    _add_set(p)
    p.add_argument("--out", help="run directory (default: a new timestamped folder under runs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the run's own config.yaml; "
                        "--set may change only train.iters (to extend), eval/checkpoint/log intervals, threads, "
                        "device and workers")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a checkpoint or run directory")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="val")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--model", help="which network of the run to score (default: eval.model of its config; "
                                   "student, teacher; pct: hybrid, pseudo)")
    _add_set(p)
    _add_threads(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="write masks and overlays for images or folders")
    p.add_argument("checkpoint")
    p.add_argument("inputs", nargs="+", help="images or folders; a change-detection run (levir_cd, whu_cd, "
                                             "folder_cd) takes a pair: two files (before, after) or two folders "
                                             "matched by name")
    p.add_argument("--out", required=True, help="output folder: NAME.png and NAME_overlay.png per image, under the "
                                                "image's path relative to the inputs (change detection: the change "
                                                "mask, 0/255, and image B with the changes in red)")
    p.add_argument("--model", help="which network of the run (default: eval.model of its config)")
    _add_set(p)
    _add_threads(p)
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
    p.add_argument("--all", action="store_true", help="list every problem (default: at most 3 of each kind)")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("bench", help="time training steps of a config (s/step, images/s, memory, FLOPs, MFU)")
    p.add_argument("config")
    _add_set(p)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--fixed-batch", action="store_true",
                   help="reuse the first batch every step: the step's computation alone, without the data loader")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="train on the built-in synthetic data and compare methods")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--methods", default=None,
                   help="comma-separated methods to compare (default: supervised,fixmatch; with --scenario "
                        "medical or change: supervised,unimatch)")
    p.add_argument("--scenario", choices=("natural", "medical", "change"), default="natural",
                   help="medical: UniMatch's ACDC scenario (UNet, Dice losses, 3D Dice) on generated h5 volumes "
                        "(default out: runs/demo-medical); change: UniMatch's remote-sensing change detection "
                        "(siamese DeepLabV3+, changed IoU) on generated LEVIR-CD-layout pairs (default out: "
                        "runs/demo-change)")
    p.add_argument("--data-root", default=None,
                   help="with --scenario medical: the real ACDC folder (data/slices/*.h5, data/*.h5; e.g. "
                        "../shared/data/acdc) instead of generated volumes; needs h5py ('semiseg[medical]')")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pseudo-label", help="pct stage two: write tag-restricted pseudo-label PNGs")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="unlabeled",
                   help="unlabeled (default: the weak images), labeled, a split name or a split file")
    p.add_argument("--out", help="folder for <id>.png pseudo labels (then: --set data.extra_labels=DIR)")
    p.add_argument("--score", action="store_true", help="print the mIoU with ground-truth-derived tags")
    p.add_argument("--no-tags", action="store_true",
                   help="self-training labels (ST/ST++): the argmax over every class; no tags read, so no "
                        "image's own mask is used (without data.tags the tags otherwise come from the masks)")
    p.add_argument("--keep-per-class", type=float, metavar="P",
                   help="with --no-tags: class-balanced labels (CBST): per class, the most confident "
                        "fraction P of its predicted pixels sets its threshold; the rest is ignored (255)")
    p.add_argument("--model", help="which network of the run (pct: hybrid, the default, or pseudo)")
    _add_set(p)
    p.set_defaults(func=cmd_pseudo_label)

    p = sub.add_parser("select-reliable",
                       help="ST++: rank unlabelled images by how stable their labels are over checkpoints")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="two or more checkpoints (files or run dirs) of one run, earliest first; the last "
                        "is the final network")
    p.add_argument("--split", default="unlabeled", help="unlabeled (default), a split name or a split file")
    p.add_argument("--out", required=True, help="folder for reliable.txt, unreliable.txt, reliability.json")
    p.add_argument("--fraction", type=float, default=0.5, help="share of the images kept as reliable (0.5)")
    p.add_argument("--model", help="which network of each checkpoint (default: eval.model)")
    _add_set(p)
    p.set_defaults(func=cmd_select_reliable)

    p = sub.add_parser("report", help="write RUN_DIR/report.html: curves, per-class IoU, confusion, samples")
    p.add_argument("run_dir")
    p.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    p.add_argument("--images", type=int, default=4, help="validation images shown with their predictions")
    p.add_argument("--no-eval", action="store_true", help="curves only: skip the fresh evaluation")
    _add_threads(p)
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


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=None):
    """semiseg's own warnings as one ``semiseg: warning: ...`` line, clear of any progress bar."""
    package = str(Path(__file__).parent)
    if issubclass(category, SemisegWarning) or str(filename).startswith(package):
        _warn(str(message))
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv=None) -> int:
    import functools
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    default = warnings.showwarning
    warnings.showwarning = functools.partial(_show_warning, _default=default)
    try:
        return args.func(args)
    except SemisegError as e:
        print(f"semiseg: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("semiseg: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = default


if __name__ == "__main__":
    sys.exit(main())
