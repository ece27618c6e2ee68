"""CLI verbs that the end-to-end tests do not cover: split and check-data; and the ``semiseg``
command that ``pip install`` writes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def folder_sets(root):
    return ["--set", "data.dataset=folder", "--set", f"data.root={root}", "--set", "data.num_classes=3"]


def test_split_writes_seeded_partition_usable_as_data_labeled(make_folder_dataset, tmp_path, cli):
    root = make_folder_dataset(n=12, lists=True)
    out = tmp_path / "split"
    r = cli("split", "synthetic", *folder_sets(root), "--labeled", "4", "--seed", "3", "--balanced", "--out", out)
    assert r.returncode == 0, r.stderr
    labeled = (out / "labeled.txt").read_text().splitlines()
    unlabeled = (out / "unlabeled.txt").read_text().splitlines()
    assert len(labeled) == 4 and len(unlabeled) == 6  # train.txt lists 10 images
    assert not set(labeled) & set(unlabeled)
    # Every class appears in the labelled part (masks hold class i % 3 on their left half).
    classes = set()
    for line in labeled:
        classes |= set(np.unique(np.array(Image.open(root / line.split()[1]))).tolist())
    assert classes == {0, 1, 2}
    # Same seed, same partition; the files are valid data.labeled / data.unlabeled split files.
    r2 = cli("split", "synthetic", *folder_sets(root), "--labeled", "4", "--seed", "3", "--balanced",
             "--out", tmp_path / "again")
    assert r2.returncode == 0 and (tmp_path / "again" / "labeled.txt").read_text() == "\n".join(labeled) + "\n"
    from semiseg.config import load_config
    from semiseg.data.datasets import list_samples
    from semiseg.data.splits import resolve_labeled

    cfg = load_config(None, ["data.dataset=folder", f"data.root={root}", "data.num_classes=3",
                             f"data.labeled={out / 'labeled.txt'}", f"data.unlabeled={out / 'unlabeled.txt'}"])
    lab, unlab = resolve_labeled(cfg.data, list_samples(cfg.data, "train"))
    assert len(lab) == 4 and len(unlab) == 6


def test_check_data_reports_every_bad_file(make_folder_dataset, cli):
    root = make_folder_dataset(n=12, lists=True)
    (root / "images" / "img001.png").write_bytes(b"")  # zero-byte image
    Image.fromarray(np.full((16, 24), 9, np.uint8)).save(root / "masks" / "img002.png")  # class 9 of 3
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "img003.png")  # size mismatch
    r = cli("check-data", "synthetic", *folder_sets(root), "--set", "data.labeled=4")
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    # what was found (3 lines), one line per bad file, then the hint for the stray mask value
    assert [x.split(":")[0] for x in lines[1:3]] == ["train", "val"]
    problems = lines[3:6]
    assert "img001.png" in problems[0]
    assert "img002.png" in problems[1] and "9" in problems[1]
    assert "img003.png" in problems[2]
    assert lines[6].startswith("hint:") and len(lines) == 7
    assert "3 problem(s) found" in r.stderr


def test_check_data_clean_dataset(make_folder_dataset, cli):
    r = cli("check-data", "synthetic", *folder_sets(make_folder_dataset(n=6, lists=True)), "--set", "data.labeled=2")
    assert r.returncode == 0 and "no problems" in r.stdout


def test_the_installed_command_runs_the_cli_and_exits_with_its_status(tmp_path):
    """The console script of ``[project.scripts]`` (the other tests call ``semiseg.cli.main`` or
    ``python -m semiseg``): 0 for ``--version``, 2 and one line for a config error."""
    exe = shutil.which("semiseg", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("no semiseg command beside this Python (pip install -e . writes it)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().startswith("semiseg "), r.stderr
    r = subprocess.run([exe, "train", "synthetic", "--set", "train.iter=3", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean train.iters?" in lines[0], r.stderr
    assert not (tmp_path / "r").exists()
