"""The one training loop every method runs in.

Per iteration: set the poly learning rate, draw the batches the method asked for (labelled,
unlabelled, CutMix partner), ``method.train_step`` under the configured precision, skip a
non-finite loss, backward, average gradients across ranks, optimiser step,
``method.after_step`` (EMA teachers, memories), log; evaluate and checkpoint on schedule.
Methods never see the loop.
"""

from __future__ import annotations

import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from semiseg.config import Config, save_config
from semiseg.engine import distributed as D
from semiseg.engine.logging import MetricsLogger, RunningMeans, to_float
from semiseg.engine.optim import build_optimizer, poly_lr, set_lr
from semiseg.engine.sampling import Stream
from semiseg.errors import CheckpointError, SemisegError


class TrainingError(SemisegError):
    exit_code = 5


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


def cpu_has_native_bf16(cpuinfo: Optional[str] = None) -> bool:
    """True when the CPU executes bf16 dot products natively (AVX-512 BF16 or AMX), read from
    ``/proc/cpuinfo`` (or the given text); False where that cannot be read. Without them bf16 is
    emulated and slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision: auto`` (the default) is ``bf16`` on a CPU with native bf16 and ``fp32``
    everywhere else, CUDA included.

    Measured on the CamVid-CPU v1 protocol (BENCHMARKS.md): on an AVX-512 BF16 CPU, bf16 autocast
    makes the UniMatch step 1.9x faster at unchanged mIoU. On CUDA nothing has been measured
    here yet, so ``auto`` keeps fp32 there; ``bf16`` and ``fp16`` are one key away."""
    if precision != "auto":
        return precision
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast_factory(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise SemisegError("config error: key 'train.precision': fp16 needs CUDA; use bf16 on the CPU")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Optional[dict], device: torch.device, channels_last: bool = False) -> Optional[dict]:
    if batch is None:
        return None
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def load_init_weights(model: nn.Module, path: str) -> dict:
    """``train.init_from``: copy the network weights of an earlier run (its best checkpoint if
    it has one) into ``model``; optimiser and schedule start fresh.

    Every weight of ``model`` must be in the checkpoint with the same shape. Weights of parts
    a method attaches later (AllSpark's ``neck.*``) are returned, to be loaded once the method
    has built them; a plain network started from such a run simply leaves them out.
    """
    from semiseg.engine.checkpoint import load_weights

    state, _meta = load_weights(path)
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")} or state
    own = model.state_dict()
    bad = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in weights]
    if bad or missing:
        what = (f"shape mismatch at {bad[0]} ({tuple(weights[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})"
                if bad else f"missing {missing[0]}")
        raise CheckpointError(
            f"train.init_from {path}: weights do not fit this model ({what}); "
            "same model.encoder, model.head and number of classes are required")
    model.load_state_dict({k: weights[k] for k in own})
    return {k: v for k, v in weights.items() if k.startswith("neck.")}


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None, resume: bool = False,
                 progress: bool = True, config_name: str = "run"):
        from semiseg.models.pretrained import resolve_normalization

        self.cfg = cfg = resolve_normalization(cfg)  # data.mean/std follow the encoder's weights
        self.resume = resume
        self.progress = progress
        self.dist = D.init_distributed(cfg.train.device)
        self.device = D.resolve_device(cfg.train.device, self.dist)
        self.precision = resolve_precision(cfg.train.precision, self.device)  # "auto" made concrete
        self.run_dir = Path(run_dir) if run_dir else new_run_dir(name=config_name)
        self._stop_signal: Optional[int] = None

    # ------------------------------------------------------------------ set-up
    def _build(self):
        from semiseg.data.build import build_eval_set, build_train_sets
        from semiseg.data.datasets import dataset_info
        from semiseg.engine.checkpoint import CheckpointManager
        from semiseg.methods import build_method
        from semiseg.models import build_model

        cfg, tc = self.cfg, self.cfg.train
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
        seed_everything(tc.seed + self.dist.rank)

        self.info = dataset_info(cfg.data)
        model = build_model(cfg.model, self.info.num_classes)
        later_weights = load_init_weights(model, tc.init_from) if tc.init_from else {}
        if self.dist.enabled and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if tc.channels_last:
            model.to(memory_format=torch.channels_last)
        self.method = build_method(cfg, model, self.info.num_classes, self.info.ignore_index).to(self.device)
        if later_weights and getattr(model, "neck", None) is not None:
            model.load_state_dict(later_weights, strict=False)
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
        self.autocast = autocast_factory(self.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.ckpt = CheckpointManager(self.run_dir, keep_last=tc.keep_last)
        self.logger = MetricsLogger(self.run_dir, enabled=self.dist.is_main)

    # ------------------------------------------------------------------ state
    def _state_tensors(self, it: int, best: float, skips: int):
        from semiseg.engine.checkpoint import capture_rng_state, flatten_state

        tensors = {f"model.{k}": v for k, v in self.method.state_dict().items()}
        extra, skeleton = flatten_state({"optim": self.optimizer.state_dict(), "rng": capture_rng_state(),
                                         "scaler": self.scaler.state_dict()}, "state")
        tensors.update(extra)
        meta = {
            "iter": it, "best_mIoU": best, "nonfinite_skips": skips, "state": skeleton,
            "config": self.cfg.to_dict(), "num_classes": self.info.num_classes,
            "class_names": list(self.info.class_names), "method": self.cfg.method.name,
            "world_size": self.dist.world_size,
        }
        return tensors, meta

    def _restore(self) -> Optional[tuple[int, float, int]]:
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
        return int(meta["iter"]), float(meta.get("best_mIoU", -1.0)), int(meta.get("nonfinite_skips", 0))

    def _save(self, it: int, best: float, skips: int, is_best: bool = False) -> None:
        if not self.dist.is_main:
            return
        for kind, named in (("parameter", self.method.named_parameters()), ("buffer", self.method.named_buffers())):
            for name, p in named:
                if p.is_floating_point() and not torch.isfinite(p).all():
                    raise TrainingError(f"refusing to checkpoint: {kind} {name} holds NaN/inf at iteration {it}")
        tensors, meta = self._state_tensors(it, best, skips)
        if is_best:
            # best before last: a kill between the two writes must not leave a ``last`` whose
            # best_mIoU already counts this evaluation while ``best`` still holds older weights
            # (the resumed run would never rewrite it). Killed before ``last``, the resumed run
            # repeats this step and writes the same ``best`` again.
            from semiseg.engine.checkpoint import WEIGHTS_PREFIX, save_checkpoint

            weights = {k: v for k, v in tensors.items() if k.startswith(WEIGHTS_PREFIX)}
            save_checkpoint(self.ckpt.best_path, weights, {**meta, "weights_only": True})
        self.ckpt.save(it, tensors, meta)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, it: int) -> dict:
        from semiseg.engine.evaluator import evaluate

        results = {}
        crop = self.cfg.eval.crop_size or self.cfg.data.crop_size
        for name, net in self.method.eval_models().items():
            res = evaluate(net, self.val_set, self.cfg.eval, self.info.num_classes,
                           ignore_index=self.info.ignore_index, device=self.device, crop_size=crop,
                           progress=False, autocast=self.autocast, num_workers=self.cfg.data.workers)
            results[name] = res
            self.logger.log({"iter": it, "type": "eval", "model": name, "mIoU": res["mIoU"],
                             "pixel_acc": res["pixel_acc"], "per_class_iou": res["per_class_iou"]})
        return results

    # ------------------------------------------------------------------ signals
    @contextmanager
    def _graceful_signals(self):
        """SIGINT/SIGTERM finish the current step, save and exit cleanly."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            self._stop_signal = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after: Optional[int] = None) -> TrainResult:
        """Train to ``train.iters``; ``stop_after=N`` behaves like a stop signal after iteration N
        (checkpoint, then return), which is how tests and schedulers cut a run in pieces."""
        cfg, tc = self.cfg, self.cfg.train
        ckpt_dir = self.run_dir / "checkpoints"
        if not self.resume and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.safetensors")):
            raise SemisegError(f"{self.run_dir} already holds a run: continue it with --resume, "
                               "or choose another --out")
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        D.barrier()
        self._build()
        start, best, skips = 0, -1.0, 0
        if self.resume:
            restored = self._restore()
            if restored is None:  # killed before its first checkpoint
                import warnings

                warnings.warn(f"--resume: no checkpoint in {ckpt_dir} yet; starting {self.run_dir} from iteration 0")
            else:
                start, best, skips = restored
            self.logger.truncate_after(start)
        if start >= tc.iters:
            return TrainResult(self.run_dir, {}, start)

        iters = {k: s.iterate_from(start) for k, s in self.streams.items()}
        eval_points = set(range(tc.eval_every, tc.iters + 1, tc.eval_every)) if tc.eval_every else set()
        eval_points.add(tc.iters)
        means = RunningMeans()
        last_metrics: dict = {}
        consecutive_bad = 0
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=tc.iters, initial=start, desc=f"{cfg.method.name} [{self.precision}]", dynamic_ncols=True,
                       mininterval=1.0)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        t_window = time.perf_counter()
        it = start
        with self._graceful_signals():
            while it < tc.iters:
                lr = poly_lr(tc.lr, it, tc.iters, tc.poly_power, tc.warmup_iters)
                set_lr(self.optimizer, lr)
                batch = self._next_batch(iters)
                ctx = self._context(it, lr)
                self.method.train()
                # buffers the forward passes update (BatchNorm statistics, memories) are put back
                # when the step is skipped: a NaN forward would otherwise leave NaN statistics
                buffers = list(self.method.buffers()) if tc.nonfinite == "skip" else []
                saved = [b.detach().clone() for b in buffers]
                result = self.method.train_step(batch, ctx)
                loss = result.loss
                if not torch.isfinite(loss.detach()):
                    with torch.no_grad():
                        for b, old in zip(buffers, saved):
                            b.copy_(old)
                    skips += 1
                    consecutive_bad += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    msg = f"non-finite loss ({to_float(loss)}) at iteration {it + 1}"
                    if tc.nonfinite == "stop" or consecutive_bad >= tc.max_nonfinite:
                        if tc.nonfinite == "skip":
                            msg += f" ({consecutive_bad} in a row)"
                        raise TrainingError(msg + "; no checkpoint was written with these values "
                                            "(lower train.lr, or set train.precision=fp32)")
                else:
                    consecutive_bad = 0
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(loss).backward()
                    D.average_gradients(params, self.dist.world_size)
                    if tc.grad_clip:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    D.average_batchnorm_stats(self.method, self.dist.world_size)
                    self.method.after_step(ctx)
                    means.add({"loss": loss.detach(), **result.logs})
                it += 1
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
                is_eval = it in eval_points
                if is_eval:
                    results = self.evaluate(it)
                    last_metrics = next(iter(results.values()))
                    score = results.get(cfg.eval.model, last_metrics)["mIoU"]  # "auto": the first network
                    improved = score > best
                    best = max(best, score)
                    if bar is not None:
                        bar.write(f"iter {it}: " + ", ".join(f"{n} mIoU {r['mIoU']:.2f}" for n, r in results.items()))
                    self._save(it, best, skips, is_best=improved)
                elif tc.checkpoint_every and it % tc.checkpoint_every == 0:
                    self._save(it, best, skips)
                if stop_after is not None and it >= stop_after:
                    self._stop_signal = self._stop_signal or -1
                if self._stop_signal is not None and it < tc.iters:
                    if not is_eval and not (tc.checkpoint_every and it % tc.checkpoint_every == 0):
                        self._save(it, best, skips)
                    if bar is not None:
                        bar.close()
                    self.logger.close()
                    return TrainResult(self.run_dir, last_metrics, it, stopped_early=True)
        if bar is not None:
            bar.close()
        self.logger.close()
        D.barrier()
        return TrainResult(self.run_dir, last_metrics, it)

    def _context(self, it: int, lr: float):
        from semiseg.methods import StepContext

        return StepContext(iteration=it, total_iters=self.cfg.train.iters, lr=lr, autocast=self.autocast,
                           iters_per_epoch=self.iters_per_epoch)

    def _next_batch(self, iters: dict):
        from semiseg.methods import Batch

        cl = self.cfg.train.channels_last
        fetched = {k: to_device(next(v), self.device, cl) for k, v in iters.items()}
        return Batch(labeled=fetched["labeled"], unlabeled=fetched.get("unlabeled"),
                     unlabeled_mix=fetched.get("unlabeled_mix"))


def train(cfg: Config, run_dir=None, resume: bool = False, progress: bool = True, config_name: str = "run") -> TrainResult:
    return Trainer(cfg, run_dir, resume=resume, progress=progress, config_name=config_name).fit()
