"""``semiseg bench``: the report has every field and the FLOP count matches a direct count."""

import json

from semiseg.bench import run_bench
from semiseg.config import load_config

from conftest import as_sets

TINY = ["data.synthetic.num_train=24", "data.synthetic.num_val=2", "data.synthetic.image_size=48",
        "data.crop_size=32", "data.labeled=8", "model.encoder=test_resnet", "model.decoder_channels=16",
        "train.batch_size=2"]


def test_bench_fields_and_image_count():
    official = ["method.name=unimatch", "method.mix_source=separate_batch"]
    r = run_bench(load_config("synthetic", TINY + official), steps=1, warmup=1, loader_batches=2)
    # UniMatch with the official separate CutMix batch: labelled + unlabelled + partner batches.
    assert r["images_per_step"] == 6
    default = run_bench(load_config("synthetic", TINY + ["method.name=unimatch"]), steps=1, warmup=1, loader_batches=2)
    assert default["images_per_step"] == 4  # in_batch (the default): the partner is the same batch
    assert default["flops_per_step"] < r["flops_per_step"]  # no eval-mode partner pass
    for key in ("sec_per_step", "images_per_sec", "peak_memory_mb", "flops_per_step", "achieved_tflops",
                "matmul_peak_tflops", "loader_images_per_sec"):
        assert r[key] > 0, key
    assert 0 < r["mfu"] < 5
    sup = run_bench(load_config("synthetic", TINY), steps=1, warmup=1, loader_batches=2)
    assert sup["images_per_step"] == 2
    assert sup["flops_per_step"] < r["flops_per_step"]


def test_bench_cli_json(cli):
    r = cli("bench", "synthetic", "--steps", "1", "--warmup", "1", "--json", *as_sets(TINY))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["method"] == "supervised"


def test_bench_times_the_step_train_runs(tmp_path, monkeypatch):
    """``semiseg bench`` and ``semiseg train`` call one and the same ``Trainer.step``, gradient
    averaging and clipping included: nothing of the step is re-implemented for the benchmark."""
    import torch

    from semiseg.engine import trainer as T

    calls, clips = [], []
    real_step, real_clip = T.Trainer.step, torch.nn.utils.clip_grad_norm_

    def spy_step(self, it, batches):
        calls.append(it)
        return real_step(self, it, batches)

    monkeypatch.setattr(T.Trainer, "step", spy_step)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clips.append(1) or real_clip(*a, **k))
    clip = ["train.grad_clip=1.0", "train.eval_every=0", "train.iters=2"]
    run_bench(load_config("synthetic", TINY + clip), steps=1, warmup=1, loader_batches=1)
    assert calls == [0, 1, 2] and len(clips) == 3  # warm-up, the FLOP count, the timed step
    calls.clear(), clips.clear()
    T.Trainer(load_config("synthetic", TINY + clip), tmp_path / "run", progress=False).fit()
    assert calls == [0, 1] and len(clips) == 2


def test_flop_count_of_a_grouped_convolution_backward_is_its_own_groups_work():
    """Backward of a convolution = the forward's multiply-adds for the input gradient plus as many
    for the weight gradient, whatever the groups; PyTorch's own formula counts a depthwise
    backward as a dense one's (64x too many here)."""
    import torch

    from semiseg.bench import count_flops

    for groups in (1, 4, 64):
        conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False)
        forward = 2 * 8 * 32 * 32 * 64 * (64 // groups) * 9  # 2 FLOPs per multiply-add
        for needs_input_grad, passes in ((True, 3), (False, 2)):
            x = torch.randn(8, 64, 32, 32, requires_grad=needs_input_grad)
            assert count_flops(lambda: conv(x).sum().backward()) == passes * forward, (groups, needs_input_grad)


def test_fixed_batch_takes_one_batch_per_stream_for_every_step(monkeypatch):
    """``--fixed-batch`` times the step without the loader: each stream is read once, and every
    warm-up, counted and timed step reuses that batch; without it each step reads a new one."""
    from semiseg.engine import sampling

    pulled = {}
    real = sampling.Stream.iterate_from

    def counting(self, iteration):
        for batch in real(self, iteration):
            pulled[iteration] = pulled.get(iteration, 0) + 1
            yield batch

    monkeypatch.setattr(sampling.Stream, "iterate_from", counting)
    cfg = load_config("synthetic", TINY + ["method.name=fixmatch"])
    r = run_bench(cfg, steps=2, warmup=1, loader_batches=1, fixed_batch=True)
    assert r["fixed_batch"] is True
    assert pulled[0] == 2  # the labelled and the unlabelled stream, once each
    pulled.clear()
    r = run_bench(cfg, steps=2, warmup=1, loader_batches=1)
    assert r["fixed_batch"] is False
    assert pulled[0] == 2 * 4  # warm-up, FLOP count and two timed steps, for each stream
