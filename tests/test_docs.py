"""The documentation stays true: its links resolve, the README's top stays short, every docs page is
reachable from the README, and every command in its code blocks names a real CLI verb and option,
a config that exists and loads, and config keys the schema has.

Nothing here trains or imports torch: the CLI's parser and the config schema are enough.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from semiseg.cli import build_parser
from semiseg.config import METHOD_SCHEMAS, config_file, known_keys, load_config
from semiseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LINKED_PAGES = [README, REPO / "BENCHMARKS.md", *DOCS]  # their links must resolve
COMMAND_PAGES = [README, *DOCS]  # their commands must run
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ----------------------------------------------------------------------------------- markdown
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def split_fences(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(the lines outside fenced code blocks, [(language, lines) of each block])."""
    prose, blocks, block, lang = [], [], None, ""
    for line in text.splitlines():
        m = FENCE.match(line)
        if block is None and m:
            block, lang = [], m.group(2).lower()
        elif block is not None and m and not m.group(2):
            blocks.append((lang, block))
            block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    assert block is None, "an unclosed code block"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, drop what is not a letter, digit, space, hyphen or
    underscore, spaces to hyphens (link markup rendered to its text first)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    out |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", path.read_text()))
    return out


def links(path: Path) -> list[str]:
    """The targets of the markdown links outside code (code blocks and inline code)."""
    prose, _ = split_fences(path.read_text())
    text = INLINE_CODE.sub(lambda m: "x" * len(m.group(2)), "\n".join(prose))
    return LINK.findall(text)


def test_slug_follows_githubs_rule():
    assert slug("Change detection (LEVIR-CD, WHU-CD)") == "change-detection-levir-cd-whu-cd"
    assert slug("The demo's synthetic data, from the pretrained encoder") == \
        "the-demos-synthetic-data-from-the-pretrained-encoder"
    assert slug("UniMatch V2 on a GPU: ViT-S/14 + DPT") == "unimatch-v2-on-a-gpu-vit-s14--dpt"
    assert slug("`train.threads` and speed") == "trainthreads-and-speed"


def test_links_are_found_outside_code_only(tmp_path):
    page = tmp_path / "x.md"
    page.write_text("a [b](c.md#d) `[e](f)` [`g`](h/i.py)\n```\n[j](k)\n```\n")
    assert links(page) == ["c.md#d", "h/i.py"]


@pytest.mark.parametrize("page", LINKED_PAGES, ids=rel)
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README) if t.partition("#")[0]}
    missing = [rel(p) for p in DOCS if p.name != "architecture.md" and p.resolve() not in linked]
    assert not missing, f"README.md links none of {missing}"


def test_readme_top_is_short():
    prose_before = []
    in_block = False
    for line in README.read_text().splitlines():
        if FENCE.match(line):
            in_block = not in_block
        if not in_block and line.startswith("## "):
            break
        prose_before.append(line)
    else:
        pytest.fail("README.md has no ## section")
    assert len(prose_before) <= 45, f"{len(prose_before)} lines before the README's first ## heading"


