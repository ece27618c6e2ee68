"""benchmarks/acdc_cpu.py: the ACDC-CPU runner's rows, its table and its refusals, on tiny
generated ACDC-layout data."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import acdc_cpu  # noqa: E402


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    pytest.importorskip("h5py")
    from semiseg.data.acdc_synthetic import generate_acdc

    return generate_acdc(tmp_path_factory.mktemp("acdc"), train_patients=7, val_patients=1, test_patients=1,
                         slices=3, height=24, width=28, seed=1)


TINY = ["--set", "data.crop_size=16", "--set", "train.iters=2", "--set", "train.eval_every=2",
        "--set", "model.unet_channels=[4,8,8,8,8]", "--set", "data.workers=0", "--set", "train.batch_size=2"]


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "unimatch", "unimatch_v2", "meanteacher"])
def test_acdc_cpu_appends_a_row_with_the_protocol_and_the_3d_dice(acdc_root, tmp_path, method):
    results = tmp_path / "rows.jsonl"
    assert acdc_cpu.main(["--method", method, "--cases", "1", "--seed", "2", "--data-root", str(acdc_root),
                          "--runs", str(tmp_path / "runs"), "--results", str(results), *TINY]) == 0
    row = json.loads(results.read_text())
    assert (row["protocol"], row["method"], row["split"], row["seed"], row["iters"]) == ("acdc-cpu", method, "1", 2, 2)
    assert {"train.optimizer=adamw", "train.precision=fp32", "data.crop_size=128"} <= set(row["overrides"])
    assert row["per_class_dice"][0] is None and len(row["per_class_dice"]) == 4
    evals = [json.loads(x) for x in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert row["mDice"] == round(evals[0]["mDice"], 2) and row["network"] == evals[0]["model"]
    mine = [e for e in evals if e["model"] == row["network"]]
    assert row["curve"] == [[e["iter"], round(e["mDice"], 2)] for e in mine] and row["curve"][-1] == [2, row["mDice"]]
    assert "python benchmarks/acdc_cpu.py --method " + method + " --cases 1 --seed 2" in row["command"]
    saved = (Path(row["run_dir"]) / "config.yaml").read_text()
    assert "splits/acdc/1/labeled.txt" in saved and "optimizer: adamw" in saved and "crop_size: 16" in saved
    if method == "meanteacher":  # UniMatch's keys dropped, the ramp-up over the first third
        assert "loss_u" not in saved and f"rampup_iters: {acdc_cpu.ITERS // 3}" in saved
        assert row["config"] == "acdc without method.loss_u, method.conf_thresh"


def test_acdc_cpu_refuses_a_ceiling_of_another_method_and_a_folder_without_slices(tmp_path):
    with pytest.raises(SystemExit, match="--cases all is the supervised ceiling"):
        acdc_cpu.main(["--method", "unimatch", "--cases", "all", "--data-root", str(tmp_path)])
    (tmp_path / "data" / "slices").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"--data-root .*: not an ACDC folder with data/slices/"):
        acdc_cpu.main(["--method", "supervised", "--data-root", str(tmp_path / "data")])


def test_acdc_cpu_warm_start_starts_from_the_supervised_run_of_the_same_cases_and_seed(acdc_root, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "rows.jsonl"
    common = ["--cases", "1", "--seed", "2", "--data-root", str(acdc_root), "--runs", str(runs),
              "--results", str(results), *TINY]
    with pytest.raises(SystemExit, match=r"--warm-start: no supervised run at .*supervised-1-s2: run --method supervised"):
        acdc_cpu.main(["--method", "unimatch", "--warm-start", *common])
    assert not results.exists()
    assert acdc_cpu.main(["--method", "supervised", *common]) == 0
    # TINY's --set makes that run a variant; the protocol's supervised run has the plain name
    (runs / "supervised-1-s2-variant").rename(runs / "supervised-1-s2")
    assert acdc_cpu.main(["--method", "unimatch", "--warm-start", *common]) == 0
    sup, warm = [json.loads(x) for x in results.read_text().splitlines()]
    assert warm["variant"] == [*sup["variant"], f"train.init_from={runs / 'supervised-1-s2'}"]
    assert "--warm-start" in warm["command"] and not acdc_cpu.is_warm(sup) and not acdc_cpu.is_warm(warm)  # TINY too
    assert f"init_from: {runs / 'supervised-1-s2'}" in (Path(warm["run_dir"]) / "config.yaml").read_text()
    warm, sup = {**warm, "variant": warm["variant"][-1:]}, {**sup, "variant": []}  # as the protocol's rows
    assert acdc_cpu.is_warm(warm) and ("unimatch (warm start)", "1") in acdc_cpu.cells([sup, warm])


def _row(method, split, seed, dice, per=(None, 1.0, 2.0, 3.0), variant=()):
    return {"protocol": "acdc-cpu", "method": method, "split": split, "seed": seed, "mDice": dice,
            "per_class_dice": list(per), "sec_per_step": 1.0, "wall_min": 10.0, "variant": list(variant)}


def test_acdc_table_means_seeds_and_measures_the_gap_recovered_against_the_same_budget():
    rows = [_row("supervised", "1", 0, 20.0), _row("supervised", "1", 1, 30.0),
            _row("supervised", "all", 0, 85.0), _row("supervised", "all", 1, 75.0),
            _row("unimatch", "1", 0, 60.0), _row("unimatch", "1", 1, 50.0),
            _row("unimatch", "1", 2, 99.0, variant=["train.iters=5"]),  # a variant: kept out
            _row("unimatch", "1", 0, 10.0)]  # a second row of seed 0: the first one counts
    lines = acdc_cpu.table(rows).splitlines()
    uni = next(line for line in lines if "| unimatch |" in line)
    # mean 55 against supervised 25 (+30.00) and the ceiling 80: 30 / 55 = 55%
    assert "**55.00**" in uni and "s0 60.00 / s1 50.00" in uni and "+30.00" in uni and "| 55% |" in uni
    assert "99.00" not in acdc_cpu.table(rows).split("Variants")[0]
    variants = acdc_cpu.table(rows + [_row("unimatch", "1", 1, 41.0, variant=["train.init_from=runs/x"])]).split("Variants")[1]
    assert "| 1 | unimatch | `train.iters=5` | 2 | 99.00 | - |" in variants  # no supervised seed 2
    assert "| 1 | unimatch | `train.init_from=runs/x` | 1 | 41.00 | +11.00 (30.00) | 1.0 / 2.0 / 3.0 |" in variants
    assert any("| supervised (ceiling) | **80.00** |" in line for line in lines)
    assert acdc_cpu.gap_recovered(50.0, 25.0, 75.0) == 50.0


def test_acdc_render_replaces_only_between_its_markers():
    doc = f"# top\n{acdc_cpu.BEGIN}\nold table\n{acdc_cpu.END}\nbelow\n"
    out = acdc_cpu.render(doc, [_row("supervised", "1", 0, 20.0)])
    assert out.startswith("# top\n") and out.endswith(f"{acdc_cpu.END}\nbelow\n") and "old table" not in out
    assert "| 1 | supervised | **20.00** |" in out and acdc_cpu.render(out, [_row("supervised", "1", 0, 20.0)]) == out
    with pytest.raises(SystemExit, match="no <!-- acdc-cpu matrix"):
        acdc_cpu.render("# nothing here\n", [])


def test_acdc_table_shows_warm_starts_as_methods_against_the_same_seeds_supervised():
    warm = "train.init_from=runs/bench-acdc/supervised-1-s{}"
    rows = [_row("supervised", "1", 0, 40.0), _row("supervised", "1", 1, 46.0), _row("supervised", "all", 0, 88.0),
            _row("unimatch", "1", 0, 61.0, variant=[warm.format(0)]),
            _row("unimatch", "1", 1, 58.0, variant=[warm.format(1)]),
            _row("supervised", "1", 0, 41.0, variant=[warm.format(0)]),
            _row("unimatch", "1", 1, 50.0, variant=["train.init_from=runs/bench-acdc/supervised-1-s0"])]  # other seed's
    text = acdc_cpu.table(rows)
    matrix, variants = text.split("Variants")
    uni = next(line for line in matrix.splitlines() if "| unimatch (warm start) |" in line)
    # mean 59.5 against supervised s0 / s1 43.0 (+16.50); ceiling 88: 16.5 / 45 = 37%
    assert "**59.50**" in uni and "s0 61.00 / s1 58.00" in uni and "+16.50" in uni and "| 37% |" in uni
    # the supervised control has seed 0 only: against supervised seed 0 (40), not the mean of both
    ctl = next(line for line in matrix.splitlines() if "| supervised (warm start) |" in line)
    assert "**41.00**" in ctl and "+1.00" in ctl
    assert matrix.index("| supervised (warm start) |") < matrix.index("| unimatch (warm start) |")
    assert "warm start" not in variants and "| 1 | unimatch | `train.init_from=runs/bench-acdc/supervised-1-s0` | 1 |" in variants


def test_acdc_table_measures_a_warm_start_against_supervised_trained_as_many_iterations():
    warm = ["train.init_from=runs/bench-acdc/supervised-3-s0"]
    rows = [_row("supervised", "3", 0, 50.0), _row("supervised", "3", 1, 52.0),
            _row("supervised", "3", 0, 55.0, variant=warm), _row("unimatch", "3", 0, 70.0, variant=warm),
            _row("unimatch", "3", 1, 60.0, variant=["train.init_from=runs/bench-acdc/supervised-3-s1"]),
            _row("fixmatch", "3", 0, 51.0)]
    rows[1]["wall_min"], rows[0]["wall_min"] = None, 30.0  # a row whose wall time was lost
    lines = acdc_cpu.table(rows).splitlines()
    assert "| cases | method | mDice (mean) | seeds | vs supervised | vs supervised, same iterations |" in lines[0]
    sup, ctl, fix, uni = (next(line for line in lines if f"| {m} |" in line)
                          for m in ("supervised", "supervised (warm start)", "fixmatch", "unimatch (warm start)"))
    assert sup.endswith("| 1.00 | 30.0 |")  # the mean of the walls recorded
    assert "| +5.00 | - |" in ctl  # the control has no control
    assert "| +1.00 | +1.00 |" in fix  # a cold start's control is supervised itself
    # seeds 0 and 1 against supervised 51; the control has seed 0 only: 70 - 55, named
    assert "| +14.00 | +15.00 (s0) |" in uni
    one = acdc_cpu.table(rows[:4]).splitlines()
    assert "| +20.00 | +15.00 |" in next(line for line in one if "| unimatch (warm start) |" in line)
