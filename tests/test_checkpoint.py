import math
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from semiseg.engine import checkpoint as C
from semiseg.engine.checkpoint import (CheckpointManager, capture_rng_state, flatten_state, load_checkpoint,
                                       load_weights, restore_rng_state, save_checkpoint, state_dict_to_tensors,
                                       tensors_to_state_dict, unflatten_state)
from semiseg.errors import CheckpointError


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def train_steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(2, 3, 8, 8, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def full_state(model, opt, it=3):
    tensors = state_dict_to_tensors(model.state_dict(), "model")
    extra, skeleton = flatten_state({"optim": opt.state_dict(), "rng": capture_rng_state()}, "state")
    tensors.update(extra)
    return tensors, {"iter": it, "state": skeleton, "config": {"train": {"lr": 0.1}}}


def flip_byte(path, offset_from_end=5):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.unlink()  # a new inode: hard-linked siblings keep the good bytes
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ flatten / unflatten


def test_flatten_roundtrip_keeps_types():
    t = torch.arange(12.0).view(3, 4)
    obj = {
        "state": {0: {"buf": t.T, "step": torch.tensor(3.0)}, 7: {"buf": None}},
        "groups": [{"params": [0, 7], "lr": 0.1, "nesterov": False, "name": "enc", "betas": (0.9, 0.999)}],
        "a.b": torch.ones(2),
        "a": {"b": torch.zeros(2)},  # same dotted path as the key above
        "special": [math.inf, -math.inf, math.nan, 1.0, 2, None, True],
        "arr": np.arange(5, dtype=np.uint32),
        "np_scalar": np.float32(1.5),
    }
    tensors, skeleton = flatten_state(obj, "state")
    assert all(k.startswith("state.") for k in tensors) and len(tensors) == 5
    import json
    skeleton = json.loads(json.dumps(skeleton))  # it really is JSON
    back = unflatten_state(tensors, skeleton)
    assert set(back["state"]) == {0, 7}
    assert torch.equal(back["state"][0]["buf"], t.T) and back["state"][7]["buf"] is None
    assert back["groups"][0]["betas"] == (0.9, 0.999) and back["groups"][0]["params"] == [0, 7]
    assert back["groups"][0]["nesterov"] is False and isinstance(back["groups"][0]["lr"], float)
    assert torch.equal(back["a.b"], torch.ones(2)) and torch.equal(back["a"]["b"], torch.zeros(2))
    sp = back["special"]
    assert sp[0] == math.inf and sp[1] == -math.inf and math.isnan(sp[2]) and sp[3:] == [1.0, 2, None, True]
    assert isinstance(sp[4], int) and not isinstance(sp[4], bool)
    assert isinstance(back["arr"], np.ndarray) and back["arr"].dtype == np.uint32
    assert back["np_scalar"] == 1.5


def test_flatten_rejects_unsupported_values():
    with pytest.raises(TypeError, match="set"):
        flatten_state({"x": {1, 2}})
    with pytest.raises(TypeError, match="key"):
        flatten_state({(1, 2): 3})


# ------------------------------------------------------------------ single file


def test_training_state_roundtrip_resumes_identically(tmp_path):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    train_steps(model, opt, 3, seed=1)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    tensors, meta = full_state(model, opt)
    save_checkpoint(tmp_path / "ck.safetensors", tensors, meta)

    train_steps(model, opt, 2, seed=2)  # the reference continuation
    expected_params = [p.detach().clone() for p in model.parameters()]
    expected_rng = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])

    loaded, meta2 = load_checkpoint(tmp_path / "ck.safetensors")
    assert meta2["iter"] == 3 and meta2["config"] == {"train": {"lr": 0.1}}
    fresh = small_model()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
    fresh.load_state_dict(tensors_to_state_dict(loaded, "model"))
    state = unflatten_state(loaded, meta2["state"])
    fresh_opt.load_state_dict(state["optim"])
    assert all("momentum_buffer" in s for s in fresh_opt.state.values())
    torch.rand(10), np.random.rand(10), random.random()  # disturb the generators
    restore_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected_rng[0])
    assert np.array_equal(np.random.rand(3), expected_rng[1])
    assert [random.random() for _ in range(3)] == expected_rng[2]

    train_steps(fresh, fresh_opt, 2, seed=2)
    for a, b in zip(fresh.parameters(), expected_params):
        assert torch.equal(a, b)


def test_adamw_state_and_odd_tensors_roundtrip(tmp_path):
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, opt, 1, seed=0)
    base = torch.arange(24.0).view(4, 6)
    tensors, skeleton = flatten_state(opt.state_dict(), "optim")
    tensors.update({
        "odd.transposed": base.T,            # non-contiguous
        "odd.view": base[1],                 # a view into a larger storage
        "odd.alias": base,                   # shares storage with both of the above
        "odd.empty": torch.zeros(0, 3),
        "odd.scalar": torch.tensor(7, dtype=torch.int64),
        "odd.bf16": torch.randn(5).to(torch.bfloat16),
        "odd.bool": torch.tensor([True, False]),
    })
    save_checkpoint(tmp_path / "a.safetensors", tensors, {"optim": skeleton})
    loaded, meta = load_checkpoint(tmp_path / "a.safetensors")
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    opt.load_state_dict(unflatten_state(loaded, meta["optim"]))


