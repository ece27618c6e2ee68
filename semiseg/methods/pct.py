"""Progressive cross training (PCT) with class-aware cross-entropy: Wang, Zhang, Kan, Shan,
"Learning pseudo labels for semi-and-weakly supervised semantic segmentation", Pattern
Recognition 2022 (official code: YudeWang/Learning-Pseudo-Label, ``experiment/
deeplabv3+_voc_swsss/train.py``). Stage one of a two-stage method; ``method.name: pct``.

Data: a few *strong* images with pixel labels (the labelled stream) and many *weak* images with
image-level tags only (the unlabelled stream, ``data.tags``). Every image carries its tags
``y`` (multi-hot, the background always tagged when the dataset has one); the strong images'
tags come from their masks. A step takes half strong, half weak images, as the official code
(``TRAIN_BATCHES // 2`` of each): ``train.batch_size`` strong + ``train.unlabeled_batch_size``
weak.

Two networks of the same architecture, not sharing weights: HybridNet (``self.model``) and
PseudoNet (``self.pseudo_net``, built here with ``build_model(cfg.model, K)``), each run once on
the concatenated batch (official: ``HybridNet(image)``, ``PseudoNet(image)``). With ``CCE`` the
class-aware cross-entropy and ``pl(z, y)`` the argmax of the tag-restricted softmax
(:mod:`semiseg.methods.cce`)::

    L_seg    = CCE(hybrid(x_s), mask_s, y_s)                           strong images
    L_cls    = MultiLabelSoftMargin(maxpool(hybrid(x)), y)             all images, background excluded
    L_pseudo = CCE(pseudo(x_w), pl(hybrid(x_w), y_w), y_w)             weak images, labels detached
    L_pct    = sum_i w_i sum_pixels CCE(hybrid(x_w), pl(pseudo(x_w), y_w), y_w) / #pixels
    loss     = L_seg + L_cls + L_pseudo + L_pct                         (official: all weights 1)

Dynamic evaluation: on the strong images, PseudoNet's restricted predictions ``pl(pseudo(x_s),
y_s)`` are compared with the masks; per-class true-positive, ground-truth and predicted pixel
counts are accumulated with momentum 0.99 (``count <- 0.99 count + batch count``) and give a
running per-class IoU ``J_c = TP / (GT + P - TP)`` (:class:`DynamicIoU`; buffers, so they are in
every checkpoint). The weight of weak image ``i`` is ``w_i = (min_{c tagged, J_c > 0} J_c) ** 8``
(:func:`pct_image_weights`).

Followed from the official code (the paper is silent or differs):

* the counts are updated with this batch before the weights are computed; the ground-truth
  count starts at 1 (``iou_t = ones``), the others at 0, so ``J`` is 0, not 0/0, for an unseen class;
* in ``w_i`` the tagged classes whose ``J`` is exactly 0 are skipped, and an image all of whose
  tagged classes have ``J == 0`` weighs 1 (official ``sample_weight[sample_weight == 0] = 1``
  before the min over classes);
* the classification loss uses the global *max*-pooled segmentation logits of HybridNet on all
  images; the strong images get the photometric strong augmentation (official ``DATA_AUGTIME=2``
  for the segmentation loader; here UniMatch's colour jitter / grayscale / blur, not the official
  RandAugment with shear and rotation: ``method.strong_aug_labeled``);
* ``L_pct`` is a per-pixel mean (``torch.mean(loss * weight)``), not normalised by the weights.

Deviations:

* the dynamic-evaluation counts skip pixels whose ground truth is the ignore label (official
  counts PseudoNet's predictions there too, crop padding included), i.e. the standard IoU;
* on the weak images the crop-padding pixels (``ignore_mask == 255``) are excluded from
  ``L_pseudo`` and ``L_pct`` (official predicts and trains on them) and the means are over the
  non-padding pixels;
* CCE uses masked log-sum-exp instead of the official ``exp`` with ``1e-5`` epsilons;
* the official replaces the pseudo labels of weak-half images that are in the strong subset
  (its weak loader walks the whole training set) by their ground truth; here the weak stream is
  the unlabelled pool, disjoint from the strong images, so there is nothing to replace;
* one SGD optimiser over both networks (the trainer's), instead of one per network with the
  same schedule -- the same update for SGD.

``eval_models()`` is ``{"hybrid": HybridNet, "pseudo": PseudoNet}``: HybridNet first (the
default scoring and inference network), since the official pipeline tests and generates the
stage-two pseudo labels with the HybridNet checkpoint (``run.py``). These scores are *without*
tags; ``semiseg pseudo-label RUN --split val --score`` scores the tag-restricted predictions
(see :mod:`semiseg.pseudo_label`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from semiseg.config.methods import PCTConfig
from semiseg.data import IGNORE_INDEX
from semiseg.data.datasets import dataset_info
from semiseg.data.tags import resolve_background
from semiseg.errors import ConfigError
from semiseg.methods.base import Batch, Method, StepContext, StepResult, register_method
from semiseg.methods.cce import (as_tag_mask, class_aware_cross_entropy, class_aware_pseudo_label,
                                 multilabel_tag_loss)
from semiseg.models import build_model


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class (true-positive, ground-truth, predicted) pixel counts over the pixels whose
    target is not ``ignore_index``; float32 ``(K,)`` each."""
    valid = target != ignore_index
    t = target[valid].long()
    p = pred[valid].long()
    gt = torch.bincount(t, minlength=num_classes)[:num_classes].float()
    predicted = torch.bincount(p, minlength=num_classes)[:num_classes].float()
    tp = torch.bincount(t[t == p], minlength=num_classes)[:num_classes].float()
    return tp, gt, predicted


