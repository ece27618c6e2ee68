"""``semiseg sweep``: the grid's commands (--dry-run), the runs, and sweep.json/csv/png."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys

from PIL import Image

TINY = [
    "data.dataset=synthetic", "data.synthetic.num_train=16", "data.synthetic.num_val=2",
    "data.synthetic.image_size=40", "data.crop_size=32", "data.workers=0",
    "model.encoder=test_resnet", "model.decoder_channels=8", "train.batch_size=2", "train.iters=2",
    "train.eval_every=2", "train.log_every=1",
]
SETS = sum((["--set", s] for s in TINY), [])


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "semiseg", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_dry_run_prints_one_train_command_per_cell(tmp_path):
    r = _cli("sweep", "synthetic", "--labeled", "4,8,1/2", "--methods", "supervised,unimatch", "--seeds", "0,1",
             "--dry-run", "--out", tmp_path / "sw", *SETS)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 * 3 * 2
    assert not (tmp_path / "sw").exists()  # nothing ran
    outs = set()
    from semiseg.config import load_config

    for line in lines:
        argv = shlex.split(line)
        assert argv[:3] == ["semiseg", "train", "synthetic"]
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        cfg = load_config("synthetic", sets)  # each command is a valid train command
        assert cfg.train.iters == 2
        outs.add(argv[argv.index("--out") + 1])
    assert len(outs) == 12  # one run directory each
    assert any("labeled_1_2" in o for o in outs)


def test_sweep_runs_grid_and_plots(tmp_path):
    out = tmp_path / "sw"
    r = _cli("sweep", "synthetic", "--labeled", "4,8", "--methods", "supervised,fixmatch", "--out", out, *SETS)
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "sweep.json").read_text())
    runs = data["runs"]
    assert {(x["method"], x["labeled"], x["num_labeled"]) for x in runs} == {
        ("supervised", "4", 4), ("supervised", "8", 8), ("fixmatch", "4", 4), ("fixmatch", "8", 8)}
    assert all(0 <= x["mIoU"] <= 100 and x["iters"] == 2 for x in runs)
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 4 and set(rows[0]) >= {"method", "labeled", "seed", "mIoU"}
    im = Image.open(out / "sweep.png")
    assert im.width > 300 and im.height > 200
    assert "fixmatch" in r.stdout and "sweep.png" in r.stdout
    # a second invocation reuses the finished runs
    r2 = _cli("sweep", "synthetic", "--labeled", "4,8", "--methods", "supervised,fixmatch", "--out", out, *SETS)
    assert r2.returncode == 0 and r2.stdout.count("already done") == 4
    assert json.loads((out / "sweep.json").read_text())["runs"] == runs


def test_sweep_bad_method_is_one_line(tmp_path):
    r = _cli("sweep", "synthetic", "--labeled", "4", "--methods", "supervised,nosuch", "--dry-run", *SETS)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nosuch" in lines[0]