def test_missing_garbage_truncated_and_flipped_files(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="nope.safetensors does not exist"):
        load_checkpoint(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64).replace(b"{", b"x"))
    with pytest.raises(CheckpointError, match="garbage.safetensors is not a safetensors file"):
        load_checkpoint(garbage)

    good = tmp_path / "good.safetensors"
    save_checkpoint(good, {"model.w": torch.randn(64, 64)}, {"iter": 1})
    data = good.read_bytes()
    for cut in (4, 20, len(data) // 2, len(data) - 1):
        (tmp_path / "trunc.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"trunc.safetensors is corrupt \(truncated"):
            load_checkpoint(tmp_path / "trunc.safetensors")

    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data)
    flip_byte(flipped, 100)  # inside the tensor data
    with pytest.raises(CheckpointError, match=r"flipped.safetensors is corrupt \(checksum mismatch\)"):
        load_checkpoint(flipped)
    tensors, _ = load_checkpoint(flipped, verify=False)  # the bytes are still readable on request
    assert tensors["model.w"].shape == (64, 64)

    meta_flip = tmp_path / "meta.safetensors"
    save_checkpoint(meta_flip, {"model.w": torch.ones(2)}, {"iter": 123456})
    meta_flip.write_bytes(meta_flip.read_bytes().replace(b"123456", b"923456"))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(meta_flip)


def test_header_size_that_looks_like_a_pickle_opcode_still_loads(tmp_path):
    # a header of 0x280 bytes starts the file with b"\x80\x02", like a protocol-2 pickle
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, {"model.w": torch.ones(1)}, {"pad": ""})
    start = 0x280 - int.from_bytes(path.read_bytes()[:8], "little") - 16  # the header grows ~1 byte per char
    for pad in range(max(0, start), start + 48):
        save_checkpoint(path, {"model.w": torch.ones(1)}, {"pad": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.skip("no padding gave a 0x280-byte header")
    assert load_checkpoint(path)[1]["pad"] == "x" * pad


def test_error_messages_are_one_line(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (str(self.marker), "w"))


def test_pickle_files_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"model": _Evil(marker)}, protocol=2))
    torch_file = tmp_path / "evil.pt"
    torch.save({"model": _Evil(marker)}, torch_file)
    disguised = tmp_path / "run" / "checkpoints" / "last.safetensors"
    disguised.parent.mkdir(parents=True)
    disguised.write_bytes(raw.read_bytes())

    for path in (raw, torch_file):
        with pytest.raises(CheckpointError, match="not safetensors"):
            load_checkpoint(path)
    with pytest.warns(RuntimeWarning, match="last.safetensors"):
        assert CheckpointManager(tmp_path / "run").latest_valid() is None
    with pytest.raises(CheckpointError), pytest.warns(RuntimeWarning):
        load_weights(tmp_path / "run")
    assert not marker.exists()

    # the payload is live: a plain unpickle would have run it
    pickle.loads(pickle.dumps(_Evil(tmp_path / "control")))
    assert (tmp_path / "control").exists()


# ------------------------------------------------------------------ atomic writes


