"""Model layer: shapes, widths from feature_info, ASPP rates, UniPerb, parameter groups,
encoder weights from local files and the errors a user can cause. Random init only."""

import timm
import torch
import pytest
from safetensors.torch import save_file
from torch import nn

from semiseg.config import ModelConfig
from semiseg.errors import CheckpointError, ConfigError, SemisegError
from semiseg.models import DeepLabV3PlusHead, SegFormerHead, SegModel, build_model
from semiseg.methods.perturbations import feature_perturbation

WIDTH = 32  # small head widths keep the tests fast


def make(encoder="resnet18", head="deeplabv3plus", output_stride=16, num_classes=3, **kw) -> SegModel:
    torch.manual_seed(0)
    cfg = ModelConfig(encoder=encoder, head=head, output_stride=output_stride,
                      decoder_channels=WIDTH, embed_dim=WIDTH, **kw)
    return build_model(cfg, num_classes)


@pytest.mark.parametrize("encoder,head,output_stride", [
    ("resnet18", "deeplabv3plus", 16),
    ("resnet18", "deeplabv3plus", 8),
    ("resnet18", "segformer", 16),
    ("pvt_v2_b0", "segformer", 32),
    ("pvt_v2_b0", "deeplabv3plus", 32),
    ("convnext_atto", "deeplabv3plus", 8),
    ("mobilenetv3_small_050", "segformer", 16),
])
def test_output_shapes(encoder, head, output_stride):
    model = make(encoder, head, output_stride).eval()
    assert min(model.feature_reductions) == 4 and max(model.feature_reductions) == output_stride
    for h, w in [(64, 64), (97, 75), (180, 240)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            feats = model.encode(x)
            logits, dec = model.decode(feats, return_features=True)
            assert model(x).shape == (2, 3, h, w)
        assert [f.shape[1] for f in feats] == model.feature_channels
        for f, r in zip(feats, model.feature_reductions):
            assert abs(f.shape[-2] - h / r) < 1 and abs(f.shape[-1] - w / r) < 1
        assert logits.shape == (2, 3, *feats[0].shape[-2:])
        assert dec.shape == (2, WIDTH, *feats[0].shape[-2:])


def test_resnet_stages_at_output_stride_16():
    model = make("resnet18", output_stride=16)
    assert model.feature_reductions == [4, 8, 16, 16]
    assert model.feature_channels == [64, 128, 256, 512]
    feats = model.eval().encode(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (8, 8), (4, 4), (4, 4)]


@pytest.mark.parametrize("encoder", ["resnet18", "convnext_atto", "mobilenetv3_small_050"])
def test_head_widths_follow_feature_info(encoder):
    deeplab = make(encoder, "deeplabv3plus")
    channels = deeplab.encoder.feature_info.channels()
    assert deeplab.feature_channels == channels
    assert deeplab.decoder.reduce[0].in_channels == channels[0]
    assert all(b.in_channels == channels[-1] for b in deeplab.decoder.aspp.modules() if isinstance(b, nn.Conv2d)
               and b is not deeplab.decoder.aspp.project[0])
    segformer = make(encoder, "segformer")
    assert [conv.in_channels for conv in segformer.decoder.embed] == channels


@pytest.mark.parametrize("output_stride,rates", [(8, (12, 24, 36)), (16, (6, 12, 18)), (32, (3, 6, 9))])
def test_aspp_rates_follow_output_stride(output_stride, rates):
    head = DeepLabV3PlusHead([64, 512], [4, output_stride], num_classes=2, output_stride=output_stride, channels=8)
    assert head.aspp.rates == rates
    dilations = [m.dilation[0] for m in head.aspp.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert tuple(dilations) == rates



def test_model_aspp_rates_replace_the_strides_rates_and_bad_rates_are_refused():
    from semiseg.config import load_config
    from semiseg.errors import ConfigError

    head = make(aspp_rates=[1, 2, 3]).decoder
    assert head.aspp.rates == (1, 2, 3)
    assert [m.dilation[0] for m in head.aspp.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)] == [1, 2, 3]
    with pytest.raises(ConfigError, match="aspp_rates"):
        load_config({"model": {"aspp_rates": [0, 2, 3]}})
    with pytest.raises(ConfigError, match="aspp_rates"):
        load_config({"model": {"aspp_rates": [2, 3]}})


def test_heads_follow_official_layout():
    deeplab = DeepLabV3PlusHead([24, 40, 80], [4, 8, 16], num_classes=5, output_stride=16, channels=16)
    assert deeplab.in_index == (0, 2)
    assert deeplab.reduce[0].out_channels == 48
    assert deeplab.fuse[0][0].in_channels == 16 + 48 and deeplab.fuse[1][0].kernel_size == (3, 3)
    assert isinstance(deeplab.dropout, nn.Identity)  # UniMatch: no dropout before the classifier
    segformer = SegFormerHead([24, 40, 80], num_classes=5, embed_dim=16, dropout=0.1)
    assert segformer.in_index == (0, 1, 2)
    assert segformer.fuse[0].in_channels == 3 * 16
    assert isinstance(segformer.dropout, nn.Dropout2d) and segformer.dropout.p == 0.1
    assert make(head="segformer", dropout=0.25).decoder.dropout.p == 0.25


@pytest.mark.parametrize("head", ["deeplabv3plus", "segformer"])
def test_feature_perturbation(head):
    model = make("resnet18", head)
    x = torch.randn(2, 3, 50, 70)

    model.train()
    torch.manual_seed(1)
    logits, logits_fp = feature_perturbation(model, x)
    assert logits.shape == logits_fp.shape == (2, 3, 50, 70)
    assert not torch.allclose(logits, logits_fp)

    # Without dropout the two halves are the clean decode: a batch of two identical copies
    # gives BatchNorm the same statistics as the clean batch alone.
    if head == "deeplabv3plus":  # the SegFormer head has its own classifier dropout
        clean, same = feature_perturbation(model, x, p=0.0)
        reference = model.decode(model.encode(x), out_size=x.shape[-2:])
        assert torch.allclose(clean, reference, atol=1e-4) and torch.allclose(same, reference, atol=1e-4)

    # In eval mode the perturbation does not exist: both halves equal the plain forward.
    model.eval()
    with torch.no_grad():
        logits, logits_fp = feature_perturbation(model, x)
        reference = model.decode(model.encode(x), out_size=x.shape[-2:])
    assert torch.allclose(logits, reference, atol=1e-5) and torch.allclose(logits_fp, reference, atol=1e-5)


def test_feature_perturbation_drops_channels_of_the_features_the_head_reads():
    model = make("resnet18").train()
    seen = []
    model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    p = 0.3
    torch.manual_seed(2)
    feature_perturbation(model, torch.randn(4, 3, 64, 64), p=p)
    feats = seen[0]
    assert [f.shape[0] for f in feats] == [8, 4, 4, 8]  # only the low-level and deepest are doubled
    dropped, total = 0, 0
    for f in (feats[0], feats[-1]):
        clean, perturbed = f.chunk(2)
        live = clean.flatten(2).abs().amax(-1) > 0  # channels not already all zero
        zero = perturbed.flatten(2).abs().amax(-1) == 0
        kept = torch.isclose(perturbed, clean / (1 - p), atol=1e-6).flatten(2).all(-1)
        assert bool((zero | kept).all())  # every channel is dropped or rescaled, nothing else
        dropped += int((zero & live).sum())
        total += int(live.sum())
    assert abs(dropped / total - p) < 0.06  # ~2300 channels: the standard error is ~0.01


def test_param_groups_partition_parameters():
    for head in ("deeplabv3plus", "segformer"):
        model = make(head=head)
        model.neck = nn.Conv2d(512, 512, 1)
        encoder, others = model.param_groups()
        ids = [id(p) for p in encoder + others]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))
        assert {id(p) for p in encoder} == {id(p) for p in model.encoder.parameters()}
        assert {id(p) for p in model.neck.parameters()} <= {id(p) for p in others}


