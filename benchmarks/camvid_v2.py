#!/usr/bin/env python
"""CamVid-CPU v2 protocol (BENCHMARKS.md): train one method on one split with one seed, from the
ImageNet-pretrained EfficientNet-Lite0, and append the result to ``benchmarks/results/camvid_v2.jsonl``.

    python benchmarks/camvid_v2.py --method supervised --split 1_8 --seed 0
    python benchmarks/camvid_v2.py --method supervised --split all --seed 0   # the ceiling: 367 masks
    python benchmarks/camvid_v2.py --method unimatch --split 1_16 --seed 1
    python benchmarks/camvid_v2.py --method pct --split 1_8 --seed 0          # stage one, pseudo labels, stage two
    python benchmarks/camvid_v2.py --resume runs/bench-v2/allspark-1_16-s0    # finish a run SIGTERM stopped

The budget, model and optimiser are those of ``configs/camvid.yaml`` (AllSpark:
``configs/camvid_allspark.yaml``, the same model with the AllSpark neck); a method only adds the
keys in :data:`METHODS`. Each run writes one JSON line: the final mIoU of the network the method
reports (and of its other networks), the per-class IoU, the best mIoU on the way, seconds per
step, wall time, the machine, the thread count and CPU affinity, and the exact command.
A run stopped by SIGTERM or Ctrl-C saves its checkpoint and makes no row; ``--resume`` finishes
it (the trainer's resume is exact) and the row counts the wall time of every segment.
``benchmarks/render_v2.py`` turns the lines into the matrix at the top of BENCHMARKS.md and the
run log.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# $SEMISEG_V2_RESULTS moves the results file out of the checkout (a queue of runs on a worktree)
RESULTS = Path(os.environ.get("SEMISEG_V2_RESULTS", REPO / "benchmarks" / "results" / "camvid_v2.jsonl"))
SPLITS = ("1_16", "1_8", "1_4", "1_2", "all")
# the protocol computes in fp32 on every CPU: ``train.precision: auto`` would pick bf16 on a CPU
# with AVX-512 BF16 and make its rows incomparable with those of an AVX2 machine
PROTOCOL = ["train.precision=fp32"]

# method -> (config, overrides). The schedules of the memory-bank method are scaled from the
# official 2000/1000/2000 iterations of a 40k-150k-iteration run to this 800-iteration budget.
METHODS: dict[str, tuple[str, list[str]]] = {
    "supervised": ("camvid", []),
    "fixmatch": ("camvid", ["method.name=fixmatch"]),
    "unimatch": ("camvid", ["method.name=unimatch"]),
    "unimatch_v2": ("camvid", ["method.name=unimatch_v2"]),
    "meanteacher": ("camvid", ["method.name=meanteacher"]),
    "contrastive_memory": ("camvid", ["method.name=contrastive_memory", "method.rampup_iters=100",
                                      "method.memory_start_iter=50", "method.contrastive_start_iter=100"]),
    "pct": ("camvid", ["method.name=pct", "data.tags=masks"]),
    "allspark": ("camvid_allspark", []),
    "allspark_unimatch": ("camvid_allspark", ["method.name=allspark_unimatch", "method.conf_thresh=0.95"]),
}


def cpu_fields(cpuinfo: str) -> dict:
    """The first processor's name, ISA level, family and model from ``/proc/cpuinfo`` text.

    The name alone does not tell CPU generations apart (two generations of AMD EPYC both call
    themselves "AMD EPYC" and both have AVX-512 BF16, with per-step times 1.5x apart), so the
    family and model numbers are kept beside it."""
    fields = {"model name": None, "cpu family": None, "model": None, "flags": None}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in fields and fields[key] is None:
            fields[key] = value.strip()
    flags = set((fields["flags"] or "").split())
    isa = "AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "?"
    return {"cpu": fields["model name"] or "unknown CPU", "isa": isa,
            "cpu_family": fields["cpu family"], "cpu_model": fields["model"]}


def machine() -> dict:
    import torch

    try:
        cpu = cpu_fields(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = cpu_fields("")
    return {**cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def split_overrides(split: str, root: Path) -> list[str]:
    if split == "all":
        return [f"data.root={root}", "data.labeled=null", "data.unlabeled=null"]
    return [f"data.root={root}", f"data.labeled=splits/{split}/labeled.txt",
            f"data.unlabeled=splits/{split}/unlabeled.txt"]


def as_recorded(path) -> str:
    """``path`` as the results file records it: relative to the project when it lies beside it
    (the project's own ``runs/``, ``../shared/data/camvid``), so a row names no machine's layout;
    any other path as given."""
    resolved = Path(path).resolve()
    beside = resolved.is_relative_to(REPO) or resolved.is_relative_to(REPO.parent / "shared")
    return os.path.relpath(resolved, REPO) if beside else str(path)


PATH_KEYS = ("data.root=", "data.extra_labels=", "train.init_from=")  # overrides whose value is a path


def recorded_overrides(overrides: list[str]) -> list[str]:
    """``overrides`` as the results file records them: path values through :func:`as_recorded`."""
    return [o.split("=", 1)[0] + "=" + as_recorded(o.split("=", 1)[1]) if o.startswith(PATH_KEYS) else o
            for o in overrides]


PATH_OPTIONS = ("--config", "--data-root", "--runs")  # options whose value is a path


def recorded_command(argv: list[str], script: str = "benchmarks/camvid_v2.py", drop=("--results",)) -> str:
    """The command line of ``script`` as a row records it: the values of :data:`PATH_OPTIONS` and
    of path overrides through :func:`as_recorded`, and the options ``drop`` left out (where the row
    is written does not change the run), so that a row names no machine's layout."""
    out, args = [], list(argv)
    while args:
        a = args.pop(0)
        name, eq, value = a.partition("=")
        if name in drop:
            if not eq and args:
                args.pop(0)
            continue
        if name in PATH_OPTIONS or name == "--set":
            if not eq:
                out.append(a)
                if not args:
                    break
                value = args.pop(0)
            recorded = as_recorded(value) if name in PATH_OPTIONS else recorded_overrides([value])[0]
            out.append(f"{name}={recorded}" if eq else recorded)
            continue
        out.append(a)
    return f"python {script} " + " ".join(shlex.quote(a) for a in out)


def read_metrics(run_dir: Path, metric: str = "mIoU") -> tuple[list[float], dict[str, dict], float]:
    """(seconds per step of each logging window after the first, last eval per network, best
    ``metric`` of the first network)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["sec_per_iter"] for r in rows if r.get("type") == "train" and "sec_per_iter" in r]
    evals = [r for r in rows if r.get("type") == "eval"]
    last: dict[str, dict] = {}
    for r in evals:
        last[r["model"]] = r
    first = evals[0]["model"] if evals else None
    best = max((r[metric] for r in evals if r["model"] == first), default=float("nan"))
    return steps[1:] or steps, last, best


def evals_of(run_dir: Path, network: str) -> list[dict]:
    """The eval rows of ``network`` in ``run_dir/metrics.jsonl``, in order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("type") == "eval" and r.get("model") == network]


