"""Config loading: validation errors name the key and the file; overrides are validated too."""

from pathlib import Path

import pytest

from semiseg.config import load_config, parse_override
from semiseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_override_types():
    cfg = load_config(None, ["train.lr=0.02", "data.labeled=1/8", "data.resize=[240,180]", "model.pretrained=false"])
    assert cfg.train.lr == 0.02
    assert cfg.data.labeled == "1/8"
    assert cfg.data.resize == (240, 180)
    assert cfg.model.pretrained is False


@pytest.mark.parametrize("labeled,expected", [("46", 46), (46, 46), ("1/8", "1/8"), ("splits/a.txt", "splits/a.txt")])
def test_labeled_forms(labeled, expected):
    assert load_config({"data": {"labeled": labeled}}).data.labeled == expected


@pytest.mark.parametrize(
    "text,needle",
    [
        ("train:\n  lrr: 0.1\n", "unknown key 'train.lrr'"),
        ("train:\n  lr: abc\n", "key 'train.lr'"),
        ("train:\n  lr: -1\n", "key 'train.lr'"),
        ("train:\n  iters: 0\n", "key 'train.iters'"),
        ("data:\n  labeled: 3/2\n", "key 'data.labeled'"),
        ("data:\n  dataset: imagenet\n", "key 'data.dataset'"),
        ("method:\n  name: nosuch\n", "key 'method.name'"),
        ("method:\n  name: supervised\n  conf_thresh: 0.9\n", "unknown key 'method.conf_thresh'"),
        ("eval:\n  scales: []\n", "key 'eval.scales'"),
        ("data:\n  class_uniform_p: 1.5\n", "key 'data.class_uniform_p': Input should be less than or equal to 1"),
        ("data:\n  extra_labels_strong: true\n", "key 'data.extra_labels_strong': acts on the pseudo-labelled "
         "images of data.extra_labels, which is not set"),
        ("nosection: 1\n", "unknown key 'nosection'"),
        ("train: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_config_one_line_naming_key_and_file(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert needle in msg
    assert str(p) in msg
    assert "\n" not in msg and "<root>" not in msg  # a cross-key check names its key once


def test_override_is_validated_like_the_file():
    with pytest.raises(ConfigError, match="unknown key 'train.itres'"):
        load_config(None, ["train.itres=5"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("trainiters5")


def test_all_shipped_configs_validate():
    for p in sorted((REPO / "semiseg" / "configs").glob("*.yaml")):
        load_config(p)


def test_packaged_config_by_name():
    assert load_config("camvid").data.dataset == "camvid"


def test_cli_config_error_exit_code_2(tmp_path, cli):
    p = write(tmp_path, "train:\n  lrr: 0.1\n")
    r = cli("train", p)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lrr" in lines[0] and str(p) in lines[0]


@pytest.mark.parametrize("args,expected", [
    # a misspelt key from --set names the --set (not the config file) and the nearest key
    (["--set", "train.iter=5"], "config error in --set train.iter=5: unknown key 'train.iter'; did you mean train.iters?"),
    (["--set", "trian.iters=5"], "config error in --set trian.iters=5: unknown key 'trian'; did you mean train.iters?"),
    (["--set", "train.lr=abc"], "config error in --set train.lr=abc: key 'train.lr'"),
    (["--set", "method.conf_thresh=0.9"], "method.conf_thresh is a key of allspark, allspark_unimatch, fixmatch"),
    # a value that is not YAML is said to be so
    (["--set", "data.resize=[240,180"], "invalid YAML in --set data.resize=[240,180: expected ',' or ']'"),
])
def test_set_errors_name_the_set_and_suggest_the_key(tmp_path, capsys, args, expected):
    from semiseg.cli import main

    cfg = write(tmp_path, "train:\n  iters: 4\n")
    assert main(["train", str(cfg), *args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and (str(cfg) not in err[0])
    assert not (tmp_path / "r").exists()


def test_file_errors_still_name_the_file_and_suggest_the_key(tmp_path):
    p = write(tmp_path, "train:\n  iters: 4\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.iters=5"])
    assert str(e.value) == f"config error in {p}: unknown key 'train.lrr'; did you mean train.lr?"


def test_unknown_config_name_suggests_the_nearest_built_in(capsys):
    from semiseg.cli import main

    assert main(["train", "camvd"]) == 2
    err = capsys.readouterr().err.strip()
    assert "camvd is neither a file nor a built-in config; did you mean camvid?" in err
