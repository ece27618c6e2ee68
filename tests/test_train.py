"""End-to-end: training, resume, init_from, eval/predict CLIs and the Python API on tiny
synthetic data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import semiseg
from semiseg.api import load_model
from semiseg.config import load_config
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.trainer import Trainer
from semiseg.errors import CheckpointError

from conftest import as_sets, tiny

TINY = tiny("train.iters=6", "train.eval_every=3", "train.log_every=2", "train.lr=0.01")


def tiny_cfg(*extra):
    return load_config(None, TINY + list(extra))


def weights(run_dir, name="last"):
    tensors, meta = load_checkpoint(Path(run_dir) / "checkpoints" / f"{name}.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith("model.")}, meta


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sup"
    result = semiseg.train(tiny_cfg(), out=out, progress=False)
    return result


def test_run_directory_contents(run):
    d = run.run_dir
    assert (d / "config.yaml").exists()
    assert load_config(d / "config.yaml").train.iters == 6
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    eval_rows = [r for r in rows if r["type"] == "eval"]
    assert [r["iter"] for r in train_rows] == [2, 4, 6]
    assert all("loss" in r and "lr" in r and "loss_x" in r for r in train_rows)
    assert [r["iter"] for r in eval_rows] == [3, 6]
    assert all(0 <= r["mIoU"] <= 100 for r in eval_rows)
    assert 0 <= run.metrics["mIoU"] <= 100
    assert (d / "checkpoints" / "last.safetensors").exists()
    assert (d / "checkpoints" / "best.safetensors").exists()
    assert list((d / "tensorboard").iterdir())


def test_resume_equals_uninterrupted(tmp_path):
    cpu = "train.device=cpu"  # bit-exact resumption is the CPU's (docs/runs-and-checkpoints.md)
    full = Trainer(tiny_cfg(cpu), tmp_path / "full", progress=False).fit()
    Trainer(tiny_cfg(cpu), tmp_path / "cut", progress=False).fit(stop_after=2)
    _, meta = weights(tmp_path / "cut")
    assert meta["iter"] == 2
    resumed = Trainer(tiny_cfg(cpu), tmp_path / "cut", resume=True, progress=False).fit()
    a, _ = weights(full.run_dir)
    b, _ = weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda rs: [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in rs]  # noqa: E731
    assert strip(rows(tmp_path / "full")) == strip(rows(tmp_path / "cut"))


def test_init_from_copies_weights_with_fresh_optimizer(run, tmp_path):
    trainer = Trainer(tiny_cfg(f"train.init_from={run.run_dir}", "train.iters=1"), tmp_path / "ft", progress=False)
    trainer.build()
    best, _ = weights(run.run_dir, "best")
    own = trainer.method.state_dict()
    for k, v in best.items():
        assert torch.equal(own[k[len("model."):]].cpu(), v)
    assert not trainer.optimizer.state  # fresh momentum buffers


def test_init_from_mismatched_encoder(run, tmp_path):
    cfg = tiny_cfg(f"train.init_from={run.run_dir}", "model.encoder=resnet34")
    with pytest.raises(CheckpointError, match="init_from"):
        Trainer(cfg, tmp_path / "x", progress=False).fit()


def test_load_model_predict(run):
    model = load_model(run.run_dir)
    image = Image.fromarray((np.random.rand(40, 56, 3) * 255).astype("uint8"))
    pred = model.predict(image)
    assert pred.shape == (40, 56)
    assert pred.max() < model.num_classes


def test_eval_cli_json_and_table(run, cli):
    r = cli("eval", run.run_dir, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert 0 <= out["mIoU"] <= 100
    assert len(out["per_class_iou"]) == load_model(run.run_dir).num_classes
    r = cli("eval", run.run_dir)
    assert r.returncode == 0 and "mIoU" in r.stdout


def test_predict_cli_writes_masks_and_overlays(run, tmp_path, cli):
    src = tmp_path / "in" / "sub"
    src.mkdir(parents=True)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(src / "a.png")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "in" / "b.jpg")
    r = cli("predict", run.run_dir, tmp_path / "in", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    for name in ("sub/a", "b"):  # paths relative to the input folder are kept
        mask = Image.open(tmp_path / "out" / f"{name}.png")
        assert mask.size == (40, 30) and mask.mode == "L"
        assert Image.open(tmp_path / "out" / f"{name}_overlay.png").mode == "RGB"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--set", "data.dataset=camvid", "--set", "data.root=/nonexistent/camvid"], "/nonexistent/camvid"),
        (["--set", "model.encoder=resnet_nosuch"], "model.encoder"),
        (["--set", "data.labeled=nosuch_split.txt"], "nosuch_split.txt"),
    ],
)
def test_bad_input_one_line_nonzero(tmp_path, args, needle, cli):
    r = cli("train", "synthetic", *as_sets(TINY), *args, "--out", tmp_path / "r")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]


def test_existing_run_is_never_overwritten(run, cli):
    before = (run.run_dir / "checkpoints" / "last.safetensors").read_bytes()
    r = cli("train", "synthetic", *as_sets(TINY), "--out", run.run_dir)
    assert r.returncode != 0
    assert "--resume" in r.stderr.strip().splitlines()[-1] and str(run.run_dir) in r.stderr
    assert (run.run_dir / "checkpoints" / "last.safetensors").read_bytes() == before


def test_resume_before_first_checkpoint_starts_fresh(tmp_path):
    from semiseg.config import save_config
    from semiseg.errors import SemisegWarning

    run_dir = tmp_path / "killed_early"  # what a run killed before its first checkpoint leaves
    run_dir.mkdir()
    save_config(tiny_cfg("train.iters=2", "train.eval_every=2"), run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text('{"iter": 2, "type": "train", "loss": 1.0}\n')
    with pytest.warns(SemisegWarning, match="no checkpoint"):
        result = Trainer(None, run_dir, resume=True, progress=False).fit()
    assert result.iteration == 2
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["type"] == "train"] == [2]  # the stale row was dropped


def test_oracle_pseudo_labels_train_end_to_end_and_refuse_scenarios_without_them(tmp_path):
    """``method.oracle_pseudo_labels`` (a diagnostic): the trainer hands the unlabelled crops'
    true masks to the method, so every pixel of the weak view counts as confident."""
    from semiseg.config import DataConfig
    from semiseg.data.build import build_train_sets
    from semiseg.errors import ConfigError

    result = semiseg.train(tiny_cfg("method.name=fixmatch", "method.oracle_pseudo_labels=true", "train.iters=2",
                                    "train.eval_every=2", "train.log_every=1"), out=tmp_path / "oracle", progress=False)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert len(train_rows) == 2 and all(r["mask_ratio"] == 1.0 and r["loss_s"] > 0 for r in train_rows)
    for dataset in ("levir_cd",):  # change detection; ACDC carries its slices' labels
        with pytest.raises(ConfigError, match=f"'method.oracle_pseudo_labels': not available for data.dataset "
                                              f"'{dataset}'"):
            build_train_sets(DataConfig(dataset=dataset, root=str(tmp_path)), num_strong=1, with_unlabeled=True,
                             unlabeled_masks=True)