STATE = "benchmark.json"  # in a run directory: which row the run makes, and its wall time so far


def claim_run_dir(out: Path) -> Path:
    """Create and return a run directory no other run has: ``out`` itself, else ``out`` with the
    start time, else that with ``-2``, ``-3``... ``mkdir`` without ``exist_ok`` is the claim, so two
    runs of the same method, split and seed started in the same second (two variants, one per core)
    never train into one directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = f"{out.name}-{datetime.now():%Y%m%d-%H%M%S}"
    for name in (out.name, stamp, *(f"{stamp}-{i}" for i in range(2, 1000))):
        try:
            (out.parent / name).mkdir()
        except FileExistsError:
            continue
        return out.parent / name
    raise SystemExit(f"{out.parent}: no free run directory named {stamp}-N")


def train_row(method: str, split: str, seed: int, config: str, overrides: list[str], out: Path,
              command: str, variant: list[str], stage: str = "", resume: bool = False,
              protocol: str = "camvid-cpu-v2", metric: str = "mIoU", per_class: str = "per_class_iou",
              script: str = "benchmarks/camvid_v2.py") -> Optional[dict]:
    """Train (or, with ``resume``, continue) the run in ``out`` and return its row; None when a
    stop signal (SIGTERM, Ctrl-C) cut it short: its checkpoint is saved, its wall time so far is
    kept in ``out/benchmark.json``, and ``--resume out`` finishes it. The trainer's resume is
    exact (tested bit for bit), so a row made in several segments is the row of one run.
    ``protocol``, ``metric`` and ``per_class`` name the row's protocol, its score (an eval
    row's key) and per-class list; ``script`` is the runner the resume hint names."""
    import semiseg

    state_file = out / STATE
    if resume:
        state = json.loads(state_file.read_text())
    else:
        state = {"method": method, "split": split, "seed": seed, "config": config, "overrides": overrides,
                 "variant": variant, "command": command, "wall_s": 0.0, "segments": 0}
        out.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state, indent=1) + "\n")
    t0 = time.perf_counter()
    result = semiseg.train(None if resume else config, overrides=None if resume else overrides, out=out,
                           resume=resume)
    state["wall_s"] += time.perf_counter() - t0
    state["segments"] += 1
    state_file.write_text(json.dumps(state, indent=1) + "\n")
    if result.stopped_early:
        print(f"stopped at iteration {result.iteration}; finish it with: python {script} "
              f"--resume {as_recorded(out)}", file=sys.stderr)
        return None
    steps, last, best = read_metrics(out, metric)
    networks = {name: round(r[metric], 2) for name, r in last.items()}
    reported = next(iter(last))  # the network eval.model "auto" scores: the method's default
    row = {
        "protocol": protocol, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "method": method + (f":{stage}" if stage else ""), "split": split, "seed": seed,
        metric: round(result.metrics.get(metric, last[reported][metric]), 2), "network": reported,
        "networks": networks, f"best_{metric}": round(best, 2),
        per_class: [None if x is None else round(x, 2) for x in last[reported][per_class]],
        "sec_per_step": round(sum(steps) / max(1, len(steps)), 3), "wall_min": round(state["wall_s"] / 60, 1),
        "iters": result.iteration, "config": config,
        "overrides": recorded_overrides(overrides),
        "run_dir": as_recorded(out),
        "machine": machine(), "command": command,
        "variant": variant,  # another config or extra overrides: listed in the log, kept out of the matrix
    }
    # the reported network's evaluations on the way: (iteration, score), so a row keeps its curve
    # when the run directory is gone
    row["curve"] = [[r["iter"], round(r[metric], 2)] for r in evals_of(out, reported) if metric in r]
    if state["segments"] > 1:  # stopped and resumed: wall_min sums the segments
        row["segments"] = state["segments"]
    return row


