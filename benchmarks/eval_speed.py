"""Where the time of one evaluation goes: loading, the forward pass (by batch size and memory
layout), the scoring, and the whole ``evaluate`` call as the trainer and ``semiseg eval`` run it.

    python benchmarks/eval_speed.py camvid_v1 --set data.root=../shared/data/camvid \
        --set data.resize=null --images 24

The network has random weights (the time does not depend on them). Every figure is the median
over ``--repeats`` passes of seconds per image, as wall time and as the CPU time of this process
(``time.process_time``: with one thread it is what the work costs, whatever else the machine
runs; with more threads it is their sum). Compare figures of one run with each other.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def median_time(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``, medians over ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def per_image(times: tuple[float, float], n: int) -> dict:
    return {"wall": times[0] / n, "cpu": times[1] / n}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> dict:
    from torch.utils.data import Subset

    from semiseg.config import load_config
    from semiseg.data.build import build_eval_set
    from semiseg.data.datasets import dataset_info
    from semiseg.engine.evaluator import evaluate, predict_logits
    from semiseg.engine.metrics import ConfusionMatrix
    from semiseg.engine.precision import set_threads
    from semiseg.models import build_model
    from semiseg.models.pretrained import resolve_normalization

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--images", type=int, default=16, help="validation images timed (the first N)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    cfg = resolve_normalization(load_config(args.config, args.overrides))
    threads = set_threads(cfg.train.threads)
    info = dataset_info(cfg.data)
    model = build_model(cfg.model.model_copy(update={"pretrained": False}), info.num_classes).eval()
    full = build_eval_set(cfg, cfg.data.val_split)
    dataset = Subset(full, range(min(args.images, len(full))))
    n = len(dataset)
    samples = [dataset[i] for i in range(n)]
    h, w = samples[0]["image"].shape[-2:]
    res: dict = {"config": args.config, "overrides": args.overrides, "cpu": cpu_name(), "threads": threads,
                 "images": n, "size": f"{w}x{h}", "encoder": cfg.model.encoder,
                 "decoder_channels": cfg.model.decoder_channels}

    res["load_s_per_image"] = per_image(median_time(lambda: [full[i] for i in range(n)], args.repeats), n)

    def forward(batch: int, channels_last: bool):
        net = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

        def run():
            with torch.inference_mode():
                for i in range(0, n, batch):
                    x = torch.stack([s["image"] for s in samples[i:i + batch]])
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    net(x)
        return run

    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for cl in (False, True):
            key = f"forward_b{batch}{'_channels_last' if cl else ''}_s_per_image"
            res[key] = per_image(median_time(forward(batch, cl), args.repeats), n)
    model.to(memory_format=torch.contiguous_format)

    with torch.inference_mode():
        logits = [predict_logits(model, s["image"][None], cfg.eval, info.num_classes) for s in samples[:2]]

    def score():
        cm = ConfusionMatrix(info.num_classes, info.ignore_index)
        for i in range(n):
            cm.update(logits[i % 2].argmax(1), samples[i]["mask"][None])
    res["argmax_and_confusion_s_per_image"] = per_image(median_time(score, args.repeats), n)

    # The whole evaluate() call, by layout of the network and eval.batch_size: one warm-up pass
    # each, then the variants in turn (A B C D A B C D ...), so that drift in the machine's load
    # moves all of them alike.
    variants = [(layout, batch) for layout in ("contiguous", "channels_last")
                for batch in [int(b) for b in args.batch_sizes.split(",")]]

    def run_variant(layout, batch):
        model.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
        eval_cfg = cfg.eval.model_copy(update={"batch_size": batch})
        return median_time(lambda: evaluate(model, dataset, eval_cfg, info.num_classes, progress=False,
                                            num_workers=0), 1)

    for v in variants:
        run_variant(*v)
    timed: dict = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            timed[v].append(run_variant(*v))
    for (layout, batch), times in timed.items():
        wall = statistics.median(t[0] for t in times)
        cpu = statistics.median(t[1] for t in times)
        res[f"evaluate_{layout}_b{batch}_s_per_image"] = per_image((wall, cpu), n)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:42s} {v['wall'] * 1000:9.1f} ms wall {v['cpu'] * 1000:9.1f} ms CPU"
                  if k.endswith("_per_image") else f"{k:42s} {v}")
    return res


if __name__ == "__main__":
    main()
