"""UniMatch V2's model side: the DPT head for plain ViT encoders (shapes, the official arithmetic
against an independent functional reference, sizes, refusals), the ViT features through the
final norm (``model.encoder_norm``) and the official DINOv2 weight files. Random init only."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.config import ModelConfig, load_config
from semiseg.errors import CheckpointError, ConfigError
from semiseg.models import DPTHead, SegModel, build_model
from semiseg.models.heads import DPT_SIZES, build_dpt, dpt_sizes

SMALL = {"embed_dim": 64, "depth": 4, "num_heads": 2, "img_size": 56}


def make_dpt(encoder="vit_small_patch14_dinov2", num_classes=3, **kw) -> SegModel:
    torch.manual_seed(0)
    kwargs = {**SMALL, **kw.pop("encoder_kwargs", {})}
    return build_model(ModelConfig(encoder=encoder, head="dpt", encoder_kwargs=kwargs, **kw), num_classes)


# ---------------------------------------------------------------------------------------------
# DPT head


def test_dpt_logits_at_the_input_size():
    model = make_dpt()
    assert isinstance(model.decoder, DPTHead) and model.decoder.in_index == (0, 1, 2, 3)
    features, channels = dpt_sizes(64)  # no official width: the ViT-S/B rule, 64 // 6 and 64 // 8 ...
    assert (features, channels) == (10, (8, 16, 32, 64))
    for h, w in [(56, 56), (42, 70)]:
        x = torch.randn(2, 3, h, w)
        model.train()
        logits = model(x)
        assert logits.shape == (2, 3, h, w)
        logits.mean().backward()
        # refinenet4 fuses no skip: its resConfUnit1 exists (as official) but is never used
        unused = {n for n, p in model.named_parameters() if p.grad is None}
        assert unused == {f"decoder.scratch.refinenet4.resConfUnit1.conv{i}.{k}"
                          for i in (1, 2) for k in ("weight", "bias")}
        model.zero_grad()
        with torch.no_grad():
            raw, path_1 = model.eval().decode(model.encode(x), return_features=True)
        # DPT's logits and fused map are at 8x the patch grid, the map `features` wide
        assert raw.shape == (2, 3, 8 * h // 14, 8 * w // 14) and path_1.shape == (2, 10, 8 * h // 14, 8 * w // 14)


def test_dpt_whole_image_of_any_size_is_padded_and_the_padding_cut_off():
    model = make_dpt().eval()
    x = torch.randn(1, 3, 48, 61)
    with torch.no_grad():
        logits = model(x)
        padded = model(F.pad(x, (0, 9, 0, 8)))  # 56 x 70: multiples of 14
    assert logits.shape == (1, 3, 48, 61)
    assert torch.allclose(logits, padded[..., :48, :61], atol=1e-5)
    # the official resize: bilinear, align_corners=True, from 8x the patch grid to the (padded) input
    with torch.no_grad():
        raw = model.decode(model.encode(F.pad(x, (0, 9, 0, 8))))
    expected = F.interpolate(raw, size=(56, 70), mode="bilinear", align_corners=True)[..., :48, :61]
    assert torch.allclose(logits, expected, atol=1e-6)


def reference_dpt(head: DPTHead, feats):
    """UniMatch V2's DPTHead.forward (use_bn=False) written out with torch.nn.functional, reading
    the weights of ``head`` by their official names."""
    p = dict(head.named_parameters())

    def conv(x, name, stride=1, padding=0):
        return F.conv2d(x, p[f"{name}.weight"], p.get(f"{name}.bias"), stride=stride, padding=padding)

    def rcu(x, name):  # act -> conv3x3 -> act -> conv3x3, plus the input
        out = conv(F.relu(x), f"{name}.conv1", padding=1)
        out = conv(F.relu(out), f"{name}.conv2", padding=1)
        return out + x

    def fusion(name, *xs, size=None):
        out = xs[0]
        if len(xs) == 2:
            out = out + rcu(xs[1], f"{name}.resConfUnit1")
        out = rcu(out, f"{name}.resConfUnit2")
        if size is None:
            out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        return conv(out, f"{name}.out_conv")

    layers = [conv(f, f"projects.{i}") for i, f in enumerate(feats)]
    layers[0] = F.conv_transpose2d(layers[0], p["resize_layers.0.weight"], p["resize_layers.0.bias"], stride=4)
    layers[1] = F.conv_transpose2d(layers[1], p["resize_layers.1.weight"], p["resize_layers.1.bias"], stride=2)
    layers[3] = conv(layers[3], "resize_layers.3", stride=2, padding=1)
    l1, l2, l3, l4 = (conv(x, f"scratch.layer{i}_rn", padding=1) for i, x in enumerate(layers, start=1))
    path_4 = fusion("scratch.refinenet4", l4, size=l3.shape[2:])
    path_3 = fusion("scratch.refinenet3", path_4, l3, size=l2.shape[2:])
    path_2 = fusion("scratch.refinenet2", path_3, l2, size=l1.shape[2:])
    path_1 = fusion("scratch.refinenet1", path_2, l1)
    out = F.relu(conv(path_1, "scratch.output_conv.0", padding=1))
    return conv(out, "scratch.output_conv.2"), path_1


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])  # odd sides: the /2 layer rounds up, fusion resizes back
def test_dpt_arithmetic_equals_the_official(grid):
    torch.manual_seed(1)
    head = DPTHead([24] * 4, num_classes=5, features=12, out_channels=(6, 12, 18, 24)).eval()
    with torch.no_grad():
        for param in head.parameters():  # every weight and bias matters, none at its init scale
            param.normal_(0, 0.3)
        feats = [torch.randn(2, 24, *grid) for _ in range(4)]
        logits, feature = head(feats)
        expected_logits, expected_feature = reference_dpt(head, feats)
    assert logits.shape == (2, 5, 8 * grid[0], 8 * grid[1])
    assert torch.allclose(feature, expected_feature, atol=1e-5, rtol=0)
    assert torch.allclose(logits, expected_logits, atol=1e-5, rtol=0)


def test_dpt_sizes_follow_the_official_table_and_the_config():
    assert DPT_SIZES[384] == (64, (48, 96, 192, 384)) and DPT_SIZES[768] == (128, (96, 192, 384, 768))
    assert DPT_SIZES[1024] == (256, (256, 512, 1024, 1024)) and DPT_SIZES[1536] == (384, (1536,) * 4)
    assert dpt_sizes(32) == (8, (8, 8, 16, 32))  # none below 8

    def widths(head):
        return ([c.out_channels for c in head.projects], head.scratch.layer1_rn.out_channels,
                head.scratch.output_conv[2].out_channels)

    cfg = ModelConfig(head="dpt")
    assert widths(build_dpt(cfg, [384] * 4, [14] * 4, 21)) == ([48, 96, 192, 384], 64, 21)
    assert widths(build_dpt(cfg, [768] * 4, [14] * 4, 21)) == ([96, 192, 384, 768], 128, 21)
    cfg = ModelConfig(head="dpt", dpt_features=16, dpt_channels=[8, 16, 24, 32])
    head = build_dpt(cfg, [384] * 4, [14] * 4, 4)
    assert widths(head) == ([8, 16, 24, 32], 16, 4)
    assert head.resize_layers[0].kernel_size == (4, 4) and head.resize_layers[0].stride == (4, 4)
    assert head.resize_layers[1].kernel_size == (2, 2) and head.resize_layers[1].stride == (2, 2)
    assert isinstance(head.resize_layers[2], nn.Identity) and head.resize_layers[3].stride == (2, 2)
    assert isinstance(head.dropout, nn.Identity)  # the official head has no dropout
    # the official parameter names (model/semseg/dpt.py), so its weights would load by name
    names = set(head.state_dict())
    assert {"projects.3.bias", "resize_layers.0.weight", "resize_layers.3.bias", "scratch.layer4_rn.weight",
            "scratch.refinenet1.resConfUnit1.conv1.bias", "scratch.refinenet4.resConfUnit2.conv2.weight",
            "scratch.refinenet2.out_conv.bias", "scratch.output_conv.0.bias", "scratch.output_conv.2.weight"} <= names
    assert "scratch.layer1_rn.bias" not in names  # the scratch convs have no bias
    assert build_dpt(ModelConfig(head="dpt", dropout=0.2), [64] * 4, [14] * 4, 3).dropout.p == 0.2


def test_dpt_on_a_hierarchical_encoder_is_a_config_error():
    one_line = r"^config error: key 'model.head': dpt needs a plain ViT encoder read at four blocks [^\n]*$"
    with pytest.raises(ConfigError, match=one_line) as info:
        build_model(ModelConfig(encoder="resnet18", head="dpt"), 3)
    assert "strides [4, 8, 16, 16]" in str(info.value)
    with pytest.raises(ConfigError, match=r"key 'model.head': dpt .* gives 2 at strides \[14, 14\]"):
        make_dpt(encoder_layers=[1, 3])
    with pytest.raises(ConfigError, match=r"key 'model.head': dpt "):  # the head's builder is not bypassed
        build_dpt(ModelConfig(head="dpt"), [64] * 3, [14] * 3, 3)


def test_dpt_head_validates_in_the_config():
    cfg = load_config(None, ["model.head=dpt", "model.dpt_features=32", "model.dpt_channels=[8,16,32,64]"])
    assert cfg.model.head == "dpt" and cfg.model.dpt_features == 32 and cfg.model.dpt_channels == [8, 16, 32, 64]
    assert cfg.model.encoder_norm is None and cfg.model.dpt_channels is not None
    with pytest.raises(ConfigError, match=r"key 'model.head'.*'dpt'.*\(got 'dtp'\)"):
        load_config(None, ["model.head=dtp"])
    with pytest.raises(ConfigError, match=r"key 'model.dpt_channels'"):
        load_config(None, ["model.dpt_channels=[8,16,32]"])
    with pytest.raises(ConfigError, match=r"key 'model.dpt_channels': expected four positive widths"):
        load_config(None, ["model.dpt_channels=[8,16,32,0]"])


def test_dpt_feature_perturbation_doubles_every_feature():
    from semiseg.methods.perturbations import feature_perturbation

    model = make_dpt().train()
    seen = []
    model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    clean, perturbed = feature_perturbation(model, torch.randn(2, 3, 42, 42))
    assert clean.shape == perturbed.shape == (2, 3, 42, 42)
    assert [f.shape[0] for f in seen[0]] == [4] * 4


# ---------------------------------------------------------------------------------------------
# model.encoder_norm


def test_encoder_norm_reads_the_blocks_through_the_final_norm():
    x = torch.randn(1, 3, 42, 56)
    normed, raw = make_dpt().eval(), make_dpt(encoder_norm=False).eval()
    assert normed.encoder.model.norm.weight.shape == (64,)  # the norm is kept, and has weights to load
    assert not any(k.startswith("model.norm.") for k in raw.encoder.state_dict())
    with torch.no_grad():  # the same seed: the same blocks
        raw.encoder.model.norm = normed.encoder.model.norm
        raw_feats = raw.encode(x)
        normed_feats = normed.encode(x)
        for a, b in zip(raw_feats, normed_feats):
            by_hand = F.layer_norm(a.permute(0, 2, 3, 1), (64,), normed.encoder.model.norm.weight,
                                   normed.encoder.model.norm.bias, eps=1e-6).permute(0, 3, 1, 2)
            assert torch.allclose(b, by_hand, atol=1e-5)
            assert not torch.allclose(a, b, atol=1e-2)
    # ignored for a hierarchical encoder
    torch.manual_seed(0)
    a = build_model(ModelConfig(encoder="resnet18", encoder_norm=True, decoder_channels=16), 3).eval()
    torch.manual_seed(0)
    b = build_model(ModelConfig(encoder="resnet18", encoder_norm=False, decoder_channels=16), 3).eval()
    with torch.no_grad():
        y = torch.randn(1, 3, 32, 32)
        assert all(torch.equal(u, v) for u, v in zip(a.encode(y), b.encode(y)))


# ---------------------------------------------------------------------------------------------
# Official DINOv2 weight files


def official_state(vit: nn.Module, variant: str) -> dict:
    """``vit``'s weights as the official DINOv2 release names them (``dinov2_vits14_pretrain.pth``):
    with ``mask_token``; ``chunked``: blocks in chunks of two (``blocks.<chunk>.<block>.``);
    ``registers``: ``register_tokens``, the class position in ``pos_embed``; ``swiglu``: the
    giant's ``mlp.w12``/``mlp.w3``."""
    torch.manual_seed(5)
    state = {k: v.clone() for k, v in vit.state_dict().items() if not k.startswith("head.")}
    state["mask_token"] = torch.randn(1, state["cls_token"].shape[-1])
    if variant == "chunked":
        state = {(f"blocks.{int(k.split('.')[1]) // 2}.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v
                 for k, v in state.items()}
    if variant == "registers":
        class_position = torch.randn_like(state["cls_token"])
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - class_position
        state["pos_embed"] = torch.cat([class_position, state["pos_embed"]], dim=1)
    if variant == "swiglu":
        state = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in state.items()}
    return state


