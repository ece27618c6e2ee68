"""Run logging: ``metrics.jsonl`` (one JSON object per event) and TensorBoard.

Only the main process writes. Each ``metrics.jsonl`` row has ``iter`` (1-based count of
completed steps) and ``type`` (``train`` or ``eval``); train rows carry the mean of each logged
scalar over the last ``train.log_every`` steps and ``lr``; eval rows carry ``mIoU`` (0-100),
``per_class_iou``, ``pixel_acc`` and ``model`` (which network was scored).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch

from semiseg.errors import DataError, warn


def to_float(v) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


class RunningMeans:
    """Mean of each scalar since the last :meth:`pop`."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, logs: dict) -> None:
        for k, v in logs.items():
            v = to_float(v)
            if math.isfinite(v):
                self.sums[k] += v
                self.counts[k] += 1

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        self.sums.clear()
        self.counts.clear()
        return out


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard missing or broken: metrics.jsonl still has everything
                self.writer = None

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop rows logged after the checkpoint, so the file matches an
        uninterrupted run."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("iter", 0) <= iteration:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.writer is not None:
            step = row["iter"]
            prefix = "eval" if row.get("type") == "eval" else "train"
            model = row.get("model")
            for k, v in row.items():
                if k in ("iter", "type", "model") or not isinstance(v, (int, float)):
                    continue
                tag = f"{prefix}/{k}" if not model or model == "student" else f"{prefix}_{model}/{k}"
                self.writer.add_scalar(tag, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class TrainLog:
    """The training loop's console and ``train`` rows: a progress bar (rank 0, when asked), lines
    printed clear of it, and every ``log_every`` steps (and at the last) the mean of each logged
    scalar over the window -- averaged over ranks by ``reduce`` -- with ``lr``, the count of
    skipped non-finite steps and the seconds per step."""

    def __init__(self, log_every: int, enabled: bool = True,
                 reduce: Callable[[dict], dict] = lambda row: row):
        self.log_every = log_every
        self.enabled = enabled  # rank 0 prints; the others only take part in ``reduce``
        self.reduce = reduce
        self.means = RunningMeans()
        self.bar = None
        self.logger: Optional[MetricsLogger] = None
        self.total = 0
        self._window = time.perf_counter()

    def start(self, logger: MetricsLogger, total: int, initial: int, desc: str, bar: bool) -> None:
        """Rows go to ``logger`` from now; the step timer starts; ``bar``: show a progress bar."""
        self.logger, self.total = logger, total
        if bar and self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)
        self._window = time.perf_counter()

    def say(self, message: str) -> None:
        """One line on stderr (rank 0), clear of the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def show(self, message: str) -> None:
        """A line above the progress bar (evaluation results); nothing without a bar."""
        if self.bar is not None:
            self.bar.write(message)

    def add(self, logs: dict) -> None:
        """The scalars of one finite step."""
        self.means.add(logs)

    def stepped(self, it: int, lr: float, skips: int) -> None:
        """Iteration ``it`` (1-based count) is done: move the bar; write the row when due."""
        if self.bar is not None:
            self.bar.update(1)
        if it % self.log_every and it != self.total:
            return
        row = self.reduce(self.means.pop())
        now = time.perf_counter()
        row = {"iter": it, "type": "train", "lr": lr, **row, "nonfinite_skips": skips,
               "sec_per_iter": (now - self._window) / max(1, (it - 1) % self.log_every + 1)}
        self._window = now
        self.logger.log(row)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k.startswith("loss") or k == "mask_ratio"})

    def eval_progress(self) -> Optional[Callable[[str], Callable[[int, int], None]]]:
        """Per-network progress of an evaluation on the bar's line (which would otherwise sit
        still at the evaluation point); None without a bar."""
        if self.bar is None:
            return None
        return lambda name: (lambda done, total: self.bar.set_postfix_str(f"eval {name} {done}/{total}"))

    def close(self) -> None:
        """Close the bar first (so that an error line does not land on it), then the logger."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.logger is not None:
            self.logger.close()


class SkippedFiles:
    """Unusable data files met during a run (the datasets skip them and put another sample in
    their place): one warning per file, and a DataError once more than ``limit`` were met."""

    def __init__(self, limit: int):
        self.limit = limit
        self.seen: dict[str, None] = {}  # their messages, in order

    def note(self, messages) -> None:
        for text in messages:
            for message in str(text).split("\n"):
                if not message or message in self.seen:
                    continue
                self.seen[message] = None
                n = len(self.seen)
                if n > self.limit:
                    raise DataError(f"{n} data files could not be used, more than data.max_bad_files={self.limit}; "
                                    f"the last: {message} ('semiseg check-data' lists every bad file)")
                warn(f"skipped ({n} of at most data.max_bad_files={self.limit}): {message}")
