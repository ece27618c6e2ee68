#!/usr/bin/env python
"""CamVid-CPU v1 protocol (``../shared/BENCHMARK.md``, resnet18 from scratch; ``configs/camvid_v1.yaml``):
train one method on one split and append the result to ``benchmarks/camvid_v1.md`` with the exact
command, machine, date, seed, wall time and mIoU. The v2 protocol's runner is ``camvid_v2.py``.

    python benchmarks/camvid_cpu.py --method supervised --split 1_8 --seed 0
    python benchmarks/camvid_cpu.py --method supervised --split all --seed 0
    python benchmarks/camvid_cpu.py --method unimatch --split 1_8 --track W --init-from runs/bench/S-supervised-1_8-s0

Track S trains 1200 iterations from scratch at lr 0.02; track W continues 600 iterations at
lr 0.01 from a track-S supervised checkpoint (``train.init_from``) with a fresh optimiser.
Any ``--set`` is passed to the config and recorded in the row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRACKS = {"S": {"train.iters": 1200, "train.lr": 0.02}, "W": {"train.iters": 600, "train.lr": 0.01}}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{os.cpu_count()} threads={torch.get_num_threads()}"
    return f"{cpu}; {dev}; torch {torch.__version__}"


def overrides_for(args) -> list[str]:
    root = Path(args.data_root)
    o = [f"{k}={v}" for k, v in TRACKS[args.track].items()]
    o += [f"data.root={root}", f"method.name={args.method}", f"train.seed={args.seed}"]
    if args.split == "all":
        o += ["data.labeled=null", "data.unlabeled=null"]
    else:
        o += [f"data.labeled=splits/{args.split}/labeled.txt", f"data.unlabeled=splits/{args.split}/unlabeled.txt"]
    if args.track == "W":
        if not args.init_from:
            raise SystemExit("track W needs --init-from (a track-S supervised run directory or checkpoint)")
        o.append(f"train.init_from={args.init_from}")
    return o + list(args.overrides)


def append_row(path: Path, row: dict) -> None:
    header = ("| date | track | method | split | seed | mIoU | s/step | wall | machine | command |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    marker = "<!-- camvid-cpu-v1 rows: appended by benchmarks/camvid_cpu.py -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if marker not in text:  # the raw log is the last section of the file; rows go at its end
        text = text.rstrip("\n") + f"\n\n## CamVid-CPU v1 results (raw log)\n\n{marker}\n{header}"
    line = (f"| {row['date']} | {row['track']} | {row['method']} | {row['split']} | {row['seed']} | "
            f"{row['mIoU']:.2f} | {row['sec_per_step']:.3f} | {row['wall_min']:.1f} min | {row['machine']} | "
            f"`{row['command']}` |\n")
    path.write_text(text.rstrip("\n") + "\n" + line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="supervised")
    p.add_argument("--config", default="camvid_v1",
                   help="config name under configs/ or a YAML path (default camvid_v1: the protocol's model); "
                        "camvid_v1_allspark swaps in pvt_v2_b0 + SegFormer head for the AllSpark rows")
    p.add_argument("--split", default="1_8", help="1_16, 1_8, 1_4, 1_2 or all")
    p.add_argument("--track", default="S", choices=sorted(TRACKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", help="track W: the supervised run to continue from")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "camvid"))
    p.add_argument("--out", help="run directory (default runs/bench/TRACK-METHOD-SPLIT-sSEED)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--results", default=str(REPO / "benchmarks" / "camvid_v1.md"))
    p.add_argument("--no-append", action="store_true", help="print the row instead of appending it")
    args = p.parse_args()

    import semiseg
    from semiseg.config import config_file

    config = config_file(args.config)
    if not config.is_file():
        raise SystemExit(f"--config {args.config}: no such config file ({config})")
    out = Path(args.out or REPO / "runs" / "bench" / f"{args.track}-{args.method}-{args.split}-s{args.seed}")
    if not args.out:  # a fresh run each time: never train into an earlier or a concurrent one
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from camvid_v2 import claim_run_dir

        out = claim_run_dir(out)
    overrides = overrides_for(args)
    t0 = time.perf_counter()
    result = semiseg.train(config, overrides=overrides, out=out)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["sec_per_iter"] for r in rows if r.get("type") == "train" and "sec_per_iter" in r]
    steps = steps[1:] or steps  # the first window includes start-up
    row = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "track": args.track, "method": args.method, "split": args.split, "seed": args.seed,
        "mIoU": result.metrics["mIoU"], "sec_per_step": sum(steps) / max(1, len(steps)),
        "wall_min": wall / 60, "machine": machine(),
        "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "")
        + "python benchmarks/camvid_cpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "run_dir": str(out),
    }
    print(json.dumps(row))
    if not args.no_append:
        append_row(Path(args.results), row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
