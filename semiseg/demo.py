"""``semiseg demo``: the built-in synthetic data, supervised vs semi-supervised, side by side.

Every method trains on the same labelled images (``data.labeled`` of ``configs/synthetic.yaml``)
for the same number of iterations; the semi-supervised ones also see the remaining images
without their masks.
"""

from __future__ import annotations

import time
from pathlib import Path

from semiseg.config import load_config
from semiseg.engine.trainer import Trainer


def packaged_config(name: str) -> Path:
    return Path(__file__).parent / "configs" / f"{name}.yaml"


def run_demo(out: str | Path = "runs/demo", iters: int | None = None,
             methods=("supervised", "unimatch")) -> int:
    out = Path(out)
    rows = []
    for method in methods:
        overrides = [f"method.name={method}"]
        if iters:
            overrides.append(f"train.iters={iters}")
            overrides.append(f"train.eval_every={iters}")
        cfg = load_config(packaged_config("synthetic"), overrides)
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