SOURCES = {
    "plain": "vit_small_patch14_dinov2",
    "chunked": "vit_small_patch14_dinov2",
    "registers": "vit_small_patch14_reg4_dinov2",
    "swiglu": "vit_giant_patch14_dinov2",
}


@pytest.mark.parametrize("variant", list(SOURCES))
def test_official_dinov2_file_loads(tmp_path, variant):
    encoder = SOURCES[variant]
    torch.manual_seed(4)
    kwargs = {"mlp_ratio": 4} if variant == "swiglu" else {}  # the giant's 5.33 gives an odd SwiGLU width at 64
    source = timm.create_model(encoder, **SMALL, **kwargs).eval()  # init_values set: ls1/ls2 gammas exist
    with torch.no_grad():
        for name, param in source.named_parameters():
            if name.endswith("gamma") or name.startswith("norm."):
                param.normal_(0, 1)  # layer scales and the final norm far from their init
    path = tmp_path / "dinov2_small.pth"
    state = official_state(source, variant)
    assert ("blocks.1.2.norm1.weight" in state) == (variant == "chunked")
    torch.save(state, path)
    model = make_dpt(encoder, pretrained=str(path), encoder_kwargs=kwargs).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        feats = model.encode(x)
        expected = source.forward_intermediates(x, indices=[0, 1, 2, 3], norm=True, output_fmt="NCHW",
                                                intermediates_only=True)
    for f, e in zip(feats, expected):
        if variant == "registers":  # the class position folded into the class token: float rounding
            assert torch.allclose(f, e, atol=1e-5)
        else:
            assert torch.equal(f, e)


