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
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from semiseg.config import Config, load_config, save_config
from semiseg.engine import distributed as D
from semiseg.engine.logging import MetricsLogger, RunningMeans, to_float
from semiseg.engine.optim import build_optimizer, poly_lr, set_lr
from semiseg.engine.precision import autocast_factory, resolve_precision, set_threads, to_device
from semiseg.engine.sampling import Stream
from semiseg.errors import CheckpointError, ConfigError, DataError, SemisegError, warn


class TrainingError(SemisegError):
    exit_code = 5


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
    from semiseg.engine.checkpoint import CheckpointManager

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
        self._stop_signal: Optional[int] = None
        self._bad_files: dict[str, None] = {}  # unusable data files met so far (their messages), in order
        self._saved_at = -1  # iteration of the newest checkpoint written or restored
        self._evaluating = False
        self.logger: Optional[MetricsLogger] = None
        self._bar = None

    def _say(self, message: str) -> None:
        """One line on stderr (rank 0), clear of the progress bar."""
        if not self.dist.is_main:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    # ------------------------------------------------------------------ set-up
    def build(self):
        """Read and check config, data and model; build the method, the data streams, the
        optimiser and the precision set-up. Writes nothing."""
        from semiseg.data.build import build_eval_set, build_train_sets
        from semiseg.data.datasets import dataset_info
        from semiseg.engine.checkpoint import CheckpointManager, load_init_weights
        from semiseg.methods import build_method
        from semiseg.models import build_model, check_input_size

        cfg, tc = self.cfg, self.cfg.train
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
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
                                strong_labeled=m.strong_labeled)
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
        self.ckpt = CheckpointManager(self.run_dir, keep_last=tc.keep_last)

    # ------------------------------------------------------------------ state
    def _state_tensors(self, it: int, best: float, skips: int, rng: Optional[dict] = None,
                       pending_eval: bool = False):
        from semiseg.engine.checkpoint import capture_rng_state, flatten_state

        tensors = {f"model.{k}": v for k, v in self.method.state_dict().items()}
        extra, skeleton = flatten_state({"optim": self.optimizer.state_dict(), "rng": rng or capture_rng_state(),
                                         "scaler": self.scaler.state_dict()}, "state")
        tensors.update(extra)
        meta = {
            "iter": it, "best_mIoU": best, "nonfinite_skips": skips, "state": skeleton,
            "pending_eval": pending_eval,  # stopped during the evaluation after ``iter``: a resume redoes it
            "config": self.cfg.to_dict(), "num_classes": self.info.num_classes,
            "class_names": list(self.info.class_names), "method": self.cfg.method.name,
            "world_size": self.dist.world_size,
        }
        return tensors, meta

    def _restore(self) -> Optional[tuple[int, float, int, bool]]:
        """Load the newest valid checkpoint; None when the run has none yet."""
        from semiseg.engine.checkpoint import restore_rng_state, unflatten_state

        found = self.ckpt.load_latest()
        if found is None:
            return None
        path, tensors, meta = found
        weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.method.load_state_dict(weights)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise CheckpointError(f"checkpoint {path} does not fit this config: {first}") from None
        state = unflatten_state({k: v for k, v in tensors.items() if k.startswith("state.")}, meta["state"])
        self.optimizer.load_state_dict(state["optim"])
        self.scaler.load_state_dict(state["scaler"])
        if meta.get("world_size", 1) == self.dist.world_size == 1:
            restore_rng_state(state["rng"])
        else:  # per-rank generators cannot come from one file: re-derive them from the iteration
            seed_everything(self.cfg.train.seed + 1000 * meta["iter"] + self.dist.rank)
        self._saved_at = int(meta["iter"])
        return (int(meta["iter"]), float(meta.get("best_mIoU", -1.0)), int(meta.get("nonfinite_skips", 0)),
                bool(meta.get("pending_eval", False)))

    def _save(self, it: int, best: float, skips: int, is_best: bool = False, rng: Optional[dict] = None,
              pending_eval: bool = False) -> None:
        self._saved_at = it
        if not self.dist.is_main:
            return
        for kind, named in (("parameter", self.method.named_parameters()), ("buffer", self.method.named_buffers())):
            for name, p in named:
                if p.is_floating_point() and not torch.isfinite(p).all():
                    raise TrainingError(f"refusing to checkpoint: {kind} {name} holds NaN/inf at iteration {it}")
        tensors, meta = self._state_tensors(it, best, skips, rng, pending_eval)
        self.ckpt.save(it, tensors, meta, is_best=is_best)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, it: int) -> Optional[dict]:
        """Score every network of :meth:`Method.eval_models` on the validation set, then log
        them; None (nothing logged) when a stop signal interrupted the evaluation."""
        from semiseg.engine.evaluator import EvaluationInterrupted, evaluate

        results = {}
        crop = self.cfg.eval.crop_size or self.cfg.data.crop_size
        self._evaluating = True  # left set when an error escapes: the checkpoint then asks for this evaluation
        try:
            for name, net in self.method.eval_models().items():
                # progress on the training bar's line, which would otherwise sit still at the eval point
                shown = (lambda done, total, name=name: self._bar.set_postfix_str(f"eval {name} {done}/{total}")
                         ) if self._bar is not None else False
                res = evaluate(net, self.val_set, self.cfg.eval, self.info.num_classes,
                               ignore_index=self.info.ignore_index, device=self.device, crop_size=crop,
                               progress=shown, autocast=self.autocast, num_workers=self.cfg.data.workers,
                               should_stop=lambda: self._stop_signal is not None)
                self._note_bad_files(res.get("skipped", []))
                results[name] = res
        except EvaluationInterrupted:
            self._evaluating = False
            return None
        self._evaluating = False
        for name, res in results.items():  # logged together: an interrupted evaluation leaves no rows
            row = {"iter": it, "type": "eval", "model": name, "mIoU": res["mIoU"],
                   "pixel_acc": res["pixel_acc"], "per_class_iou": res["per_class_iou"]}
            if "mDice" in res:  # volumes (acdc): the paper's score
                row.update(mDice=res["mDice"], per_class_dice=res["per_class_dice"])
            if "changed_iou" in res:  # image pairs (change detection): the paper's scores
                row.update({k: res[k] for k in ("changed_iou", "unchanged_iou", "f1", "precision", "recall",
                                                "overall_acc")})
            self.logger.log(row)
        return results

    def _evaluate_and_save(self, it: int, best: float, skips: int) -> tuple[Optional[dict], float]:
        """The evaluation after iteration ``it`` and its checkpoint (``best`` too when improved).
        Returns ``(results, best)``; results are None when a stop signal interrupted it: the
        checkpoint is then marked so that the resumed run evaluates first."""
        results = self.evaluate(it)
        if results is None:
            self._save(it, best, skips, pending_eval=True)
            return None, best
        first = next(iter(results.values()))
        chosen = results.get(self.cfg.eval.model, first)  # "auto": the first network
        # volumes (acdc): the best checkpoint by mean Dice; change detection: by the changed class's
        # IoU (official UniMatch's remote-sensing choice)
        score = chosen.get("mDice", chosen.get("changed_iou", chosen["mIoU"]))
        if score != score:  # NaN (no changed pixel anywhere yet): never "improved"
            score = float("-inf")
        improved = score > best
        best = max(best, score)
        if self._bar is not None:
            self._bar.write(f"iter {it}: " + ", ".join(
                f"{n} mIoU {r['mIoU']:.2f}" + (f" mDice {r['mDice']:.2f}" if "mDice" in r else "")
                + (f" changed IoU {r['changed_iou']:.2f} F1 {r['f1']:.2f}" if "changed_iou" in r else "")
                for n, r in results.items()))
        self._save(it, best, skips, is_best=improved)
        return results, best

    def _logged_metrics(self) -> dict:
        """The last logged evaluation of the default network (for a run that is already done)."""
        from semiseg.engine.logging import read_metrics

        evals = [r for r in read_metrics(self.run_dir) if r.get("type") == "eval"]
        if not evals:
            return {}
        last = [r for r in evals if r["iter"] == evals[-1]["iter"]]
        pick = next((r for r in last if r.get("model") == self.cfg.eval.model), last[0])
        return {k: v for k, v in pick.items() if k not in ("iter", "type")}

    # ------------------------------------------------------------------ unusable files
    def _note_bad_files(self, messages) -> None:
        """Warn once per unusable data file (the datasets skip them); stop past data.max_bad_files."""
        limit = self.cfg.data.max_bad_files
        for text in messages:
            for message in str(text).split("\n"):
                if not message or message in self._bad_files:
                    continue
                self._bad_files[message] = None
                n = len(self._bad_files)
                if n > limit:
                    raise DataError(f"{n} data files could not be used, more than data.max_bad_files={limit}; "
                                    f"the last: {message} ('semiseg check-data' lists every bad file)")
                warn(f"skipped ({n} of at most data.max_bad_files={limit}): {message}")

    # ------------------------------------------------------------------ signals
    @contextmanager
    def _graceful_signals(self):
        """SIGINT/SIGTERM finish the current step (or cut the evaluation short), save and exit
        cleanly; a second SIGINT quits at once, without saving."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            if signum == signal.SIGINT and self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if signum == signal.SIGINT and self.dist.is_main:
                sys.stderr.write("\nsemiseg: stopping: finishing this step and saving a checkpoint "
                                 "(Ctrl-C again to quit at once, without saving)\n")

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _open_run_dir(self, write_config: bool) -> None:
        """Create the run directory, write ``config.yaml`` and open the logs: only after the
        config, data and model were checked, so a failed start leaves nothing behind."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if write_config or not (self.run_dir / "config.yaml").exists():
                save_config(self.cfg, self.run_dir / "config.yaml")
        D.barrier()
        self.logger = MetricsLogger(self.run_dir, enabled=self.dist.is_main)

    def _save_after_error(self, it: int, best: float, skips: int, rng: dict, error: BaseException) -> None:
        """A run stopped by an error keeps its work: the state after the last completed step is
        saved (unless it already is) and the error message says how to continue."""
        if not self.dist.is_main or it <= 0:
            return
        if self._saved_at != it:
            try:
                self._save(it, best, skips, rng=rng, pending_eval=self._evaluating)
            except Exception:  # e.g. NaN weights: the previous checkpoint stays the newest
                return
        note = (f"the checkpoint of iteration {it} is saved: fix the cause, then continue with "
                f"semiseg train --out {self.run_dir} --resume")
        if isinstance(error, SemisegError) and error.args:
            error.args = (f"{error.args[0]}; {note}",) + error.args[1:]
        else:
            print(f"semiseg: {note}", file=sys.stderr)

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after: Optional[int] = None) -> TrainResult:
        """Train to ``train.iters``; ``stop_after=N`` behaves like a stop signal after iteration N
        (checkpoint, then return), which is how tests and schedulers cut a run in pieces."""
        from semiseg.engine.checkpoint import capture_rng_state

        cfg, tc = self.cfg, self.cfg.train
        ckpt_dir = self.run_dir / "checkpoints"
        if not self.resume and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.safetensors")):
            raise SemisegError(f"{self.run_dir} already holds a run: continue it with --resume, "
                               "or choose another --out")
        self.threads = set_threads(tc.threads)
        self.build()  # reads and checks config, data and model; nothing is written before this succeeds
        start, best, skips, pending_eval = 0, -1.0, 0, False
        if self.resume:
            restored = self._restore()
            if restored is None:  # killed before its first checkpoint
                warn(f"--resume: {self.run_dir} has no checkpoint yet; starting it from iteration 0")
            else:
                start, best, skips, pending_eval = restored
                if start > tc.iters:
                    raise ConfigError(f"--resume: {self.run_dir} is at iteration {start}, beyond "
                                      f"train.iters={tc.iters}: expected train.iters >= {start}")
                changed = ", ".join(f"{k} {old} -> {new}" for k, old, new in self.resume_changes)
                if start < tc.iters or pending_eval:
                    self._say(f"resuming {self.run_dir} at iteration {start} of {tc.iters}"
                              + (f" ({changed})" if changed else ""))
        self._open_run_dir(write_config=not self.resume or bool(self.resume_changes))
        if self.resume:
            self.logger.truncate_after(start)
        if start >= tc.iters and not pending_eval:
            self._say(f"{self.run_dir} is complete ({start} of {tc.iters} iterations): nothing to train "
                      "(--set train.iters=N extends it)")
            self.logger.close()
            return TrainResult(self.run_dir, self._logged_metrics(), start)

        iters = {k: s.iterate_from(start) for k, s in self.streams.items()}
        eval_points = set(range(tc.eval_every, tc.iters + 1, tc.eval_every)) if tc.eval_every else set()
        eval_points.add(tc.iters)
        means = RunningMeans()
        last_metrics: dict = {}
        consecutive_bad = 0
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            self._bar = tqdm(total=tc.iters, initial=start, desc=f"{cfg.method.name} [{self.precision}]",
                             dynamic_ncols=True, mininterval=1.0)
        bar = self._bar
        t_window = time.perf_counter()
        it = start
        rng_done = capture_rng_state()  # the generators as they are after iteration ``it``
        try:
            with self._graceful_signals():
                if pending_eval:  # the evaluation after ``start`` was cut short: do it now
                    results, best = self._evaluate_and_save(it, best, skips)
                    if results is None:
                        return TrainResult(self.run_dir, last_metrics, it, stopped_early=True)
                    last_metrics = next(iter(results.values()))
                    if it >= tc.iters:
                        return TrainResult(self.run_dir, last_metrics, it)
                while it < tc.iters:
                    outcome = self.step(it, iters)
                    lr = outcome.lr
                    if not outcome.finite:
                        skips += 1
                        consecutive_bad += 1
                        msg = f"non-finite loss ({to_float(outcome.loss)}) at iteration {it + 1}"
                        if tc.nonfinite == "stop" or consecutive_bad >= tc.max_nonfinite:
                            if tc.nonfinite == "skip":
                                msg += f" ({consecutive_bad} in a row)"
                            raise TrainingError(msg + "; no checkpoint was written with these values "
                                                "(lower train.lr, or set train.precision=fp32)")
                    else:
                        consecutive_bad = 0
                        means.add({"loss": outcome.loss, **outcome.logs})
                    it += 1
                    rng_done = capture_rng_state()
                    if bar is not None:
                        bar.update(1)
                    if it % tc.log_every == 0 or it == tc.iters:
                        row = D.all_reduce_means(means.pop())  # logged values are means over ranks
                        now = time.perf_counter()
                        row = {"iter": it, "type": "train", "lr": lr, **row, "nonfinite_skips": skips,
                               "sec_per_iter": (now - t_window) / max(1, (it - 1) % tc.log_every + 1)}
                        t_window = now
                        self.logger.log(row)
                        if bar is not None:
                            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items()
                                             if k.startswith("loss") or k == "mask_ratio"})
                    if it in eval_points:
                        results, best = self._evaluate_and_save(it, best, skips)
                        if results is None:  # a stop signal cut the evaluation short
                            return TrainResult(self.run_dir, last_metrics, it, stopped_early=True)
                        last_metrics = next(iter(results.values()))
                    elif tc.checkpoint_every and it % tc.checkpoint_every == 0:
                        self._save(it, best, skips)
                    if stop_after is not None and it >= stop_after:
                        self._stop_signal = self._stop_signal or -1
                    if self._stop_signal is not None and it < tc.iters:
                        if self._saved_at != it:
                            self._save(it, best, skips)
                        return TrainResult(self.run_dir, last_metrics, it, stopped_early=True)
        except KeyboardInterrupt:
            raise  # a second Ctrl-C: quit at once
        except Exception as e:
            self._save_after_error(it, best, skips, rng_done, e)
            raise
        finally:
            if bar is not None:
                bar.close()  # before any error line, so that it does not end up on the bar's line
                self._bar = None
            self.logger.close()
        D.barrier()
        return TrainResult(self.run_dir, last_metrics, it)

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
            self._note_bad_files(part.pop("skipped", []))
        return Batch(labeled=fetched["labeled"], unlabeled=fetched.get("unlabeled"),
                     unlabeled_mix=fetched.get("unlabeled_mix"))


def train(cfg: Optional[Config], run_dir=None, resume: bool = False, progress: bool = True,
          config_name: str = "run") -> TrainResult:
    return Trainer(cfg, run_dir, resume=resume, progress=progress, config_name=config_name).fit()
