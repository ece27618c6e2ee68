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
        result = Trainer(cfg, out / method, config_name=method).fit()
        rows.append((method, result.metrics.get("mIoU", float("nan")), time.perf_counter() - t0, result.run_dir))
    print("\nmethod         mIoU    time   run directory")
    for method, miou, secs, run_dir in rows:
        print(f"{method:<12} {miou:6.2f} {secs:6.0f}s   {run_dir}")
    first = rows[0][3]
    print("\nnext:\n"
          f"  semiseg eval {first}                    # per-class table\n"
          f"  semiseg predict {first} IMAGE_OR_FOLDER --out preds\n"
          "  semiseg train configs/camvid.yaml --set method.name=unimatch   # real data")
    return 0
