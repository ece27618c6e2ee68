"""``eval``, ``predict``, ``report``, ``export`` and ``demo`` in daily use: one line for a
checkpoint of another class count; predict keeps every output apart, never reads its own
outputs, skips and counts unreadable images; the network "auto" stands for is named; report
samples are spread over the split; progress is shown; a second demo reuses or starts anew."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny

TINY = tiny("data.synthetic.num_val=9", "method.name=fixmatch", "method.teacher=ema")


@pytest.fixture(scope="module")
def run(train_run) -> Path:
    return train_run(TINY, "inference")


def errors(err: str) -> list[str]:
    """The ``semiseg: error:`` lines as a terminal shows them (a progress bar clears its line
    with a carriage return)."""
    return [x.rsplit("\r", 1)[-1] for x in err.split("\n") if x.rsplit("\r", 1)[-1].startswith("semiseg: error:")]


def test_eval_of_a_checkpoint_on_data_of_another_class_count(run, tmp_path, cli):
    rc, _, err = cli("eval", run, "--set", "data.dataset=camvid", "--set", f"data.root={tmp_path}")
    assert rc == 4 and len(errors(err)) == 1 and "Traceback" not in err
    assert "predicts 6 classes" in errors(err)[0] and "camvid dataset (data.dataset=camvid) has 11" in errors(err)[0]


def test_eval_names_the_network_and_shows_progress(run, cli):
    rc, out, err = cli("eval", run, "--json")
    assert rc == 0
    assert json.loads(out)["model"] == "student"  # what "auto" stood for
    assert "eval student on 'val'" in err  # the bar
    rc, out, _ = cli("eval", run, "--model", "teacher")
    assert rc == 0 and "(teacher)" in out.splitlines()[0]
    rc, _, err = cli("eval", run, "--model", "hybrid")
    assert rc == 2 and "student, teacher" in errors(err)[0]


def _photo(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((30, 40, 3), value, np.uint8)).save(path)
    return path


def test_predict_keeps_outputs_apart_skips_unreadable_and_never_reads_its_outputs(run, tmp_path, cli):
    src = tmp_path / "in"
    for name in ("a/x.png", "b/x.png", "x.jpg", "x.png", "c/d/y.bmp"):
        _photo(src / name)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (src / "._x.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource file: not an image
    out = src / "predictions"  # inside the input folder
    expected = {"a/x", "b/x", "x_jpg", "x_png", "c/d/y"}
    for attempt in range(2):  # the second run must not see the first one's outputs
        rc, stdout, err = cli("predict", run, src, "--out", out)
        assert rc == 3, err
        assert stdout.strip() == f"wrote 5 masks and overlays to {out}"
        assert "broken.png" in err and "._x.png" not in err
        assert errors(err) == ["semiseg: error: 1 of 6 images could not be read and were skipped (named above)"]
        written = {str(p.relative_to(out).with_suffix("")) for p in out.rglob("*.png")}
        assert written == expected | {f"{n}_overlay" for n in expected}
        for name in expected:
            assert Image.open(out / f"{name}.png").size == (40, 30)
    assert "predict" in err  # a progress bar


def test_predict_of_files_from_several_folders(run, tmp_path, cli):
    a, b = _photo(tmp_path / "a" / "x.png"), _photo(tmp_path / "b" / "x.png", 200)
    # a folder and a file inside it: each image is predicted once
    rc, stdout, _ = cli("predict", run, a, b, tmp_path / "b", "--out", tmp_path / "out")
    assert rc == 0 and stdout.strip().startswith("wrote 2 masks")
    assert (tmp_path / "out" / "a" / "x.png").exists() and (tmp_path / "out" / "b" / "x.png").exists()
    # a tree of symbolic links keeps its own layout
    links = tmp_path / "links"
    for name, target in (("one/x.png", a), ("two/x.png", b)):
        (links / name).parent.mkdir(parents=True, exist_ok=True)
        (links / name).symlink_to(target)
    rc, stdout, _ = cli("predict", run, links, "--out", tmp_path / "linked")
    assert rc == 0 and stdout.strip().startswith("wrote 2 masks")
    assert {str(p.relative_to(tmp_path / "linked")) for p in (tmp_path / "linked").rglob("x.png")} == {
        "one/x.png", "two/x.png"}


def test_report_spreads_its_samples_over_the_split_and_shows_progress(run, cli, monkeypatch):
    from semiseg import report
    from semiseg.data.build import EvalSet

    assert report.sample_indices(4, 101) == [0, 33, 67, 100]
    assert report.sample_indices(4, 3) == [0, 1, 2] and report.sample_indices(1, 9) == [0]
    shown = []
    original = EvalSet.__getitem__

    def getitem(self, index):
        shown.append(index)
        return original(self, index)

    monkeypatch.setattr(EvalSet, "__getitem__", getitem)
    rc, stdout, err = cli("report", run, "--images", "3")
    assert rc == 0, err
    assert shown[-3:] == [0, 4, 8]  # after the evaluation of all 9: the first, middle and last images
    assert "report: eval student" in err
    page = (run / "report.html").read_text()
    assert "network student" in page and "network auto" not in page


def test_a_second_demo_reuses_the_finished_runs_and_a_new_setting_gets_new_folders(tmp_path, capsys, monkeypatch, cli):
    import semiseg.demo as demo
    from semiseg.config import load_config, save_config

    config = tmp_path / "synthetic.yaml"
    save_config(load_config(None, TINY[:-2] + ["method.name=supervised"]), config)
    monkeypatch.setattr(demo, "packaged_config", lambda name: config)
    out = tmp_path / "demo"
    assert demo.run_demo(out=out, iters=2, methods=["supervised", "fixmatch"]) == 0
    first = capsys.readouterr().out
    miou = [line.split()[1] for line in first.splitlines() if line.startswith(("supervised ", "fixmatch "))]
    assert len(miou) == 2
    # the gain it measured, from the unrounded figures of the two rows above
    gain = [line for line in first.splitlines() if line.startswith("gain of fixmatch over supervised: ")]
    assert len(gain) == 1 and gain[0].endswith("mIoU with the same labelled images (one seed; what each method "
                                               "buys on real data: BENCHMARKS.md)")
    assert abs(float(gain[0].split()[5]) - (float(miou[1]) - float(miou[0]))) <= 0.011
    # the same demo again: both finished runs are reused, and the table shows their results
    rc, second, _ = cli("demo", "--out", out, "--iters", "2", "--methods", "supervised,fixmatch")
    assert rc == 0
    assert f"{out / 'supervised'} holds a finished run of this setting: showing its results" in second
    assert [line.split()[1] for line in second.splitlines() if line.startswith(("supervised ", "fixmatch "))] == miou
    # another setting: a new folder beside the old one, which is left alone
    before = (out / "supervised" / "config.yaml").read_text()
    rc, third, _ = cli("demo", "--out", out, "--iters", "3", "--methods", "supervised")
    assert rc == 0 and f"training a new one in {out / 'supervised-2'}" in third
    assert (out / "supervised" / "config.yaml").read_text() == before
    assert load_config(out / "supervised-2" / "config.yaml").train.iters == 3


def test_the_demo_compares_supervised_and_fixmatch_from_the_pretrained_encoder_and_scenarios_keep_unimatch(
        tmp_path, monkeypatch, capsys):
    """``semiseg demo`` trains ``configs/demo.yaml`` (8 masks of the synthetic data, the packaged
    ImageNet-pretrained Lite0) for supervised and FixMatch, and prints the gain from the two
    scores; ``--methods`` replaces the pair; the medical and change demos keep supervised and
    UniMatch."""
    from types import SimpleNamespace

    import semiseg.demo as demo
    from semiseg.cli import main

    trained, scores = [], {"supervised": 25.0, "fixmatch": 27.5, "unimatch_v2": 26.0}

    def fake_run(cfg, run_dir):
        trained.append((cfg.method.name, cfg.model.encoder, cfg.model.pretrained, cfg.data.labeled,
                        cfg.data.dataset, cfg.train.iters, run_dir.name))
        return SimpleNamespace(metrics={"mIoU": scores[cfg.method.name]}, run_dir=run_dir)

    monkeypatch.setattr(demo, "demo_run", fake_run)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert trained == [(m, "tf_efficientnet_lite0", True, 8, "synthetic", 300, m) for m in ("supervised", "fixmatch")]
    assert "gain of fixmatch over supervised: +2.50 mIoU" in capsys.readouterr().out
    trained.clear()
    assert main(["demo", "--out", str(tmp_path / "d"), "--methods", "supervised,unimatch_v2", "--iters", "5"]) == 0
    assert [(t[0], t[5]) for t in trained] == [("supervised", 5), ("unimatch_v2", 5)]
    assert "gain of unimatch_v2 over supervised: +1.00 mIoU" in capsys.readouterr().out

    # Mean Teacher's ramp-up and the memory bank's schedule follow the demo's length
    schedules = {}
    monkeypatch.setattr(demo, "demo_run", lambda cfg, run_dir: schedules.update({cfg.method.name: cfg.method})
                        or SimpleNamespace(metrics={"mIoU": 20.0}, run_dir=run_dir))
    assert main(["demo", "--out", str(tmp_path / "d"), "--methods", "meanteacher,contrastive_memory,fixmatch"]) == 0
    assert schedules["meanteacher"].rampup_iters == 100
    cm = schedules["contrastive_memory"]
    assert (cm.rampup_iters, cm.memory_start_iter, cm.contrastive_start_iter) == (40, 20, 40)
    schedules.clear()
    assert main(["demo", "--out", str(tmp_path / "e"), "--methods", "meanteacher,contrastive_memory", "--iters", "30"]) == 0
    assert schedules["meanteacher"].rampup_iters == 10
    assert (schedules["contrastive_memory"].memory_start_iter, schedules["contrastive_memory"].contrastive_start_iter) == (2, 4)
    capsys.readouterr()

    for scenario in ("medical", "change"):
        seen = []
        monkeypatch.setattr(demo, f"run_{scenario}_demo", lambda out, iters, methods, *data_root: seen.append(methods) or 0)
        assert main(["demo", "--scenario", scenario]) == 0
        assert main(["demo", "--scenario", scenario, "--methods", "supervised,fixmatch"]) == 0
        assert seen == [("supervised", "unimatch"), ["supervised", "fixmatch"]]
