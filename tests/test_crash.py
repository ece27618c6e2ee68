"""Crash safety, end to end: the runs that are killed or stopped are ``python -m semiseg train`` in
real subprocesses; the uninterrupted reference and the final resumes run in this process, with one
thread like the subprocesses, and must agree with them bit for bit.

* SIGKILL at random moments (and deliberately in the middle of a checkpoint write), then
  ``--resume``, repeated: the final weights (student and EMA teacher), optimiser-free ``best``
  weights and ``metrics.jsonl`` equal those of an uninterrupted run (``train.deterministic``).
* A corrupt ``last.safetensors`` is skipped with a warning and the previous good one is used.
* SIGTERM finishes the step, saves, exits 0 and prints the ``resume with:`` command.
* A non-finite loss is skipped and counted (or stops the run with one clear line) and no
  checkpoint ever holds a NaN/inf tensor.

The network is timm's ``test_resnet`` with an 8-channel head (a few ms per step) and every
subprocess runs with one thread: on a busy 2-core machine, two OpenMP threads make each
convolution ~100x slower.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from semiseg.engine.checkpoint import load_checkpoint

from conftest import as_sets

ITERS = 24
BASE = [
    "data.dataset=synthetic", "data.synthetic.num_train=24", "data.synthetic.num_val=4",
    "data.synthetic.image_size=48", "data.crop_size=32", "data.labeled=8", "data.workers=0",
    "model.encoder=test_resnet", "model.decoder_channels=8", "train.batch_size=2",
    f"train.iters={ITERS}", "train.eval_every=6", "train.log_every=1", "train.lr=0.01",
    "train.checkpoint_every=1", "train.keep_last=2", "train.deterministic=true", "train.device=cpu",
    "method.name=fixmatch", "method.teacher=ema",
]
TIMING = {"sec_per_iter"}


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="default")


def _args(out: Path, resume: bool = False, extra=()) -> list[str]:
    """The ``semiseg`` arguments of the run: ``train synthetic --set ... --out OUT [--resume]``."""
    return ["train", "synthetic", *as_sets([*BASE, *extra]), "--out", str(out)] + (["--resume"] if resume else [])


def _argv(out: Path, resume: bool = False, extra=()) -> list[str]:
    return [sys.executable, "-m", "semiseg", *_args(out, resume, extra)]


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _tensors(path: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def _assert_same_run(a: Path, b: Path) -> None:
    for name in ("last", "best"):
        ta, tb = _tensors(a / "checkpoints" / f"{name}.safetensors"), _tensors(b / "checkpoints" / f"{name}.safetensors")
        assert ta.keys() == tb.keys(), name
        assert any(k.startswith("model.teacher.") or ".teacher." in k or "ema" in k for k in ta), \
            f"no EMA teacher tensors in {name}: the test would not cover the teacher"
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}.safetensors: {k} differs"
    # the full training state (optimiser momenta, RNG) of the final checkpoint as well
    sa, sb = _tensors(a / "checkpoints" / "last.safetensors", "state."), _tensors(b / "checkpoints" / "last.safetensors", "state.")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"last.safetensors: {k} differs"
    assert _rows(a) == _rows(b)


@pytest.fixture(scope="module")
def reference(train_run) -> Path:
    """The uninterrupted run, trained in this process with one thread: the subprocess runs below
    (one thread each) must end bit-identical to it."""
    return train_run(BASE, "reference")


def _has_checkpoint(run: Path) -> bool:
    d = run / "checkpoints"
    return d.is_dir() and any(p.name.endswith(".safetensors") for p in d.iterdir())


def _kill_when(proc: subprocess.Popen, run: Path, mode: str, rng: random.Random, deadline: float = 60) -> bool:
    """SIGKILL ``proc`` once training is under way: ``write`` = as soon as a checkpoint temp file
    exists (mid-write), ``random`` = a random delay after the first metrics row. Returns whether
    it was killed (False: it finished first)."""
    start = time.monotonic()
    metrics = run / "metrics.jsonl"
    delay_until = None
    while proc.poll() is None and time.monotonic() - start < deadline:
        if mode == "write":
            d = run / "checkpoints"
            if d.is_dir() and any(".tmp-" in p.name for p in os.scandir(d) for p in [Path(p.path)]):
                proc.kill()
                return True
            time.sleep(0.0005)
        else:
            if delay_until is None and metrics.exists() and metrics.stat().st_size:
                delay_until = time.monotonic() + rng.uniform(0.0, 1.2)
            if delay_until is not None and time.monotonic() >= delay_until:
                proc.kill()
                return True
            time.sleep(0.002)
    return False


def test_sigkill_and_resume_equals_uninterrupted(reference, tmp_path, one_thread, cli):
    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for mode in ("random", "write", "random", "write", "random"):
        resume = _has_checkpoint(run)
        if not resume and run.exists():  # killed before its first checkpoint: start again
            shutil.rmtree(run)
        proc = subprocess.Popen(_argv(run, resume), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
        killed = _kill_when(proc, run, mode, rng)
        _, err = proc.communicate(timeout=120)
        if killed:
            assert proc.returncode == -signal.SIGKILL
            kills += 1
        else:
            assert proc.returncode == 0, err.decode()
            break
    assert kills >= 3
    if not _has_checkpoint(run):
        shutil.rmtree(run)
    r = cli(*_args(run, _has_checkpoint(run)))  # the last resume in this process, one thread
    assert r.returncode == 0, r.stderr
    _assert_same_run(reference, run)


def test_corrupt_last_checkpoint_falls_back_with_warning(reference, tmp_path, one_thread, cli):
    run = tmp_path / "corrupt"
    shutil.copytree(reference, run)  # hard links become separate files
    ckpts = run / "checkpoints"
    last, newest = ckpts / "last.safetensors", ckpts / f"iter_{ITERS:07d}.safetensors"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit: checksum mismatch
    last.write_bytes(bytes(data))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])  # truncated
    r = cli(*_args(run, resume=True))  # in this process: the CLI shows warnings on stderr
    assert r.returncode == 0, r.stderr
    assert "last.safetensors" in r.stderr and "checksum" in r.stderr, r.stderr
    assert newest.name in r.stderr and "truncated" in r.stderr, r.stderr
    # it went back to iteration ITERS - 1, redid the last step and ends where the reference ends
    _assert_same_run(reference, run)


def test_sigterm_finishes_step_saves_and_prints_resume_command(reference, tmp_path, one_thread, cli):
    run = tmp_path / "term"
    # without per-step checkpoints, so the stop itself has to write one
    proc = subprocess.Popen(_argv(run, extra=["train.checkpoint_every=0"]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(), text=True)
    metrics = run / "metrics.jsonl"
    t0 = time.monotonic()
    while proc.poll() is None and not (metrics.exists() and metrics.stat().st_size) and time.monotonic() - t0 < 60:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    line = next((x for x in out.splitlines() if "resume with:" in x), None)
    assert line is not None, out
    assert f"--out {run} --resume" in line
    _, meta = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert 1 <= meta["iter"] < ITERS
    assert max(r["iter"] for r in _rows(run)) == meta["iter"]
    r = cli(*_args(run, True, ["train.checkpoint_every=0"]))  # the resume in this process
    assert r.returncode == 0, r.stderr
    last_ref, last_run = (_tensors(d / "checkpoints" / "last.safetensors") for d in (reference, run))
    for k in last_ref:
        assert torch.equal(last_ref[k], last_run[k]), k
    assert _rows(reference) == _rows(run)


# --------------------------------------------------------------------------- non-finite losses
def _all_finite(run: Path) -> None:
    files = sorted((run / "checkpoints").glob("*.safetensors"))
    assert files
    for f in files:
        for k, v in load_checkpoint(f)[0].items():
            if v.is_floating_point():
                assert torch.isfinite(v).all(), f"{f.name}: {k} holds NaN/inf"


def test_absurd_lr_stops_with_one_line_and_finite_checkpoints(tmp_path, cli, one_thread):
    run = tmp_path / "boom"  # a message and an exit code: in-process
    r = cli("train", "synthetic", *as_sets([*BASE, "train.lr=1e30", "train.max_nonfinite=2", "train.iters=12"]),
            "--out", run)
    assert r.returncode == 5, (r.returncode, r.stderr)
    # stderr also carries the progress bar; the error is one line, without a traceback
    lines = [x for x in r.stderr.splitlines() if "semiseg: error:" in x]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "non-finite" in lines[0] or "NaN" in lines[0]
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("*.safetensors")):
        _all_finite(run)


def _nan_on(iterations: set[int]):
    """Patch FixMatch so that its loss is NaN at the given 0-based iterations."""
    from semiseg.methods.fixmatch import FixMatch

    original = FixMatch.train_step

    def train_step(self, batch, ctx):
        result = original(self, batch, ctx)
        if ctx.iteration in iterations:
            result.loss = result.loss * float("nan")
        return result

    return FixMatch, train_step


def _tiny_cfg(*extra):
    from semiseg.config import load_config

    return load_config(None, BASE + ["train.iters=8", "train.eval_every=4", "train.checkpoint_every=2",
                                     "train.deterministic=false", *extra])


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_nonfinite_loss_is_skipped_and_counted(tmp_path, monkeypatch, one_thread):
    from semiseg.engine.trainer import Trainer

    cls, step = _nan_on({1, 4, 5})
    monkeypatch.setattr(cls, "train_step", step)
    result = Trainer(_tiny_cfg("train.nonfinite=skip", "train.max_nonfinite=3"), tmp_path / "skip",
                     progress=False).fit()
    assert result.iteration == 8 and not result.stopped_early
    rows = [r for r in _rows(tmp_path / "skip") if r["type"] == "train"]
    assert [r["nonfinite_skips"] for r in rows] == [0, 1, 1, 1, 2, 3, 3, 3]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # logged means skip the NaN steps
    _all_finite(tmp_path / "skip")
    _, meta = load_checkpoint(tmp_path / "skip" / "checkpoints" / "last.safetensors")
    assert meta["nonfinite_skips"] == 3


def test_nonfinite_loss_stop_and_consecutive_limit(tmp_path, monkeypatch, one_thread):
    from semiseg.engine.trainer import Trainer, TrainingError

    cls, step = _nan_on({2})
    monkeypatch.setattr(cls, "train_step", step)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at iteration 3") as e:
        Trainer(_tiny_cfg("train.nonfinite=stop"), tmp_path / "stop", progress=False).fit()
    assert "\n" not in str(e.value)
    _all_finite(tmp_path / "stop")  # the checkpoint of iteration 2 is there and finite
    cls, step = _nan_on({3, 4})
    monkeypatch.setattr(cls, "train_step", step)
    with pytest.raises(TrainingError, match="2 in a row"):
        Trainer(_tiny_cfg("train.nonfinite=skip", "train.max_nonfinite=2"), tmp_path / "limit",
                progress=False).fit()
