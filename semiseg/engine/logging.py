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
from collections import defaultdict
from pathlib import Path

import torch


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