def test_encode_neck_decode_are_separable():
    model = make().eval()
    model.neck = nn.Conv2d(512, 512, 1)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        feats = model.encode(x)
        feats[-1] = model.neck(feats[-1])
        by_hand = model.decode(feats, out_size=x.shape[-2:])
        assert torch.equal(by_hand, model(x))
        model.neck = None
        assert not torch.allclose(by_hand, model(x))


def test_unknown_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match=r"key 'model.encoder'.*unknown timm model 'resnet-18'.*resnet18"):
        make("resnet-18")


def test_output_stride_the_encoder_cannot_give():
    with pytest.raises(ConfigError, match=r"key 'model.output_stride'.*'pvt_v2_b0'.*set model.output_stride to 32"):
        make("pvt_v2_b0", output_stride=16)


def test_pretrained_from_full_model_safetensors(tmp_path):
    torch.manual_seed(3)
    full = timm.create_model("resnet18", pretrained=False)  # classifier model, with fc.*
    path = tmp_path / "resnet18.safetensors"
    save_file(full.state_dict(), str(path))
    model = make("resnet18", pretrained=str(path))
    own = model.encoder.state_dict()
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in own.items())


def test_pretrained_flattened_module_names(tmp_path):
    # timm's features_only wrapper renames convnext's `stages.0` to `stages_0`; a classifier
    # state dict must still load, which the deepest feature at OS32 proves.
    torch.manual_seed(4)
    full = timm.create_model("convnext_atto", pretrained=False).eval()
    path = tmp_path / "convnext.safetensors"
    save_file(full.state_dict(), str(path))
    model = make("convnext_atto", output_stride=32, pretrained=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.encode(x)[-1], full.forward_features(x), atol=1e-5)


