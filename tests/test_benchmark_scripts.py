"""Scripts under ``benchmarks/`` that compute figures (not timings) are tested like the package."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from conftest import write_folder_dataset  # noqa: E402
from pseudo_label_quality import confident_errors, measure  # noqa: E402


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, train_run):
    root = write_folder_dataset(tmp_path_factory.mktemp("plq") / "data", n=10, lists=True, void=True)
    run = train_run(["data.dataset=folder", f"data.root={root}", "data.num_classes=3", "data.crop_size=16",
                     "model.encoder=test_resnet", "model.decoder_channels=8", "train.batch_size=2", "train.iters=2",
                     "train.precision=fp32"], "plq")
    return run


def test_threshold_zero_keeps_every_scored_pixel_and_matches_the_evaluator(folder_run):
    out = measure(str(folder_run), "val.txt", [0.0, 0.5, 0.9, 1.01])
    rows = out["rows"]
    assert out["images"] == 2
    assert rows[0]["kept"] == 1.0
    kept = [r["kept"] for r in rows]
    assert kept == sorted(kept, reverse=True) and kept[-1] == 0.0  # confidence never exceeds 1
    assert rows[-1]["accuracy_of_kept"] == 0.0 and rows[-1]["mIoU_of_kept"] == 0.0
    final = [json.loads(x) for x in (folder_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["type"] == "eval"
    assert rows[0]["accuracy_of_kept"] * 100 == pytest.approx(final["pixel_acc"], abs=1e-6)
    assert rows[0]["mIoU_of_kept"] == pytest.approx(final["mIoU"], abs=1e-6)
    shares = rows[0]["per_class_kept_share_of_gt"]
    assert shares == [1.0] * 3  # with nothing filtered, every ground-truth pixel is kept


def test_confusion_of_kept_pixels_agrees_with_every_other_figure(folder_run):
    out = measure(str(folder_run), "val.txt", [0.0, 0.6, 1.01])
    gt = out["gt_pixels"]
    for row in out["rows"]:
        m = row["confusion_of_kept"]
        total = sum(map(sum, m))
        assert total == pytest.approx(row["kept"] * sum(gt))
        diag = sum(m[c][c] for c in range(3))
        assert diag == pytest.approx(row["accuracy_of_kept"] * total) if total else diag == 0
        for c in range(3):  # rows are true classes, columns pseudo labels
            assert sum(m[c]) == pytest.approx(row["per_class_kept_share_of_gt"][c] * gt[c])
            union = gt[c] + sum(m[r][c] for r in range(3)) - m[c][c]
            assert 100 * m[c][c] / max(union, 1) == pytest.approx(row["per_class_iou"][c])
    assert [sum(r) for r in out["rows"][0]["confusion_of_kept"]] == gt  # threshold 0 keeps every pixel


def test_confident_errors_rank_wrong_labels_by_share_of_the_true_class():
    row = {"confusion_of_kept": [[50, 0, 0],
                                 [30, 10, 5],
                                 [1, 0, 0]]}
    names = ["road", "sidewalk", "pole"]
    assert confident_errors(row, [100, 60, 4], names) == [
        ("sidewalk", "road", 0.5), ("pole", "road", 0.25), ("sidewalk", "pole", 5 / 60)]
    assert confident_errors(row, [100, 60, 4], names, top=1) == [("sidewalk", "road", 0.5)]
    assert confident_errors({"confusion_of_kept": [[3, 0], [0, 2]]}, [3, 2], ["a", "b"]) == []


TINY_CONFIG = """\
data: {dataset: folder, num_classes: 3, crop_size: 16, workers: 0}
model: {encoder: test_resnet, decoder_channels: 8, pretrained: false}
method: {name: supervised}
train: {batch_size: 2, eval_every: 0}
"""


def test_camvid_cpu_trains_the_named_config_with_the_protocol_keys_and_appends_its_row(tmp_path, monkeypatch):
    import camvid_cpu

    root = write_folder_dataset(tmp_path / "data", n=10, lists=True)
    lines = (root / "train.txt").read_text().splitlines(keepends=True)
    (root / "splits" / "1_8").mkdir(parents=True)
    (root / "splits" / "1_8" / "labeled.txt").write_text("".join(lines[:3]))
    (root / "splits" / "1_8" / "unlabeled.txt").write_text("".join(lines[3:]))
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    results = tmp_path / "BENCHMARKS.md"
    results.write_text("# Benchmarks\n\nkept text\n")
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["camvid_cpu.py", "--config", str(config), "--data-root", str(root),
                                      "--out", str(run), "--results", str(results),
                                      "--set", "train.iters=2", "--set", "train.precision=fp32"])
    assert camvid_cpu.main() == 0
    saved = (run / "config.yaml").read_text()
    assert "test_resnet" in saved and "splits/1_8/labeled.txt" in saved  # the file, then the protocol keys
    assert "lr: 0.02" in saved and "iters: 2" in saved  # track S lr; --set wins over the track's iters
    text = results.read_text()
    assert text.startswith("# Benchmarks\n\nkept text\n")
    row = text.rstrip("\n").splitlines()[-1].split(" | ")
    assert row[1:5] == ["S", "supervised", "1_8", "0"]
    assert f"--config {config}" in row[-1]


def test_camvid_cpu_names_a_missing_config(tmp_path, monkeypatch):
    import camvid_cpu

    monkeypatch.setattr(sys, "argv", ["camvid_cpu.py", "--config", "no_such_config", "--results",
                                      str(tmp_path / "B.md")])
    with pytest.raises(SystemExit, match=r"--config no_such_config: no such config file .*no_such_config\.yaml"):
        camvid_cpu.main()
    assert not (tmp_path / "B.md").exists()


# ---------------------------------------------------------------------------------------------
# allspark_kv_probe.py


def test_kv_source_swaps_the_labelled_branch_keys_for_the_training_forward_it_names():
    """In eval mode, kv_source('memory') equals the training-mode labelled branch reading the
    memory, and kv_source('self') the training-mode unlabelled branch; both undo on exit."""
    import torch
    from allspark_kv_probe import kv_source

    from semiseg.models.allspark_neck import AllSparkNeck, NeckPass

    torch.manual_seed(0)
    neck = AllSparkNeck(6, 3, (2, 3), num_heads=2, attn_dropout=0.0).eval()
    x = torch.randn(2, 6, 2, 3)
    with torch.no_grad():
        plain = neck(x)
        with kv_source(neck, "memory"):
            from_memory = neck(x)
        with kv_source(neck, "self"):
            from_self = neck(x)
        after = neck(x)
        neck.train()
        with neck.plan([NeckPass(2)], use_memory=True):
            trained_labelled = neck(x)
        with neck.plan([NeckPass(0)]):
            trained_unlabelled = neck(x)
    assert torch.allclose(from_memory, trained_labelled, atol=1e-5)
    assert torch.allclose(from_self, trained_unlabelled, atol=1e-5)
    assert not torch.allclose(from_memory, plain, atol=1e-3) and not torch.allclose(from_self, plain, atol=1e-3)
    assert torch.equal(after, plain)
    with pytest.raises(ValueError, match="source must be one of"):
        with kv_source(neck, "batch"):
            pass


def test_kv_probe_scores_a_run_with_each_source_and_matches_the_evaluator_for_image(tmp_path_factory, train_run):
    from allspark_kv_probe import probe

    root = write_folder_dataset(tmp_path_factory.mktemp("kvp") / "data", n=10, lists=True)
    run = train_run(["data.dataset=folder", f"data.root={root}", "data.num_classes=3", "data.crop_size=64",
                     "data.labeled=3", "model.encoder=test_resnet", "model.head=segformer", "model.embed_dim=8",
                     "model.output_stride=32", "method.name=allspark", "train.batch_size=2", "train.iters=2",
                     "train.precision=fp32", "eval.mode=sliding_window"], "kvp")
    rows = probe(str(run))
    assert [(r["mode"], r["source"]) for r in rows] == [
        ("sliding_window", "image"), ("sliding_window", "memory"), ("sliding_window", "self"),
        ("original", "image"), ("original", "self")]
    final = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["type"] == "eval"
    assert rows[0]["mIoU"] == pytest.approx(final["mIoU"], abs=1e-6)  # image = what evaluation scores
    with pytest.raises(SystemExit, match="no AllSpark neck"):
        probe(str(train_run(["data.dataset=folder", f"data.root={root}", "data.num_classes=3", "data.crop_size=16",
                             "model.encoder=test_resnet", "model.decoder_channels=8", "train.batch_size=2",
                             "train.iters=1", "train.precision=fp32"], "kvp2")))


# ---------------------------------------------------------------------------------------------
# bn_recalibration_probe.py


def test_recalibrate_sets_the_statistics_to_the_average_over_the_batches_and_leaves_the_weights():
    import torch
    from bn_recalibration_probe import recalibrate
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1))
    net[0].running_mean.fill_(5.0)
    net[0].running_var.fill_(7.0)
    images = [torch.randn(2, 3, 4) * (i + 1) + i for i in range(5)]
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert recalibrate(net, [{"image": im} for im in images], batch=2) == 3  # batches of 2, 2 and 1
    batches = [torch.stack(images[0:2]), torch.stack(images[2:4]), torch.stack(images[4:5])]
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.transpose(0, 1).reshape(2, -1).var(dim=1, unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(net[0].running_mean, mean, atol=1e-6)
    assert torch.allclose(net[0].running_var, var, atol=1e-5)
    assert not net.training and not net[0].training
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())
    with pytest.raises(SystemExit, match="no BatchNorm layer"):
        recalibrate(nn.Conv2d(2, 2, 1), [{"image": images[0]}])


def test_bn_probe_scores_the_run_as_trained_like_the_evaluator_then_recalibrated(folder_run):
    from bn_recalibration_probe import probe

    rows = probe(str(folder_run), split="val", calib="train", batch=4)
    final = [json.loads(x) for x in (folder_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["type"] == "eval"
    assert rows[0]["state"] == "as trained" and rows[0]["mIoU"] == pytest.approx(final["mIoU"], abs=1e-6)
    assert rows[1]["state"] == "BatchNorm recomputed on 'train' (2 batches of 4)"  # the 8 training images
    assert len(rows[1]["per_class_iou"]) == 3


def test_bn_probe_scores_the_network_it_is_asked_for_and_names_the_others(tmp_path_factory, train_run, capsys):
    import bn_recalibration_probe
    from semiseg.errors import ConfigError

    root = write_folder_dataset(tmp_path_factory.mktemp("bnmt") / "data", n=10, lists=True, void=True)
    lines = (root / "train.txt").read_text().splitlines(keepends=True)
    (root / "labeled.txt").write_text("".join(lines[:4]))
    (root / "unlabeled.txt").write_text("".join(lines[4:]))
    run = train_run(["method.name=meanteacher", "data.dataset=folder", f"data.root={root}", "data.num_classes=3",
                     "data.labeled=labeled.txt", "data.unlabeled=unlabeled.txt",
                     "data.crop_size=16", "model.encoder=test_resnet", "model.decoder_channels=8",
                     "train.batch_size=2", "train.iters=2", "train.precision=fp32"], "bnmt")
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = {r["model"]: r for r in evals if r.get("type") == "eval" and r["iter"] == 2}
    assert set(final) == {"student", "teacher"}
    for name in ("student", "teacher"):
        rows = bn_recalibration_probe.probe(str(run), batch=4, network=name)
        assert [r["network"] for r in rows] == [name, name]
        assert rows[0]["mIoU"] == pytest.approx(final[name]["mIoU"], abs=1e-6)
    with pytest.raises(ConfigError, match=r"eval.model='hybrid' but method 'meanteacher' has only student, teacher"):
        bn_recalibration_probe.probe(str(run), network="hybrid")
    with pytest.raises(SystemExit, match=r"^error: eval.model='hybrid' but method 'meanteacher' has only"):
        bn_recalibration_probe.main([str(run), "--network", "hybrid"])


def test_errors_at_must_be_one_of_the_thresholds(monkeypatch, tmp_path):
    import pseudo_label_quality

    monkeypatch.setattr(sys, "argv", ["pseudo_label_quality.py", str(tmp_path / "run"), "--thresholds", "0,0.9",
                                      "--errors-at", "0.95"])
    with pytest.raises(SystemExit, match=r"--errors-at 0.95: not one of --thresholds 0,0.9"):
        pseudo_label_quality.main()


# ---------------------------------------------------------------------------------------------
# camvid_v2.py and render_v2.py


def _camvid_like(tmp_path):
    root = write_folder_dataset(tmp_path / "data", n=10, lists=True)
    lines = (root / "train.txt").read_text().splitlines(keepends=True)
    for split in ("1_16", "1_8"):
        (root / "splits" / split).mkdir(parents=True)
        (root / "splits" / split / "labeled.txt").write_text("".join(lines[:3]))
        (root / "splits" / split / "unlabeled.txt").write_text("".join(lines[3:]))
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    return root, config


def test_claim_run_dir_gives_runs_started_in_the_same_second_their_own_directories(tmp_path, monkeypatch):
    import camvid_v2

    class Frozen(camvid_v2.datetime):  # every call in the same second
        @classmethod
        def now(cls, tz=None):
            return camvid_v2.datetime(2026, 12, 7, 9, 47, 13)

    monkeypatch.setattr(camvid_v2, "datetime", Frozen)
    base = tmp_path / "runs" / "fixmatch-1_16-s0-variant"
    claimed = [camvid_v2.claim_run_dir(base) for _ in range(4)]
    assert [p.name for p in claimed] == ["fixmatch-1_16-s0-variant", "fixmatch-1_16-s0-variant-20261207-094713",
                                         "fixmatch-1_16-s0-variant-20261207-094713-2",
                                         "fixmatch-1_16-s0-variant-20261207-094713-3"]
    assert all(p.is_dir() for p in claimed)
    (claimed[0] / "metrics.jsonl").write_text("{}\n")  # an earlier run's files stay as they were
    camvid_v2.claim_run_dir(base)
    assert (claimed[0] / "metrics.jsonl").read_text() == "{}\n"


def test_camvid_v2_appends_one_json_line_per_run(tmp_path):
    import camvid_v2

    root, config = _camvid_like(tmp_path)
    results = tmp_path / "v2.jsonl"
    args = ["--method", "supervised", "--split", "1_8", "--seed", "3", "--config", str(config), "--data-root",
            str(root), "--runs", str(tmp_path / "runs"), "--results", str(results),
            "--set", "train.iters=2"]
    assert camvid_v2.main(args) == 0
    row = json.loads(results.read_text())
    assert (row["method"], row["split"], row["seed"], row["iters"]) == ("supervised", "1_8", 3, 2)
    assert row["variant"] == [f"--config {config}", "train.iters=2"]
    assert "train.precision=fp32" in row["overrides"]  # the protocol's, on a bf16 CPU as on an AVX2 one
    assert len(row["per_class_iou"]) == 3 and row["network"] == "student"
    assert row["machine"]["threads"] >= 1 and "python benchmarks/camvid_v2.py --method supervised" in row["command"]
    saved = (Path(row["run_dir"]) / "config.yaml").read_text()
    assert "splits/1_8/labeled.txt" in saved and "seed: 3" in saved and "precision: fp32" in saved
    with pytest.raises(SystemExit, match="--split all is the supervised ceiling"):
        camvid_v2.main(["--method", "unimatch", "--split", "all", "--data-root", str(root)])
    with pytest.raises(SystemExit, match=r"--data-root .*: not a CamVid folder with splits/"):
        camvid_v2.main(["--method", "supervised", "--data-root", str(tmp_path)])
    # a bad key's value (a missing folder): the trainer's one-line error, no traceback, no empty run dir
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    missing = tmp_path / "no_such_labels"
    with pytest.raises(SystemExit, match=f"^camvid_v2.py: data.extra_labels folder {missing} does not exist"):
        camvid_v2.main([*args[:-2], "--set", f"data.extra_labels={missing}"])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == before


def test_camvid_v2_a_stopped_run_resumes_to_the_row_of_an_uninterrupted_run(tmp_path, monkeypatch):
    import camvid_v2

    from semiseg.engine.trainer import Trainer

    root, config = _camvid_like(tmp_path)
    results = tmp_path / "v2.jsonl"
    args = ["--method", "supervised", "--split", "1_8", "--config", str(config), "--data-root", str(root),
            "--results", str(results), "--set", "train.iters=4", "--set", "train.eval_every=2",
            "--set", "train.precision=fp32"]
    assert camvid_v2.main(args + ["--runs", str(tmp_path / "whole")]) == 0
    whole = json.loads(results.read_text())

    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: fit(self, stop_after=None if self.resume else 2))
    assert camvid_v2.main(args + ["--runs", str(tmp_path / "cut")]) == 0
    assert len(results.read_text().splitlines()) == 1  # stopped after 2 of 4 iterations: no row yet
    run = tmp_path / "cut" / "supervised-1_8-s0-variant"
    assert json.loads((run / "benchmark.json").read_text())["segments"] == 1
    assert camvid_v2.main(["--resume", str(run), "--results", str(results)]) == 0
    resumed = json.loads(results.read_text().splitlines()[1])
    assert resumed["segments"] == 2 and resumed["iters"] == 4
    for key in ("method", "split", "seed", "mIoU", "per_class_iou", "networks", "best_mIoU", "variant", "overrides"):
        assert resumed[key] == whole[key], key
    assert resumed["command"] == whole["command"].replace("/whole", "/cut")  # the command that started it
    with pytest.raises(SystemExit, match=r"--resume .*: no benchmark.json there"):
        camvid_v2.main(["--resume", str(tmp_path), "--results", str(results)])


def _row(method, split, seed, miou, variant=(), sps=1.0):
    return {"method": method, "split": split, "seed": seed, "mIoU": miou, "variant": list(variant),
            "sec_per_step": sps, "wall_min": 10.0, "best_mIoU": miou, "network": "student",
            "networks": {"student": miou}, "per_class_iou": [1.0] * 11, "date": "2026-11-30 06:00 UTC",
            "command": "python benchmarks/camvid_v2.py", "machine": {"cpu": "CPU", "isa": "AVX2", "threads": 1,
                                                                    "affinity": [0], "torch": "2"}}


def test_render_v2_matrix_means_seeds_and_keeps_variants_out():
    import render_v2

    rows = [_row("supervised", "1_8", 0, 40.0), _row("supervised", "1_8", 1, 42.0),
            _row("unimatch", "1_8", 0, 46.0), _row("unimatch", "1_8", 1, 49.0, sps=3.0),
            _row("unimatch", "1_8", 0, 99.0, variant=["method.conf_thresh=0.7"]),  # a variant: log only
            _row("unimatch", "1_8", 0, 11.0),  # a rerun of a cell: the first run counts
            _row("fixmatch", "1_16", 0, 30.0), _row("supervised", "all", 0, 60.0)]
    text = render_v2.matrix(rows)
    first = text.split("Gain over supervised")[0]
    lines = {line.split(" | ")[0]: line for line in first.splitlines() if line.startswith("| ")}
    assert "| **41.00** (40.00 / 42.00) |" in lines["| Supervised (labelled images only)"]
    assert lines["| UniMatch"].endswith("| not run yet | **47.50** (46.00 / 49.00) |")
    assert "30.00 (seed 0 only)" in lines["| FixMatch"]
    assert lines["| *Ceiling: supervised on all 367 masks*"].count("60.00 (seed 0 only)") == 2
    gains = text.split("Gain over supervised")[1]
    assert "| UniMatch | – | +6.50 (2 seeds), gap 34% |" in gains and "| FixMatch | – | – |" in gains  # 6.5 / (60 - 41)
    assert "| UniMatch | 2.00 (10.0 min, 2) |" in text.split("Seconds per step")[1]  # (1 + 3) / 2
    other = {**_row("unimatch", "1_16", 0, 40.0, sps=7.0), "machine": {"cpu": "Xeon", "isa": "AVX-512 BF16",
                                                                     "threads": 2, "affinity": [0], "torch": "2"}}
    timing = render_v2.matrix(rows + [other]).split("Seconds per step")[1]  # one line per method, a column per CPU
    assert "| method | CPU (AVX2) | Xeon (AVX-512 BF16) |" in timing
    assert "| UniMatch | 2.00 (10.0 min, 2) | 7.00 (10.0 min, 1, 2 threads) |" in timing
    assert "| FixMatch | 1.00 (10.0 min, 1) | – |" in timing
    assert "| unimatch | `method.conf_thresh=0.7` | 1_8 | 0 | 99.00 | +59.00 (40.00) |" in text.split("Variants")[1]
    log = render_v2.log(rows)
    assert log.count("\n| 2026-11-30") == len(rows) and "99.00" in log


def test_render_v2_puts_a_recipe_in_the_matrix_against_its_own_supervised_control():
    import render_v2

    street = ["model.aspp_rates=[2,4,6]", "train.loss=ohem", "train.ohem_min_kept=20480"]
    recipe = street + ["method.conf_thresh=0", "data.strong_blur_sigma=[0.1,0.8]"]
    rows = [_row("supervised", "1_16", 0, 40.0), _row("supervised", "1_16", 1, 38.0),
            _row("supervised", "all", 0, 50.0),
            _row("supervised", "1_16", 0, 41.0, variant=street), _row("supervised", "1_16", 1, 39.0, variant=street),
            _row("fixmatch", "1_16", 0, 43.0, variant=recipe[::-1]),  # the order of the overrides does not matter
            _row("fixmatch", "1_16", 1, 41.0, variant=recipe, sps=3.0),
            _row("fixmatch", "1_16", 0, 99.0, variant=recipe[:-1])]  # one change short: a variant
    text = render_v2.matrix(rows)
    table = text.split("Gain over supervised")[0]
    assert ("| *Recipe:* FixMatch, CamVid recipe: ASPP 2/4/6, OHEM, threshold 0, blur sigma 0.1-0.8 | "
            "**42.00** (43.00 / 41.00) | not run yet |") in table
    assert "| *Recipe:* Supervised + the recipe's ASPP rates 2/4/6 and OHEM | **40.00** (41.00 / 39.00) |" in table
    gains = text.split("Gain over supervised")[1].split("Variants")[0]
    # the recipe against its control: +2 over a gap of 50 - 40; the control against plain supervised: +1 of 11
    assert ("| FixMatch, CamVid recipe: ASPP 2/4/6, OHEM, threshold 0, blur sigma 0.1-0.8 (against Supervised "
            "+ the recipe's ASPP rates 2/4/6 and OHEM) | +2.00 (2 seeds), gap 20% | – |") in gains
    assert ("| Supervised + the recipe's ASPP rates 2/4/6 and OHEM (against Supervised) | +1.00 (2 seeds), "
            "gap 9% | – |") in gains
    variants = text.split("Variants")[1].split("Seconds per step")[0]
    assert "99.00" in variants and "43.00" not in variants and "41.00 |" not in variants
    assert "| FixMatch, CamVid recipe: ASPP 2/4/6, OHEM, threshold 0, blur sigma 0.1-0.8 | 2.00 (10.0 min, 2) |" in \
        text.split("Seconds per step")[1]
    alone = render_v2.matrix(rows[:3] + rows[5:7])  # before its control has a run
    assert "| *Recipe:* FixMatch, CamVid recipe" in alone and "| *Recipe:* Supervised +" not in alone
    assert ("(against Supervised + the recipe's ASPP rates 2/4/6 and OHEM) | – | – |") in alone
    # the control's own ceiling (its changes on all 367 masks) sets the recipe's gap: +2 of 44 - 40
    with_top = render_v2.matrix(rows + [_row("supervised", "all", 0, 44.0, variant=street)])
    assert ("| *Recipe ceiling:* Supervised + the recipe's ASPP rates 2/4/6 and OHEM, all 367 masks | "
            "44.00 (seed 0 only) | 44.00 (seed 0 only) |") in with_top
    # the recipe with the loss weights is a row of its own, with as many seeds as it has
    weights = recipe + ["method.weight_x=2", "method.weight_s=0.5"]
    four = render_v2.matrix(rows + [_row("fixmatch", "1_16", s, 40.0 + s, variant=weights) for s in range(4)])
    assert ("| *Recipe:* FixMatch, CamVid recipe, L_x + L_s / 4 (`method.weight_x=2 method.weight_s=0.5`) | "
            "**41.50** (40.00 / 41.00 / 42.00 / 43.00) | not run yet |") in four.split("Gain over supervised")[0]
    # against the control on the seeds both have (0 and 1): (40 + 41) / 2 - 40, of a gap of 50 - 40
    assert ("L_s / 4 (`method.weight_x=2 method.weight_s=0.5`) (against Supervised + the recipe's ASPP rates "
            "2/4/6 and OHEM) | +0.50 (2 seeds), gap 5% | – |") in four
    assert "(against Supervised + the recipe's ASPP rates 2/4/6 and OHEM) | +2.00 (2 seeds), gap 50% | – |" in with_top
    assert "(against Supervised) | +1.00 (2 seeds), gap 9% | – |" in with_top  # the control: the protocol's ceiling
    assert render_v2.missing(rows[:6])[-1] == (
        "python benchmarks/camvid_v2.py --method fixmatch --split 1_16 --set model.aspp_rates=[2,4,6] --set "
        "train.loss=ohem --set train.ohem_min_kept=20480 --set method.conf_thresh=0 --set "
        "data.strong_blur_sigma=[0.1,0.8] --seed 1  # about 10 min per run so far")


def test_render_v2_matches_the_self_training_recipe_by_pattern_and_measures_it_against_two_controls():
    import render_v2

    street = ["model.aspp_rates=[2,4,6]", "train.loss=ohem", "train.ohem_min_kept=20480"]
    cbst = street + ["data.extra_labels_balance=true"]
    rows = [_row("supervised", "1_16", 0, 40.0), _row("supervised", "1_16", 1, 38.0),
            _row("supervised", "all", 0, 50.0),
            _row("supervised", "1_16", 0, 41.0, variant=street), _row("supervised", "1_16", 1, 39.0, variant=street),
            _row("supervised", "1_16", 0, 42.0, variant=street + ["train.iters=1600"]),
            _row("supervised", "1_16", 1, 41.0, variant=["train.iters=1600"] + street),
            # any folder named cbst50-*, wherever it is: the pattern's * matches any text
            _row("supervised", "1_16", 0, 43.0, variant=cbst + ["data.extra_labels=runs/a/cbst50-s0"]),
            _row("supervised", "1_16", 1, 42.0, variant=["data.extra_labels=/abs/b/cbst50-1_16-s1"] + cbst),
            _row("supervised", "1_16", 0, 77.0, variant=cbst + ["data.extra_labels=runs/st/pl-1_16-s0"]),  # not CBST
            _row("supervised", "1_16", 0, 78.0, variant=cbst),  # the labels missing: a variant
            # outside a *, brackets are literal: aspp_rates=2 is not [2,4,6]
            _row("supervised", "1_16", 1, 79.0, variant=["model.aspp_rates=2"] + street[1:])]
    assert [render_v2.recipe_of(r) for r in rows[5:]] == [
        "recipe:supervised-street-1600", "recipe:supervised-street-1600", "recipe:cbst-street", "recipe:cbst-street",
        None, None, None]
    text = render_v2.matrix(rows)
    table = text.split("Gain over supervised")[0]
    label = "Self-training: a student on CBST pseudo labels (P = 0.5) of the control (teacher 800 + student 800 iterations)"
    assert f"| *Recipe:* {label} | **42.50** (43.00 / 42.00) | not run yet |" in table
    assert "| *Recipe:* Supervised + the recipe, 1600 iterations (`train.iters=1600`) | **41.50** (42.00 / 41.00) |" in table
    gains = text.split("Gain over supervised")[1].split("Variants")[0]
    # against its teacher, 42.5 - 40: no gap, the pipeline trains 1600 iterations and the teacher 800;
    # against the 1600-iteration control, 42.5 - 41.5: no gap either until there is a 1600-iteration ceiling
    assert f"| {label} (against Supervised + the recipe's ASPP rates 2/4/6 and OHEM) | +2.50 (2 seeds) | – |" in gains
    assert f"| {label} (against Supervised + the recipe, 1600 iterations) | +1.00 (2 seeds) | – |" in gains
    long_top = _row("supervised", "all", 0, 52.0, variant=street + ["train.iters=1600"])
    gains = render_v2.matrix(rows + [long_top]).split("Gain over supervised")[1]
    assert f"| {label} (against Supervised + the recipe, 1600 iterations) | +1.00 (2 seeds), gap 10% | – |" in gains  # 1 / (52 - 41.5)
    assert f"| {label} (against Supervised + the recipe's ASPP rates 2/4/6 and OHEM) | +2.50 (2 seeds) | – |" in gains
    # the student started from its teacher, and the teacher continued without pseudo labels: 1600 iterations both
    warm = [_row("supervised", "1_16", s, 44.0 - s, variant=cbst + ["data.extra_labels=runs/a/cbst50-s%d" % s,
                                                                  "train.init_from=runs/t/supervised-1_16-s%d" % s])
            for s in (0, 1)] + [_row("supervised", "1_16", s, 42.0, variant=street + ["train.init_from=runs/t/x"])
                                for s in (0, 1)]
    assert [render_v2.recipe_of(r) for r in warm] == ["recipe:cbst-street-warm"] * 2 + ["recipe:supervised-street-warm"] * 2
    gains = render_v2.matrix(rows + [long_top] + warm).split("Gain over supervised")[1]
    warm_label = "Self-training from the teacher: the CBST student started from the control's weights (`train.init_from`)"
    assert (f"| {warm_label} (against Supervised + the recipe, continued 800 iterations from the control) | "
            "+1.50 (2 seeds), gap 15% | – |") in gains  # 1.5 / (52 - 42)
    assert f"| {warm_label} (against Supervised + the recipe, 1600 iterations) | +2.00 (2 seeds), gap 19% | – |" in gains
    variants = text.split("Variants")[1].split("Seconds per step")[0]
    assert all(f"| {v:.2f} |" in variants for v in (77.0, 78.0, 79.0)) and "| 43.00 |" not in variants
    # the missing seed: the command that makes its labels from the control, then the student's
    todo = render_v2.missing(rows[:8])
    assert todo[-2] == ("semiseg pseudo-label runs/bench-v2/supervised-1_16-s1-variant --no-tags --keep-per-class 0.5 "
                        "--out runs/bench-v2/cbst50-1_16-s1 --set eval.flip=true --set "
                        "\"eval.scales=[0.5,0.75,1.0,1.5,2.0]\"  # first")
    assert todo[-1].startswith("python benchmarks/camvid_v2.py --method supervised --split 1_16 --set "
                               "model.aspp_rates=[2,4,6] --set train.loss=ohem --set train.ohem_min_kept=20480 --set "
                               "data.extra_labels=runs/bench-v2/cbst50-1_16-s1 --set data.extra_labels_balance=true "
                               "--seed 1  # about")


def test_camvid_v2_reads_cpu_family_and_model_and_render_keeps_generations_apart():
    import camvid_v2
    import render_v2

    info = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
            "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
            "processor\t: 1\ncpu family\t: 99\nmodel\t\t: 99\nmodel name\t: other\nflags\t\t: avx2\n")
    assert camvid_v2.cpu_fields(info) == {"cpu": "AMD EPYC", "isa": "AVX-512 BF16", "cpu_family": "26",
                                          "cpu_model": "2"}
    assert camvid_v2.cpu_fields("") == {"cpu": "unknown CPU", "isa": "?", "cpu_family": None, "cpu_model": None}
    zen = {"cpu": "AMD EPYC", "isa": "AVX-512 BF16", "threads": 1, "affinity": [0], "torch": "2"}
    rows = [{**_row("fixmatch", "1_8", 0, 40.0, sps=2.0), "machine": {**zen, "cpu_family": "25", "cpu_model": "17"}},
            {**_row("fixmatch", "1_8", 1, 41.0, sps=1.0), "machine": {**zen, "cpu_family": "26", "cpu_model": "2"}},
            {**_row("fixmatch", "1_16", 0, 30.0, sps=5.0), "machine": zen}]  # recorded before family and model
    timing = render_v2.matrix(rows).split("Seconds per step")[1]
    assert ("| method | AMD EPYC (AVX-512 BF16) | AMD EPYC family 25 model 17 (AVX-512 BF16) | "
            "AMD EPYC family 26 model 2 (AVX-512 BF16) |") in timing
    assert "| FixMatch | 5.00 (10.0 min, 1) | 2.00 (10.0 min, 1) | 1.00 (10.0 min, 1) |" in timing
    assert "| 1 (0) | AMD EPYC family 26 model 2 (AVX-512 BF16), torch 2 |" in render_v2.log(rows)


def test_render_v2_compares_a_variant_with_supervised_under_the_same_budget():
    import render_v2

    rows = [_row("supervised", "1_16", 0, 40.0), _row("supervised", "1_16", 0, 45.0, variant=["train.iters=2400"]),
            _row("fixmatch", "1_16", 0, 41.0, variant=["train.iters=2400"]),
            _row("fixmatch", "1_16", 0, 42.0, variant=["method.oracle_pseudo_labels=true", "data.strong_blur_p=0"]),
            _row("fixmatch", "1_16", 1, 39.0, variant=["train.iters=2400"])]  # no supervised seed-1 run at 2400
    variants = render_v2.matrix(rows).split("Variants")[1]
    assert "| supervised | `train.iters=2400` | 1_16 | 0 | 45.00 | +5.00 (40.00) |" in variants
    assert "| fixmatch | `train.iters=2400` | 1_16 | 0 | 41.00 | -4.00 (45.00, with `train.iters=2400`) |" in variants
    assert ("| fixmatch | `method.oracle_pseudo_labels=true`, `data.strong_blur_p=0` | 1_16 | 0 | 42.00 | "
            "+2.00 (40.00) |") in variants
    assert "| fixmatch | `train.iters=2400` | 1_16 | 1 | 39.00 | – |" in variants


def test_render_v2_missing_lists_the_commands_of_the_empty_cells_and_seeds():
    import render_v2

    rows = [_row("supervised", "1_8", 0, 40.0), _row("supervised", "1_8", 1, 42.0),
            _row("fixmatch", "1_16", 0, 30.0), _row("fixmatch", "1_16", 1, 31.0, variant=["x=1"]),
            _row("pct", "1_16", 0, 30.0), {**_row("pct:stage2", "1_16", 0, 30.0), "wall_min": 99.0}]
    todo = render_v2.missing(rows)
    assert "python benchmarks/camvid_v2.py --method supervised --split 1_8 --seed 0" not in "\n".join(todo)
    assert todo[0] == "python benchmarks/camvid_v2.py --method supervised --split 1_16 --seed 0  # about 10 min per run so far"
    assert "python benchmarks/camvid_v2.py --method fixmatch --split 1_16 --seed 1  # about 10 min per run so far" in todo
    assert not any("--method fixmatch --split 1_16 --seed 0" in t for t in todo)  # a variant fills no cell
    assert not any("pct:stage2" in t for t in todo)  # stage two comes with --method pct
    # stage two's wall time counts the whole run (stage one, pseudo labels, stage two)
    assert "python benchmarks/camvid_v2.py --method pct --split 1_16 --seed 1  # about 99 min per run so far" in todo
    assert todo[-2:] == [f"python benchmarks/camvid_v2.py --method supervised --split all --seed {s}  # about 10 min "
                         "per run so far" for s in (0, 1)]
    assert len(todo) == 9 * 2 * 2 + 2 - 4  # every method x split x seed and the ceiling's two, less the four run


def test_render_v2_replaces_only_between_its_markers():
    import render_v2

    doc = f"# B\n\nintro\n{render_v2.BEGIN}\nold table\n{render_v2.END}\n\nkept\n"
    new = render_v2.render(doc, [_row("supervised", "1_8", 0, 40.0)])
    assert new.startswith("# B\n\nintro\n") and new.endswith(f"{render_v2.END}\n\nkept\n") and "old table" not in new
    with pytest.raises(SystemExit, match="markers"):
        render_v2.render("# no markers\n", [])


def test_camvid_v2_records_paths_beside_the_project_relative_to_it(tmp_path):
    import camvid_v2

    repo = camvid_v2.REPO
    assert camvid_v2.as_recorded(repo.parent / "shared" / "data" / "camvid") == "../shared/data/camvid"
    assert camvid_v2.as_recorded(repo / "runs" / "bench-v2" / "supervised-1_8-s0") == "runs/bench-v2/supervised-1_8-s0"
    assert camvid_v2.as_recorded(tmp_path / "camvid") == str(tmp_path / "camvid")  # elsewhere: as given
    start = repo / "runs" / "bench-v2" / "supervised-1_16-s0"
    assert camvid_v2.recorded_overrides([f"data.root={repo.parent / 'shared' / 'data' / 'camvid'}",
                                         f"train.init_from={start}", "train.iters=400"]) == [
        "data.root=../shared/data/camvid", "train.init_from=runs/bench-v2/supervised-1_16-s0", "train.iters=400"]
    # the command a row records names no machine's layout either, and leaves out where the row went
    assert camvid_v2.recorded_command(
        ["--method", "fixmatch", "--set", f"train.init_from={start}", f"--set=train.init_from={start}",
         "--data-root", str(repo.parent / "shared" / "data" / "camvid"), f"--runs={repo / 'runs' / 'x'}",
         "--results", str(tmp_path / "r.jsonl"), f"--results={tmp_path / 'r.jsonl'}", "--set", "train.iters=400",
         "--config", str(tmp_path / "my config.yaml")]) == (
        "python benchmarks/camvid_v2.py --method fixmatch --set train.init_from=runs/bench-v2/supervised-1_16-s0"
        " --set=train.init_from=runs/bench-v2/supervised-1_16-s0 --data-root ../shared/data/camvid --runs=runs/x"
        f" --set train.iters=400 --config '{tmp_path / 'my config.yaml'}'")


@pytest.mark.parametrize("scenario,keys", [
    ("medical", {"mDice", "per_class_dice"}),
    ("change", {"changed_iou", "f1", "precision", "recall", "overall_acc", "unchanged_iou"}),
])
def test_scenario_demo_appends_one_row_per_method_and_seed_with_the_scenarios_scores(tmp_path, scenario, keys):
    pytest.importorskip("h5py")
    from scenario_demo import main

    results = tmp_path / "rows.jsonl"
    assert main(["--scenario", scenario, "--seeds", "0,1", "--methods", "supervised", "--iters", "1",
                 "--runs", str(tmp_path / "runs"), "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["scenario"], r["method"], r["seed"], r["iters"], r["data"]) for r in rows] == \
        [(scenario, "supervised", 0, 1, "generated"), (scenario, "supervised", 1, 1, "generated")]
    for r in rows:
        assert keys <= set(r) and r["command"].startswith("python benchmarks/scenario_demo.py --scenario")
        runs = tmp_path / "runs" / f"{scenario}-supervised-s{r['seed']}"
        evals = [json.loads(x) for x in (runs / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
        main_score = "mDice" if scenario == "medical" else "changed_iou"
        assert r[main_score] == round(evals[-1][main_score], 2)


def test_scenario_demo_natural_measures_the_demo_setting_with_overrides_and_keeps_settings_apart(tmp_path, monkeypatch):
    """``--scenario natural`` trains ``configs/demo.yaml`` (or ``--config``) with the ``--set``
    overrides (a method's own keys included); its rows carry mIoU (the last evaluation's), every
    evaluation, the config, the overrides, the iterations and the precision that ran; another
    setting trains in another folder; ``--set`` or ``--config`` with another scenario is refused."""
    from scenario_demo import main

    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    results, runs = tmp_path / "rows.jsonl", tmp_path / "runs"
    small = ["--set", "data.synthetic.num_train=6", "--set", "data.synthetic.num_val=2", "--set", "data.labeled=2",
             "--set", "train.batch_size=2", "--set", "train.eval_every=1", "--set", "train.iters=2",
             "--set", "model.encoder=test_resnet", "--set", "model.pretrained=false"]
    base = ["--scenario", "natural", "--seeds", "0", "--runs", str(runs), "--results", str(results)]
    assert main(base + ["--methods", "supervised"] + small) == 0
    assert main(base + ["--methods", "supervised", "--config", "synthetic"] + small + ["--set", "train.lr=0.001"]) == 0
    assert main(base + ["--methods", "meanteacher"] + small + ["--set", "method.rampup_iters=5"]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["scenario"], r["method"], r["iters"], r["precision"] in ("fp32", "bf16")) for r in rows] == \
        [("natural", "supervised", 2, True)] * 2 + [("natural", "meanteacher", 2, True)]
    assert [r["set"] for r in rows] == [small[1::2], small[1::2] + ["train.lr=0.001"],
                                        small[1::2] + ["method.rampup_iters=5"]]
    assert [r["config"] for r in rows] == ["demo", "synthetic", "demo"]
    # the demo's schedule for Mean Teacher, scaled to the 2 iterations, applied before --set (which wins)
    assert [r["schedule"] for r in rows] == [[], [], ["method.rampup_iters=1"]]
    assert yaml.safe_load((runs / ("natural-meanteacher-s0-" + "-".join(o.replace("=", "_") for o in rows[2]["set"]))
                           / "config.yaml").read_text())["method"]["rampup_iters"] == 5
    # the command names neither where the runs nor where the rows went
    assert rows[1]["command"] == ("python benchmarks/scenario_demo.py --scenario natural --seeds 0 --methods supervised "
                                  "--config synthetic " + " ".join(small) + " --set train.lr=0.001")
    folders = [f"natural-{r['method']}-s0-" + ("synthetic-" if r["config"] == "synthetic" else "")
               + "-".join(o.replace("=", "_") for o in r["set"]) for r in rows]
    assert sorted(d.name for d in runs.iterdir()) == sorted(folders)
    for r, folder in zip(rows, folders):
        evals = [json.loads(x) for x in (runs / folder / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
        shown = [e for e in evals if e["model"] == "student"]  # the network the demo reports
        assert r["evals"] == {str(e["iter"]): round(e["mIoU"], 2) for e in shown} and list(r["evals"]) == ["1", "2"]
        assert r["mIoU"] == round(shown[-1]["mIoU"], 2) and len(r["per_class_iou"]) == 6
        assert r["networks"] == {e["model"]: round(e["mIoU"], 2) for e in evals if e["iter"] == 2}
    assert list(rows[2]["networks"]) == ["student", "teacher"]
    assert main(base + ["--methods", "meanteacher", "--iters", "6"] + small) == 0
    last = json.loads(results.read_text().splitlines()[-1])
    assert (last["iters"], last["schedule"]) == (6, ["method.rampup_iters=2"])
    trained = yaml.safe_load((runs / ("natural-meanteacher-s0-" + "-".join(o.replace("=", "_") for o in small[1::2]))
                              / "config.yaml").read_text())
    assert (trained["method"]["rampup_iters"], trained["train"]["iters"]) == (2, 6)
    for other in (["--set", "train.lr=0.1"], ["--config", "synthetic"]):
        with pytest.raises(SystemExit):
            main(["--scenario", "medical", *other, "--results", str(results)])


def test_unimatch_v2_gpu_cells_are_valid_configs_of_the_named_recipes():
    """The GPU row's cells load: crop 518 (a multiple of 14 for the ViT), 4 + 4 images, the
    synthetic data in place of Pascal, random weights, and each cell's method and model."""
    import argparse

    import unimatch_v2_gpu as G

    from semiseg.config import load_config

    args = argparse.Namespace(crop=518, batch=4, image_size=512, num_train=48, labeled=16, workers=8, overrides=[])
    expected = {"v2-vit": ("unimatch_v2", "vit_small_patch14_dinov2", "dpt", "adamw"),
                "v1-r101": ("unimatch", "resnet101", "deeplabv3plus", "sgd"),
                "v2-r101": ("unimatch_v2", "resnet101", "deeplabv3plus", "adamw")}
    assert set(G.CELLS) == set(expected)
    for name, (config, extra) in G.CELLS.items():
        for precision in ("fp32", "bf16"):
            cfg = load_config(config, G.cell_overrides(args, extra, precision))
            assert (cfg.method.name, cfg.model.encoder, cfg.model.head, cfg.train.optimizer) == expected[name]
            assert (cfg.data.dataset, cfg.data.crop_size, cfg.train.batch_size) == ("synthetic", 518, 4)
            assert cfg.model.pretrained is False and cfg.train.precision == precision


