"""Hostile inputs, systematically: each one either loads correctly or fails with one line naming
the file (or key) and the reason. Through the CLI where a user meets it (one line on stderr,
non-zero exit, no traceback), through the data layer for the rest.

Decisions: a split file listing an image twice is an error naming the file, line and id (not a
silent dedupe: a duplicate would count double and usually means a botched split); a PNG whose
header claims more pixels than Pillow's decompression-bomb limit is a DataError before any
pixel is decoded; a pickle checkpoint is refused from its first bytes and never unpickled.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg.data.datasets import read_split_file
from semiseg.data.io import LabelMap, load_pair, read_image, read_mask
from semiseg.errors import DataError

from conftest import as_sets, tiny

H, W = 6, 8
MAP3 = LabelMap.identity(3)


def _rgb():
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _png(path: Path, array, mode=None) -> Path:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _jpeg_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def _bomb(path: Path, w: int = 100_000, h: int = 100_000) -> Path:
    """A tiny PNG whose header claims w x h pixels."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def _palette_mask(path: Path) -> Path:
    m = Image.fromarray(np.tile(np.array([0, 1, 2, 1], np.uint8), (H, W // 4)), mode="P")
    m.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    m.save(path)
    return path


def _exif_jpeg(path: Path) -> Path:
    im = Image.fromarray(np.zeros((H, W, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW when shown
    im.save(path, exif=exif)
    return path


# (name, write image, write mask, expected: ("ok", image size, mask values) or ("error", fragments))
def ok(size, values):
    return ("ok", size, values)


def err(*fragments):
    return ("error", fragments)


CASES = [
    ("corrupt png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), lambda p: _png(p, np.ones((H, W), np.uint8)),
     err("img", "cannot be read")),
    ("corrupt jpeg", lambda p: p.write_bytes(_jpeg_bytes(_rgb())[:50]), lambda p: _png(p, np.ones((H, W), np.uint8)),
     err("img", "cannot be read")),
    ("zero-byte image", lambda p: p.write_bytes(b""), lambda p: _png(p, np.ones((H, W), np.uint8)),
     err("img", "cannot be read")),
    ("zero-byte mask", lambda p: _png(p, _rgb()), lambda p: p.write_bytes(b""), err("msk", "cannot be read")),
    ("16-bit mask, valid values", lambda p: _png(p, _rgb()), lambda p: _png(p, np.full((H, W), 2, np.uint16)),
     ok((W, H), {2})),
    ("16-bit mask, value 1000", lambda p: _png(p, _rgb()), lambda p: _png(p, np.full((H, W), 1000, np.uint16)),
     err("msk", "values [1000]")),
    ("palette mask: indices, not colours", lambda p: _png(p, _rgb()), _palette_mask, ok((W, H), {0, 1, 2})),
    ("mask values outside the classes", lambda p: _png(p, _rgb()), lambda p: _png(p, np.full((H, W), 7, np.uint8)),
     err("msk", "values [7]", "[0, 3)")),
    ("void value kept as ignore", lambda p: _png(p, _rgb()), lambda p: _png(p, np.full((H, W), 255, np.uint8)),
     ok((W, H), {255})),
    ("RGBA image", lambda p: _png(p, np.dstack([_rgb(), np.full((H, W), 9, np.uint8)])),
     lambda p: _png(p, np.ones((H, W), np.uint8)), ok((W, H), {1})),
    ("grayscale image", lambda p: _png(p, _rgb()[..., 0]), lambda p: _png(p, np.ones((H, W), np.uint8)), ok((W, H), {1})),
    ("colour (RGB) mask", lambda p: _png(p, _rgb()), lambda p: _png(p, _rgb()), err("msk", "colour image")),
    ("decompression bomb image", _bomb, lambda p: _png(p, np.ones((H, W), np.uint8)),
     err("img", "cannot be read", "exceeds limit")),
    ("decompression bomb mask", lambda p: _png(p, _rgb()), _bomb, err("msk", "cannot be read", "exceeds limit")),
    # EXIF orientation 6: a W x H JPEG shown as H x W; the mask (no EXIF) must be H x W too
    ("EXIF-rotated jpeg", _exif_jpeg, lambda p: _png(p, np.ones((W, H), np.uint8)), ok((H, W), {1})),
    ("size mismatch", lambda p: _png(p, _rgb()), lambda p: _png(p, np.ones((H + 1, W), np.uint8)),
     err("img", "msk", "same size")),
]


@pytest.mark.parametrize("name,write_image,write_mask,expected", CASES, ids=[c[0] for c in CASES])
def test_data_layer_table(tmp_path, name, write_image, write_mask, expected):
    image, mask = tmp_path / "img.png", tmp_path / "msk.png"
    if "jpeg" in name:
        image = tmp_path / "img.jpg"
    write_image(image)
    write_mask(mask)
    if expected[0] == "ok":
        img, m = load_pair(image, mask, MAP3)
        assert img.mode == "RGB" and img.size == expected[1] and m.size == expected[1]
        assert set(np.unique(np.asarray(m)).tolist()) == expected[2]
        return
    with pytest.raises(DataError) as e:
        load_pair(image, mask, MAP3)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for fragment in expected[1]:
        assert fragment in msg, (fragment, msg)


def test_bomb_is_refused_before_decoding(tmp_path):
    # header-only check: 10^10 claimed pixels fail fast, for images and masks alike
    for reader in (read_image, read_mask):
        with pytest.raises(DataError, match="bomb.png"):
            reader(_bomb(tmp_path / "bomb.png"))


def _folder(tmp_path: Path, n: int = 3) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        _png(root / "images" / f"a{i}.png", _rgb())
        _png(root / "masks" / f"a{i}.png", np.ones((H, W), np.uint8))
    return root


@pytest.mark.parametrize("lines,fragments", [
    (["images/a0.png masks/a0.png", "images/a1.png masks/a1.png", "images/a0.png masks/a0.png"],
     ["list.txt line 3", "duplicate id 'images/a0.png'", "line 1"]),
    (["images/a0.png", "images/a0.png"], ["line 2", "duplicate"]),
    (["../outside.png masks/a0.png"], ["list.txt line 1", "'../outside.png'", "outside the dataset root"]),
    (["images/a0.png /etc/passwd"], ["line 1", "'/etc/passwd'", "outside the dataset root"]),
    (["images/../../x.png"], ["outside the dataset root"]),
])
def test_split_file_duplicates_and_escaping_paths(tmp_path, lines, fragments):
    root = _folder(tmp_path)
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        read_split_file("list.txt", root)
    msg = str(e.value)
    assert "\n" not in msg and str(root / "list.txt") in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


# ------------------------------------------------------------------------------------------ CLI
TINY = tiny("train.iters=1", "train.eval_every=1")
SETS = as_sets(TINY)


def _one_line(r, code, *fragments):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("semiseg: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.fixture(scope="module")
def run(train_run):
    return train_run(TINY, "bad")


@pytest.mark.parametrize("override,fragments", [
    ("train.iters=abc", ["train.iters"]),
    ("train.lr=[1,2]", ["train.lr"]),
    ("data.crop_size=-3", ["data.crop_size"]),
    ("train.nonfinite=maybe", ["train.nonfinite"]),
])
def test_config_wrong_types(override, fragments):
    from semiseg.config import load_config
    from semiseg.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config("synthetic", TINY + [override])
    assert "\n" not in str(e.value) and all(f in str(e.value) for f in fragments)


def test_config_wrong_type_cli(tmp_path, cli):
    _one_line(cli("train", "synthetic", *SETS, "--set", "train.iters=abc", "--out", tmp_path / "r"), 2,
              "train.iters")
    assert not (tmp_path / "r").exists()


def test_config_file_wrong_type_cli(tmp_path, cli):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  batch_size: many\n")
    # in a real process: the exit status a shell sees (a config error loads no torch: quick)
    _one_line(cli("train", cfg, "--out", tmp_path / "r", subprocess=True), 2, str(cfg), "train.batch_size")


def test_mismatching_checkpoint_eval_init_from_and_resume(run, tmp_path, cli):
    ckpt = run / "checkpoints" / "best.safetensors"
    # eval of a checkpoint with an override that changes the network
    _one_line(cli("eval", ckpt, "--set", "model.encoder=test_convnext"), 4, str(ckpt))
    # fine-tuning from a checkpoint of another encoder / another number of classes
    _one_line(cli("train", "synthetic", *SETS, "--set", f"train.init_from={ckpt}",
                   "--set", "model.decoder_channels=16", "--out", tmp_path / "ft"), 4, "init_from", str(ckpt))
    # --resume with another network: refused before the checkpoint is read (a resumed run keeps its config)
    import shutil

    shutil.copytree(run, tmp_path / "res")
    _one_line(cli("train", "synthetic", *SETS, "--set", "train.iters=3", "--set", "model.encoder=test_efficientnet",
                   "--out", tmp_path / "res", "--resume"), 2, "model.encoder", "test_efficientnet")
    # a run whose config.yaml was edited so that its checkpoint no longer fits
    record = tmp_path / "res" / "config.yaml"
    record.write_text(record.read_text().replace("encoder: test_resnet", "encoder: test_efficientnet"))
    _one_line(cli("train", "--out", tmp_path / "res", "--resume", "--set", "train.iters=3"), 4,
              "does not fit this config")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("use", ["eval", "init_from", "export"])
def test_pickle_checkpoint_is_refused_without_running_it(tmp_path, use, cli):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pth"
    evil.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}, protocol=2))
    torch_style = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1)}, torch_style)  # a zip archive: refused too
    for path in (evil, torch_style) if use == "eval" else (evil,):
        if use == "eval":
            r = cli("eval", path)
        elif use == "init_from":
            r = cli("train", "synthetic", *SETS, "--set", f"train.init_from={path}", "--out", tmp_path / "r")
        else:
            r = cli("export", path, "--out", tmp_path / "m.onnx")
        _one_line(r, 4, str(path), "pickle")
    assert not marker.exists()
