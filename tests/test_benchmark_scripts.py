"""Scripts under ``benchmarks/`` that compute figures (not timings) are tested like the package."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from conftest import write_folder_dataset  # noqa: E402
from pseudo_label_quality import measure  # noqa: E402


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, train_run):
    root = write_folder_dataset(tmp_path_factory.mktemp("plq") / "data", n=10, lists=True, void=True)
    run = train_run(["data.dataset=folder", f"data.root={root}", "data.num_classes=3", "data.crop_size=16",
                     "model.encoder=test_resnet", "model.decoder_channels=8", "train.batch_size=2", "train.iters=2",
                     "train.precision=fp32"], "plq")
    return run


def test_threshold_zero_keeps_every_scored_pixel_and_matches_the_evaluator(folder_run):
    out = measure(str(folder_run), "val.txt", [0.0, 0.5, 0.9, 1.01])
    rows = out["rows"]
    assert out["images"] == 2
    assert rows[0]["kept"] == 1.0
    kept = [r["kept"] for r in rows]
    assert kept == sorted(kept, reverse=True) and kept[-1] == 0.0  # confidence never exceeds 1
    assert rows[-1]["accuracy_of_kept"] == 0.0 and rows[-1]["mIoU_of_kept"] == 0.0
    final = [json.loads(x) for x in (folder_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["type"] == "eval"
    assert rows[0]["accuracy_of_kept"] * 100 == pytest.approx(final["pixel_acc"], abs=1e-6)
    assert rows[0]["mIoU_of_kept"] == pytest.approx(final["mIoU"], abs=1e-6)
    shares = rows[0]["per_class_kept_share_of_gt"]
    assert shares == [1.0] * 3  # with nothing filtered, every ground-truth pixel is kept
