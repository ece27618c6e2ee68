"""A run's life from the command line: what ``--resume`` may change, where a failed start leaves
nothing, how a bad file or an error mid-run keeps the work done, how Ctrl-C during evaluation is
honoured, and ``train.threads``. In-process (``semiseg.cli.main``) where the test is about a
message, with the network timm's ``test_resnet`` (a few ms per step)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from semiseg.cli import main
from semiseg.config import load_config
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.trainer import Trainer
from semiseg.errors import DataError, SemisegWarning

from conftest import as_sets, tiny

# On the CPU: a resumed run equals an uninterrupted one bit for bit there (on CUDA only up to the
# kernels without a deterministic version, docs/runs-and-checkpoints.md).
TINY = tiny("data.synthetic.num_val=4", "train.iters=6", "train.eval_every=3", "method.name=fixmatch",
            "eval.batch_size=2", "train.device=cpu")
SETS = as_sets(TINY)


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def error_lines(err: str) -> list[str]:
    """The ``semiseg: error:`` lines as a terminal shows them (after a carriage return, if a bar
    cleared its line); each must start its own line, not be glued to a progress bar."""
    lines = [x.rsplit("\r", 1)[-1] for x in err.split("\n") if "semiseg: error:" in x]
    assert all(x.startswith("semiseg: error:") for x in lines), err
    return lines


def last_iter(run: Path) -> int:
    return load_checkpoint(run / "checkpoints" / "last.safetensors")[1]["iter"]


def weights(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run / "checkpoints" / f"{name}.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "state."))}


def rows(run: Path) -> list[dict]:
    found = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in found]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert rows(a) == rows(b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones must end equal to."""
    out = tmp_path_factory.mktemp("lifecycle") / "reference"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config("synthetic", TINY), out, progress=False).fit()
    finally:
        torch.set_num_threads(n)
    return out


# ----------------------------------------------------------------------------- --resume
def test_resume_continues_the_runs_own_config(tmp_path, cli):
    run = tmp_path / "run"
    Trainer(load_config("synthetic", TINY), run, progress=False).fit(stop_after=2)
    record = (run / "config.yaml").read_text()

    # another method: refused in one line naming the --set and both values; the record is kept
    rc, _, err = cli("train", "--out", run, "--resume", "--set", "method.name=supervised")
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1
    assert "--set method.name=supervised" in lines[0] and "'fixmatch'" in lines[0] and "train.iters" in lines[0]
    # a config file describing another run (4 iterations, the run has 6): refused too
    from semiseg.config import save_config

    other = tmp_path / "tiny.yaml"
    save_config(load_config("synthetic", TINY + ["train.iters=4"]), other)
    rc, _, err = cli("train", other, "--out", run, "--resume")
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1 and "train.iters" in lines[0] and str(other) in lines[0]
    assert (run / "config.yaml").read_text() == record and last_iter(run) == 2

    # no config argument: the run goes on with its own config, to its own end
    rc, _, err = cli("train", "--out", run, "--resume")
    assert rc == 0, err
    assert last_iter(run) == 6 and (run / "config.yaml").read_text() == record
    # train.iters may grow: said in one line, recorded in config.yaml
    rc, _, err = cli("train", "--out", run, "--resume", "--set", "train.iters=8")
    assert rc == 0, err
    assert "train.iters 6 -> 8" in err
    assert last_iter(run) == 8 and load_config(run / "config.yaml").train.iters == 8
    # ... but not shrink below where the run is
    rc, _, err = cli("train", "--out", run, "--resume", "--set", "train.iters=7")
    assert rc == 2 and "iteration 8" in error_lines(err)[0]
    assert load_config(run / "config.yaml").train.iters == 8
    # a finished run resumed as it is trains nothing and says so
    rc, out, err = cli("train", "--out", run, "--resume")
    assert rc == 0 and "complete" in err and last_iter(run) == 8


def test_resume_of_a_missing_or_foreign_directory_is_refused(tmp_path, cli):
    rc, _, err = cli("train", "synthetic", *SETS, "--out", tmp_path / "typo", "--resume")
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "typo" in lines[0] and "does not exist" in lines[0]
    assert not (tmp_path / "typo").exists()
    (tmp_path / "photos").mkdir()
    rc, _, err = cli("train", "--out", tmp_path / "photos", "--resume")
    assert rc == 1 and "not a run directory" in error_lines(err)[0]
    assert not list((tmp_path / "photos").iterdir())


@pytest.mark.parametrize("bad,code", [(["data.dataset=camvid", "data.root=/nonexistent/camvid"], 3),
                                      (["model.encoder=resnet_nosuch"], 2)])
