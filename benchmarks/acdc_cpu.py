#!/usr/bin/env python
"""ACDC-CPU protocol (BENCHMARKS.md, "ACDC-CPU"): train one method on the 1- or 3-case split of
the real ACDC cardiac MRI with one seed, score the 20 validation volumes in 3D (mean Dice over
RV, Myo and LV, as ``semiseg eval`` does) and append the row to ``benchmarks/results/acdc_cpu.jsonl``.

    python benchmarks/acdc_cpu.py --method supervised --cases 1 --seed 0
    python benchmarks/acdc_cpu.py --method supervised --cases all --seed 0   # the ceiling: 1312 slices
    python benchmarks/acdc_cpu.py --method unimatch --cases 1 --seed 0
    python benchmarks/acdc_cpu.py --table                                    # the matrix, as markdown
    python benchmarks/acdc_cpu.py --render                                   # ... into BENCHMARKS.md
    python benchmarks/acdc_cpu.py --resume runs/bench-acdc/unimatch-1-s0     # finish a stopped run

The recipe is UniMatch's medical one (``configs/acdc.yaml``: the official 2D UNet from scratch,
(CE + Dice) / 2 on the labelled slices, Dice on the confident unlabelled pixels, threshold 0.95,
CutMix partners from a separate batch, 12 + 12 slices a step; supervised 24), scaled to a 2-core
CPU by :data:`PROTOCOL`, chosen by measurement (BENCHMARKS.md, ACDC-CPU, "why these numbers"):

* ``data.crop_size=128`` instead of 256: a quarter of the pixels (UniMatch: 297.6 GFLOP a step);
  slices are resized to 128 for prediction and the logits back to the label's size to score;
* ``train.iters=1200``: UniMatch at 2.23 s/step on 2 quiet threads of an AMD EPYC family 25
  model 17 (``semiseg bench --fixed-batch``) is 45 minutes of steps;
* AdamW at lr 1e-3 instead of SGD at 0.01: on the 1-case split SGD's UNet scored 13.46 / 4.61
  mDice at iterations 150 / 300, AdamW 32.28 / 29.03 (BENCHMARKS.md, ACDC-CPU);
* fp32 on every CPU, as CamVid-CPU v2, so rows of AVX2 and AVX-512 BF16 machines compare.

Each row holds the final mDice of the network the method reports (and its other networks), the
per-class Dice, the best mDice on the way, seconds per step, wall time, the machine and the exact
command. A run stopped by SIGTERM or Ctrl-C keeps its checkpoint; ``--resume`` finishes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from camvid_v2 import REPO, STATE, append, claim_run_dir, recorded_command, recorded_overrides, train_row  # noqa: E402

RESULTS = Path(os.environ.get("SEMISEG_ACDC_RESULTS", REPO / "benchmarks" / "results" / "acdc_cpu.jsonl"))
CASES = ("1", "3", "7", "all")
ITERS = 1200
PROTOCOL = ["data.crop_size=128", f"train.iters={ITERS}", "train.eval_every=200", "train.precision=fp32",
            "train.optimizer=adamw", "train.lr=0.001"]

# method -> (config, overrides). Mean Teacher's sigmoid ramp-up spans the first third of the run
# (without one its consistency at full weight from the first step collapses the student).
METHODS: dict[str, tuple[str, list[str]]] = {
    "supervised": ("acdc_supervised", []),
    "fixmatch": ("acdc", ["method.name=fixmatch"]),
    "unimatch": ("acdc", []),
    "unimatch_v2": ("acdc", ["method.name=unimatch_v2"]),
    "meanteacher": ("acdc", ["method.name=meanteacher", f"method.rampup_iters={ITERS // 3}"]),
}
# keys of configs/acdc.yaml's UniMatch section that another method does not have
NOT_KEYS = {"meanteacher": ["method.loss_u", "method.conf_thresh"]}
PROTOCOL_NAME = "acdc-cpu"
FOREGROUND = ("RV", "Myo", "LV")


def split_overrides(cases: str, root: Path) -> list[str]:
    if cases == "all":
        return [f"data.root={root}", "data.labeled=null", "data.unlabeled=null"]
    return [f"data.root={root}", f"data.labeled=splits/acdc/{cases}/labeled.txt",
            f"data.unlabeled=splits/acdc/{cases}/unlabeled.txt"]


def method_config(method: str):
    """The config of ``method`` (a built-in name, or the parsed config without the keys the
    method lacks, :data:`NOT_KEYS`) and its overrides."""
    config, overrides = METHODS[method]
    if method not in NOT_KEYS:
        return config, overrides
    import yaml

    from semiseg.config.load import config_file

    raw = yaml.safe_load(config_file(config).read_text())
    for key in NOT_KEYS[method]:
        section, name = key.split(".")
        raw[section].pop(name, None)
    return raw, overrides


# ---------------------------------------------------------------------------------------------
# The matrix


def load_rows(path: Path = RESULTS) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


WARM = " (warm start)"


def warm_override(runs: Path, cases: str, seed: int) -> str:
    """``--warm-start``: start from the supervised run of the same cases and seed (its best
    checkpoint, :func:`semiseg.engine.checkpoint.load_init_weights`)."""
    return f"train.init_from={runs / f'supervised-{cases}-s{seed}'}"


def is_warm(row: dict) -> bool:
    """Whether ``row``'s only change to the protocol is :func:`warm_override`."""
    v = row.get("variant") or []
    return (len(v) == 1 and v[0].startswith("train.init_from=")
            and v[0].rstrip("/").endswith(f"supervised-{row['split']}-s{row['seed']}"))