def test_official_dinov2_file_that_does_not_fit(tmp_path):
    torch.manual_seed(4)
    source = timm.create_model("vit_small_patch14_dinov2", **SMALL)
    path = tmp_path / "dinov2_small.pth"
    state = official_state(source, "plain")
    del state["blocks.1.attn.qkv.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"^model\.pretrained [^\n]*dinov2_small\.pth: weights do not fit "
                                              r"[^\n]*blocks\.1\.attn\.qkv\.weight[^\n]*$"):
        make_dpt(pretrained=str(path))

    state = official_state(source, "plain")
    del state["norm.weight"], state["norm.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError,
                       match=r"dinov2_small\.pth.*model\.norm\.weight.*set model\.encoder_norm: false"):
        make_dpt(pretrained=str(path))
    make_dpt(pretrained=str(path), encoder_norm=False)  # the raw block outputs need no final norm

    state = official_state(timm.create_model("vit_small_patch14_dinov2", **{**SMALL, "img_size": 42}), "plain")
    torch.save(state, path)  # a 3x3 position grid for a 4x4 encoder
    with pytest.raises(CheckpointError, match=r"dinov2_small\.pth.*pos_embed has shape \(1, 10, 64\) in the file, "
                                              r"\(1, 17, 64\) in the encoder"):
        make_dpt(pretrained=str(path))