# ----------------------------------------------------------------------------------- commands
_PARSER = build_parser()
VERBS: dict[str, argparse.ArgumentParser] = next(
    a for a in _PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices
PLACEHOLDER = re.compile(r"\.\.\.|[A-Z][A-Z0-9_/.-]*|.*<[^>]*>.*|\[.*|.*\]")


def shell_lines(page: Path) -> list[str]:
    """The command lines of a page's shell code blocks, continuation lines joined."""
    _, blocks = split_fences(page.read_text())
    out = []
    for lang, lines in blocks:
        if lang not in SHELL_LANGS:
            continue
        joined = "\n".join(lines).replace("\\\n", " ")
        out += [line for line in joined.splitlines() if line.strip()]
    return out


def semiseg_commands(page: Path) -> list[tuple[str, list[str]]]:
    """[(the line, the tokens after `semiseg`)] for each semiseg command in the page's code blocks
    (also under `python -m` and `torchrun -m`), up to the end of its command (`&&`, `|`, `;`)."""
    out = []
    for line in shell_lines(page):
        tokens = shlex.split(line, comments=True)
        for i, tok in enumerate(tokens):
            if tok == "semiseg" and i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                rest = tokens[i + 1:]
                for j, t in enumerate(rest):
                    if t in ("&&", "||", "|", ";"):
                        rest = rest[:j]
                        break
                out.append((line, rest))
    return out


def parse_command(verb: str, args: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(positional arguments, option names, --set overrides) of one command, by the verb's parser."""
    options = VERBS[verb]._option_string_actions
    positionals, names, overrides = [], [], []
    i = 0
    while i < len(args):
        tok = args[i].strip("[]")
        if tok.startswith("-") and tok != "-":
            name, eq, value = tok.partition("=")
            names.append(name)
            action = options.get(name)
            takes_value = action is not None and action.nargs != 0
            if takes_value and not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            if name == "--set":
                overrides.append(value)
        else:
            positionals.append(args[i])
        i += 1
    return positionals, names, overrides


COMMANDS = [(page, line, rest) for page in COMMAND_PAGES for line, rest in semiseg_commands(page)]


def test_the_docs_have_commands_to_check():
    verbs = {rest[0] for _, _, rest in COMMANDS}
    assert {"train", "eval", "predict", "demo"} <= verbs, verbs
    assert any("--set" in rest for _, _, rest in COMMANDS)


def test_parse_command_reads_configs_options_and_overrides():
    positionals, names, overrides = parse_command(
        "train", ["configs/acdc.yaml", "--set", "data.root=PATH/TO/ACDC", "--out", "runs/x", "--resume"])
    assert positionals == ["configs/acdc.yaml"] and names == ["--set", "--out", "--resume"]
    assert overrides == ["data.root=PATH/TO/ACDC"]
    assert parse_command("train", ["--out", "RUN_DIR", "--resume"])[0] == []


@pytest.mark.parametrize("page,line,rest", COMMANDS, ids=lambda x: rel(x) if isinstance(x, Path) else None)
def test_command_names_a_verb_and_its_options(page, line, rest):
    verb = rest[0]
    assert verb in VERBS, f"{rel(page)}: `semiseg {verb}` is not a verb (the CLI has {sorted(VERBS)}): {line}"
    _, names, _ = parse_command(verb, rest[1:])
    unknown = [n for n in names if n not in VERBS[verb]._option_string_actions]
    assert not unknown, f"{rel(page)}: `semiseg {verb}` has no option {unknown}: {line}"


def _config_path(token: str) -> Path:
    path = REPO / token
    return path if path.is_file() else config_file(token)


def _key_known(key: str, method: str | None) -> bool:
    names = [method] if method else sorted(METHOD_SCHEMAS)
    return any(key in known_keys(name) for name in names)


@pytest.mark.parametrize("page,line,rest", COMMANDS, ids=lambda x: rel(x) if isinstance(x, Path) else None)
def test_command_config_exists_loads_and_overrides_name_schema_keys(page, line, rest):
    verb = rest[0]
    if verb not in VERBS:
        pytest.skip("not a verb (the verb test fails)")
    positionals, _, overrides = parse_command(verb, rest[1:])
    takes_config = any(a.dest == "config" for a in VERBS[verb]._actions)
    config = positionals[0] if takes_config and positionals and not PLACEHOLDER.fullmatch(positionals[0]) else None
    items = [o.partition("=") for o in overrides]
    method = next((v for k, _, v in items if k == "method.name"), None)
    if config is not None:
        path = _config_path(config)
        assert path.is_file(), f"{rel(page)}: no config {config!r} ({path}): {line}"
        try:
            cfg = load_config(path)
        except ConfigError as e:
            pytest.fail(f"{rel(page)}: {config} does not load: {e}")
        method = method or cfg.method.name
        # The command's own overrides whose values are real (not PATH/TO/... or <run>) must load too.
        real = [o for o in overrides if not PLACEHOLDER.fullmatch(o.partition("=")[2])
                and "PATH/TO" not in o]
        try:
            load_config(path, overrides=real)
        except ConfigError as e:
            pytest.fail(f"{rel(page)}: {line}: {e}")
    for key, eq, _ in items:
        assert eq, f"{rel(page)}: --set {key} has no value: {line}"
        assert _key_known(key, method), f"{rel(page)}: --set {key}: no such config key: {line}"


def test_override_check_rejects_a_misspelt_key():
    assert _key_known("train.iters", "supervised") and _key_known("method.conf_thresh", None)
    assert not _key_known("train.iter", "unimatch")
    assert not _key_known("method.conf_thresh", "supervised")


CONFIG_PATH = re.compile(r"(?<![\w/.])configs/([\w.-]+\.yaml)")


@pytest.mark.parametrize("page", COMMAND_PAGES, ids=rel)
def test_every_named_config_file_exists_and_loads(page):
    for name in sorted(set(CONFIG_PATH.findall(page.read_text()))):
        path = REPO / "configs" / name
        assert path.is_file(), f"{rel(page)} names configs/{name}, which does not exist"
        try:
            load_config(path)
        except ConfigError as e:
            pytest.fail(f"{rel(page)}: configs/{name} does not load: {e}")