class DynamicIoU(nn.Module):
    """Running per-class IoU of PseudoNet on the strong images (the paper's dynamic evaluation).

    Each :meth:`update` multiplies the counts by ``momentum`` and adds the batch's; ``iou`` is
    ``tp / (gt + pred - tp)``. The ground-truth count starts at 1 as in the official code.
    """

    def __init__(self, num_classes: int, momentum: float = 0.99):
        super().__init__()
        self.momentum = momentum
        self.num_classes = num_classes
        self.register_buffer("tp", torch.zeros(num_classes))
        self.register_buffer("gt", torch.ones(num_classes))
        self.register_buffer("pred", torch.zeros(num_classes))

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        tp, gt, predicted = confusion_counts(pred, target, self.num_classes, ignore_index)
        for buf, add in ((self.tp, tp), (self.gt, gt), (self.pred, predicted)):
            buf.mul_(self.momentum).add_(add.to(buf.device))
        return self.iou

    @property
    def iou(self) -> torch.Tensor:
        return self.tp / (self.gt + self.pred - self.tp).clamp_min(1e-12)


@torch.no_grad()
def pct_image_weights(tags: torch.Tensor, iou: torch.Tensor, power: float) -> torch.Tensor:
    """``(B,)`` weights of the weak images: the lowest ``J`` among each image's tagged classes,
    to the power ``power``; tagged classes with ``J == 0`` are skipped and an image with none
    left weighs 1 (official code)."""
    scores = as_tag_mask(tags).float() * iou.float().unsqueeze(0)
    scores = scores.masked_fill(scores == 0, 1.0)
    return scores.min(dim=1).values.pow(power)


