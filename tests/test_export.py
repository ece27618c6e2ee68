"""``semiseg export --format onnx``: the ONNX graph runs in onnxruntime with dynamic batch and
size and gives the PyTorch logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import tiny

TINY = tiny("method.name=fixmatch", "method.teacher=ema")


@pytest.fixture(scope="module")
def run(train_run):
    return train_run(TINY, "export")


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_onnx_matches_pytorch_with_dynamic_shapes(run, tmp_path, which, cli):
    from semiseg.api import build_method_from_checkpoint

    out = tmp_path / f"{which}.onnx"
    r = cli("export", run, "--format", "onnx", "--out", out, "--model", which)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {out}"
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["semiseg.num_classes"] == "6" or int(props["semiseg.num_classes"]) > 1
    assert props["semiseg.model"] == which

    _, method, _ = build_method_from_checkpoint(run)
    net = method.inference_model(which).eval()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 3, 32, 32), (3, 3, 40, 56), (2, 3, 24, 48)]:  # batch, height and width vary
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            ref = net(x).float().numpy()
        got = sess.run(["logits"], {"image": x.numpy()})[0]
        assert got.shape == ref.shape == (shape[0], method.num_classes, shape[2], shape[3])
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)


def test_export_verify_flag_and_bad_checkpoint(run, tmp_path, cli):
    r = cli("export", run, "--out", tmp_path / "m.onnx", "--verify", "--static")
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not a checkpoint")
    r = cli("export", bad, "--out", tmp_path / "x.onnx")
    assert r.returncode == 4 and not (tmp_path / "x.onnx").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pickle" in lines[0] and str(bad) in lines[0]


def test_export_verify_prints_its_verdict_and_names_the_network(run, tmp_path, cli):
    out = tmp_path / "m.onnx"
    r = cli("export", run, "--out", out, "--verify")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("verified: onnxruntime matches PyTorch on a 2x3x40x56 input (largest difference")
    assert lines[1] == f"wrote {out}"
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["semiseg.model"] == "student"  # what "auto" stood for


def test_a_vit_exports_at_a_fixed_size_and_matches_pytorch(train_run, tmp_path):
    """A plain ViT's position embeddings are resampled with traced constants: its graph is fixed to
    the traced size (batch still dynamic), says so in the metadata, and matches PyTorch there."""
    import json

    from semiseg.api import build_method_from_checkpoint
    from semiseg.export import export_onnx

    vit = [o for o in TINY if not o.startswith(("model.", "data.crop_size", "method."))] + [
        "model.encoder=vit_small_patch14_dinov2", "model.head=dpt", "model.encoder_kwargs.img_size=28",
        "model.encoder_kwargs.embed_dim=32", "model.encoder_kwargs.depth=4", "model.encoder_kwargs.num_heads=2",
        "data.crop_size=28", "train.iters=1", "train.eval_every=1"]
    run_dir = train_run(vit, "export-vit")
    out, said = tmp_path / "vit.onnx", []
    export_onnx(run_dir, out, verify=True, log=said.append)
    assert said[0] == "note: a plain-ViT network runs at the traced input size only: the graph takes 28x28 images " \
                      "(any batch size)"
    assert said[1].startswith("verified: onnxruntime matches PyTorch on a 2x3x28x28 input")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["semiseg.fixed_size"]) == [28, 28]
    _, method, _ = build_method_from_checkpoint(run_dir)
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = method.inference_model().eval()(x).float().numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