def test_pseudo_labels_as_trained_score_training_crops_in_both_modes(folder_run, capsys):
    """``--as-trained``: training crops with their true masks kept aside, labelled in training
    mode (BatchNorm batch statistics of labelled + weak crops) and in eval mode; threshold 0
    keeps every scored pixel in both; the running statistics are restored after each batch, so
    two measurements agree exactly."""
    from pseudo_label_quality import main, measure_as_trained

    thresholds = [0.0, 0.36, 0.38, 0.4, 0.42, 0.45, 0.5, 0.6, 0.9, 1.01]
    args = dict(thresholds=thresholds, batches=3, overrides=("data.labeled=2",))
    out = measure_as_trained(str(folder_run), **args)
    train, eval_ = out["modes"]["train"], out["modes"]["eval"]
    assert out["crop_size"] == 16 and out["batch_size"] == 2
    assert train["gt_pixels"] == eval_["gt_pixels"] and sum(train["gt_pixels"]) > 0
    for mode in (train, eval_):
        assert mode["rows"][0]["kept"] == 1.0 and mode["rows"][-1]["kept"] == 0.0
        assert [sum(r) for r in mode["rows"][0]["confusion_of_kept"]] == mode["gt_pixels"]
    assert train["rows"][0]["confusion_of_kept"] != eval_["rows"][0]["confusion_of_kept"]  # the modes differ
    assert measure_as_trained(str(folder_run), **args) == out
    # eval mode equals the checkpoint's network on the same seeded crops: no batch statistics leaked
    from semiseg.api import build_method_from_checkpoint
    from semiseg.data.build import build_train_sets
    from semiseg.engine.sampling import Stream

    cfg, method, _ = build_method_from_checkpoint(str(folder_run), ["data.labeled=2"])
    net = method.inference_model("auto").eval()
    crops = Stream(build_train_sets(cfg, 0, True, unlabeled_masks=True).unlabeled, 2, 1).iterate_from(0)
    confusion = torch.zeros(len(thresholds), 3, 3, dtype=torch.long)
    with torch.no_grad():
        for _, u in zip(range(3), crops):
            conf, label = net(u["weak"]).softmax(1).max(1)
            for i, t in enumerate(thresholds):
                keep = (u["mask"] != 255) & (conf >= t)
                confusion[i] += torch.bincount(u["mask"][keep] * 3 + label[keep], minlength=9).view(3, 3)
    assert confusion.tolist() == [r["confusion_of_kept"] for r in eval_["rows"]]
    assert len({sum(map(sum, r["confusion_of_kept"])) for r in eval_["rows"]}) >= 3  # the thresholds select
    with pytest.raises(SystemExit, match="its config has no unlabelled images"):  # every image of the run is labelled
        main([str(folder_run), "--as-trained", "1", "--thresholds", "0,0.95"])


