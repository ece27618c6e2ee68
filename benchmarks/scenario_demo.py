#!/usr/bin/env python
"""The demos, measured: supervised against semi-supervised methods on generated data, several seeds.

    python benchmarks/scenario_demo.py --scenario natural --seeds 0,1 --methods supervised,meanteacher
    python benchmarks/scenario_demo.py --scenario medical --seeds 0,1
    python benchmarks/scenario_demo.py --scenario change --seeds 0,1

``natural``: the setting of ``semiseg demo`` (``configs/demo.yaml``: the built-in procedural
shapes-and-textures data, 8 labelled images, the packaged ImageNet-pretrained Lite0, 60
validation images, mIoU), or ``--config NAME`` (a packaged config: ``synthetic`` is resnet18 from
scratch with 16 masks), with ``--set KEY=VALUE`` overrides applied to every method's config --
the way candidate demo settings are measured before one becomes the demo's.
``medical``: the setting of ``semiseg demo --scenario medical`` (:func:`semiseg.demo.medical_config`:
``configs/acdc.yaml`` scaled down, one labelled case of the generated ACDC-layout data, 3D Dice
on its 8 val + test volumes). ``change``: the setting of ``semiseg demo --scenario change``
(:func:`semiseg.demo.change_config`: ``configs/levir.yaml`` scaled down, 8 labelled generated
LEVIR-CD-layout pairs, scored on the 16 test pairs). Each with ``train.seed`` = each seed. The data
are generated, not ACDC or LEVIR-CD: a row says what the recipe does on generated structures, not
what it does on hearts or cities.

Each (method, seed) appends one JSON line to ``benchmarks/results/scenarios.jsonl``: the
scenario's scores (medical: mDice and per-class Dice; change: changed-class IoU, F1, precision,
recall, overall accuracy, unchanged IoU), iterations, wall time, the machine, the thread count,
the date and the command; ``natural`` rows also carry mIoU, per-class IoU, the mIoU of every
scheduled evaluation (``evals``), each network's last (``networks``), the config, the
overrides (``set``) and, with the demo's config, the demo's schedule for the method
(``schedule``: :data:`semiseg.demo.DEMO_SCHEDULES`, applied before ``--set``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from camvid_v2 import machine, recorded_command  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "scenarios.jsonl"
SCORES = {"natural": ("mIoU", "per_class_iou"),
          "medical": ("mDice", "per_class_dice"),
          "change": ("changed_iou", "f1", "precision", "recall", "overall_acc", "unchanged_iou")}


def scores(scenario: str, metrics: dict) -> dict:
    """The scenario's scores from an evaluation's metrics, rounded to 0.01 (None stays None)."""
    def r(v):
        return [r(x) for x in v] if isinstance(v, list) else None if v is None else round(v, 2)
    return {k: r(metrics[k]) for k in SCORES[scenario]}


def evaluations(metrics: list[dict]) -> dict:
    """``evals``: the mIoU of every scheduled evaluation of the network the method reports (the
    first one each evaluation scores, the one ``semiseg demo`` shows); ``networks``: the last
    evaluation's mIoU of each network (student and teacher, for methods with both)."""
    rows = [r for r in metrics if r.get("type") == "eval" and "mIoU" in r]
    if not rows:
        return {"evals": {}, "networks": {}}
    reported, last = rows[0].get("model"), rows[-1]["iter"]
    return {"evals": {str(r["iter"]): round(r["mIoU"], 2) for r in rows if r.get("model") == reported},
            "networks": {r.get("model") or "model": round(r["mIoU"], 2) for r in rows if r["iter"] == last}}


def run_tag(overrides: list[str]) -> str:
    """A run folder's suffix naming its overrides, so that two settings never share a folder."""
    return "".join("-" + o.replace("/", "_").replace("=", "_") for o in overrides)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=("natural", "medical", "change"), default="medical")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--methods", default=None,
                   help="default: the demo's (natural: supervised,fixmatch; medical, change: supervised,unimatch)")
    p.add_argument("--iters", type=int, default=None, help="default: the demo's")
    p.add_argument("--runs", default=str(REPO / "runs" / "scenario-demo"))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--config", default="demo", help="natural only: the packaged config (default: the demo's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="natural only: a config override for every method's run (repeatable)")
    args = p.parse_args(argv)
    if (args.overrides or args.config != "demo") and args.scenario != "natural":
        p.error("--set and --config apply to --scenario natural only (the other scenarios' settings are the demo's)")

    from semiseg import demo
    from semiseg.config import load_config
    from semiseg.engine.logging import read_metrics
    from semiseg.engine.trainer import Trainer

    runs = Path(args.runs)
    tag = ("" if args.config == "demo" else f"-{args.config}") + run_tag(args.overrides)
    if args.scenario == "natural":
        root, iters = None, args.iters

        def make_config(method, root, iters, seed):
            overrides = [*args.overrides, f"train.seed={seed}", *([f"train.iters={iters}"] if iters else [])]
            if args.config == "demo":  # the demo's own, with its schedule for the method (--set wins)
                return demo.demo_config(method, overrides)
            # method.name first: an override may set a key of that method
            return load_config(demo.packaged_config(args.config), [f"method.name={method}", *overrides])
    elif args.scenario == "medical":
        from semiseg.data.acdc_synthetic import ensure_acdc_synthetic

        root, make_config = ensure_acdc_synthetic(runs / "acdc-data"), demo.medical_config
        iters = args.iters or demo.MEDICAL_ITERS
    else:
        from semiseg.data.cd_synthetic import ensure_change_synthetic

        root, make_config = ensure_change_synthetic(runs / "levir-data"), demo.change_config
        iters = args.iters or demo.CHANGE_ITERS
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in (args.methods.split(",") if args.methods
                       else demo.DEMO_METHODS if args.scenario == "natural" else demo.SCENARIO_METHODS):
            cfg = make_config(method, root, iters, seed=seed)
            t0 = time.perf_counter()
            run_dir = runs / f"{args.scenario}-{method}-s{seed}{tag}"
            trainer = Trainer(cfg, run_dir, progress=False)
            result = trainer.fit()
            row = {"scenario": args.scenario, "data": "generated", "method": method, "seed": seed,
                   **scores(args.scenario, result.metrics), "iters": cfg.train.iters,
                   "precision": trainer.precision,
                   **({"config": args.config, "set": args.overrides,
                       "schedule": demo.demo_schedule(method, cfg.train.iters) if args.config == "demo" else [],
                       **evaluations(read_metrics(run_dir))} if args.scenario == "natural" else {}),
                   "wall_min": round((time.perf_counter() - t0) / 60, 1), "machine": machine(),
                   "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   # where the runs and rows go does not change them: left out, so no machine's layout shows
                   "command": recorded_command(sys.argv[1:] if argv is None else argv, "benchmarks/scenario_demo.py",
                                               drop=("--runs", "--results"))}
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            shown = {k: v for k, v in row.items() if k in SCORES[args.scenario]}
            print(f"{args.scenario} {method} seed {seed}: {json.dumps(shown)}, {row['wall_min']} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
