"""The one training loop every method runs in.

One iteration is :meth:`Trainer.step`: set the poly learning rate, draw the batches the method
asked for (labelled, unlabelled, CutMix partner), ``method.train_step`` under the configured
precision, skip a non-finite loss, backward, average gradients across ranks, clip, optimiser
step, average BatchNorm statistics across ranks, ``method.after_step`` (EMA teachers,
memories). :meth:`Trainer.fit` runs it ``train.iters`` times and logs, evaluates and
checkpoints on schedule; ``semiseg bench`` times the very same :meth:`Trainer.step`.
Methods never see the loop.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from semiseg.config import Config, load_config, save_config
from semiseg.engine import distributed as D
from semiseg.engine.checkpoint import (CheckpointManager, LoopState, TrainingCheckpoints, capture_rng_state,
                                       load_init_weights)
from semiseg.engine.logging import MetricsLogger, SkippedFiles, TrainLog, read_metrics, to_float
from semiseg.engine.optim import build_optimizer, poly_lr, set_lr
from semiseg.engine.precision import autocast_factory, resolve_precision, set_deterministic, set_threads, to_device
from semiseg.engine.sampling import Stream
from semiseg.engine.signals import StopRequest
from semiseg.engine.validation import Validation, summary
from semiseg.errors import ConfigError, SemisegError, TrainingError, warn


@dataclass
class StepOutcome:
    """What one :meth:`Trainer.step` did: the (detached) loss and the method's logs; ``finite``
    False when the loss was not finite and the step was skipped (no update, buffers restored)."""
    lr: float
    loss: torch.Tensor
    logs: dict
    finite: bool


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict = field(default_factory=dict)  # last evaluation of the default network
    iteration: int = 0
    stopped_early: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def new_run_dir(base: str | Path = "runs", name: str = "run") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"{stamp}-{name}"
    i = 1
    while path.exists():
        path = Path(base) / f"{stamp}-{name}-{i}"
        i += 1
    return path


# Keys a resumed run may change: budget, schedule of evaluations/checkpoints/logs, and how the
# work is spread over the machine. Everything else would make the run a different experiment.
RESUMABLE_KEYS = ("train.iters", "train.eval_every", "train.checkpoint_every", "train.log_every",
                  "train.keep_last", "train.threads", "train.device", "data.workers", "eval.batch_size")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    """``(key, value in a, value in b)`` for every dotted key where the two configs differ, once
    ``data.mean``/``data.std`` are resolved from the encoder's weights where unset (a run's
    config.yaml holds them resolved)."""
    from semiseg.models.pretrained import resolve_normalization

    fa, fb = (_flatten(resolve_normalization(c).to_dict()) for c in (a, b))
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def run_config(run_dir: str | Path) -> tuple[Config, Path]:
    """The saved config of an existing run (``config.yaml``, else its newest checkpoint's) and
    the file it came from; one-line errors for a missing or foreign directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SemisegError(f"--resume: run directory {run_dir} does not exist: expected the --out folder of an "
                           "earlier 'semiseg train' (nothing was written)")
    path = run_dir / "config.yaml"
    if path.is_file():
        return load_config(path), path
    found = CheckpointManager(run_dir).load_latest()
    if found is not None and "config" in found[2]:
        return load_config(found[2]["config"]), found[0]
    raise SemisegError(f"--resume: {run_dir} is not a run directory (no config.yaml, no checkpoint): expected the "
                       "--out folder of an earlier 'semiseg train'")


def resume_config(run_dir: str | Path, requested: Optional[Config] = None, overrides=None
                  ) -> tuple[Config, list[tuple[str, Any, Any]]]:
    """The config a resumed run continues with: the run's own saved config, with ``overrides``
    (``--set`` strings) applied -- or ``requested``, which must equal it -- where only
    :data:`RESUMABLE_KEYS` may differ. Returns the config and its changes ``(key, old, new)``;
    any other difference is a ConfigError naming the key, both values and the ``--set``."""
    from semiseg.config import override_items

    from semiseg.models.pretrained import resolve_normalization

    saved, path = run_config(run_dir)
    items = override_items(overrides)
    set_keys = {".".join(parts): text for parts, _v, text in items}
    own = _flatten(saved.to_dict())

    def refuse(key: str, what: str, new) -> ConfigError:
        change = f"from {own.get(key)!r} to {new!r}" if key in own else f"(the run has no {key})"
        return ConfigError(f"--resume continues the run's own config ({path}): {what} would change {key} {change}; "
                           f"on resume only {', '.join(RESUMABLE_KEYS)} may change")

    if requested is None:
        try:
            requested = load_config(saved.to_dict(), overrides)
        except ConfigError:  # e.g. another method.name, with which the run's method keys are invalid
            for parts, value, text in items:
                key = ".".join(parts)
                if key not in RESUMABLE_KEYS and own.get(key) != value:
                    raise refuse(key, f"--set {text}", value) from None
            raise
    requested = resolve_normalization(requested)  # as the run's config.yaml holds them
    changes = config_differences(saved, requested)
    changes.sort(key=lambda c: c[0] not in set_keys)  # report what a --set changed first
    for key, _old, new in changes:
        if key not in RESUMABLE_KEYS:
            raise refuse(key, f"--set {set_keys[key]}" if key in set_keys else "the given config", new)
    return requested, changes


class Trainer:
    """The loop of parts: :meth:`build` makes the method, data streams and optimiser;
    :meth:`step` is one iteration; :meth:`fit` runs the steps and calls the pieces around them
    -- :class:`TrainLog` (console and ``train`` rows), :class:`Validation` (the scheduled
    evaluation and the score that picks the best checkpoint), :class:`TrainingCheckpoints`
    (save and restore of the whole state) and :class:`StopRequest` (SIGINT/SIGTERM)."""

    def __init__(self, cfg: Optional[Config], run_dir: str | Path | None = None, resume: bool = False,
                 progress: bool = True, config_name: str = "run"):
        """``resume``: continue the run in ``run_dir`` with its own saved config; ``cfg`` may then
        be None, else it must equal that config but for :data:`RESUMABLE_KEYS`."""
        from semiseg.models.pretrained import resolve_normalization

        self.resume_changes: list[tuple[str, Any, Any]] = []
        if resume:
            if run_dir is None:
                raise SemisegError("--resume needs --out RUN_DIR (the run to continue)")
            cfg, self.resume_changes = resume_config(run_dir, requested=cfg)
        elif cfg is None:
            raise ConfigError("no config given: expected a config to train (or resume=True with a run directory)")
        self.cfg = cfg = resolve_normalization(cfg)  # data.mean/std follow the encoder's weights
        self.resume = resume
        self.progress = progress
        self.dist = D.init_distributed(cfg.train.device)
        self.device = D.resolve_device(cfg.train.device, self.dist)
        self.precision = resolve_precision(cfg.train.precision, self.device)  # "auto" made concrete
        self.run_dir = Path(run_dir) if run_dir else new_run_dir(name=config_name)
        self.stop = StopRequest(announce=self.dist.is_main)
        self.skipped = SkippedFiles(cfg.data.max_bad_files)
        self.log = TrainLog(cfg.train.log_every, enabled=self.dist.is_main, reduce=D.all_reduce_means)

    # ------------------------------------------------------------------ set-up
    def build(self):
        """Read and check config, data and model; build the method, the data streams, the
        optimiser, the precision set-up, the validation and the checkpoints. Writes nothing."""
        from semiseg.data.build import build_eval_set, build_train_sets
        from semiseg.data.datasets import dataset_info
        from semiseg.methods import build_method
        from semiseg.models import build_model, check_input_size

        cfg, tc = self.cfg, self.cfg.train
        if tc.deterministic:
            set_deterministic(self.device)
        seed_everything(tc.seed + self.dist.rank)

        self.info = dataset_info(cfg.data)
        model = build_model(cfg.model, self.info.num_classes)
        check_input_size(model, cfg.data.crop_size, "data.crop_size")
        if cfg.eval.mode != "original" and cfg.eval.crop_size is not None:
            check_input_size(model, cfg.eval.crop_size, "eval.crop_size")
        later_weights = load_init_weights(model, tc.init_from) if tc.init_from else {}
        if self.dist.enabled and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if tc.channels_last:
            model.to(memory_format=torch.channels_last)
        self.method = build_method(cfg, model, self.info.num_classes, self.info.ignore_index).to(self.device)
        if later_weights:
            self.method.take_init_weights(later_weights)
        D.broadcast_module(self.method)
        if tc.compile:
            for part in (model.encoder, model.decoder):
                part.compile()

        m = self.method
        sets = build_train_sets(cfg, num_strong=m.num_strong_views, with_unlabeled=m.uses_unlabeled,
                                strong_labeled=m.strong_labeled, unlabeled_masks=m.unlabeled_masks)
        self.val_set = build_eval_set(cfg, cfg.data.val_split)
        r, w = self.dist.rank, self.dist.world_size
        workers = cfg.data.workers
        ub = tc.unlabeled_batch_size or tc.batch_size
        self.streams = {"labeled": Stream(sets.labeled, tc.batch_size, tc.seed * 3 + 0, workers=workers, rank=r,
                                          world_size=w, name="labelled")}
        if m.uses_unlabeled:
            if sets.unlabeled is None or len(sets.unlabeled) == 0:
                raise SemisegError(f"method {cfg.method.name!r} needs unlabelled images, but the unlabelled set is "
                                   "empty: set data.labeled to fewer images than the training set (or data.unlabeled)")
            self.streams["unlabeled"] = Stream(sets.unlabeled, ub, tc.seed * 3 + 1, workers=workers, rank=r,
                                               world_size=w, name="unlabelled")
            if m.needs_mix_batch:
                self.streams["unlabeled_mix"] = Stream(sets.unlabeled, ub, tc.seed * 3 + 2, workers=workers,
                                                       rank=r, world_size=w, name="unlabelled")
        driver = self.streams.get("unlabeled", self.streams["labeled"])
        self.iters_per_epoch = driver.epoch_length

        self.optimizer = build_optimizer(m, tc)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.autocast = autocast_factory(self.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.validation = Validation(cfg, self.val_set, self.info, self.device, self.autocast, self.skipped.note)
        identity = {"config": cfg.to_dict(), "num_classes": self.info.num_classes,
                    "class_names": list(self.info.class_names), "method": cfg.method.name}
        self.checkpoints = TrainingCheckpoints(
            self.run_dir, tc.keep_last, self.method, self.optimizer, self.scaler, identity, rank=r, world_size=w,
            reseed=lambda it: seed_everything(tc.seed + 1000 * it + self.dist.rank))

    # ------------------------------------------------------------------ the pieces the loop calls
    def _evaluate_and_save(self, loop: LoopState) -> Optional[dict]:
        """The evaluation after ``loop.iteration`` and its checkpoint (``best`` too when improved:
        ``loop.best`` is updated). None when a stop signal interrupted it: the checkpoint is then
        marked so that the resumed run evaluates first."""
        results = self.validation.run(self.method, loop.iteration, self.log.logger,
                                      should_stop=lambda: self.stop.requested, progress=self.log.eval_progress())
        if results is None:
            self.checkpoints.save(replace(loop, pending_eval=True))
            return None
        score = self.validation.score(results)
        improved = score > loop.best
        loop.best = max(loop.best, score)
        self.log.show(summary(loop.iteration, results))
        self.checkpoints.save(loop, is_best=improved)
        return results

    def _logged_metrics(self) -> dict:
        """The last logged evaluation of the default network (for a run that is already done)."""
        evals = [r for r in read_metrics(self.run_dir) if r.get("type") == "eval"]
        if not evals:
            return {}
        last = [r for r in evals if r["iter"] == evals[-1]["iter"]]
        pick = next((r for r in last if r.get("model") == self.cfg.eval.model), last[0])
        return {k: v for k, v in pick.items() if k not in ("iter", "type")}

    def _open_run_dir(self, write_config: bool) -> MetricsLogger:
        """Create the run directory, write ``config.yaml`` and open the logs: only after the
        config, data and model were checked, so a failed start leaves nothing behind."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if write_config or not (self.run_dir / "config.yaml").exists():
                save_config(self.cfg, self.run_dir / "config.yaml")
        D.barrier()
        return MetricsLogger(self.run_dir, enabled=self.dist.is_main)

    def _save_after_error(self, loop: LoopState, rng: dict, error: BaseException) -> None:
        """A run stopped by an error keeps its work: the state after the last completed step is
        saved (unless it already is) and the error message says how to continue."""
        if not self.dist.is_main or loop.iteration <= 0:
            return
        if self.checkpoints.saved_at != loop.iteration:
            try:
                self.checkpoints.save(replace(loop, pending_eval=self.validation.running), rng=rng)
            except Exception:  # e.g. NaN weights: the previous checkpoint stays the newest
                return
        note = (f"the checkpoint of iteration {loop.iteration} is saved: fix the cause, then continue with "
                f"semiseg train --out {self.run_dir} --resume")
        if isinstance(error, SemisegError) and error.args:
            error.args = (f"{error.args[0]}; {note}",) + error.args[1:]
        else:
            print(f"semiseg: {note}", file=sys.stderr)

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after: Optional[int] = None) -> TrainResult:
        """Train to ``train.iters``; ``stop_after=N`` behaves like a stop signal after iteration N
        (checkpoint, then return), which is how tests and schedulers cut a run in pieces."""
        cfg, tc = self.cfg, self.cfg.train
        ckpt_dir = self.run_dir / "checkpoints"
        if not self.resume and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.safetensors")):
            raise SemisegError(f"{self.run_dir} already holds a run: continue it with --resume, "
                               "or choose another --out")
        self.threads = set_threads(tc.threads)
        self.build()  # reads and checks config, data and model; nothing is written before this succeeds
        loop = LoopState()
        if self.resume:
            restored = self.checkpoints.restore()
            if restored is None:  # killed before its first checkpoint
                warn(f"--resume: {self.run_dir} has no checkpoint yet; starting it from iteration 0")
            else:
                loop = restored
                if loop.iteration > tc.iters:
                    raise ConfigError(f"--resume: {self.run_dir} is at iteration {loop.iteration}, beyond "
                                      f"train.iters={tc.iters}: expected train.iters >= {loop.iteration}")
                changed = ", ".join(f"{k} {old} -> {new}" for k, old, new in self.resume_changes)
                if loop.iteration < tc.iters or loop.pending_eval:
                    self.log.say(f"resuming {self.run_dir} at iteration {loop.iteration} of {tc.iters}"
                                 + (f" ({changed})" if changed else ""))
        logger = self._open_run_dir(write_config=not self.resume or bool(self.resume_changes))
        start = loop.iteration
        if self.resume:
            logger.truncate_after(start)
        if start >= tc.iters and not loop.pending_eval:
            self.log.say(f"{self.run_dir} is complete ({start} of {tc.iters} iterations): nothing to train "
                         "(--set train.iters=N extends it)")
            logger.close()
            return TrainResult(self.run_dir, self._logged_metrics(), start)

        iters = {k: s.iterate_from(start) for k, s in self.streams.items()}
        eval_points = set(range(tc.eval_every, tc.iters + 1, tc.eval_every)) if tc.eval_every else set()
        eval_points.add(tc.iters)
        last_metrics: dict = {}
        consecutive_bad = 0
        self.log.start(logger, tc.iters, start, desc=f"{cfg.method.name} [{self.precision}]", bar=self.progress)
        rng_done = capture_rng_state()  # the generators as they are after iteration ``loop.iteration``
        try:
            with self.stop.listening():
                if loop.pending_eval:  # the evaluation after ``start`` was cut short: do it now
                    loop.pending_eval = False
                    results = self._evaluate_and_save(loop)
                    if results is None:
                        return TrainResult(self.run_dir, last_metrics, loop.iteration, stopped_early=True)
                    last_metrics = next(iter(results.values()))
                    if loop.iteration >= tc.iters:
                        return TrainResult(self.run_dir, last_metrics, loop.iteration)
                while loop.iteration < tc.iters:
                    outcome = self.step(loop.iteration, iters)
                    if not outcome.finite:
                        loop.skips += 1
                        consecutive_bad += 1
                        msg = f"non-finite loss ({to_float(outcome.loss)}) at iteration {loop.iteration + 1}"
                        if tc.nonfinite == "stop" or consecutive_bad >= tc.max_nonfinite:
                            if tc.nonfinite == "skip":
                                msg += f" ({consecutive_bad} in a row)"
                            raise TrainingError(msg + "; no checkpoint was written with these values "
                                                "(lower train.lr, or set train.precision=fp32)")
                    else:
                        consecutive_bad = 0
                        self.log.add({"loss": outcome.loss, **outcome.logs})
                    loop.iteration += 1
                    it = loop.iteration
                    rng_done = capture_rng_state()
                    self.log.stepped(it, outcome.lr, loop.skips)
                    if it in eval_points:
                        results = self._evaluate_and_save(loop)
                        if results is None:  # a stop signal cut the evaluation short
                            return TrainResult(self.run_dir, last_metrics, it, stopped_early=True)
                        last_metrics = next(iter(results.values()))
                    elif tc.checkpoint_every and it % tc.checkpoint_every == 0:
                        self.checkpoints.save(loop)
                    if stop_after is not None and it >= stop_after:
                        self.stop.request()
                    if self.stop.requested and it < tc.iters:
                        if self.checkpoints.saved_at != it:
                            self.checkpoints.save(loop)
                        return TrainResult(self.run_dir, last_metrics, it, stopped_early=True)
        except KeyboardInterrupt:
            raise  # a second Ctrl-C: quit at once
        except Exception as e:
            self._save_after_error(loop, rng_done, e)
            raise
        finally:
            self.log.close()  # the bar before any error line, so that it does not end up on the bar's line
            self.close_streams()
        D.barrier()
        return TrainResult(self.run_dir, last_metrics, loop.iteration)

    def close_streams(self) -> None:
        """Stop the data loaders' worker processes (:meth:`Stream.close`); :meth:`fit` does it on
        its way out, however it ends."""
        for stream in getattr(self, "streams", {}).values():
            stream.close()

    def step(self, it: int, batches: dict) -> StepOutcome:
        """Training iteration ``it`` (0-based), the one :meth:`fit` runs and ``semiseg bench``
        times: poly learning rate, next batch of every stream in ``batches`` (``{name:
        iterator}``, as :meth:`Stream.iterate_from` gives), ``method.train_step`` in train mode,
        then -- for a finite loss -- backward, gradient averaging over ranks, ``train.grad_clip``,
        optimiser and scaler step, BatchNorm statistics averaged over ranks, ``method.after_step``.

        A non-finite loss updates nothing: with ``train.nonfinite=skip`` the buffers the forward
        passes changed (BatchNorm statistics, memories) are put back, since a NaN forward would
        otherwise leave NaN statistics. Counting and stopping on such steps is the loop's job."""
        tc = self.cfg.train
        lr = poly_lr(tc.lr, it, tc.iters, tc.poly_power, tc.warmup_iters)
        set_lr(self.optimizer, lr)
        batch = self._next_batch(batches)
        ctx = self._context(it, lr)
        self.method.train()
        buffers = list(self.method.buffers()) if tc.nonfinite == "skip" else []
        saved = [b.detach().clone() for b in buffers]
        result = self.method.train_step(batch, ctx)
        loss = result.loss
        if not torch.isfinite(loss.detach()):
            with torch.no_grad():
                for b, old in zip(buffers, saved):
                    b.copy_(old)
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(lr, loss.detach(), result.logs, finite=False)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        D.average_gradients(self.params, self.dist.world_size)
        if tc.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        D.average_batchnorm_stats(self.method, self.dist.world_size)
        self.method.after_step(ctx)
        return StepOutcome(lr, loss.detach(), result.logs, finite=True)

    def _context(self, it: int, lr: float):
        from semiseg.methods import StepContext

        return StepContext(iteration=it, total_iters=self.cfg.train.iters, lr=lr, autocast=self.autocast,
                           iters_per_epoch=self.iters_per_epoch)

    def _next_batch(self, iters: dict):
        from semiseg.methods import Batch

        cl = self.cfg.train.channels_last
        fetched = {k: to_device(next(v), self.device, cl) for k, v in iters.items()}
        for part in fetched.values():  # files a dataset could not use (another sample took their place)
            self.skipped.note(part.pop("skipped", []))
        return Batch(labeled=fetched["labeled"], unlabeled=fetched.get("unlabeled"),
                     unlabeled_mix=fetched.get("unlabeled_mix"))


def train(cfg: Optional[Config], run_dir=None, resume: bool = False, progress: bool = True,
          config_name: str = "run") -> TrainResult:
    return Trainer(cfg, run_dir, resume=resume, progress=progress, config_name=config_name).fit()