def test_score_pseudo_labels_leaves_ignored_pixels_out_of_the_iou_and_counts_them(tmp_path):
    """Pseudo labels equal to the true masks on the left half and ignored (255) on the right:
    mIoU 100 on the labelled pixels, ``labelled_share`` the left half's share of the non-void
    pixels, and the ignored pixels counted as no class (they used to be clipped to the last)."""
    import numpy as np
    from PIL import Image
    from score_pseudo_labels import score

    from semiseg.config import load_config
    from semiseg.data.io import read_mask

    root = write_folder_dataset(tmp_path / "data", n=6, size=(8, 4), lists=True, void=True)
    cfg = load_config(None, ["data.dataset=folder", f"data.root={root}", "data.num_classes=3"])
    (tmp_path / "pl").mkdir()
    truth_px, kept_px, valid_px = np.zeros(3), np.zeros(3), 0
    for i in range(4):  # the images of train.txt
        truth = read_mask(root / "masks" / f"img{i:03d}.png").astype(np.int64)
        pseudo = truth.copy()
        pseudo[:, 4:] = 255
        pseudo[0, :4] = i % 3  # under the void pixels: never scored
        Image.fromarray(pseudo.astype(np.uint8), mode="L").save(tmp_path / "pl" / f"img{i:03d}.png")
        valid = truth != 255
        valid_px += valid.sum()
        truth_px += np.bincount(truth[valid], minlength=3)
        kept_px += np.bincount(truth[valid & (pseudo != 255)], minlength=3)
    out = score(tmp_path / "pl", cfg, "train.txt")
    assert out["images"] == 4 and out["mIoU"] == 100.0 and out["pixel_acc"] == 100.0
    assert out["labelled_share"] == round(kept_px.sum() / valid_px, 4) and 0.2 < out["labelled_share"] < 0.6
    names = list(out["pixel_share_ratio"])
    assert out["pixel_share_ratio"] == {n: round(k / t, 3) for n, k, t in zip(names, kept_px, truth_px)}
    assert out["labelled_share_per_class"] == out["pixel_share_ratio"]  # every kept label is right
