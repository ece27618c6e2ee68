#!/usr/bin/env python
"""Render the CamVid-CPU v2 results (``benchmarks/results/camvid_v2.jsonl``, one line per run of
``benchmarks/camvid_v2.py``) into the matrix at the top of BENCHMARKS.md and the run log
``benchmarks/results/camvid_v2_runs.md``.

    python benchmarks/render_v2.py            # rewrite both from the results file
    python benchmarks/render_v2.py --check    # exit 1 if either is out of date

Only protocol runs and named recipes enter the matrix: a run with extra ``--set`` overrides is a
variant (in the variants table and the log) unless its overrides are exactly one of ``RECIPES``
(where a ``*`` matches any text: the run a recipe starts from or the folder of its pseudo labels),
whose rows sit below the protocol's, each compared with the supervised run that shares the
changes supervised training also feels. A cell shows the mean over seeds and each seed; the
first run of a (method, split, seed) counts, reruns are listed in the log.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "camvid_v2.jsonl"
LOG = REPO / "benchmarks" / "results" / "camvid_v2_runs.md"
DOC = REPO / "BENCHMARKS.md"
BEGIN, END = "<!-- camvid-v2 matrix: rendered by benchmarks/render_v2.py -->", "<!-- end camvid-v2 matrix -->"

CLASSES = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian", "bicyclist"]
ROWS = [  # (method key in the results, label)
    ("supervised", "Supervised (labelled images only)"),
    ("fixmatch", "FixMatch"),
    ("unimatch", "UniMatch"),
    ("unimatch_v2", "UniMatch V2 (EMA teacher, complementary dropout)"),
    ("meanteacher", "Mean Teacher"),
    ("contrastive_memory", "Memory-bank contrastive (Alonso et al.)"),
    ("pct", "PCT stage one, tags on the unlabelled images"),
    ("pct:stage2", "PCT stage two (masks + stage-one pseudo labels)"),
    ("allspark", "AllSpark (neck on the deepest feature)"),
    ("allspark_unimatch", "AllSpark + UniMatch (the neck in UniMatch's recipe)"),
]
SPLITS = [("1_16", "1/16: 23 labels"), ("1_8", "1/8: 46 labels")]
# named recipes: (row key, method, the overrides that make it, label, the row or rows its gain is
# measured against). The CamVid recipe is what the lever probes of BENCHMARKS.md point to: ASPP rates scaled
# to the 8x8 training maps, OHEM sized to the 8x128x128 batch, no confidence threshold (as in
# UniMatch's Cityscapes recipe) and a blur range scaled to the crop. Its supervised control takes
# the two changes that supervised training has too (the ASPP rates and OHEM).
STREET = ["model.aspp_rates=[2,4,6]", "train.loss=ohem", "train.ohem_min_kept=20480"]
FIXMATCH_STREET = STREET + ["method.conf_thresh=0", "data.strong_blur_sigma=[0.1,0.8]"]
RECIPES = [
    ("recipe:supervised-street", "supervised", STREET,
     "Supervised + the recipe's ASPP rates 2/4/6 and OHEM", "supervised"),
    ("recipe:fixmatch-street", "fixmatch", FIXMATCH_STREET,
     "FixMatch, CamVid recipe: ASPP 2/4/6, OHEM, threshold 0, blur sigma 0.1-0.8", "recipe:supervised-street"),
    # the same with the control's labelled gradient (FixMatch halves the loss sum) and a quarter of L_s
    ("recipe:fixmatch-street-lx-ls4", "fixmatch", FIXMATCH_STREET + ["method.weight_x=2", "method.weight_s=0.5"],
     "FixMatch, CamVid recipe, L_x + L_s / 4 (`method.weight_x=2 method.weight_s=0.5`)", "recipe:supervised-street"),
    # the control trained as long as the self-training pipeline below (its teacher's 800 + its student's 800)
    ("recipe:supervised-street-1600", "supervised", STREET + ["train.iters=1600"],
     "Supervised + the recipe, 1600 iterations (`train.iters=1600`)", "recipe:supervised-street"),
    # offline self-training: a fresh student of the control's keys on the true masks plus CBST labels of the
    # unlabelled images (`semiseg pseudo-label CONTROL_RUN --no-tags --keep-per-class 0.5`, written to a
    # folder named cbst50-*; a `*` matches any text). Measured against the control (its teacher) and
    # against the control trained for the pipeline's whole 1600 iterations.
    ("recipe:cbst-street", "supervised", STREET + ["data.extra_labels=*/cbst50-*", "data.extra_labels_balance=true"],
     "Self-training: a student on CBST pseudo labels (P = 0.5) of the control (teacher 800 + student 800 iterations)",
     ("recipe:supervised-street", "recipe:supervised-street-1600")),
    # the same student started from its teacher's weights (`train.init_from` the control's run, whose labels
    # it learns): 1600 iterations in all, as the control continued from the same weights without the
    # pseudo labels and as the control trained 1600 iterations from ImageNet
    ("recipe:supervised-street-warm", "supervised", STREET + ["train.init_from=*"],
     "Supervised + the recipe, continued 800 iterations from the control (`train.init_from`)", "recipe:supervised-street"),
    ("recipe:cbst-street-warm", "supervised",
     STREET + ["data.extra_labels=*/cbst50-*", "data.extra_labels_balance=true", "train.init_from=*"],
     "Self-training from the teacher: the CBST student started from the control's weights (`train.init_from`)",
     ("recipe:supervised-street-warm", "recipe:supervised-street-1600")),
]
# a gap is shown only between rows of one budget, against that budget's ceiling; at 1600 iterations
# the ceiling is this control's run on all 367 masks
LONG_CEILING = "recipe:supervised-street-1600"


def budget(key: str) -> int:
    """A row's iterations in all: its ``train.iters`` (800 by the protocol), plus the 800 of the
    control run it learns from when it starts from that run's weights or learns its pseudo labels."""
    changes = next((c for k, _, c, _, _ in RECIPES if k == key), [])
    iters = next((int(c.split("=", 1)[1]) for c in changes if c.startswith("train.iters=")), 800)
    return iters + (800 if any(c.startswith(("train.init_from=", "data.extra_labels=")) for c in changes) else 0)


