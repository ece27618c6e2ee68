"""The pieces the training loop calls, each on its own: stop requests, the score that picks the
best checkpoint, the skipped-file allowance, the ``train`` rows, and the training state's
save/restore round trip."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from semiseg.engine.checkpoint import LoopState, TrainingCheckpoints
from semiseg.engine.logging import MetricsLogger, SkippedFiles, TrainLog
from semiseg.engine.signals import StopRequest
from semiseg.engine.validation import Validation, eval_row, summary
from semiseg.errors import DataError, SemisegWarning, TrainingError


def test_stop_request_keeps_the_first_reason_and_a_second_sigint_quits():
    stop = StopRequest(announce=False)
    assert not stop.requested
    old = signal.getsignal(signal.SIGTERM)
    with stop.listening():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        stop.request()  # the caller's request does not overwrite the signal
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is old  # handlers put back


def test_stop_request_by_the_caller():
    stop = StopRequest(announce=False)
    stop.request()
    assert stop.requested and stop.signum == -1


def _validation(model: str = "auto") -> Validation:
    cfg = SimpleNamespace(eval=SimpleNamespace(model=model))
    info = SimpleNamespace(num_classes=2, ignore_index=255)
    return Validation(cfg, None, info, torch.device("cpu"), None, note_skipped=lambda m: None)


def test_validation_score_follows_the_scenario_and_the_chosen_network():
    plain = {"student": {"mIoU": 40.0}, "teacher": {"mIoU": 45.0}}
    assert _validation().score(plain) == 40.0  # auto: the first network
    assert _validation("teacher").score(plain) == 45.0
    assert _validation().score({"student": {"mIoU": 40.0, "mDice": 61.5}}) == 61.5  # volumes: mean Dice
    assert _validation().score({"student": {"mIoU": 40.0, "changed_iou": 12.0}}) == 12.0  # change detection
    assert _validation().score({"student": {"mIoU": 40.0, "changed_iou": float("nan")}}) == float("-inf")


def test_eval_row_and_summary_carry_the_scenario_scores():
    res = {"mIoU": 50.0, "pixel_acc": 90.0, "per_class_iou": [40.0, 60.0], "changed_iou": 30.0, "unchanged_iou": 70.0,
           "f1": 46.0, "precision": 50.0, "recall": 42.0, "overall_acc": 90.0}
    row = eval_row(7, "student", res)
    assert row == {"iter": 7, "type": "eval", "model": "student", **{k: res[k] for k in res}}
    assert summary(7, {"student": res}) == "iter 7: student mIoU 50.00 changed IoU 30.00 F1 46.00"


def test_skipped_files_warn_once_each_then_stop_past_the_limit():
    skipped = SkippedFiles(limit=2)
    with pytest.warns(SemisegWarning, match=r"skipped \(1 of at most data.max_bad_files=2\): a.png: bad"):
        skipped.note(["a.png: bad"])
    skipped.note(["a.png: bad"])  # the same file again: no second warning, not counted twice
    with pytest.warns(SemisegWarning, match=r"\(2 of at most"):
        skipped.note(["b.png: bad\n"])
    with pytest.raises(DataError, match=r"^3 data files could not be used, more than data.max_bad_files=2; "
                                        r"the last: c.png: bad"):
        skipped.note(["c.png: bad"])


def test_train_log_writes_the_window_mean_every_log_every_steps_and_at_the_end(tmp_path):
    log = TrainLog(log_every=2, reduce=lambda row: {k: 10 * v for k, v in row.items()})
    log.start(MetricsLogger(tmp_path, tensorboard=False), total=5, initial=0, desc="x", bar=False)
    for it, loss in zip(range(1, 6), (1.0, 3.0, 5.0, 7.0, 9.0)):
        log.add({"loss": torch.tensor(loss)})
        log.stepped(it, lr=0.1 * it, skips=0)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["loss"], r["lr"]) for r in rows] == [(2, 20.0, 0.2), (4, 60.0, 0.4), (5, 90.0, 0.5)]
    assert all(r["type"] == "train" and r["sec_per_iter"] >= 0 for r in rows)


def _state(seed: int):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return net, opt


def test_training_checkpoints_round_trip_weights_optimiser_rng_and_loop_state(tmp_path):
    net, opt = _state(0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    saved = TrainingCheckpoints(tmp_path, 2, net, opt, scaler, {"config": {"a": 1}, "method": "m"})
    saved.save(LoopState(iteration=3, best=41.5, skips=1, pending_eval=True), is_best=True)
    after = torch.rand(3)  # the generator as it was when the checkpoint was written

    net2, opt2 = _state(1)
    back = TrainingCheckpoints(tmp_path, 2, net2, opt2, scaler, {})
    torch.manual_seed(99)
    assert back.restore() == LoopState(iteration=3, best=41.5, skips=1, pending_eval=True)
    assert back.saved_at == 3
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(torch.rand(3), after)
    assert (tmp_path / "checkpoints" / "best.safetensors").exists()
    assert TrainingCheckpoints(tmp_path / "none", 2, net2, opt2, scaler, {}).restore() is None


def test_training_checkpoints_refuse_nan_weights_and_keep_the_previous_checkpoint(tmp_path):
    net, opt = _state(0)
    ckpt = TrainingCheckpoints(tmp_path, 2, net, opt, torch.amp.GradScaler("cuda", enabled=False), {})
    ckpt.save(LoopState(iteration=1))
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"refusing to checkpoint: parameter 0.weight holds NaN/inf at iteration 2"):
        ckpt.save(LoopState(iteration=2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_0000001.safetensors",
                                                                           "last.safetensors"]
