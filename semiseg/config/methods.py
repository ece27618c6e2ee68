"""The ``method`` section's keys, one schema per method.

The schemas live here, beside the rest of the config, so that a config is validated (and a typo
reported) without importing the methods, which need torch. Each method's class names its schema
(:func:`semiseg.methods.base.register_method`); a method added outside this package registers
its own schema with :func:`register_method_config`.

What each key does is told in the method's own module (``semiseg/methods/<name>.py``); the
comments here say the default's source.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from semiseg.config.schema import MethodConfig

# ---------------------------------------------------------------------------------------------
# Weak-to-strong consistency: FixMatch, UniMatch, Mean Teacher (semiseg.methods.consistency)

MixSource = Literal["separate_batch", "in_batch"]
# Where the CutMix partner of an unlabelled image comes from, for every consistency method:
#   "separate_batch": a second, independently drawn unlabelled batch whose pseudo labels come
#       from an extra eval-mode, no-grad forward pass (official UniMatch / FixMatch code);
#   "in_batch": the same batch in reverse order (``flip(0)``), reusing the weak predictions
#       already computed (UniMatch V2's code): no extra batch, no extra forward pass.
# The default is "in_batch": it drops the partner's eval-mode pass (7% of UniMatch's step, 15% of
# FixMatch's on the CamVid-CPU v1 model) with CamVid mIoU within seed noise of the official
# source (BENCHMARKS.md, "Defaults against the official recipe"). "separate_batch" reproduces the
# official recipe exactly.
DEFAULT_MIX_SOURCE: MixSource = "in_batch"


class ConsistencyConfig(MethodConfig):
    """Keys shared by FixMatch and UniMatch."""

    conf_thresh: float = Field(0.95, ge=0.0, le=1.0)  # tau: official UniMatch Pascal and COCO 0.95, Cityscapes 0
    mix_source: MixSource = DEFAULT_MIX_SOURCE
    teacher: Literal["none", "ema"] = "none"  # "ema": pseudo labels from an EMA teacher
    ema_momentum: float = Field(0.996, ge=0.0, le=1.0)  # with teacher=ema; UniMatch V2's value
    use_tags: bool = False  # restrict pseudo labels to the unlabelled images' tags (needs data.tags)
    # Loss of the strong views and the fp stream against the pseudo labels: "ce", the confidence-
    # masked cross-entropy (natural images); "dice", the official medical scenario's Dice loss over
    # the confident pixels (semiseg.methods.consistency.unsupervised_dice_loss)
    loss_u: Literal["ce", "dice"] = "ce"
    # Diagnostic, not a method: the pseudo labels of the unlabelled crops are their true masks
    # (confidence 1; void counts as padding). Measures self-training with perfect pseudo labels;
    # the unlabelled images need masks (semiseg.methods.consistency.oracle_target).
    oracle_pseudo_labels: bool = False
    # Where the weak view's pseudo labels come from without a teacher: "train", the student's
    # training-mode weak forward (official: BatchNorm batch statistics of labelled + weak images,
    # dropout on); "eval", an eval-mode no-grad pass of the student over the weak view made before
    # the training forwards (running statistics, no dropout), one extra forward a step. Beyond the
    # papers (semiseg.methods.consistency.ConsistencyMethod.plan_forwards).
    weak_labels: Literal["train", "eval"] = "train"
    # "freematch": FreeMatch's self-adaptive class thresholds (Wang et al., ICLR 2023) replace
    # conf_thresh, which is then not read: classes the network rarely predicts get lower
    # thresholds. Beyond the UniMatch papers (semiseg.methods.consistency.SelfAdaptiveThresholds).
    adaptive_thresh: Literal["none", "freematch"] = "none"
    adaptive_momentum: float = Field(0.999, ge=0.0, lt=1.0)  # FreeMatch's EMA momentum (official 0.999)
    # Distribution alignment (ReMixMatch, Berthelot et al., ICLR 2020; USB's DistAlignEMAHook), per
    # pixel: the weak softmax is multiplied by (class frequency of the labelled masks) / (the mean
    # weak softmax), both running averages, and renormalised before the pseudo labels and their
    # confidences are read, so that classes the network under-predicts gain pseudo labels. Beyond
    # the UniMatch papers (semiseg.methods.consistency.DistributionAlignment).
    dist_align: bool = False
    dist_align_momentum: float = Field(0.999, ge=0.0, lt=1.0)  # USB's default for ReMixMatch (ema_p)


class FixMatchConfig(ConsistencyConfig):
    name: str = "fixmatch"
    weight_x: float = Field(1.0, ge=0.0)  # loss = (weight_x * L_x + weight_s * L_s) / 2
    weight_s: float = Field(1.0, ge=0.0)


class UniMatchConfig(ConsistencyConfig):
    name: str = "unimatch"
    feature_perturbation: bool = True  # UniPerb: the fp stream
    dual_strong: bool = True  # DusPerb: two strong views
    fp_dropout: float = Field(0.5, ge=0.0, lt=1.0)  # Dropout2d probability of the fp stream
    weight_x: float = Field(1.0, ge=0.0)  # loss = (weight_x L_x + weight_s mean_k L_sk + weight_fp L_fp) / 2
    weight_s: float = Field(0.5, ge=0.0)  # shared equally by the strong views
    weight_fp: float = Field(0.5, ge=0.0)  # moved to the strong views when feature_perturbation is off


class UniMatchV2Config(ConsistencyConfig):
    name: str = "unimatch_v2"
    teacher: Literal["ema"] = "ema"  # pseudo labels always come from the EMA teacher (official)
    comp_drop: bool = True  # complementary channel dropout on the two strong views
    comp_drop_kept: float = Field(0.5, ge=0.0, le=1.0)  # share of images keeping every channel (official 0.5)
    weight_x: float = Field(1.0, ge=0.0)  # loss = (weight_x L_x + weight_s (L_s1 + L_s2) / 2) / 2
    weight_s: float = Field(1.0, ge=0.0)


class MeanTeacherConfig(MethodConfig):
    name: str = "meanteacher"
    consistency: Literal["ce", "mse"] = "ce"
    conf_thresh: float = Field(0.0, ge=0.0, le=1.0)  # 0: every non-padding pixel teaches
    unsup_weight: float = Field(1.0, ge=0.0)  # loss = L_x + unsup_weight * ramp * L_u
    rampup_iters: int = Field(0, ge=0)  # sigmoid ramp-up length; 0 = none
    mix_source: MixSource = DEFAULT_MIX_SOURCE
    ema_momentum: float = Field(0.99, ge=0.0, le=1.0)


# ---------------------------------------------------------------------------------------------
# AllSpark (semiseg.methods.allspark, semiseg.models.allspark_neck)

CrossHeads = Literal["merged", "per_head"]
KVScope = Literal["image", "batch"]


class AllSparkKeys(MethodConfig):
    """Keys of the AllSpark neck and memory, shared by ``allspark`` and ``allspark_unimatch``."""

    num_heads: int = Field(2, ge=1)  # official configs: 2
    attn_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # attention and projection dropout (official 0.1)
    neck_dim: Optional[int] = Field(None, ge=1)  # attention width; None = the deepest feature's channels (official)
    cross_heads: CrossHeads = "merged"  # "merged": official code; "per_head": the paper's multi-head reading
    memory: bool = True  # false: never fill nor read the semantic memory (ablation)
    memory_warmup_iters: Optional[int] = Field(None, ge=0)  # read the memory from this iteration on
    memory_warmup_epochs: float = Field(5.0, ge=0.0)  # used when memory_warmup_iters is None (official Pascal: 5)
    grouping_source: Literal["logits", "probs"] = "logits"  # what channels are grouped against (official: logits)
    pseudo_label_kv: KVScope = "batch"  # neck keys/values in the pseudo-label pass (official: the whole batch)
    strong_labeled: bool = True  # photometric strong augmentation of the labelled images (official AllSpark)


class AllSparkConfig(AllSparkKeys):
    name: str = "allspark"
    conf_thresh: float = Field(0.0, ge=0.0, le=1.0)  # official: none (every pixel teaches)


class AllSparkUniMatchConfig(UniMatchConfig, AllSparkKeys):
    name: str = "allspark_unimatch"
    strong_labeled: bool = False  # UniMatch's labelled pipeline
    # Where the weak view's pseudo labels come from (without an EMA teacher): "eval_pass", an
    # eval-mode pass, i.e. the neck's labelled (cross-attention) branch, as in official AllSpark;
    # "weak_forward": UniMatch's training-mode weak prediction, i.e. the unlabelled
    # (self-attention) branch, which no label ever reaches (see AllSparkUniMatch).
    pseudo_label_source: Literal["eval_pass", "weak_forward"] = "eval_pass"


# ---------------------------------------------------------------------------------------------
# Alonso et al.'s contrastive memory (semiseg.methods.contrastive_memory)


class ContrastiveMemoryConfig(MethodConfig):
    name: str = "contrastive_memory"
    # --- mean teacher and self-training
    ema_momentum: float = Field(0.995, ge=0.0, le=1.0)
    ema_schedule: Literal["cosine", "constant"] = "cosine"
    rampup_iters: int = Field(2000, ge=0)  # sigmoid ramp-up of L_u; ClassMix only after it
    classmix_prob: float = Field(0.75, ge=0.0, le=1.0)  # per strong copy, after the ramp-up
    classmix_exclude: list[int] = []  # classes never pasted when others exist; [0] for Pascal
    labeled_classmix_prob: float = Field(0.2, ge=0.0, le=1.0)  # official weak labelled augmentation
    labeled_jitter_prob: float = Field(0.2, ge=0.0, le=1.0)
    confidence_power: float = Field(6.0, ge=0.0)  # pixel weight = confidence ** 6
    entropy_weight: float = Field(0.01, ge=0.0)
    class_balance: bool = False  # official on Cityscapes
    class_balance_window: Optional[int] = Field(None, ge=1)  # steps; None = one unlabelled epoch
    # --- contrastive module
    proj_dim: int = Field(256, ge=2)
    memory_per_class: int = Field(256, ge=2)
    memory_per_image: Optional[int] = Field(None, ge=1)  # None = official rule (see the method)
    memory_ranking: Literal["paper", "official"] = "paper"
    memory_conf_thresh: float = Field(0.95, ge=0.0, le=1.0)
    memory_start_iter: int = Field(1000, ge=0)  # memory updated once iteration > this
    contrastive_start_iter: int = Field(2000, ge=0)  # contrastive terms once iteration > this
    contrastive_weight_l: float = Field(0.1, ge=0.0)
    contrastive_weight_u: float = Field(0.1, ge=0.0)
    max_pixels_per_class: Optional[int] = Field(None, ge=2)  # random cap per class; None = all


# ---------------------------------------------------------------------------------------------
# PCT (semiseg.methods.pct)


class PCTConfig(MethodConfig):
    name: str = "pct"
    score_momentum: float = Field(0.99, ge=0.0, lt=1.0)  # official score_mom
    score_power: float = Field(8.0, ge=0.0)  # official TRAIN_SCORE_POW
    weight_seg: float = Field(1.0, ge=0.0)  # loss = weight_seg L_seg + weight_cls L_cls + ...
    weight_cls: float = Field(1.0, ge=0.0)
    weight_pseudo: float = Field(1.0, ge=0.0)
    weight_pct: float = Field(1.0, ge=0.0)
    strong_aug_labeled: bool = True  # photometric strong augmentation on the strong images


# ---------------------------------------------------------------------------------------------
# The registry: method.name -> schema

METHOD_SCHEMAS: dict[str, type[MethodConfig]] = {
    "supervised": MethodConfig,
    "fixmatch": FixMatchConfig,
    "unimatch": UniMatchConfig,
    "unimatch_v2": UniMatchV2Config,
    "meanteacher": MeanTeacherConfig,
    "allspark": AllSparkConfig,
    "allspark_unimatch": AllSparkUniMatchConfig,
    "contrastive_memory": ContrastiveMemoryConfig,
    "pct": PCTConfig,
}


def register_method_config(name: str, schema: type[MethodConfig]) -> None:
    """Make ``method.name: <name>`` valid, with ``schema``'s keys."""
    METHOD_SCHEMAS[name] = schema


def method_schema(name: str) -> type[MethodConfig]:
    """The schema of ``method.name: <name>``; ValueError naming the known methods otherwise."""
    if name not in METHOD_SCHEMAS:
        known = ", ".join(sorted(METHOD_SCHEMAS))
        raise ValueError(f"unknown method {name!r}; expected one of: {known}")
    return METHOD_SCHEMAS[name]