def test_chunked_names_are_only_mapped_for_a_plain_vit(tmp_path):
    """timm's EfficientNets name their blocks ``blocks.<stage>.<block>.``, which looks chunked."""
    from semiseg.models.pretrained import dinov2_to_timm, is_dinov2_naming

    assert is_dinov2_naming({"blocks.0.1.conv_dw.weight": torch.zeros(1)})
    assert not is_dinov2_naming({"blocks.0.norm1.weight": torch.zeros(1)})
    assert set(dinov2_to_timm({"backbone.mask_token": torch.zeros(1), "backbone.blocks.1.3.ls1.gamma": torch.zeros(1)},
                              "here")) == {"backbone.blocks.3.ls1.gamma"}
    with pytest.raises(CheckpointError, match=r"^here: DINOv2 weights name block tensor blocks\.3\.ls1\.gamma twice"):
        dinov2_to_timm({"blocks.0.3.ls1.gamma": torch.zeros(1), "blocks.1.3.ls1.gamma": torch.zeros(1)}, "here")
    # a MobileNetV3 file (blocks.<stage>.<block>.) still loads as it is
    from safetensors.torch import save_file

    torch.manual_seed(6)
    full = timm.create_model("mobilenetv3_small_050")
    path = tmp_path / "mobilenet.safetensors"
    save_file(full.state_dict(), str(path))
    model = build_model(ModelConfig(encoder="mobilenetv3_small_050", pretrained=str(path), decoder_channels=16), 3)
    key = "blocks.1.0.conv_dw.weight"
    assert torch.equal(model.encoder.state_dict()[key], full.state_dict()[key])


def test_vit_hub_weights_without_network(monkeypatch):
    """``model.pretrained: true`` on a ViT read through its norm goes to timm's hub like any
    encoder, and a failed download is the one-line error."""
    from semiseg.errors import SemisegError

    real, asked = timm.create_model, []

    def no_hub(name, pretrained=False, **kwargs):
        asked.append((name, pretrained))
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_hub)
    with pytest.raises(SemisegError, match=r"could not fetch pretrained weights for encoder "
                                           r"'vit_small_patch14_dinov2' \(no network\?\)"):
        make_dpt(pretrained=True)
    assert asked[-1] == ("vit_small_patch14_dinov2", True)
