"""``semiseg report RUN_DIR``: a self-contained HTML page (embedded PNGs, also written beside it)
with curves, the per-class IoU table, the confusion matrix and validation predictions; it
renders in headless Chromium (skipped where chromium is not installed)."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny

TINY = tiny("data.synthetic.num_val=3", "train.iters=4", "method.name=fixmatch", "method.teacher=ema")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(train_run):
    return train_run(TINY, "report")


@pytest.fixture(scope="module")
def report(run):
    import torch

    from semiseg.cli import main

    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["report", str(run)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err.getvalue()
    assert out.getvalue().strip() == f"wrote {run / 'report.html'}"
    return run / "report.html"


def _images(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_is_self_contained_with_all_sections(run, report):
    page = report.read_text()
    # nothing fetched from elsewhere: every src is inline data, no scripts, no links
    assert not re.search(r'src="(?!data:)', page) and "<script" not in page and "href=" not in page
    images = _images(page)
    assert len(images) == 3  # curves, confusion matrix, validation samples
    for name, im in zip(("curves", "confusion", "samples"), images):
        assert im.format == "PNG" and im.width > 300
        beside = run / f"report_{name}.png"
        assert beside.exists() and Image.open(beside).size == im.size
    for text in ("Training curves", "Per-class IoU", "Confusion matrix", "Validation images", "mIoU"):
        assert text in page
    from semiseg.data.datasets import dataset_info
    from semiseg.config import load_config

    names = dataset_info(load_config(None, TINY).data).class_names
    table = page.split("Per-class IoU")[1].split("</table>")[0]
    assert all(n in table for n in names)
    assert table.count("<tr>") == len(names) + 1
    # the samples figure: 3 rows of image | ground truth | prediction
    samples = np.asarray(images[2].convert("RGB"))
    assert samples.std() > 10


def test_report_without_checkpoint_still_has_curves(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "metrics.jsonl", bare / "metrics.jsonl")
    from semiseg.report import write_report

    page = write_report(bare).read_text()
    assert "Training curves" in page and "no fresh evaluation" in page
    assert len(_images(page)) == 1


def test_report_of_a_missing_directory_is_one_line(tmp_path, cli):
    r = cli("report", tmp_path / "nope")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="headless chromium not installed")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "render_report.sh"), str(report.parent), str(shot),
                        "1100x2600"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert im.shape[:2] == (2600, 1100)
    # the page drew figures: many distinct colours, not a blank or error page
    colours = len(np.unique(im.reshape(-1, 3)[::7], axis=0))
    assert colours > 200, colours
    keep = os.environ.get("SEMISEG_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