def cells(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(method, cases) -> the protocol's rows, one per seed (the first made). A warm-started row
    (:func:`is_warm`) counts as method ``"<method> (warm start)"``; other variants are left out."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        if r.get("protocol") != PROTOCOL_NAME or (r.get("variant") and not is_warm(r)):
            continue
        method = r["method"] + (WARM if r.get("variant") else "")
        out.setdefault((method, r["split"]), {}).setdefault(r["seed"], r)
    return {k: [v[s] for s in sorted(v)] for k, v in out.items()}


def gap_recovered(method: float, supervised: float, ceiling: float) -> float:
    """(method - supervised) / (ceiling - supervised), in percent."""
    return 100.0 * (method - supervised) / (ceiling - supervised)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def wall(rows: list[dict]) -> str:
    """Mean wall minutes of the rows that recorded theirs (a row whose first segment was killed
    without a stop signal has ``wall_min`` null); "-" when none did."""
    got = [r["wall_min"] for r in rows if r.get("wall_min") is not None]
    return f"{mean(got):.1f}" if got else "-"


def table(rows: list[dict]) -> str:
    """The ACDC-CPU matrix as markdown: one row per method and split, mean mDice over the seeds
    made, each seed, the gain over supervised and the gap recovered (both against the same seeds'
    mean of supervised and of the ceiling), the gain over supervised trained as many iterations
    (a warm start's control is ``supervised (warm start)``; over the seeds the control has, named
    when they are fewer), s/step and wall time."""
    c = cells(rows)
    ceiling = c.get(("supervised", "all"))
    lines = ["| cases | method | mDice (mean) | seeds | vs supervised | vs supervised, same iterations | gap recovered "
             "| RV / Myo / LV | s/step | wall min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = [m + w for w in ("", WARM) for m in ("supervised", "fixmatch", "unimatch", "unimatch_v2", "meanteacher")]
    for cases in ("1", "3", "7"):
        sup = {r["seed"]: r for r in c.get(("supervised", cases), [])}
        sup_warm = {r["seed"]: r for r in c.get(("supervised" + WARM, cases), [])}
        for method in order:
            got = c.get((method, cases))
            if not got:
                continue
            m = mean([r["mDice"] for r in got])
            vs = same = gap = "-"
            if method != "supervised" and all(r["seed"] in sup for r in got):
                s = mean([sup[r["seed"]]["mDice"] for r in got])  # supervised of the same seeds
                vs = f"{m - s:+.2f}"
                if ceiling:
                    gap = f"{gap_recovered(m, s, mean([r['mDice'] for r in ceiling])):.0f}%"
            # a warm start trains twice as many iterations: its control is supervised's warm start
            control = sup_warm if method.endswith(WARM) else sup
            both = [r for r in got if r["seed"] in control]  # the seeds the control has
            if not method.startswith("supervised") and both:
                same = f"{mean([r['mDice'] - control[r['seed']]['mDice'] for r in both]):+.2f}"
                if len(both) < len(got):
                    same += " (" + ", ".join(f"s{r['seed']}" for r in both) + ")"
            per = [mean([r["per_class_dice"][k] for r in got]) for k in (1, 2, 3)]
            lines.append(f"| {cases} | {method} | **{m:.2f}** | " + " / ".join(f"s{r['seed']} {r['mDice']:.2f}" for r in got)
                         + f" | {vs} | {same} | {gap} | " + " / ".join(f"{x:.1f}" for x in per)
                         + f" | {mean([r['sec_per_step'] for r in got]):.2f} | {wall(got)} |")
    ceiling_row = None
    if ceiling:
        m = mean([r["mDice"] for r in ceiling])
        per = [mean([r["per_class_dice"][k] for r in ceiling]) for k in (1, 2, 3)]
        lines.append(f"| all 1312 slices | supervised (ceiling) | **{m:.2f}** | "
                     + " / ".join(f"s{r['seed']} {r['mDice']:.2f}" for r in ceiling)
                     + " | - | - | 100% | " + " / ".join(f"{x:.1f}" for x in per)
                     + f" | {mean([r['sec_per_step'] for r in ceiling]):.2f} | {wall(ceiling)} |")
    variants = [r for r in rows if r.get("protocol") == PROTOCOL_NAME and r.get("variant") and not is_warm(r)]
    if variants:
        lines += ["", "Variants (one change to the protocol each; not in the matrix), against supervised with the same "
                  "cases and seed:", "",
                  "| cases | method | change | seed | mDice | vs supervised | RV / Myo / LV | s/step | wall min |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in variants:
            base = next((b for b in c.get(("supervised", r["split"]), []) if b["seed"] == r["seed"]), None)
            vs = f"{r['mDice'] - base['mDice']:+.2f} ({base['mDice']:.2f})" if base else "-"
            change = ", ".join(f"`{v}`" for v in r["variant"])
            lines.append(f"| {r['split']} | {r['method']} | {change} | {r['seed']} | {r['mDice']:.2f} | {vs} | "
                         + " / ".join(f"{x:.1f}" for x in r["per_class_dice"][1:])
                         + f" | {r['sec_per_step']:.2f} | {wall([r])} |")
    return "\n".join(lines)


BEGIN, END = "<!-- acdc-cpu matrix: rendered by benchmarks/acdc_cpu.py --render -->", "<!-- end acdc-cpu matrix -->"


def render(doc: str, rows: list[dict]) -> str:
    """``doc`` with the text between :data:`BEGIN` and :data:`END` replaced by :func:`table`."""
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"BENCHMARKS.md has no {BEGIN} ... {END} block to render into")
    head, rest = doc.split(BEGIN, 1)
    return head + BEGIN + "\n" + table(rows) + "\n" + END + rest.split(END, 1)[1]


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(METHODS))
    p.add_argument("--cases", default="1", choices=CASES, help="labelled cases (official splits); all: the ceiling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "acdc"))
    p.add_argument("--runs", default=str(REPO / "runs" / "bench-acdc"), help="folder of the run directories")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra config override, recorded with the row (a variant, not the protocol)")
    p.add_argument("--warm-start", action="store_true",
                   help="start from the supervised run of the same --cases and --seed under --runs (its best "
                        "checkpoint); the matrix shows the row as '<method> (warm start)'")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--resume", metavar="RUN_DIR", help="finish a run a stop signal cut short")
    p.add_argument("--table", action="store_true", help="print the matrix of --results as markdown")
    p.add_argument("--render", action="store_true", help="write the matrix into BENCHMARKS.md")
    p.add_argument("--check", action="store_true", help="exit 1 when BENCHMARKS.md's matrix is not the rendered one")
    args = p.parse_args(argv)
    if args.table:
        print(table(load_rows(Path(args.results))))
        return 0
    if args.render or args.check:
        doc_path = REPO / "BENCHMARKS.md"
        doc = doc_path.read_text()
        new = render(doc, load_rows(Path(args.results)))
        if args.check:
            if new != doc:
                print("BENCHMARKS.md's ACDC-CPU matrix is stale: run python benchmarks/acdc_cpu.py --render",
                      file=sys.stderr)
                return 1
            return 0
        doc_path.write_text(new)
        print(f"rendered {len(load_rows(Path(args.results)))} ACDC-CPU runs into BENCHMARKS.md")
        return 0
    if args.resume:
        out = Path(args.resume)
        if not (out / STATE).is_file():
            raise SystemExit(f"--resume {out}: no {STATE} there: expected a run directory this script started")
        state = json.loads((out / STATE).read_text())
        row = train_row(state["method"], state["split"], state["seed"], state["config"], state["overrides"], out,
                        state["command"], state["variant"], resume=True, **ROW_KEYS)
        if row is not None:
            append(row, Path(args.results))
        return 0
    if args.method is None:
        p.error("--method is required (or --resume RUN_DIR, or --table)")
    if args.method != "supervised" and args.cases == "all":
        raise SystemExit("--cases all is the supervised ceiling: every training slice is labelled")
    root = Path(args.data_root)
    if not (root / "data" / "slices").is_dir():
        raise SystemExit(f"--data-root {root}: not an ACDC folder with data/slices/ (see ../shared/data/acdc)")
    if args.warm_start:
        start = Path(args.runs) / f"supervised-{args.cases}-s{args.seed}"
        if not (start / "checkpoints").is_dir():
            raise SystemExit(f"--warm-start: no supervised run at {start}: run --method supervised --cases "
                             f"{args.cases} --seed {args.seed} first")
        args.overrides.append(warm_override(Path(args.runs), args.cases, args.seed))
    config, method_overrides = method_config(args.method)
    overrides = [*method_overrides, *PROTOCOL, *split_overrides(args.cases, root), f"train.seed={args.seed}",
                 *args.overrides]
    command = (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "") + \
        recorded_command(argv if argv is not None else sys.argv[1:], script="benchmarks/acdc_cpu.py")
    variant = recorded_overrides(args.overrides)
    tag = f"{args.method}-{args.cases}-s{args.seed}" + ("-variant" if variant else "")
    out = claim_run_dir(Path(args.runs) / tag)  # never train into an earlier or a concurrent run
    row = train_row(args.method, args.cases, args.seed, config, overrides, out, command, variant, **ROW_KEYS)
    if row is not None:
        if isinstance(config, dict):  # a built-in config less some keys: name it, not its text
            row["config"] = f"{METHODS[args.method][0]} without {', '.join(NOT_KEYS[args.method])}"
        append(row, Path(args.results))
    return 0


ROW_KEYS = dict(protocol=PROTOCOL_NAME, metric="mDice", per_class="per_class_dice", script="benchmarks/acdc_cpu.py")

if __name__ == "__main__":
    sys.exit(main())
