#!/usr/bin/env python
"""Training-step speed of several methods and settings on one config, as a Markdown table.

    python benchmarks/speed.py --config camvid --methods supervised,fixmatch,unimatch \\
        --variants "fp32;bf16=train.precision=bf16;bf16+cl=train.precision=bf16,train.channels_last=true"

Each cell is one ``semiseg bench`` measurement (``semiseg/bench.py``) in this process, one after
the other, so rows are comparable only within one invocation on one machine. ``--set`` applies
to every run. "peak MB" is the process's peak resident memory so far (it never
decreases within one invocation). The table goes to stdout with the machine, date and exact command above it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def parse_variants(text: str) -> list[tuple[str, list[str]]]:
    out = []
    for item in text.split(";"):
        name, _, sets = item.partition("=")
        out.append((name.strip(), [s for s in sets.split(",") if s]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="camvid")
    p.add_argument("--methods", default="supervised,fixmatch,unimatch")
    p.add_argument("--variants", default="fp32")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()

    from camvid_cpu import machine

    from semiseg.bench import run_bench
    from semiseg.config import load_config
    from semiseg.errors import ConfigError

    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"command: python benchmarks/speed.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}\n")
    print("| method | variant | s/step | images/s | GFLOP/step | GFLOP/s | MFU | peak MB | loader images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in args.methods.split(","):
        for name, sets in parse_variants(args.variants):
            try:
                cfg = load_config(args.config, [f"method.name={method}", *args.overrides, *sets])
            except ConfigError:  # a variant of keys this method does not have
                continue
            r = run_bench(cfg, steps=args.steps, warmup=args.warmup)
            print(f"| {method} | {name} | {r['sec_per_step']:.3f} | {r['images_per_sec']:.1f} | "
                  f"{r['flops_per_step'] / 1e9:.1f} | {r['achieved_tflops'] * 1e3:.0f} | {100 * r['mfu']:.0f}% | "
                  f"{r['peak_memory_mb']:.0f} | {r['loader_images_per_sec']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