# what a recipe's ``*`` stands for in the commands of ``--missing``: its value there and the command that makes it
# first, if any (from the control's run in camvid_v2.py's default run folder)
MAKE = {"data.extra_labels=*/cbst50-*": (
    "data.extra_labels=runs/bench-v2/cbst50-{split}-s{seed}",
    "semiseg pseudo-label runs/bench-v2/supervised-{split}-s{seed}-variant --no-tags --keep-per-class 0.5 --out "
    "runs/bench-v2/cbst50-{split}-s{seed} --set eval.flip=true --set \"eval.scales=[0.5,0.75,1.0,1.5,2.0]\""),
    "train.init_from=*": ("train.init_from=runs/bench-v2/supervised-{split}-s{seed}-variant", "")}


def matches(change: str, override: str) -> bool:
    """Whether ``override`` is the recipe's ``change``, where a ``*`` in the change matches any text
    (and nothing else is a pattern: ``[2,4,6]`` is literal)."""
    return re.fullmatch(".*".join(map(re.escape, change.split("*"))), override) is not None


def bases_of(against: str | tuple[str, ...]) -> tuple[str, ...]:
    return (against,) if isinstance(against, str) else tuple(against)


def load(path: Path = RESULTS) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def protocol_runs(rows: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """(method, split) -> seed -> the first protocol run (no variant overrides)."""
    cells: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        if r.get("variant"):
            continue
        cells.setdefault((r["method"], r["split"]), {}).setdefault(r["seed"], r)
    return cells


def recipe_of(run: dict) -> str | None:
    """The key of the recipe a run is (its method and exactly its overrides, in any order, a ``*``
    of the recipe matching any text)."""
    variant = run.get("variant") or []
    for key, method, changes, _, _ in RECIPES:
        if not variant or run["method"] != method or len(variant) != len(changes):
            continue
        left = list(variant)
        for change in changes:
            hit = next((v for v in left if matches(change, v)), None)
            if hit is None:
                break
            left.remove(hit)
        else:
            return key
    return None


def matrix_runs(rows: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """The protocol cells and the recipe cells (keyed by the recipe's row key)."""
    cells = protocol_runs(rows)
    for r in rows:
        key = recipe_of(r)
        if key:
            cells.setdefault((key, r["split"]), {}).setdefault(r["seed"], r)
    return cells


def gain(mine: dict[int, dict], base: dict[int, dict], ceiling: dict[int, dict]) -> str:
    """The mean gain of ``mine`` over ``base`` on the seeds both have, with the share of the gap
    from ``base`` to the ceiling (mean of its seeds) that it recovers when it gains (a loss over
    a gap of one point would read as -500%: the gain says it)."""
    shared = sorted(set(mine) & set(base))
    if not shared:
        return "–"
    g = sum(mine[x]["mIoU"] - base[x]["mIoU"] for x in shared) / len(shared)
    text = f"{g:+.2f} ({len(shared)} seed{'s' if len(shared) > 1 else ''})"
    room = mean(ceiling) - sum(base[x]["mIoU"] for x in shared) / len(shared) if ceiling else None
    return text + (f", gap {100 * g / room:.0f}%" if g > 0 and room and room > 0 else "")


def cell(runs: dict[int, dict] | None) -> str:
    if not runs:
        return "not run yet"
    seeds = sorted(runs)
    values = [runs[s]["mIoU"] for s in seeds]
    each = " / ".join(f"{v:.2f}" for v in values)
    if len(values) == 1:
        return f"{values[0]:.2f} (seed {seeds[0]} only)"
    return f"**{sum(values) / len(values):.2f}** ({each})"


def mean(runs: dict[int, dict] | None) -> float | None:
    return sum(r["mIoU"] for r in runs.values()) / len(runs) if runs else None


# changes that act only on what supervised training does not have (pseudo labels, strong views)
SSL_ONLY_CHANGES = ("method.", "data.strong_")


def variant_baseline(run: dict, rows: list[dict], cells) -> tuple[dict | None, list[str]]:
    """(the supervised run a variant is compared with, the changes they share). A change that
    supervised training also feels (``train.iters=2400``) needs a supervised run with the same
    change; changes to the pseudo labels or the strong views alone compare with the protocol's
    supervised run, and so does a supervised variant (what the change gives supervised training)."""
    shared = [v for v in run["variant"] if not v.startswith(SSL_ONLY_CHANGES)]
    if not shared or run["method"] == "supervised":
        return (cells.get(("supervised", run["split"])) or {}).get(run["seed"]), []
    base = next((r for r in rows if r["method"] == "supervised" and r["split"] == run["split"]
                 and r["seed"] == run["seed"] and r.get("variant") == shared), None)
    return base, shared


def matrix(rows: list[dict]) -> str:
    cells = matrix_runs(rows)
    recipes = [(key, label) for key, _, _, label, _ in RECIPES if any((key, s) in cells for s, _ in SPLITS)]
    against = {key: base for key, _, _, _, base in RECIPES}
    labels = dict(ROWS + [(key, label) for key, _, _, label, _ in RECIPES])
    out = ["| method | " + " | ".join(label for _, label in SPLITS) + " |",
           "| --- | " + " | ".join("---" for _ in SPLITS) + " |"]
    for key, label in ROWS:
        out.append(f"| {label} | " + " | ".join(cell(cells.get((key, s))) for s, _ in SPLITS) + " |")
    ceiling_runs = cells.get(("supervised", "all")) or {}
    ceiling = cell(ceiling_runs)
    out.append(f"| *Ceiling: supervised on all 367 masks* | {ceiling} | {ceiling} |")
    for key, label in recipes:
        out.append(f"| *Recipe:* {label} | " + " | ".join(cell(cells.get((key, s))) for s, _ in SPLITS) + " |")
    for key, _, _, label, _ in RECIPES:  # a control's own ceiling: the same changes on all 367 masks
        if (key, "all") in cells:
            own = cell(cells[(key, "all")])
            out.append(f"| *Recipe ceiling:* {label}, all 367 masks | {own} | {own} |")
    out.append("")
    out.append("Gain over supervised with the same labels (mean of the seeds both rows have) and the gap "
               "recovered where it gains, (method - supervised) / (ceiling - supervised); a recipe is measured "
               "against the row named beside it, and against that row's own ceiling where it has one; a gap is shown "
               "only between rows of one budget (the rows of 1600 iterations in all against the 1600-iteration "
               "ceiling):")
    out.append("")
    out.append("| method | " + " | ".join(label for _, label in SPLITS) + " |")
    out.append("| --- | " + " | ".join("---" for _ in SPLITS) + " |")

    def top_of(key: str, base: str) -> dict[int, dict]:
        """The ceiling of a gain of ``key`` over ``base``: none (no gap) when the two train for
        different budgets; else ``base``'s own run on all 367 masks, else the ceiling of their
        budget (the protocol's at 800 iterations)."""
        if budget(key) != budget(base):
            return {}
        if base != "supervised" and (base, "all") in cells:
            return cells[(base, "all")]
        return ceiling_runs if budget(base) == 800 else cells.get((LONG_CEILING, "all")) or {}

    for key, label in ROWS[1:] + recipes:
        for base in bases_of(against.get(key, "supervised")):  # one line per row it is measured against
            named = f" (against {labels[base].split(' (')[0]})" if key in against else ""
            out.append(f"| {label}{named} | " + " | ".join(
                gain(cells.get((key, s)) or {}, cells.get((base, s)) or {}, top_of(key, base)) for s, _ in SPLITS) + " |")
    variants = [r for r in rows if r.get("variant") and not recipe_of(r)]
    if variants:
        out.append("")
        out.append("Variants (one change to the protocol each; not in the matrix), against supervised with the same "
                   "split and seed, and with the same change where it applies to supervised training too:")
        out.append("")
        out.append("| method | change | split | seed | mIoU | against supervised |")
        out.append("| --- | --- | --- | --- | --- | --- |")
        for r in variants:
            base, shared = variant_baseline(r, rows, cells)
            against = f"{r['mIoU'] - base['mIoU']:+.2f} ({base['mIoU']:.2f}" if base else "–"
            if base:
                against += f", with {', '.join(f'`{v}`' for v in shared)})" if shared else ")"
            change = ", ".join(f"`{v}`" for v in r["variant"])
            out.append(f"| {r['method']} | {change} | {r['split']} | {r['seed']} | {r['mIoU']:.2f} | {against} |")
    out.append("")
    out.append("Seconds per step per CPU kind (mean over the runs above; in brackets the wall time per run and "
               "the number of runs; one PyTorch thread pinned per core, another run beside it, unless a cell says "
               "more threads):")
    out.append("")
    timings: list[tuple[str, dict[str, list[dict]]]] = []
    for key, label in ROWS + recipes + [("supervised_all", "")]:
        runs = [r for (m, s), seeds in cells.items() for r in seeds.values()
                if m == key and s != "all"] if key != "supervised_all" else \
            list((cells.get(("supervised", "all")) or {}).values())
        by_cpu: dict[str, list[dict]] = {}
        for r in runs:  # a mean over two CPU kinds would describe neither
            by_cpu.setdefault(cpu_kind(r["machine"]), []).append(r)
        if by_cpu:
            timings.append((label or "Supervised, all 367 masks", by_cpu))
    kinds = sorted({cpu for _, by_cpu in timings for cpu in by_cpu})
    out.append("| method | " + " | ".join(kinds) + " |")
    out.append("| --- |" + " --- |" * len(kinds))
    for label, by_cpu in timings:
        cells_of = []
        for cpu in kinds:
            group = by_cpu.get(cpu)
            if not group:
                cells_of.append("–")
                continue
            sps = sum(r["sec_per_step"] for r in group) / len(group)
            wall = sum(r["wall_min"] for r in group) / len(group)
            threads = sorted({r["machine"]["threads"] for r in group})
            more = "" if threads == [1] else f", {'/'.join(map(str, threads))} threads"
            cells_of.append(f"{sps:.2f} ({wall:.1f} min, {len(group)}{more})")
        out.append(f"| {label} | " + " | ".join(cells_of) + " |")
    return "\n".join(out)


def cpu_kind(m: dict) -> str:
    """A row's CPU as the tables name it: "AMD EPYC family 26 model 2 (AVX-512 BF16)"; rows made
    before family and model were recorded give the name and ISA only."""
    generation = f" family {m['cpu_family']} model {m['cpu_model']}" if m.get("cpu_family") else ""
    return f"{m['cpu']}{generation} ({m['isa']})"


def log(rows: list[dict]) -> str:
    out = ["# CamVid-CPU v2: every run", "",
           "Rendered by `benchmarks/render_v2.py` from `camvid_v2.jsonl` (one line per run of "
           "`benchmarks/camvid_v2.py`). mIoU is the final evaluation (iteration 800) of the network "
           "the method reports; `best` is the best evaluation on the way (every 200 iterations). "
           "Per-class IoU in the order " + ", ".join(CLASSES) + ".", "",
           "| date | method | split | seed | mIoU | best | other networks | s/step | wall | threads (cores) | CPU | per-class IoU | command |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        others = ", ".join(f"{k} {v:.2f}" for k, v in r.get("networks", {}).items() if k != r.get("network")) or "–"
        m = r["machine"]
        affinity = m.get("affinity")
        pinned = f"{m['threads']} ({','.join(map(str, affinity))})" if affinity else str(m["threads"])
        per_class = " ".join(f"{x:.1f}" for x in r["per_class_iou"])
        out.append(f"| {r['date']} | {r['method']} | {r['split']} | {r['seed']} | {r['mIoU']:.2f} | {r['best_mIoU']:.2f} | "
                   f"{others} | {r['sec_per_step']:.2f} | {r['wall_min']:.1f} min | {pinned} | {cpu_kind(m)}, "
                   f"torch {m['torch']} | {per_class} | `{r['command']}` |")
    return "\n".join(out) + "\n"


def render(doc: str, rows: list[dict]) -> str:
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC}: markers {BEGIN!r} and {END!r} not found")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{matrix(rows)}\n{END}{tail}"


def missing(rows: list[dict], seeds=(0, 1)) -> list[str]:
    """The ``camvid_v2.py`` command of every run the matrix still lacks (each method and split
    with seeds 0 and 1, the ceiling included, and the other seed of a recipe on a split it has a
    run on), each with the wall time its method took so far."""
    cells = matrix_runs(rows)
    walls: dict[str, list[float]] = {}
    whole: dict[str, list[float]] = {}  # a two-stage method's stage-two rows count the whole run
    for r in rows:
        if not r.get("variant"):
            method, _, stage = r["method"].partition(":")
            (whole if stage else walls).setdefault(method, []).append(r["wall_min"])
    walls.update(whole)
    todo = []
    wanted = [(key, split) for key, _ in ROWS if key != "pct:stage2" for split, _ in SPLITS] + [("supervised", "all")]
    for key, split in wanted:
        for seed in seeds:
            if seed in cells.get((key, split), {}):
                continue
            took = walls.get(key)
            cost = f"  # about {sum(took) / len(took):.0f} min per run so far" if took else "  # not timed yet"
            todo.append(f"python benchmarks/camvid_v2.py --method {key} --split {split} --seed {seed}{cost}")
    for key, method, changes, _, _ in RECIPES:
        for split, _ in SPLITS:
            done = cells.get((key, split))
            if not done:
                continue
            took = [r["wall_min"] for r in done.values()]
            for seed in seeds:
                if seed in done:
                    continue
                first = [MAKE[c][1].format(split=split, seed=seed) for c in changes if c in MAKE and MAKE[c][1]]
                sets = " ".join(f"--set {MAKE[c][0].format(split=split, seed=seed) if c in MAKE else c}" for c in changes)
                todo += [f"{cmd}  # first" for cmd in first]
                todo.append(f"python benchmarks/camvid_v2.py --method {method} --split {split} {sets} --seed {seed}"
                            f"  # about {sum(took) / len(took):.0f} min per run so far")
    return todo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--missing", action="store_true", help="print the commands of the runs the matrix still lacks")
    args = p.parse_args(argv)
    rows = load()
    if args.missing:
        print("\n".join(missing(rows)) or "every cell has seeds 0 and 1")
        return 0
    new_doc, new_log = render(DOC.read_text(), rows), log(rows)
    if args.check:
        stale = [str(f) for f, new in ((DOC, new_doc), (LOG, new_log)) if not f.is_file() or f.read_text() != new]
        if stale:
            print("out of date: " + ", ".join(stale) + " (run python benchmarks/render_v2.py)")
            return 1
        return 0
    DOC.write_text(new_doc)
    LOG.write_text(new_log)
    print(f"rendered {len(rows)} runs into {DOC.name} and {LOG.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