def test_failed_replace_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, {"model.w": torch.zeros(3)}, {"iter": 1})

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.os, "replace", broken_replace)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*ck.safetensors"):
        save_checkpoint(path, {"model.w": torch.ones(3)}, {"iter": 2})
    monkeypatch.undo()
    tensors, meta = load_checkpoint(path)
    assert meta["iter"] == 1 and torch.equal(tensors["model.w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from semiseg.engine import checkpoint as C
    path, how = sys.argv[1], sys.argv[2]
    if how == "at_fsync":   # die after the temporary file is written, before the rename
        C.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        C.save_checkpoint(path, {"model.w": torch.full((4,), 2.0)}, {"iter": 2})
    else:                   # keep rewriting big checkpoints until killed from outside
        print("ready", flush=True)
        i = 2
        while True:
            C.save_checkpoint(path, {"model.w": torch.full((4_000_000,), float(i))}, {"iter": i})
            i += 1
""")


def test_kill_mid_write_leaves_a_valid_file(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_KILL_SCRIPT)
    path = tmp_path / "run" / "checkpoints" / "last.safetensors"
    save_checkpoint(path, {"model.w": torch.full((4,), 1.0)}, {"iter": 1})

    r = subprocess.run([sys.executable, str(script), str(path), "at_fsync"], capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    tensors, meta = load_checkpoint(path)
    assert meta["iter"] == 1 and torch.equal(tensors["model.w"], torch.full((4,), 1.0))
    leftovers = [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers  # the dead writer's temporary file ...

    p = subprocess.Popen([sys.executable, str(script), str(path), "loop"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    tensors, meta = load_checkpoint(path)
    assert torch.all(tensors["model.w"] == float(meta["iter"]))

    CheckpointManager(tmp_path / "run").save(9, {"model.w": torch.zeros(1)}, {})
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]  # ... is cleaned up by the next save


# ------------------------------------------------------------------ manager


def test_manager_layout_keep_last_and_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for it in (10, 20, 30, 40):
        train_steps(model, opt, 1, seed=it)
        tensors, meta = full_state(model, opt, it)
        mgr.save(it, tensors, meta, is_best=it == 30)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.safetensors", "iter_0000030.safetensors", "iter_0000040.safetensors",
                     "last.safetensors"]
    assert mgr.latest_valid() == mgr.last_path
    path, tensors, meta = mgr.load_latest()
    assert meta["iter"] == 40 and any(k.startswith("state.") for k in tensors)

    best, best_meta = load_checkpoint(mgr.best_path)
    assert best_meta["iter"] == 30 and best_meta["weights_only"] is True
    assert best and all(k.startswith("model.") for k in best)

    one = CheckpointManager(tmp_path / "one", keep_last=1)
    for it in (1, 2, 3):
        one.save(it, {"model.w": torch.full((2,), float(it))}, {})
    assert [p.name for p in sorted((tmp_path / "one" / "checkpoints").glob("iter_*"))] == ["iter_0000003.safetensors"]


def test_manager_falls_back_past_corrupt_checkpoints(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for it in (1, 2, 3):
        mgr.save(it, {"model.w": torch.full((100,), float(it))}, {"note": f"it{it}"})

    flip_byte(mgr.last_path)
    with pytest.warns(RuntimeWarning, match=r"last.safetensors is corrupt \(checksum mismatch\)"):
        path, tensors, meta = mgr.load_latest()
    assert path == mgr.rolling_path(3) and meta["iter"] == 3

    mgr.rolling_path(3).write_bytes(mgr.rolling_path(3).read_bytes()[:50])  # truncated
    with pytest.warns(RuntimeWarning) as caught:
        assert mgr.latest_valid() == mgr.rolling_path(2)
    assert [str(w.message).split()[4].rsplit("/", 1)[-1] for w in caught] == [
        "last.safetensors", "iter_0000003.safetensors"]
    assert "iter_0000003.safetensors is corrupt (truncated" in str(caught[1].message)
    with pytest.warns(RuntimeWarning):
        _, tensors, meta = mgr.load_latest()
    assert meta == {"note": "it2", "iter": 2} and torch.all(tensors["model.w"] == 2.0)

    # resuming from iteration 2 and saving again drops the abandoned (corrupt) later file
    with pytest.warns(RuntimeWarning, match="iter_0000003"):
        mgr.save(2, {"model.w": torch.full((100,), 2.5)}, {})
    assert not mgr.rolling_path(3).exists() and mgr.latest_valid() == mgr.last_path

    for p in (mgr.last_path, mgr.rolling_path(2), mgr.rolling_path(1)):
        p.unlink()
        p.write_bytes(b"junk")
    with pytest.warns(RuntimeWarning):
        assert mgr.load_latest() is None
    assert CheckpointManager(tmp_path / "empty").load_latest() is None


def test_load_weights_from_file_and_run_dir(tmp_path):
    model = small_model()
    sd = model.state_dict()
    cfg = {"model": {"encoder": "resnet18"}}
    mgr = CheckpointManager(tmp_path / "run")
    tensors = {**state_dict_to_tensors(sd, "model"), "state.x": torch.ones(1)}
    mgr.save(5, tensors, {"config": cfg})

    weights, meta = load_weights(tmp_path / "run")  # no best yet: last
    assert set(weights) == set(sd) and meta["config"] == cfg and meta["iter"] == 5
    small_model().load_state_dict(weights)

    mgr.save(6, {"model.0.weight": torch.zeros(1)}, {"config": cfg, "tag": "best"}, is_best=True)
    mgr.save(7, tensors, {"config": cfg})
    weights, meta = load_weights(tmp_path / "run")  # best wins over a newer last
    assert meta["tag"] == "best" and set(weights) == {"0.weight"}
    _, meta = load_weights(mgr.last_path)
    assert meta["iter"] == 7
    _, meta = load_weights(tmp_path / "run" / "checkpoints")
    assert meta["tag"] == "best"

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*empty"):
        load_weights(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")


def test_foreign_safetensors_weights_load_without_meta(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.ones(2, 2)}, str(tmp_path / "w.safetensors"))
    weights, meta = load_weights(tmp_path / "w.safetensors")
    assert meta == {} and set(weights) == {"conv.weight"}