@register_method("pct", PCTConfig)
class PCT(Method):
    """HybridNet (``self.model``) and PseudoNet (``self.pseudo_net``) trained by cross supervision."""

    uses_unlabeled = True
    num_strong_views = 0  # the weak images are used with the weak (geometric) augmentation only

    def __init__(self, cfg, model: nn.Module, num_classes: int, ignore_index: int = 255):
        super().__init__(cfg, model, num_classes, ignore_index)
        if getattr(cfg.data, "tags", None) is None:
            raise ConfigError("method 'pct' needs image tags: set data.tags to 'masks' (derive them from the masks) "
                              "or to a CSV/JSON tags file")
        self.pseudo_net = build_model(cfg.model, num_classes)
        if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            self.pseudo_net = nn.SyncBatchNorm.convert_sync_batchnorm(self.pseudo_net)
        try:
            names = list(dataset_info(cfg.data).class_names)
        except Exception:  # a dataset config that cannot be resolved here (tests with stand-ins)
            names = []
        self.background: Optional[int] = resolve_background(cfg.data, names) if names else None
        self.strong_labeled = self.mcfg.strong_aug_labeled
        self.dynamic_iou = DynamicIoU(num_classes, self.mcfg.score_momentum)

    def param_groups(self):
        enc_h, head_h = self.model.param_groups()
        enc_p, head_p = self.pseudo_net.param_groups()
        return list(enc_h) + list(enc_p), list(head_h) + list(head_p)

    def eval_models(self) -> dict[str, nn.Module]:
        return {"hybrid": self.model, "pseudo": self.pseudo_net}

    def train_step(self, batch: Batch, ctx: StepContext) -> StepResult:
        cfg = self.mcfg
        img_s, mask_s, tags_s = batch.labeled["image"], batch.labeled["mask"], batch.labeled["tags"]
        u = batch.unlabeled
        img_w, tags_w, ignore_w = u["weak"], u["tags"], u["ignore_mask"]
        n_s, n_w = img_s.shape[0], img_w.shape[0]
        images, tags = torch.cat((img_s, img_w)), torch.cat((tags_s, tags_w))

        with ctx.autocast():
            pred_hybrid = self.model(images)
            pred_pseudo = self.pseudo_net(images)
        pred_hybrid, pred_pseudo = pred_hybrid.float(), pred_pseudo.float()
        hyb_s, hyb_w = pred_hybrid.split([n_s, n_w])
        pse_s, pse_w = pred_pseudo.split([n_s, n_w])

        # HybridNet: CCE on the strong images, tag classification on every image.
        loss_seg = class_aware_cross_entropy(hyb_s, mask_s, tags_s, self.ignore_index)
        loss_cls = multilabel_tag_loss(pred_hybrid, tags, self.background)

        # PseudoNet learns HybridNet's pseudo labels on the weak images.
        padding = ignore_w == IGNORE_INDEX
        label_from_hybrid = class_aware_pseudo_label(hyb_w, tags_w).masked_fill(padding, self.ignore_index)
        loss_pseudo = class_aware_cross_entropy(pse_w, label_from_hybrid, tags_w, self.ignore_index)

        # Dynamic evaluation of PseudoNet on the strong images, then pseudo-to-hybrid weights.
        iou = self.dynamic_iou.update(class_aware_pseudo_label(pse_s, tags_s), mask_s, self.ignore_index)
        weights = pct_image_weights(tags_w, iou, cfg.score_power)
        label_from_pseudo = class_aware_pseudo_label(pse_w, tags_w).masked_fill(padding, self.ignore_index)
        per_pixel = class_aware_cross_entropy(hyb_w, label_from_pseudo, tags_w, self.ignore_index, reduction="none")
        loss_pct = (per_pixel * weights.view(-1, 1, 1)).sum() / (~padding).sum().clamp_min(1)

        loss = (cfg.weight_seg * loss_seg + cfg.weight_cls * loss_cls + cfg.weight_pseudo * loss_pseudo
                + cfg.weight_pct * loss_pct)
        logs = {"loss_seg": loss_seg.detach(), "loss_cls": loss_cls.detach(), "loss_pseudo": loss_pseudo.detach(),
                "loss_pct": loss_pct.detach(), "pct_weight": weights.mean(), "dyn_mIoU": iou.mean() * 100}
        return StepResult(loss, logs)
