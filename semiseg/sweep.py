"""``semiseg sweep``: a grid of runs over methods x labelled-set sizes x seeds, and its plot.

Each cell is an ordinary ``semiseg train`` run in ``OUT/<method>/labeled_<spec>/seed_<seed>``
with ``--set method.name=M --set data.labeled=L --set train.seed=S`` added after the user's
``--set`` overrides. ``--dry-run`` prints exactly those commands, one per line, for a cluster
scheduler; otherwise the runs execute here one after another. A finished run is not trained
again and an interrupted one is resumed, so re-running the sweep continues it.

Results go to ``OUT/sweep.json`` (one record per run), ``OUT/sweep.csv`` and ``OUT/sweep.png``:
the final validation mIoU against the number of labelled images, one line per method (the mean
over seeds, with the min-max range shaded when there are several seeds). The score of a run is
its last evaluation of the network ``eval.model`` picks (the first network for ``auto``);
``best_mIoU`` is the best over its evaluations.
"""

from __future__ import annotations

import csv
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from semiseg.errors import SemisegError


@dataclass
class Cell:
    method: str
    labeled: str
    seed: int
    run_dir: Path

    def overrides(self) -> list[str]:
        return [f"method.name={self.method}", f"data.labeled={self.labeled}", f"train.seed={self.seed}"]


def parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise SemisegError(f"sweep: {what} is empty: expected a comma-separated list")
    if len(set(items)) != len(items):
        raise SemisegError(f"sweep: {what} {text!r} lists a value twice")
    return items


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in spec)


def grid(out: Path, methods: list[str], labeled: list[str], seeds: list[int]) -> list[Cell]:
    return [Cell(m, l, s, out / m / f"labeled_{_slug(l)}" / f"seed_{s}") for m in methods for l in labeled
            for s in seeds]


def command(config: str, cell: Cell, overrides: list[str], resume: bool = False) -> str:
    argv = ["semiseg", "train", config, "--out", str(cell.run_dir)]
    for o in [*overrides, *cell.overrides()]:
        argv += ["--set", o]
    if resume:
        argv.append("--resume")
    return shlex.join(argv)


def run_scores(run_dir: Path, eval_model: str = "auto") -> tuple[Optional[float], Optional[float], int]:
    """(final mIoU, best mIoU, last iteration) of a run from its metrics.jsonl."""
    from semiseg.engine.logging import read_metrics

    rows = read_metrics(run_dir)
    by_iter: dict[int, list[dict]] = {}
    for r in rows:
        if r.get("type") == "eval":
            by_iter.setdefault(r["iter"], []).append(r)
    scores = []
    for it in sorted(by_iter):
        group = by_iter[it]
        pick = next((r for r in group if r.get("model") == eval_model), group[0])
        scores.append(pick["mIoU"])
    last_iter = max((r["iter"] for r in rows), default=0)
    return (scores[-1] if scores else None), (max(scores) if scores else None), last_iter


def _labeled_count(cfg) -> Optional[int]:
    from semiseg.data.datasets import list_samples
    from semiseg.data.splits import resolve_labeled

    try:
        labeled, _ = resolve_labeled(cfg.data, list_samples(cfg.data, cfg.data.train_split))
    except SemisegError:
        return None
    return len(labeled)


