"""The shipped configs hold the recipe their header states, and the official ones state the official
recipe.

Each config's leading comment carries ``# recipe: section.key=value ...`` lines (values in YAML);
the loaded config must have exactly those values. The recipes that claim to be UniMatch's or the
CamVid-CPU protocol's are compared with tables written here from the sources: LiheYoung/UniMatch
``configs/{pascal,cityscapes,coco}.yaml`` and ``unimatch.py`` (SGD momentum 0.9, weight decay 1e-4,
poly 0.9, sliding-window evaluation on Cityscapes only, the length of the unlabelled loader), and
``BENCHMARK.md`` of the CamVid-CPU v1 protocol.
"""

from __future__ import annotations

import filecmp
import math
from pathlib import Path

import pytest
import yaml

from semiseg.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "semiseg" / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def header_recipe(path: Path) -> dict:
    """The ``section.key=value`` pairs of the ``# recipe:`` lines of the leading comment."""
    recipe = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("recipe:"):
            for item in text[len("recipe:"):].split():
                key, value = item.split("=", 1)
                assert key not in recipe, f"{path.name}: {key} stated twice"
                recipe[key] = yaml.safe_load(value)
    return recipe


def config_value(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return list(node) if isinstance(node, tuple) else node


def unimatch_recipe(*, crop, epochs, unlabeled, lr, lr_multi, conf_thresh, loss="ce", eval_mode="original",
                    per_gpu=2, gpus=4, **extra) -> dict:
    """An official UniMatch config in semiseg's keys, for one process holding every GPU's images.
    Steps per epoch: DistributedSampler pads the unlabelled set to ceil(n / gpus) per GPU, and the
    loader drops the last incomplete batch."""
    steps = math.ceil(unlabeled / gpus) // per_gpu
    return {"data.crop_size": crop, "method.name": "unimatch", "method.conf_thresh": conf_thresh,
            "train.batch_size": per_gpu * gpus, "train.iters": epochs * steps, "train.lr": lr,
            "train.head_lr_mult": lr_multi, "train.momentum": 0.9, "train.weight_decay": 1e-4,
            "train.poly_power": 0.9, "train.loss": loss, "eval.mode": eval_mode, **extra}


def unimatch_v2_recipe(*, crop, epochs, unlabeled, lr, lr_multi, conf_thresh, backbone, per_gpu, gpus=4,
                       loss="ce", eval_mode="original") -> dict:
    """An official UniMatch V2 config (LiheYoung/UniMatch-V2 ``configs/*.yaml`` and
    ``unimatch_v2.py``: AdamW with weight decay 0.01, EMA momentum 0.996, DPT on DINOv2) in
    semiseg's keys, for one process holding every GPU's images."""
    steps = math.ceil(unlabeled / gpus) // per_gpu
    return {"data.crop_size": crop, "model.encoder": backbone, "model.head": "dpt",
            "method.name": "unimatch_v2", "method.conf_thresh": conf_thresh, "method.ema_momentum": 0.996,
            "train.batch_size": per_gpu * gpus, "train.iters": epochs * steps, "train.optimizer": "adamw",
            "train.lr": lr, "train.head_lr_mult": lr_multi, "train.weight_decay": 0.01, "train.poly_power": 0.9,
            "train.loss": loss, "eval.mode": eval_mode}


CAMVID_PROTOCOL = {"data.dataset": "camvid", "data.labeled": "splits/1_8/labeled.txt", "data.resize": [240, 180],
                   "data.crop_size": 128, "data.scale_range": [0.5, 2.0], "model.pretrained": False,
                   "train.iters": 1200, "train.batch_size": 8, "train.unlabeled_batch_size": None,
                   "train.lr": 0.02, "train.head_lr_mult": 1.0, "train.momentum": 0.9, "train.weight_decay": 1e-4,
                   "train.poly_power": 0.9, "eval.mode": "original"}

# UniMatch's remote-sensing network and data keys, shared by its UniMatch and supervised configs
CD_MODEL = {"data.scale_range": [0.8, 1.2], "data.val_split": "test", "model.encoder": "resnet50",
            "model.pretrained": True, "model.output_stride": 16, "model.head": "deeplabv3plus", "model.siamese": True}


OFFICIAL = {
    # 1464 labelled, 9118 unlabelled images (splits/pascal/1464)
    "pascal": unimatch_recipe(crop=321, epochs=80, unlabeled=9118, lr=0.001, lr_multi=10.0, conf_thresh=0.95,
                              **{"model.encoder": "resnet101", "model.pretrained": True, "model.output_stride": 16}),
    # 372 labelled, 2603 unlabelled images (splits/cityscapes/1_8); OHEM's min_kept 200000 counts the
    # pixels of one GPU's 2 images, so 4 x 200000 for the 8 images of one process
    "cityscapes": unimatch_recipe(crop=801, epochs=240, unlabeled=2603, lr=0.005, lr_multi=1.0, conf_thresh=0.0,
                                  loss="ohem", eval_mode="sliding_window",
                                  **{"train.ohem_thresh": 0.7, "train.ohem_min_kept": 4 * 200000,
                                     "eval.crop_size": 801, "model.encoder": "resnet101", "model.pretrained": True,
                                     "model.output_stride": 16}),
    # 232 labelled of COCO's 118287 training images (splits/coco/1_512)
    "coco": unimatch_recipe(crop=513, epochs=30, unlabeled=118287 - 232, lr=0.004, lr_multi=10.0, conf_thresh=0.95,
                            **{"model.pretrained": True, "model.output_stride": 16}),
    # UniMatch V2 on the same split: 4 images per GPU x 4 GPUs, 60 epochs, DINOv2-S
    "pascal_unimatch_v2": unimatch_v2_recipe(crop=518, epochs=60, unlabeled=9118, lr=5e-6, lr_multi=40.0,
                                             conf_thresh=0.95, backbone="vit_small_patch14_dinov2", per_gpu=4),
    # change detection (more-scenarios/remote-sensing): 8 labelled + 8 unlabelled pairs on one GPU, the 5%
    # splits' 6764 (LEVIR-CD) and 5650 (WHU-CD) unlabelled pairs, scored on test.txt
    **{name: unimatch_recipe(crop=256, epochs=80, unlabeled=unlabeled, lr=0.02, lr_multi=1.0, conf_thresh=0.95,
                             per_gpu=8, gpus=1, **{**CD_MODEL, "data.dataset": dataset,
                                                   "method.mix_source": "separate_batch"})
       for name, dataset, unlabeled in (("levir", "levir_cd", 6764), ("whu", "whu_cd", 5650))},
    # their supervised baselines (supervised.py): 16 labelled pairs a step, 80 epochs of the 5% splits'
    # 356 (LEVIR-CD) and 297 (WHU-CD) labelled pairs
    **{f"{name}_supervised": {**CD_MODEL, "data.dataset": dataset, "data.crop_size": 256,
                              "method.name": "supervised", "train.batch_size": 16, "train.iters": 80 * (labeled // 16),
                              "train.lr": 0.02, "train.head_lr_mult": 1.0, "train.momentum": 0.9,
                              "train.weight_decay": 1e-4, "train.poly_power": 0.9, "train.loss": "ce",
                              "eval.mode": "original"}
       for name, dataset, labeled in (("levir", "levir_cd", 356), ("whu", "whu_cd", 297))},
    "camvid_v1": {**CAMVID_PROTOCOL, "model.encoder": "resnet18", "model.head": "deeplabv3plus",
                  "model.output_stride": 16},
    # the protocol's data and optimiser, AllSpark's model and official method keys
    "camvid_v1_allspark": {**CAMVID_PROTOCOL, "model.encoder": "pvt_v2_b0", "model.head": "segformer",
                           "method.name": "allspark", "method.num_heads": 2, "method.attn_dropout": 0.1,
                           "method.cross_heads": "merged", "method.grouping_source": "logits",
                           "method.pseudo_label_kv": "batch", "method.strong_labeled": True,
                           "method.conf_thresh": 0.0},
}


def test_the_top_level_configs_folder_is_the_packaged_one():
    top = REPO / "configs"
    assert top.resolve() == CONFIG_DIR.resolve() or all(
        filecmp.cmp(p, top / p.name, shallow=False) for p in SHIPPED)
    assert sorted(p.name for p in top.glob("*.yaml")) == [p.name for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_holds_the_recipe_its_header_states(path):
    recipe = header_recipe(path)
    assert recipe, f"{path.name}: no '# recipe:' line in the header"
    cfg = load_config(path)
    for key, stated in recipe.items():
        assert config_value(cfg, key) == stated, f"{path.name}: {key} is {config_value(cfg, key)!r}, header {stated!r}"


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_recipes_state_the_official_values(name):
    recipe = header_recipe(CONFIG_DIR / f"{name}.yaml")
    for key, official in OFFICIAL[name].items():
        assert key in recipe, f"{name}.yaml: the header does not state {key}"
        assert recipe[key] == official, f"{name}.yaml: header {key}={recipe[key]!r}, official {official!r}"


def test_official_iteration_counts():
    # 80, 240 and 30 epochs of 1140, 325 and 14757 steps (the official logs print every len // 8
    # steps: 142, 40 and 1844)
    assert (OFFICIAL["pascal"]["train.iters"], OFFICIAL["cityscapes"]["train.iters"],
            OFFICIAL["coco"]["train.iters"]) == (91200, 78000, 442710)
    assert OFFICIAL["pascal_unimatch_v2"]["train.iters"] == 60 * 570  # ceil(9118 / 4) // 4 steps an epoch
    assert (OFFICIAL["levir"]["train.iters"], OFFICIAL["whu"]["train.iters"]) == (80 * 845, 80 * 706)
    assert (OFFICIAL["levir_supervised"]["train.iters"], OFFICIAL["whu_supervised"]["train.iters"]) == (1760, 1440)
