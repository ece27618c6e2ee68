#!/usr/bin/env python
"""The scenario demos, measured: supervised against UniMatch on generated data, several seeds.

    python benchmarks/scenario_demo.py --scenario medical --seeds 0,1

``medical``: the setting of ``semiseg demo --scenario medical`` (:func:`semiseg.demo.medical_config`:
``configs/acdc.yaml`` scaled down, one labelled case of the generated ACDC-layout data, 3D Dice
on its 8 val + test volumes) with ``train.seed`` = each seed. The data are generated, not ACDC:
a row says what the recipe does on rings in noise, not what it does on hearts.

Each (method, seed) appends one JSON line to ``benchmarks/results/scenarios.jsonl``: mDice and
per-class Dice, iterations, wall time, the machine, the thread count, the date and the command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from camvid_v2 import machine  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "scenarios.jsonl"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=("medical",), default="medical")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--methods", default="supervised,unimatch")
    p.add_argument("--iters", type=int, default=None, help="default: the demo's")
    p.add_argument("--runs", default=str(REPO / "runs" / "scenario-demo"))
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)

    from semiseg.data.acdc_synthetic import ensure_acdc_synthetic
    from semiseg.demo import MEDICAL_ITERS, medical_config
    from semiseg.engine.trainer import Trainer

    runs = Path(args.runs)
    root = ensure_acdc_synthetic(runs / "acdc-data")
    iters = args.iters or MEDICAL_ITERS
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            cfg = medical_config(method, root, iters, seed=seed)
            t0 = time.perf_counter()
            result = Trainer(cfg, runs / f"{args.scenario}-{method}-s{seed}", progress=False).fit()
            m = result.metrics
            row = {"scenario": args.scenario, "data": "generated", "method": method, "seed": seed,
                   "mDice": round(m["mDice"], 2), "per_class_dice": [None if v is None else round(v, 2) for v in m["per_class_dice"]],
                   "iters": iters, "wall_min": round((time.perf_counter() - t0) / 60, 1), "machine": machine(),
                   "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "command": "python benchmarks/scenario_demo.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{args.scenario} {method} seed {seed}: mDice {row['mDice']:.2f} "
                  f"(RV/Myo/LV {' / '.join('-' if v is None else f'{v:.2f}' for v in row['per_class_dice'][1:])}), "
                  f"{row['wall_min']} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