def test_a_failed_start_leaves_no_run_folder(tmp_path, cli, monkeypatch, bad, code):
    monkeypatch.chdir(tmp_path)  # the default run folder is runs/<stamp>-<config>
    rc, _, err = cli("train", "synthetic", *SETS, *sum((["--set", b] for b in bad), []))
    assert rc == code and len(error_lines(err)) == 1
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- bad files, errors
def test_unreadable_files_are_skipped_named_and_counted_up_to_the_limit(tmp_path, make_folder_dataset):
    root = make_folder_dataset(n=10, unlabeled=6, size=(40, 32))
    broken = root / "unlabeled" / "u002.png"
    broken.write_bytes(broken.read_bytes()[:60])  # a truncated PNG
    folder = ["data.dataset=folder", f"data.root={root}", "data.num_classes=3", "data.labeled=null",
              "train.eval_every=0"]
    cfg = load_config("synthetic", TINY + folder + ["data.max_bad_files=1"])
    with pytest.warns(SemisegWarning) as record:
        result = Trainer(cfg, tmp_path / "skip", progress=False).fit()
    named = [str(w.message) for w in record if "u002.png" in str(w.message)]
    assert result.iteration == 6 and len(named) == 1  # every epoch meets it; it is named once
    assert "1 of at most data.max_bad_files=1" in named[0]

    second = root / "unlabeled" / "u004.png"
    second.write_bytes(b"")
    with pytest.raises(DataError, match="more than data.max_bad_files=1") as e, pytest.warns(SemisegWarning):
        Trainer(cfg, tmp_path / "limit", progress=False).fit()
    assert "\n" not in str(e.value)


def _break_files_at(iteration: int, files: list[Path]):
    """FixMatch's step, which truncates ``files`` at the given 0-based iteration (as a disk or a
    sync job might, mid-run)."""
    from semiseg.methods.fixmatch import FixMatch

    original = FixMatch.train_step

    def train_step(self, batch, ctx):
        if ctx.iteration == iteration:
            for f in files:
                f.write_bytes(f.read_bytes()[:60])
        return original(self, batch, ctx)

    return FixMatch, train_step


def test_an_error_mid_run_saves_first_and_the_resumed_run_equals_an_uninterrupted_one(
        reference, tmp_path, cli, monkeypatch):
    # the synthetic data of this config, copied so that its files can be broken
    from semiseg.data.datasets import resolve_root

    root = resolve_root(load_config("synthetic", TINY).data)  # generated in this session's cache
    assert Path(os.environ["SEMISEG_CACHE"]) in root.parents
    run = tmp_path / "broken"
    images = sorted((root / "images").iterdir())
    saved = {f: f.read_bytes() for f in images}
    cls, step = _break_files_at(3, images)  # after 3 good steps every image becomes unreadable
    monkeypatch.setattr(cls, "train_step", step)
    try:
        rc, _, err = cli("train", "synthetic", *SETS, "--set", "train.threads=1", "--out", run)
    finally:
        for f, data in saved.items():
            f.write_bytes(data)
    lines = error_lines(err)  # the bar is closed first: the error starts its own line
    assert rc == 3 and len(lines) == 1
    assert "cannot be read" in lines[0] and "checkpoint of iteration 4 is saved" in lines[0]
    assert f"semiseg train --out {run} --resume" in lines[0]
    assert last_iter(run) == 4
    monkeypatch.undo()
    rc, _, err = cli("train", "--out", run, "--resume")
    assert rc == 0, err
    assert_same_run(reference, run)


def test_ctrl_c_during_evaluation_stops_it_saves_and_the_resumed_run_redoes_it(reference, tmp_path, monkeypatch):
    from semiseg.data.build import EvalSet

    original = EvalSet.__getitem__
    calls = []

    def getitem(self, index):
        calls.append(index)
        if len(calls) == 1:  # the first image of the first evaluation: Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, index)

    monkeypatch.setattr(EvalSet, "__getitem__", getitem)
    run = tmp_path / "interrupted"
    result = Trainer(load_config("synthetic", TINY + ["train.threads=1"]), run, progress=False).fit()
    assert result.stopped_early and result.iteration == 3
    assert len(calls) == 2  # the evaluation of 4 images (2 per batch) stopped after its first batch
    _, meta = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert meta["iter"] == 3 and meta["pending_eval"]
    assert not [r for r in rows(run) if r["type"] == "eval"]  # nothing half-evaluated was logged
    monkeypatch.undo()
    resumed = Trainer(None, run, resume=True, progress=False).fit()
    assert resumed.iteration == 6 and not resumed.stopped_early
    assert_same_run(reference, run)
    assert [r["iter"] for r in rows(run) if r["type"] == "eval"] == [3, 6]


def test_evaluation_during_training_shows_its_progress(tmp_path, capsys):
    Trainer(load_config("synthetic", TINY + ["train.iters=2", "train.eval_every=2"]), tmp_path / "r").fit()
    err = capsys.readouterr().err
    assert "eval student 4/4" in err  # on the training bar, which would otherwise stand still


# ----------------------------------------------------------------------------- threads
def test_train_threads_sets_the_threads_of_the_run(tmp_path, cli):
    torch.set_num_threads(2)
    Trainer(load_config("synthetic", TINY + ["train.iters=1", "train.threads=1"]), tmp_path / "one", progress=False).fit()
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    Trainer(load_config("synthetic", TINY + ["train.iters=1"]), tmp_path / "auto", progress=False).fit()
    assert torch.get_num_threads() == 2  # auto: torch's own setting is kept
    # eval/predict/report: --threads, else the run's train.threads
    rc, _, err = cli("eval", tmp_path / "one", "--json")
    assert rc == 0 and torch.get_num_threads() == 1, err
    rc, _, err = cli("eval", tmp_path / "one", "--json", "--threads", "2")
    assert rc == 0 and torch.get_num_threads() == 2, err
    rc, _, err = cli("train", "synthetic", *SETS, "--set", "train.threads=0", "--out", tmp_path / "zero")
    assert rc == 2 and "train.threads" in error_lines(err)[0]
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "one"), "--threads", "none"])
