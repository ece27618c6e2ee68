"""``semiseg sweep``: the grid's commands (--dry-run), the runs, and sweep.json/csv/png."""

from __future__ import annotations

import csv
import json
import shlex

from PIL import Image

from conftest import TINY as _TINY, as_sets

TINY = [o for o in _TINY if not o.startswith("data.labeled=")]  # the sweep sets data.labeled
SETS = as_sets(TINY)


def test_dry_run_prints_one_train_command_per_cell(tmp_path, cli):
    r = cli("sweep", "synthetic", "--labeled", "4,8,1/2", "--methods", "supervised,unimatch", "--seeds", "0,1",
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


def test_sweep_runs_grid_and_plots(tmp_path, cli):
    out = tmp_path / "sw"
    r = cli("sweep", "synthetic", "--labeled", "4,8", "--methods", "supervised,fixmatch", "--out", out, *SETS)
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
    r2 = cli("sweep", "synthetic", "--labeled", "4,8", "--methods", "supervised,fixmatch", "--out", out, *SETS)
    assert r2.returncode == 0 and r2.stdout.count("already done") == 4
    assert json.loads((out / "sweep.json").read_text())["runs"] == runs


def test_sweep_bad_method_is_one_line(tmp_path, cli):
    r = cli("sweep", "synthetic", "--labeled", "4", "--methods", "supervised,nosuch", "--dry-run", *SETS)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nosuch" in lines[0]
