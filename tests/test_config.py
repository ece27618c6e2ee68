"""Config loading: validation errors name the key and the file; overrides are validated too."""

import subprocess
import sys
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
    assert "\n" not in msg


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


def test_cli_config_error_exit_code_2(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 0.1\n")
    r = subprocess.run([sys.executable, "-m", "semiseg", "train", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lrr" in lines[0] and str(p) in lines[0]