def test_pretrained_pth_with_module_prefix(tmp_path):
    source = make("resnet18")
    source.encoder.layer1[0].conv1.weight.data.fill_(0.5)
    state = {f"module.{k}": v for k, v in source.encoder.state_dict().items()}
    path = tmp_path / "encoder.pth"
    torch.save({"state_dict": state}, path)
    model = make("resnet18", pretrained=str(path))
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v)


def test_pretrained_file_that_does_not_fit(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(path))
    with pytest.raises(CheckpointError, match=r"resnet18\.safetensors.*'resnet34'.*missing.*layer1\.2\."):
        make("resnet34", pretrained=str(path))

    state = timm.create_model("resnet18").state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"conv1\.weight has shape \(64, 3, 3, 3\)"):
        make("resnet18", pretrained=str(path))

    with pytest.raises(SemisegError, match=r"missing\.pth.*does not exist"):
        make("resnet18", pretrained=str(tmp_path / "missing.pth"))


def test_pretrained_true_without_network(monkeypatch):
    real = timm.create_model

    def no_hub(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_hub)
    with pytest.raises(SemisegError, match=r"could not fetch pretrained weights for encoder 'resnet18' \(no network\?\)"):
        make("resnet18", pretrained=True)


def test_eval_mode_restores_every_submodule_also_after_an_error():
    from semiseg.models.common import eval_mode, gather_from_ranks

    net = nn.Sequential(nn.BatchNorm2d(2), nn.Dropout(0.5))
    net[1].eval()  # a submodule in its own mode
    with pytest.raises(RuntimeError), eval_mode(net):
        assert not any(m.training for m in net.modules())
        raise RuntimeError
    assert [m.training for m in net.modules()] == [True, True, False]
    rows = torch.ones(3, 2)
    assert gather_from_ranks(rows) is rows  # no process group: a no-op


def test_every_config_head_name_has_a_registered_builder():
    from semiseg.config import HEADS
    from semiseg.models.heads import HEAD_BUILDERS, register_head

    assert set(HEAD_BUILDERS) == set(HEADS)
    assert isinstance(make(head="segformer").decoder, SegFormerHead)

    @register_head("probe")  # a new head needs a builder here and its name in semiseg.config.schema.HEADS
    def build_probe(model_cfg, channels, reductions, num_classes):
        return nn.Identity()

    try:
        assert HEAD_BUILDERS["probe"] is build_probe
    finally:
        del HEAD_BUILDERS["probe"]


# ---------------------------------------------------------------------------------------------
# Plain ViT encoders (random init only: pretrained true would need the hub)

TINY_VIT = {"img_size": 28, "embed_dim": 32, "depth": 4, "num_heads": 2}


def make_vit(encoder="vit_small_patch14_dinov2", head="deeplabv3plus", **kw) -> SegModel:
    return make(encoder, head, encoder_kwargs={**TINY_VIT, **kw.pop("encoder_kwargs", {})}, **kw)


