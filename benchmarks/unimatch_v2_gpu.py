#!/usr/bin/env python
"""Issue 21's GPU row: the UniMatch V2 step on a DINOv2 ViT-S/14 + DPT model against the UniMatch
V1 step on DeepLabV3+ ResNet-101, both at crop 518 with 4 labelled + 4 unlabelled images.

    python benchmarks/unimatch_v2_gpu.py --out benchmarks/results/unimatch_v2_gpu.json

Each cell is one ``semiseg bench --json`` run (:mod:`semiseg.bench`: the trainer's own step,
timed after warm-up) in a process of its own, so one cell's memory never counts in another's
peak. The models start from random weights (``model.pretrained=false``): the step's time and
memory do not depend on the weights, and none can be fetched here. The data are the built-in
synthetic images generated at ``--image-size`` pixels (Pascal VOC's images are about 500 x 375);
the crop pads them to ``--crop`` as Pascal's are padded. The recipes are the project's Pascal
configs (``pascal_unimatch_v2``: AdamW, head at 40x; ``pascal``: SGD, head at 10x) with the data,
crop and batch replaced. The cells:

* ``v2-vit``: UniMatch V2 (EMA teacher, two strong views with complementary channel dropout),
  ViT-S/14 + DPT, as the official UniMatch V2 trains it;
* ``v1-r101``: UniMatch V1 (feature-perturbation stream + two strong views), ResNet-101 +
  DeepLabV3+ at output stride 16, as the official UniMatch trains it;
* ``v2-r101``: UniMatch V2's recipe on the ResNet-101 model, which separates the model's cost from
  the recipe's;

each in fp32 and in bf16 autocast (``train.precision``). A Markdown table goes to stdout, the
raw ``semiseg bench`` records to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CELLS = {
    "v2-vit": ("pascal_unimatch_v2", ["model.encoder=vit_small_patch14_dinov2", "model.head=dpt"]),
    "v1-r101": ("pascal", ["model.encoder=resnet101", "model.head=deeplabv3plus", "model.output_stride=16"]),
    "v2-r101": ("pascal_unimatch_v2", ["model.encoder=resnet101", "model.head=deeplabv3plus",
                                       "model.output_stride=16"]),
}


def cell_overrides(args, extra: list[str], precision: str) -> list[str]:
    return [
        "data.dataset=synthetic", "data.root=null", "data.unlabeled=null", f"data.labeled={args.labeled}",
        f"data.synthetic.image_size={args.image_size}", f"data.synthetic.num_train={args.num_train}",
        "data.synthetic.num_val=2", f"data.crop_size={args.crop}", f"data.workers={args.workers}",
        "model.pretrained=false", f"train.batch_size={args.batch}", f"train.precision={precision}",
        *extra, *args.overrides,
    ]


def run_cell(args, config: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "semiseg", "bench", config, "--json",
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--fixed-batch"] if args.fixed_batch else [])
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1], "command": shlex.join(cmd)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, of {', '.join(CELLS)}")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--crop", type=int, default=518)
    p.add_argument("--batch", type=int, default=4, help="labelled images per step (as many unlabelled)")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--num-train", type=int, default=48)
    p.add_argument("--labeled", type=int, default=16)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fixed-batch", action="store_true",
                   help="time the step's computation alone (semiseg bench --fixed-batch), without the loader")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every cell")
    p.add_argument("--out", help="write the raw records here (JSON)")
    args = p.parse_args()
    for name in args.cells.split(","):
        if name not in CELLS:
            p.error(f"--cells: unknown cell {name!r}; expected some of {', '.join(CELLS)}")

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    header = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {device}, torch {torch.__version__}\n"
              f"command: python benchmarks/unimatch_v2_gpu.py {shlex.join(sys.argv[1:])}")
    print(header + "\n")
    print("| cell | method | model | precision | s/step | images/s | peak MB | GFLOP/step | MFU | loader images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    records = []
    for name in args.cells.split(","):
        config, extra = CELLS[name]
        for precision in args.precisions.split(","):
            r = run_cell(args, config, cell_overrides(args, extra, precision))
            r["cell"] = name
            records.append(r)
            if "error" in r:
                print(f"| {name} | | | {precision} | failed: {r['error']} | | | | | |", flush=True)
                continue
            print(f"| {name} | {r['method']} | {r['encoder']}+{r['head']} | {r['precision']} | "
                  f"{r['sec_per_step']:.3f} | {r['images_per_sec']:.1f} | {r['peak_memory_mb']:.0f} | "
                  f"{r['flops_per_step'] / 1e9:.0f} | {100 * r['mfu']:.0f}% | {r['loader_images_per_sec']:.0f} |",
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"header": header, "records": records}, indent=1) + "\n")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