def run_sweep(config: str, methods: list[str], labeled: list[str], seeds: list[int], out: str | Path,
              overrides: Optional[list[str]] = None, dry_run: bool = False, progress: bool = True,
              echo=print) -> list[dict]:
    """Run (or with ``dry_run`` print) the grid; write sweep.json/csv/png; return the records."""
    from semiseg.config import load_config

    out = Path(out)
    overrides = list(overrides or [])
    cells = grid(out, methods, labeled, seeds)
    configs = {}
    for cell in cells:  # every cell's config is checked before anything runs
        configs[id(cell)] = load_config(config, [*overrides, *cell.overrides()])
    if dry_run:
        for cell in cells:
            echo(command(config, cell, overrides))
        return []

    from semiseg.engine.checkpoint import CheckpointManager
    from semiseg.engine.trainer import Trainer

    out.mkdir(parents=True, exist_ok=True)
    records = []
    counts: dict[str, Optional[int]] = {}
    for i, cell in enumerate(cells, 1):
        cfg = configs[id(cell)]
        if cell.labeled not in counts:
            counts[cell.labeled] = _labeled_count(cfg)
        _, _, done_iter = run_scores(cell.run_dir, cfg.eval.model)
        has_ckpt = CheckpointManager(cell.run_dir).latest_valid() is not None if cell.run_dir.exists() else False
        tag = f"[{i}/{len(cells)}] {cell.method} labeled={cell.labeled} seed={cell.seed}"
        if has_ckpt and done_iter >= cfg.train.iters:
            echo(f"{tag}: already done ({cell.run_dir})")
        else:
            echo(f"{tag}: {'resuming' if has_ckpt else 'training'} in {cell.run_dir}")
            result = Trainer(cfg, cell.run_dir, resume=has_ckpt, progress=progress,
                             config_name=Path(config).stem).fit()
            if result.stopped_early:
                echo(f"sweep stopped during {cell.run_dir}; run the same command again to continue")
                break
        final, best, it = run_scores(cell.run_dir, cfg.eval.model)
        records.append({"method": cell.method, "labeled": cell.labeled, "num_labeled": counts[cell.labeled],
                        "seed": cell.seed, "mIoU": final, "best_mIoU": best, "iters": it,
                        "run_dir": str(cell.run_dir)})
    write_results(out, records, config, overrides)
    return records


def write_results(out: Path, records: list[dict], config: str = "", overrides=()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"config": str(config), "overrides": list(overrides),
                                                "runs": records}, indent=1))
    fields = ["method", "labeled", "num_labeled", "seed", "mIoU", "best_mIoU", "iters", "run_dir"]
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in records:
            w.writerow({k: r.get(k) for k in fields})
    plot(records, out / "sweep.png")


def summarize(records: list[dict]) -> dict[str, list[tuple[float, float, float, float]]]:
    """method -> [(x, mean, min, max)] sorted by x (x: number of labelled images, else the order)."""
    import statistics

    specs = list(dict.fromkeys(r["labeled"] for r in records))
    lines: dict[str, list] = {}
    for m in dict.fromkeys(r["method"] for r in records):
        pts = []
        for j, spec in enumerate(specs):
            vals = [r["mIoU"] for r in records if r["method"] == m and r["labeled"] == spec and r["mIoU"] is not None]
            if not vals:
                continue
            n = next((r["num_labeled"] for r in records if r["labeled"] == spec), None)
            pts.append((float(n if n is not None else j + 1), statistics.fmean(vals), min(vals), max(vals)))
        lines[m] = sorted(pts)
    return lines


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = summarize(records)
    for m, pts in lines.items():
        if not pts:
            continue
        xs, mean, lo, hi = zip(*pts)
        ax.plot(xs, mean, marker="o", label=m)
        if any(a != b for a, b in zip(lo, hi)):
            ax.fill_between(xs, lo, hi, alpha=0.2)
    xs_all = sorted({x for pts in lines.values() for x, *_ in pts})
    if len(xs_all) > 1 and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 4:
        ax.set_xscale("log")
    if xs_all:
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{x:g}" for x in xs_all])
        ax.minorticks_off()
    ax.set_xlabel("labelled images")
    ax.set_ylabel("validation mIoU (%)")
    ax.set_title("mIoU vs. labelled images")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(records: list[dict]) -> str:
    rows = [f"{'method':<14} {'labeled':>8} {'seed':>5} {'mIoU':>7} {'best':>7}"]
    for r in records:
        f = lambda v: f"{v:7.2f}" if v is not None else "      -"  # noqa: E731
        rows.append(f"{r['method']:<14} {r['labeled']:>8} {r['seed']:>5} {f(r['mIoU'])} {f(r['best_mIoU'])}")
    return "\n".join(rows)


def main(args) -> int:
    methods = parse_list(args.methods, "--methods")
    labeled = parse_list(args.labeled, "--labeled")
    try:
        seeds = [int(s) for s in parse_list(args.seeds, "--seeds")]
    except ValueError:
        raise SemisegError(f"sweep: --seeds {args.seeds!r}: expected comma-separated integers") from None
    out = args.out or str(Path("runs") / f"sweep-{Path(args.config).stem}")
    records = run_sweep(args.config, methods, labeled, seeds, out, args.overrides, dry_run=args.dry_run,
                        echo=lambda s: print(s, flush=True))
    if not args.dry_run:
        print(format_table(records))
        print(f"wrote {Path(out) / 'sweep.png'}, sweep.json and sweep.csv")
    return 0

