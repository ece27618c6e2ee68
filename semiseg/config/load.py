"""Loading a config: YAML file or dict, ``--set`` overrides, validation, one-line errors.

A run is described by one YAML file with five sections (``data``, ``model``, ``method``,
``train``, ``eval``; :mod:`semiseg.config.schema`). Loading validates every key: an unknown or
misspelt key, a wrong type or an impossible value raises :class:`~semiseg.errors.ConfigError`
with one line naming the file, the dotted key and what was expected. ``--set section.key=value``
overrides are parsed as YAML scalars and applied before validation, so they are checked exactly
like the file.

Method-specific keys live under ``method`` and are validated by the named method's schema
(:mod:`semiseg.config.methods`), so ``method.conf_thresh`` is legal for FixMatch but an error
for the supervised baseline. Nothing here imports torch: a config error costs no more than
reading the file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from semiseg.config.methods import METHOD_SCHEMAS, method_schema
from semiseg.config.schema import Config, MethodConfig
from semiseg.errors import ConfigError

CONFIGS_DIR = Path(__file__).parent.parent / "configs"  # the built-in configs


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
        for name, schema in sorted(METHOD_SCHEMAS.items()):
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
        if msg.startswith(f"key '{key.split('.')[0]}") or (key == "<root>" and msg.startswith("key '")):
            return msg  # a validator that names its own key (a cross-key check)
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


def override_items(overrides: list[str] | dict | None) -> list[Override]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return [(k.split("."), v, f"{k}={v}") for k, v in overrides.items()]
    return [(*parse_override(o), o) for o in overrides]


def apply_overrides(raw: dict, overrides: list[str] | dict | None) -> dict:
    raw = _deepcopy(raw)
    for parts, value, _text in override_items(overrides):
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
    (see :func:`override_items`) that set the offending key."""
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
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def config_file(path: str | Path) -> Path:
    """The YAML file ``path`` names: ``path`` itself, or, for a bare name that is not a file, the
    built-in config of that name (``camvid`` -> ``semiseg/configs/camvid.yaml``; it may not exist)."""
    p = Path(path)
    if not p.is_file() and p.suffix == "":
        return CONFIGS_DIR / f"{p.name}.yaml"
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
    items = override_items(overrides)
    raw = apply_overrides(raw, overrides)
    return validate(raw, source, items)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