@pytest.mark.parametrize("encoder,patch,prefix,norm", [
    ("vit_small_patch14_dinov2", 14, 1, None),  # class token; default: through the final norm
    ("vit_small_patch14_dinov2", 14, 1, False),  # the raw block outputs
    ("vit_small_patch14_reg4_dinov2", 14, 5, None),  # class token + 4 registers
    ("vit_small_patch16_224", 16, 1, None),
    ("vit_small_patch16_224", 16, 1, False),
])
def test_vit_encoder_reads_blocks_as_maps_at_the_patch_stride(encoder, patch, prefix, norm):
    model = make_vit(encoder, encoder_norm=norm).eval()
    assert model.patch_size == patch and model.feature_reductions == [patch] * 4
    assert model.feature_channels == [32] * 4
    vit = model.encoder.model
    assert vit.num_prefix_tokens == prefix
    assert isinstance(vit.norm, nn.LayerNorm) == (norm is None)  # features_only prunes the norm
    blocks = []
    for block in vit.blocks:
        block.register_forward_hook(lambda mod, inp, out: blocks.append(out))
    for h, w in [(2 * patch, 2 * patch), (4 * patch, 3 * patch)]:  # not only the img_size it was built for
        blocks.clear()
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            feats = model.encode(x)
        assert [tuple(f.shape) for f in feats] == [(2, 32, h // patch, w // patch)] * 4
        # each map is its block's output (through the final norm unless encoder_norm is false)
        # without the prefix tokens, patch tokens row by row
        for f, tokens in zip(feats, blocks):
            if norm is None:
                with torch.no_grad():
                    tokens = vit.norm(tokens)
            expected = tokens[:, prefix:].reshape(2, h // patch, w // patch, 32).permute(0, 3, 1, 2)
            assert torch.equal(f, expected)


@pytest.mark.parametrize("head", ["deeplabv3plus", "segformer"])
@pytest.mark.parametrize("encoder,patch", [("vit_small_patch14_dinov2", 14), ("vit_small_patch16_224", 16)])
def test_vit_segmodel_logits_at_input_size(encoder, patch, head):
    model = make_vit(encoder, head)
    x = torch.randn(2, 3, 3 * patch, 2 * patch)
    model.train()
    logits = model(x)
    assert logits.shape == (2, 3, 3 * patch, 2 * patch)
    logits.mean().backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 4 * patch, 5 * patch)).shape == (1, 3, 4 * patch, 5 * patch)
    clean, perturbed = feature_perturbation(model.train(), x)
    assert clean.shape == perturbed.shape == logits.shape


@pytest.mark.parametrize("head", ["deeplabv3plus", "segformer"])
def test_vit_whole_image_of_any_size_is_padded_and_the_padding_cut_off(head):
    """Evaluation on whole images: sides that are no multiple of the patch size are padded at the
    bottom and right, and the logits are those of the padded image without the padding."""
    model = make_vit(head=head).eval()
    x = torch.randn(1, 3, 48, 61)
    with torch.no_grad():
        logits = model(x)
        padded = model(torch.nn.functional.pad(x, (0, 9, 0, 8)))  # 56 x 70: multiples of 14
    assert logits.shape == (1, 3, 48, 61)
    assert torch.allclose(logits, padded[..., :48, :61], atol=1e-5)


def test_vit_layers_and_kwargs_from_config():
    deep = make_vit(encoder_kwargs={"depth": 12})
    assert deep.encoder.feature_info.out_indices == (2, 5, 8, 11)  # four evenly spaced blocks
    assert make_vit(encoder_kwargs={"depth": 2}).encoder.feature_info.out_indices == (0, 1)
    picked = make_vit(encoder_layers=[1, -1])
    assert picked.encoder.feature_info.out_indices == (1, 3) and len(picked.encoder.model.blocks) == 4
    with pytest.raises(ConfigError, match=r"key 'model.encoder_layers'.*4 features.*got 4"):
        make_vit(encoder_layers=[0, 4])
    with pytest.raises(ConfigError, match=r"key 'model.encoder_layers'.*shallow to deep"):
        make_vit(encoder_layers=[3, 1])
    with pytest.raises(ConfigError, match=r"key 'model.encoder_kwargs'.*'output_stride'.*model.output_stride"):
        make_vit(encoder_kwargs={"output_stride": 8})
    with pytest.raises(ConfigError, match=r"key 'model.encoder'.*cannot be built"):
        make_vit(encoder_kwargs={"no_such_argument": 1})
    # hierarchical encoders: the layers pick stages, the deepest must still be at output_stride
    resnet = make("resnet18", head="segformer", encoder_layers=[2, 3, 4])
    assert resnet.feature_reductions == [8, 16, 16] and resnet.patch_size is None
    with pytest.raises(ConfigError, match=r"key 'model.output_stride'.*stride 8"):
        make("resnet18", encoder_layers=[1, 2])


def test_crop_not_a_multiple_of_the_patch_size_is_a_config_error(tmp_path):
    from semiseg.config import load_config
    from semiseg.engine.trainer import Trainer
    from semiseg.models import check_input_size

    model = make_vit()
    check_input_size(model, 42, "data.crop_size")
    check_input_size(make("resnet18"), 30, "data.crop_size")  # only patch encoders care
    with pytest.raises(ConfigError, match=r"^config error: key 'data.crop_size': 30 is not a multiple of the "
                                          r"encoder's patch size 14; use e.g. 28 or 42$"):
        check_input_size(model, 30, "data.crop_size")
    vit = ["model.encoder=vit_small_patch14_dinov2", "model.encoder_kwargs.img_size=28",
           "model.encoder_kwargs.embed_dim=32", "model.encoder_kwargs.depth=4", "model.encoder_kwargs.num_heads=2",
           "model.decoder_channels=16", "data.workers=0"]
    with pytest.raises(ConfigError, match=r"key 'data.crop_size': 30 is not a multiple"):
        Trainer(load_config(None, vit + ["data.crop_size=30"]), tmp_path / "run", progress=False).build()
    with pytest.raises(ConfigError, match=r"key 'eval.crop_size': 50 is not a multiple"):
        Trainer(load_config(None, vit + ["data.crop_size=28", "eval.mode=sliding_window", "eval.crop_size=50"]),
                tmp_path / "run", progress=False).build()
