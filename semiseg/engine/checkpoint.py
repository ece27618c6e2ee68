"""Checkpoints: one safetensors file each, written atomically, never unpickled.

File format (``semiseg-ckpt-1``): a plain safetensors file whose tensors are whatever the
caller passes (by convention ``model.*`` = the method's state dict and ``state.*`` = the
flattened optimiser / scaler / RNG state) and whose header ``__metadata__`` holds three strings:

* ``format``: ``"semiseg-ckpt-1"``;
* ``meta``: ``json.dumps(meta)`` -- iteration, resolved config, the skeleton that
  :func:`unflatten_state` needs, metrics... (the trainer decides);
* ``sha256``: a digest of ``meta`` and of every tensor (name, dtype, shape, bytes, in name
  order), checked on load, so a flipped bit or a truncated file is reported, not loaded.

Safetensors holds only raw tensor bytes and a JSON header, so loading a file can never run code;
a pickle (``torch.save``) file is recognised and refused without being parsed. Non-tensor state
(``optimizer.state_dict()`` with its int keys, RNG states) goes through :func:`flatten_state`,
which moves the tensors out and leaves a JSON skeleton.

:class:`CheckpointManager` keeps ``run_dir/checkpoints/``:
``last.safetensors`` (newest full training state), ``iter_{it:07d}.safetensors`` (the last
``keep_last`` states; the newest is a hard link to ``last``, a copy where links are not
supported) and ``best.safetensors`` (``model.*`` weights + meta). Unlike UniMatch, which
``torch.save``s only the best weights, a run can be resumed exactly and a checkpoint carries its
own config.

:class:`TrainingCheckpoints` is what the training loop calls: it turns a run's live state (the
method, optimiser, scaler, RNGs and the loop's :class:`LoopState`) into those files and back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from semiseg.errors import CheckpointError, TrainingError

FORMAT = "semiseg-ckpt-1"
WEIGHTS_PREFIX = "model."
PathLike = Union[str, Path]

# ---------------------------------------------------------------------------------------------
# Nested state <-> flat tensors + JSON skeleton


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into ``(tensors, skeleton)``.

    ``obj`` may nest dicts (keys: str, int, bool or None), lists and tuples of tensors, numpy
    arrays, ints, floats (NaN/inf included), bools, strings and None. Every tensor / array is
    moved to ``tensors`` under a unique name ``prefix.path.to.it``; the JSON-able skeleton keeps
    the structure (each container is a one-key dict: ``{"dict": [[key, value], ...]}``,
    ``{"list": [...]}``, ``{"tuple": [...]}``; leaves ``{"tensor": name}``, ``{"ndarray": name}``,
    ``{"float": "nan"}``) so that :func:`unflatten_state` restores types exactly.
    """
    tensors: dict[str, torch.Tensor] = {}

    def name_for(path: list[str]) -> str:
        base = ".".join([prefix] + path if prefix else path) or "tensor"
        name, n = base, 1
        while name in tensors:  # "a.b" as one key vs. nested "a" -> "b"
            name, n = f"{base}~{n}", n + 1
        return name

    def walk(x: Any, path: list[str]) -> Any:
        if isinstance(x, torch.Tensor):
            name = name_for(path)
            tensors[name] = x
            return {"tensor": name}
        if isinstance(x, np.ndarray):
            if x.dtype == object:
                raise TypeError(f"flatten_state: object array at {'.'.join(path) or '<root>'} is not supported")
            name = name_for(path)
            tensors[name] = torch.from_numpy(np.ascontiguousarray(x))
            return {"ndarray": name}
        if isinstance(x, np.generic):
            x = x.item()
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"float": repr(x)}
        if isinstance(x, dict):
            items = []
            for k, v in x.items():
                if isinstance(k, np.generic):
                    k = k.item()
                if not (k is None or isinstance(k, (str, int, bool))):
                    where = ".".join(path) or "<root>"
                    raise TypeError(f"flatten_state: key {k!r} at {where} is not str/int/bool/None")
                items.append([k, walk(v, path + [str(k)])])
            return {"dict": items}
        if isinstance(x, (list, tuple)):
            values = [walk(v, path + [str(i)]) for i, v in enumerate(x)]
            return {"tuple" if isinstance(x, tuple) else "list": values}
        raise TypeError(f"flatten_state: cannot store {type(x).__name__} at {'.'.join(path) or '<root>'}")

    skeleton = walk(obj, [])
    return tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state`: rebuild the structure from its tensors and skeleton."""

    def build(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        (tag, value), = node.items()
        if tag == "tensor" or tag == "ndarray":
            if value not in tensors:
                raise CheckpointError(f"checkpoint state refers to tensor {value!r}, which is not in the file")
            t = tensors[value]
            return t.numpy().copy() if tag == "ndarray" else t
        if tag == "float":
            return float(value)
        if tag == "dict":
            return {k: build(v) for k, v in value}
        if tag == "list":
            return [build(v) for v in value]
        if tag == "tuple":
            return tuple(build(v) for v in value)
        raise CheckpointError(f"checkpoint state skeleton has an unknown node {tag!r}")

    return build(skeleton)


def state_dict_to_tensors(state_dict: dict[str, torch.Tensor], prefix: str = "model") -> dict[str, torch.Tensor]:
    """``{"prefix.key": tensor}`` for a module/method ``state_dict()`` (tensors only)."""
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        out[f"{prefix}.{k}"] = v
    return out


def tensors_to_state_dict(tensors: dict[str, torch.Tensor], prefix: str = "model") -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix.``, with the prefix removed."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


# ---------------------------------------------------------------------------------------------
# Random number generators


def capture_rng_state() -> dict:
    """The state of python ``random``, numpy's global generator, torch's CPU generator and, when
    CUDA has been initialised, every CUDA generator -- as a structure :func:`flatten_state`
    stores (tensors and JSON values)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Set the generators :func:`capture_rng_state` captured (parts absent are left alone; CUDA
    states are restored for the devices present)."""
    if "python" in state:
        py = state["python"]
        internal = py["state"].tolist() if isinstance(py["state"], torch.Tensor) else py["state"]
        random.setstate((py["version"], tuple(int(v) for v in internal), py["gauss"]))
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].numpy() if isinstance(n["keys"], torch.Tensor) else np.asarray(n["keys"])
        np.random.set_state((n["kind"], keys.astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                             float(n["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to("cpu", torch.uint8), i)


# ---------------------------------------------------------------------------------------------
# One file


def _prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, CPU, contiguous tensors that each own their storage (safetensors refuses
    tensors sharing memory; views and non-contiguous tensors are copied)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"checkpoint tensor names must be str, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        owns = (t.is_contiguous() and t.storage_offset() == 0
                and storage.nbytes() == t.numel() * t.element_size())
        if not owns or (ptr and ptr in seen):
            t = t.contiguous().clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr:
            seen.add(ptr)
        out[name] = t
    return out


def _digest(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    h = hashlib.sha256()
    h.update(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    with suppress(OSError):  # not supported everywhere (e.g. Windows); the data itself is synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable) -> None:
    """Write ``path.tmp-<pid>`` next to ``path`` with ``write(file)``, fsync it, rename it over
    ``path`` and fsync the directory: ``path`` is always either the old or the new file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write checkpoint {path} ({e.strerror or e})") from None
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` and the JSON-able ``meta`` to the safetensors file ``path``, atomically
    (see :func:`_atomic_write`). Returns the path."""
    path = Path(path)
    try:
        meta_json = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint meta is not JSON-serialisable: {e}") from None
    prepared = _prepare(tensors)
    header = {"format": FORMAT, "meta": meta_json, "sha256": _digest(prepared, meta_json)}
    data = st_save(prepared, metadata=header)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: f.write(data))
    return path


def _parse_header(data: bytes, path: Path) -> dict:
    """The safetensors JSON header of ``data``; CheckpointError if it is not one."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if not (data[8:9] == b"{" and n <= 100 * 2**20):  # safetensors: u64 header size, then '{'
        if data[:2] == b"PK" or (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise CheckpointError(f"checkpoint {path} is a pickle/torch.save file, not safetensors; "
                                  "semiseg never unpickles files (it could run arbitrary code)")
        if len(data) < 9:
            raise CheckpointError(f"checkpoint {path} is corrupt (truncated: {len(data)} bytes)")
        raise CheckpointError(f"checkpoint {path} is not a safetensors file")
    if 8 + n > len(data):
        raise CheckpointError(f"checkpoint {path} is corrupt (truncated header)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {path} is corrupt (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt (unreadable header)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"checkpoint {path} is corrupt (bad tensor table)") from None
    if 8 + n + end > len(data):
        raise CheckpointError(f"checkpoint {path} is corrupt (truncated: {len(data)} of {8 + n + end} bytes)")
    return header


def load_checkpoint(path: PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a checkpoint file, as CPU tensors.

    Raises :class:`CheckpointError` (one line naming the file) when it is missing, not a
    safetensors file (a pickle is recognised and refused, never parsed), truncated, or -- with
    ``verify`` -- its checksum does not match. A safetensors file without semiseg metadata (plain
    weights from elsewhere) loads with ``meta == {}`` and nothing to verify.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                              else f"checkpoint {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e})") from None
    header = _parse_header(data, path)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt ({reason})") from None
    info = header.get("__metadata__") or {}
    if "format" not in info:
        return tensors, {}
    if info["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {info['format']!r}; this semiseg reads {FORMAT!r}")
    meta_json = info.get("meta", "{}")
    if verify and info.get("sha256") != _digest(tensors, meta_json):
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path} is corrupt (unreadable metadata)") from None
    return tensors, meta


# ---------------------------------------------------------------------------------------------
# A run's checkpoints

_ROLLING = re.compile(r"^iter_(\d+)\.safetensors$")
_TMP = re.compile(r"\.safetensors\.tmp-(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours
        return True
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same content as ``src``, atomically: a hard link, or a synced copy."""
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    with suppress(FileNotFoundError):
        tmp.unlink()
    try:
        try:
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 16 * 2**20)
                fout.flush()
                os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        with suppress(OSError):
            tmp.unlink()
        raise CheckpointError(f"cannot write checkpoint {dst} ({e.strerror or e})") from None
    _fsync_dir(dst.parent)


def _rolling(directory: Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the rolling checkpoints in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _ROLLING.match(p.name))]
    return sorted(found, reverse=True)


def _load_newest_valid(directory: Path, stacklevel: int = 3) -> Optional[tuple[Path, dict, dict]]:
    """``last.safetensors``, then the rolling checkpoints newest first: the first that loads and
    verifies. Corrupt ones are skipped with a warning naming them."""
    candidates = [directory / "last.safetensors"] + [p for _, p in _rolling(directory)]
    for path in candidates:
        if not path.exists():
            continue
        try:
            tensors, meta = load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping unusable checkpoint: {e}", RuntimeWarning, stacklevel=stacklevel)
            continue
        return path, tensors, meta
    return None


class CheckpointManager:
    """The checkpoints of one run, in ``run_dir/checkpoints/`` (see the module docstring).

    Only one process (rank 0) should call :meth:`save`."""

    def __init__(self, run_dir: PathLike, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last

    @property
    def last_path(self) -> Path:
        return self.dir / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.dir / "best.safetensors"

    def rolling_path(self, it: int) -> Path:
        return self.dir / f"iter_{it:07d}.safetensors"

    def save(self, it: int, tensors: dict[str, torch.Tensor], meta: dict, is_best: bool = False) -> Path:
        """Write the ``model.*`` weights as ``best`` when ``is_best``, then the full state of
        iteration ``it`` as ``last`` and ``iter_{it}``, then prune. Returns the rolling path.
        The only writer of ``best``.

        ``best`` before ``last``: a kill between the two writes must not leave a ``last`` whose
        ``best_mIoU`` already counts this evaluation while ``best`` still holds older weights (the
        resumed run would never rewrite it); killed before ``last``, the resumed run repeats the
        step and writes the same ``best`` again. ``last`` before the rolling file, so after a
        crash it is never older than a rolling file. Rolling files of later iterations than
        ``it`` belong to an abandoned timeline (a resume that had to fall back past corrupt
        checkpoints) and are removed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()
        meta = {**meta, "iter": meta.get("iter", it)}
        if is_best:
            weights = {k: v for k, v in tensors.items() if k.startswith(WEIGHTS_PREFIX)} or tensors
            save_checkpoint(self.best_path, weights, {**meta, "weights_only": True})
        save_checkpoint(self.last_path, tensors, meta)
        rolling = self.rolling_path(it)
        _link_or_copy(self.last_path, rolling)
        self._prune(it, rolling)
        return rolling

    def _prune(self, it: int, keep: Path) -> None:
        """Keep the ``keep_last`` newest rolling files; ``keep`` (just written) always stays."""
        survivors = []
        for step, path in _rolling(self.dir):  # newest first
            if step > it:
                warnings.warn(f"removing checkpoint {path}: it is newer than the run's current iteration {it}",
                              RuntimeWarning, stacklevel=3)
                with suppress(FileNotFoundError):
                    path.unlink()
            else:
                survivors.append(path)
        for path in survivors[self.keep_last:]:
            if path != keep:
                with suppress(FileNotFoundError):
                    path.unlink()

    def _remove_stale_tmp(self) -> None:
        """Temporary files left by a process killed mid-write (never a live writer's)."""
        for p in self.dir.iterdir():
            m = _TMP.search(p.name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                with suppress(OSError):
                    p.unlink()

    def latest_valid(self) -> Optional[Path]:
        """The newest checkpoint that loads and verifies (``last``, then rolling newest first),
        or None; corrupt ones are skipped with a warning naming them."""
        found = _load_newest_valid(self.dir, stacklevel=4)
        return found[0] if found else None

    def load_latest(self) -> Optional[tuple[Path, dict, dict]]:
        """``(path, tensors, meta)`` of :meth:`latest_valid`, or None if there is none."""
        return _load_newest_valid(self.dir)


def load_weights(path_or_run_dir: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, meta)`` for inference or fine-tuning.

    Accepts a checkpoint file, a run directory or its ``checkpoints/`` folder; from a directory
    it takes ``best.safetensors`` if present, else the newest valid full state (``last``, then
    rolling). The state dict is the ``model.*`` tensors with the prefix removed (all tensors for
    a file without that prefix); ``meta`` holds the resolved config, so a checkpoint is
    self-contained."""
    p = Path(path_or_run_dir)
    if p.is_dir():
        directory = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        best = directory / "best.safetensors"
        if best.exists():
            tensors, meta = load_checkpoint(best)
        else:
            found = _load_newest_valid(directory)
            if found is None:
                raise CheckpointError(f"no usable checkpoint in {directory}: expected best.safetensors, "
                                      "last.safetensors or iter_*.safetensors")
            _, tensors, meta = found
    else:
        tensors, meta = load_checkpoint(p)
    weights = tensors_to_state_dict(tensors, WEIGHTS_PREFIX[:-1])
    return (weights or tensors), meta


def load_init_weights(model: torch.nn.Module, path: str) -> dict:
    """``train.init_from``: copy the network weights of an earlier run (its best checkpoint if
    it has one) into ``model``; optimiser and schedule start fresh.

    Every weight of ``model`` must be in the checkpoint with the same shape. The checkpoint's
    other weights are returned: parts a method attaches later (AllSpark's ``neck.*``), which
    the method takes once it has built them (:meth:`semiseg.methods.Method.take_init_weights`);
    a plain network started from such a run simply leaves them out.
    """
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
    return {k: v for k, v in weights.items() if k not in own}


# ---------------------------------------------------------------------------------------------
# A training run's state


@dataclass
class LoopState:
    """The training loop's counters that a checkpoint carries beside the weights: iterations
    done, the best score so far, non-finite steps skipped, and whether the evaluation after
    ``iteration`` was cut short (a resumed run then does it first)."""
    iteration: int = 0
    best: float = -1.0
    skips: int = 0
    pending_eval: bool = False


class TrainingCheckpoints:
    """What a training run saves and restores: the method's weights (``model.*``), the optimiser,
    the gradient scaler, the RNG states, the :class:`LoopState` and the run's identity (resolved
    config, classes, method, world size) -- through :class:`CheckpointManager`, the only writer
    of ``best``. Only rank 0 writes; every rank restores."""

    def __init__(self, run_dir: PathLike, keep_last: int, method: torch.nn.Module, optimizer, scaler,
                 identity: dict, rank: int = 0, world_size: int = 1,
                 reseed: Optional[Callable[[int], None]] = None):
        self.files = CheckpointManager(run_dir, keep_last=keep_last)
        self.method, self.optimizer, self.scaler = method, optimizer, scaler
        self.identity = identity  # config, num_classes, class_names, method: written into every meta
        self.rank, self.world_size = rank, world_size
        self.reseed = reseed  # seed(iteration) for a resume that cannot restore the RNG exactly
        self.saved_at = -1  # iteration of the newest checkpoint written or restored

    def state(self, loop: LoopState, rng: Optional[dict] = None) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, meta)`` of the run as it is now (``rng``: the generators as captured after
        ``loop.iteration``; by default as they are)."""
        tensors = {f"{WEIGHTS_PREFIX}{k}": v for k, v in self.method.state_dict().items()}
        extra, skeleton = flatten_state({"optim": self.optimizer.state_dict(), "rng": rng or capture_rng_state(),
                                         "scaler": self.scaler.state_dict()}, "state")
        tensors.update(extra)
        meta = {"iter": loop.iteration, "best_mIoU": loop.best, "nonfinite_skips": loop.skips, "state": skeleton,
                "pending_eval": loop.pending_eval, **self.identity, "world_size": self.world_size}
        return tensors, meta

    def save(self, loop: LoopState, is_best: bool = False, rng: Optional[dict] = None) -> None:
        """Checkpoint ``loop.iteration`` (``best`` too when ``is_best``); refuses weights that hold
        NaN/inf, so the newest checkpoint is always one a run can continue from."""
        self.saved_at = loop.iteration
        if self.rank != 0:
            return
        for kind, named in (("parameter", self.method.named_parameters()), ("buffer", self.method.named_buffers())):
            for name, p in named:
                if p.is_floating_point() and not torch.isfinite(p).all():
                    raise TrainingError(f"refusing to checkpoint: {kind} {name} holds NaN/inf at iteration "
                                        f"{loop.iteration}")
        tensors, meta = self.state(loop, rng)
        self.files.save(loop.iteration, tensors, meta, is_best=is_best)

    def restore(self) -> Optional[LoopState]:
        """Load the newest valid checkpoint into the method, optimiser, scaler and RNGs; None when
        the run has none yet."""
        found = self.files.load_latest()
        if found is None:
            return None
        path, tensors, meta = found
        weights = {k[len(WEIGHTS_PREFIX):]: v for k, v in tensors.items() if k.startswith(WEIGHTS_PREFIX)}
        try:
            self.method.load_state_dict(weights)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise CheckpointError(f"checkpoint {path} does not fit this config: {first}") from None
        state = unflatten_state({k: v for k, v in tensors.items() if k.startswith("state.")}, meta["state"])
        self.optimizer.load_state_dict(state["optim"])
        self.scaler.load_state_dict(state["scaler"])
        if meta.get("world_size", 1) == self.world_size == 1:
            restore_rng_state(state["rng"])
        elif self.reseed is not None:  # per-rank generators cannot come from one file: re-derive them
            self.reseed(int(meta["iter"]))
        self.saved_at = int(meta["iter"])
        return LoopState(int(meta["iter"]), float(meta.get("best_mIoU", -1.0)), int(meta.get("nonfinite_skips", 0)),
                         bool(meta.get("pending_eval", False)))
