"""Shared fixtures: an isolated dataset cache and tiny generated datasets."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semiseg.config import DataConfig


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Generated data (the synthetic dataset) goes to a per-session folder, not ~/.cache."""
    old = os.environ.get("SEMISEG_CACHE")
    os.environ["SEMISEG_CACHE"] = str(tmp_path_factory.mktemp("semiseg-cache"))
    yield Path(os.environ["SEMISEG_CACHE"])
    if old is None:
        os.environ.pop("SEMISEG_CACHE", None)
    else:
        os.environ["SEMISEG_CACHE"] = old


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_folder_dataset(root: Path, n: int = 12, size: tuple[int, int] = (24, 16), num_classes: int = 3,
                         unlabeled: int = 0, lists: bool = False, seed: int = 0, void: bool = False) -> Path:
    """A ``folder`` dataset at ``root``. Image ``i`` is random noise; its mask holds class ``i %
    num_classes`` in the left half and random classes elsewhere, so every class occurs (``void``:
    the first four pixels of the top row are 255). ``lists`` writes ``train.txt`` (all but the last
    two images) and ``val.txt`` (the last two)."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        write_png(root / "images" / f"img{i:03d}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        mask = rng.integers(0, num_classes, (h, w), dtype=np.uint8)
        mask[:, : w // 2] = i % num_classes
        if void:
            mask[0, :4] = 255
        write_png(root / "masks" / f"img{i:03d}.png", mask)
    for i in range(unlabeled):
        write_png(root / "unlabeled" / f"u{i:03d}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if lists:
        names = [f"img{i:03d}" for i in range(n)]
        line = "images/{0}.png masks/{0}.png\n".format
        (root / "train.txt").write_text("".join(line(x) for x in names[: n - 2]))
        (root / "val.txt").write_text("".join(line(x) for x in names[n - 2:]))
    return root


@pytest.fixture
def make_folder_dataset(tmp_path):
    """Factory for a ``folder`` dataset under ``tmp_path``: ``make_folder_dataset(**keys)`` -> root,
    with the keys of :func:`write_folder_dataset`."""
    counter = iter(range(1000))

    def make(**keys) -> Path:
        return write_folder_dataset(tmp_path / f"folder{next(counter)}", **keys)

    return make


@pytest.fixture
def folder_config():
    """``folder_config(root, **keys)`` -> a DataConfig for a folder dataset (3 classes by default)."""

    def make(root: Path, **keys) -> DataConfig:
        return DataConfig(**{"dataset": "folder", "root": str(root), "num_classes": 3, "crop_size": 16, **keys})

    return make


@contextmanager
def torch_settings_restored():
    """Torch's thread count and deterministic-algorithms setting (``train.deterministic=true`` and
    ``train.threads`` change them for the process) as they were on entry, restored on exit."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


@pytest.fixture(scope="session")
def train_run(tmp_path_factory):
    """``train_run(overrides, name)`` -> the directory of a finished training run of the config
    ``overrides`` (one thread, no progress bar), for tests that need a real run to act on. Torch's
    thread count and deterministic-algorithms setting are restored after."""

    def train(overrides: list[str], name: str = "run") -> Path:
        import torch

        from semiseg.config import load_config
        from semiseg.engine.trainer import Trainer

        with torch_settings_restored():
            torch.set_num_threads(1)
            out = tmp_path_factory.mktemp(name) / "run"
            Trainer(load_config(None, overrides), out, progress=False).fit()
        return out

    return train


def loop_references():
    """``tests/test_methods_consistency.py`` as a module (not collected again): its explicit-loop
    references (``ref_pseudo``, ``ref_cutmix``, ``ref_unsup``, ``ref_ce``, ``nll``, ``close``; images of
    ``H x W`` = 5 x 6, ``K`` = 3 classes) for the other methods' tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_loop_references", Path(__file__).parent / "test_methods_consistency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ the tiny config
TINY = [
    "data.dataset=synthetic", "data.synthetic.num_train=16", "data.synthetic.num_val=2",
    "data.synthetic.image_size=40", "data.crop_size=32", "data.labeled=6", "data.workers=0",
    "model.encoder=test_resnet", "model.decoder_channels=8", "train.batch_size=2", "train.iters=2",
    "train.eval_every=2", "train.log_every=1",
]
"""The overrides of the tiny training run the tests share: 16 generated 40x40 images (6 of them
labelled, 2 for validation), 32x32 crops, timm's ``test_resnet`` encoder with an 8-channel head
(a few ms per step on one core), two iterations of batch 2, evaluated at the end. Tests whose
subject is not the encoder use it; those about a real encoder name theirs."""


def tiny(*extra: str) -> list[str]:
    """:data:`TINY` followed by ``extra`` (a later override of the same key wins)."""
    return [*TINY, *extra]


def as_sets(overrides) -> list[str]:
    """Overrides as command-line arguments: ``--set KEY=VALUE`` for each."""
    return [a for o in overrides for a in ("--set", str(o))]


# -------------------------------------------------------------------------------- CLI calls
class CliResult:
    """What a ``semiseg`` command did: ``returncode``, ``stdout``, ``stderr`` (the attributes of a
    :class:`subprocess.CompletedProcess`), for both the in-process and the subprocess call."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def __iter__(self):  # rc, out, err = cli(...)
        return iter((self.returncode, self.stdout, self.stderr))

    def __repr__(self) -> str:
        return f"CliResult(returncode={self.returncode!r}, stderr={self.stderr[-2000:]!r})"


def cli_subprocess(*args, timeout: float = 300, env: dict | None = None) -> CliResult:
    """``python -m semiseg ARGS`` in a fresh interpreter with one thread: for the tests of the
    entry point itself, exit codes seen by a shell, and what a new process imports."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run([sys.executable, "-m", "semiseg", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    return CliResult(r.returncode, r.stdout, r.stderr)


@pytest.fixture
def cli(capsys):
    """``cli(*args)`` -> :class:`CliResult` of ``semiseg ARGS``, run in this process through
    ``semiseg.cli.main`` (an argparse ``SystemExit`` becomes the return code), with torch's thread
    count and deterministic-algorithms setting restored after; ``cli(*args, subprocess=True)`` runs
    ``python -m semiseg`` instead."""
    from semiseg.cli import main

    def call(*args, subprocess: bool = False, timeout: float = 300) -> CliResult:
        if subprocess:
            return cli_subprocess(*args, timeout=timeout)
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: usage errors and --help
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    with torch_settings_restored():
        yield call