def append(row: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("method", "split", "seed", "mIoU", "mDice", "sec_per_step", "wall_min")
                      if k in row}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(METHODS))
    p.add_argument("--split", default="1_8", choices=SPLITS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="another config than the method's (a variant: kept out of the matrix)")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "camvid"))
    p.add_argument("--runs", default=str(REPO / "runs" / "bench-v2"), help="folder of the run directories")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra config override, recorded with the row (a variant, not the protocol)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="finish a run a stop signal cut short (its method, split, seed and keys are its own)")
    args = p.parse_args(argv)
    if args.resume:
        return resume(Path(args.resume), Path(args.results))
    if args.method is None:
        p.error("--method is required (or --resume RUN_DIR)")

    root = Path(args.data_root)
    if not (root / "splits").is_dir():
        raise SystemExit(f"--data-root {root}: not a CamVid folder with splits/ (see ../shared/data/camvid)")
    if args.method != "supervised" and args.split == "all":
        raise SystemExit("--split all is the supervised ceiling: every training image is labelled")
    config, method_overrides = METHODS[args.method]
    config = args.config or config
    overrides = [*method_overrides, *PROTOCOL, *split_overrides(args.split, root), f"train.seed={args.seed}",
                 *args.overrides]
    command = (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "") + \
        recorded_command(argv if argv is not None else sys.argv[1:])
    variant = [*([f"--config {as_recorded(args.config)}"] if args.config else []), *recorded_overrides(args.overrides)]
    tag = f"{args.method}-{args.split}-s{args.seed}" + ("-variant" if variant else "")
    out = claim_run_dir(Path(args.runs) / tag)  # never train into an earlier or a concurrent run

    from semiseg.errors import SemisegError

    try:
        row = train_row(args.method, args.split, args.seed, config, overrides, out, command, variant)
    except SemisegError as e:  # a bad key, folder or file: one line, and no empty run directory left
        if out.is_dir() and {p.name for p in out.iterdir()} <= {STATE}:  # the trainer wrote nothing
            (out / STATE).unlink(missing_ok=True)
            out.rmdir()
        raise SystemExit(f"camvid_v2.py: {e}") from None
    if row is None:
        return 0
    append(row, Path(args.results))
    if args.method == "pct":  # stage two: supervised on the masks plus HybridNet's tag-restricted pseudo labels
        labels = out / "pseudo_labels"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "semiseg", "pseudo-label", str(out), "--split", "unlabeled",
                        "--out", str(labels)], check=True, cwd=REPO)
        stage2 = [*PROTOCOL, *split_overrides(args.split, root), f"train.seed={args.seed}", f"data.extra_labels={labels}",
                  *args.overrides]
        row2 = train_row("pct", args.split, args.seed, config, stage2, out.with_name(out.name + "-stage2"), command,
                         variant, stage="stage2")
        if row2 is None:
            raise SystemExit("PCT's stage two was stopped: rerun the whole benchmark (--resume covers one-stage runs)")
        # stage two needs stage one and its pseudo labels first: its wall time counts all three
        row2["wall_min"] = round((time.perf_counter() - t0) / 60 + row["wall_min"], 1)
        append(row2, Path(args.results))
    return 0


def resume(out: Path, results: Path) -> int:
    """``--resume RUN_DIR``: continue the run from its last checkpoint and, once it is complete,
    append its row as the uninterrupted run would have."""
    if not (out / STATE).is_file():
        raise SystemExit(f"--resume {out}: no {STATE} there: expected a run directory this script started")
    state = json.loads((out / STATE).read_text())
    if state["method"] == "pct":
        raise SystemExit(f"--resume {out}: PCT's two stages cannot be resumed; rerun the benchmark")
    row = train_row(state["method"], state["split"], state["seed"], state["config"], state["overrides"], out,
                    state["command"], state["variant"], resume=True)
    if row is not None:
        append(row, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
