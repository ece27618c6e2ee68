"""torchrun: a 2-process gloo run on synthetic data finishes, ranks stay identical, and its first
logged loss matches a 1-process run with the same global batch (trained in this process: a world
of one is the plain, non-distributed trainer)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HELPER = Path(__file__).parent / "helpers" / "dist_train.py"
BASE = [
    "data.dataset=synthetic", "data.synthetic.num_train=24", "data.synthetic.num_val=2",
    "data.synthetic.image_size=48", "data.crop_size=32", "data.labeled=8", "data.workers=0",
    "model.decoder_channels=16", "train.iters=3", "train.eval_every=3", "train.log_every=1",
    "train.lr=0.01", "method.name=fixmatch", "method.conf_thresh=0.5",
]


def first_losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["type"] == "train")
    return {k: v for k, v in first.items() if k.startswith("loss")}


def launch(tmp_path, nproc, batch):
    out = tmp_path / f"n{nproc}"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(HELPER), str(out), *BASE, f"train.batch_size={batch}", "train.device=cpu"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_two_process_gloo_matches_one_process(tmp_path, train_run):
    two = launch(tmp_path, 2, batch=2)
    one = train_run([*BASE, "train.batch_size=4", "train.device=cpu"], "one-process")
    w0, w1 = load_file(str(two / "rank0.safetensors")), load_file(str(two / "rank1.safetensors"))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks differ at {k}"
    # Only rank 0 writes the run directory.
    assert (two / "run" / "checkpoints" / "last.safetensors").exists()
    a, b = first_losses(two / "run"), first_losses(one)
    assert a.keys() == b.keys()
    for k in a:  # per-rank BatchNorm statistics and per-rank loss normalisation differ slightly
        assert abs(a[k] - b[k]) <= 0.05 * abs(b[k]) + 1e-3, (k, a[k], b[k])
