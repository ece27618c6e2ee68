"""``train.precision`` and ``train.channels_last``: what ``auto`` resolves to, and that the trainer
really runs the chosen precision (autocast dtype of the forward, fp32 master weights) and layout."""

import pytest
import torch

import semiseg.engine.precision as P
import semiseg.engine.trainer as T
from semiseg.config import load_config
from semiseg.errors import SemisegError

from conftest import tiny

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
SAPPHIRE = "flags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"
TINY = tiny("train.iters=1")


def test_native_bf16_is_read_from_the_cpu_flags():
    assert P.cpu_has_native_bf16(ZEN4)
    assert P.cpu_has_native_bf16(SAPPHIRE)
    assert not P.cpu_has_native_bf16(ZEN3)
    assert not P.cpu_has_native_bf16("")  # no flags line: assume emulation


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    assert P.resolve_precision("auto", torch.device("cpu")) == expected


def test_auto_keeps_fp32_on_cuda_and_explicit_values_pass_through(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    assert P.resolve_precision("auto", torch.device("cuda", 0)) == "fp32"
    for p in ("fp32", "bf16", "fp16"):
        assert P.resolve_precision(p, torch.device("cpu")) == p


def test_auto_is_the_default():
    assert load_config(None, []).train.precision == "auto"


def test_fp16_on_the_cpu_is_a_config_error():
    with pytest.raises(SemisegError, match=r"train\.precision.*fp16 needs CUDA"):
        P.autocast_factory("fp16", torch.device("cpu"))


def test_unknown_precision_names_the_key():
    with pytest.raises(SemisegError, match=r"train\.precision"):
        load_config(None, ["train.precision=fp8"])


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_trainer_forward_runs_in_the_chosen_precision(tmp_path, precision, dtype):
    cfg = load_config(None, TINY + [f"train.precision={precision}"])
    trainer = T.Trainer(cfg, run_dir=tmp_path / "run", progress=False)
    trainer.build()
    assert trainer.precision == precision
    model = trainer.method.model
    with trainer.autocast():
        out = model(torch.randn(2, 3, 32, 32, device=trainer.device))
    assert out.dtype == dtype
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_converts_weights_and_batches(tmp_path, channels_last):
    cfg = load_config(None, TINY + [f"train.channels_last={channels_last}"])
    assert load_config(None, []).train.channels_last  # the default
    trainer = T.Trainer(cfg, run_dir=tmp_path / "run", progress=False)
    trainer.build()
    convs = [p for p in trainer.method.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) == channels_last for p in convs)
    batch = P.to_device({"image": torch.randn(2, 3, 8, 8), "mask": torch.zeros(2, 8, 8)}, torch.device("cpu"),
                        channels_last=channels_last)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert batch["mask"].is_contiguous()



@pytest.fixture
def restore_determinism():
    """Put PyTorch's global determinism switches and ``CUBLAS_WORKSPACE_CONFIG`` back after a
    test that sets them; the test starts without the variable."""
    import os

    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    cublas = os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    yield os.environ
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = state[2], state[3]
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    if cublas is not None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def test_deterministic_is_strict_on_the_cpu(restore_determinism):
    P.set_deterministic(torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in restore_determinism


def test_deterministic_on_cuda_warns_for_kernels_without_a_deterministic_version(restore_determinism):
    """On CUDA the summed cross-entropy (``nll_loss2d`` forward) has no deterministic kernel: strict
    mode stopped every run at its first loss (seen on an H200). The mode warns there instead, with
    deterministic cuDNN and cuBLAS's workspace setting."""
    P.set_deterministic(torch.device("cuda", 0))
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert restore_determinism["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    restore_determinism["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    P.set_deterministic(torch.device("cuda", 0))
    assert restore_determinism["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # a user's own setting stays
