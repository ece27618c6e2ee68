"""UniMatch V2 (Yang et al., "UniMatch V2: Pushing the Limit of Semi-Supervised Semantic
Segmentation", TPAMI 2025), following the official ``unimatch_v2.py`` (LiheYoung/UniMatch-V2).

Weak-to-strong consistency with an EMA teacher, two strong views and complementary channel
dropout; V1's separate feature-perturbation stream is gone. One step::

    target_w  = argmax / max softmax teacher(u_w)                  EMA teacher, eval mode, no grad
    u_sk      = CutMix(strong view k of u, partner's strong view k, box_k)      k = 1, 2
    target_sk = CutMix(target_w, partner's target_w, box_k)
    pred_x    = student(x)                                          its own pass
    pred_s1, pred_s2 = student(cat(u_s1, u_s2), complementary dropout)   one pass
    L_s  = (L_u(pred_s1, target_s1) + L_u(pred_s2, target_s2)) / 2
    loss = (weight_x L_x + weight_s L_s) / 2                        official: weights 1 and 1

``L_u`` is the confidence-masked cross-entropy of :func:`~semiseg.methods.consistency.unsupervised_loss`
(pixels below ``conf_thresh`` and padding ignored, divided by the number of non-padding pixels).

Complementary dropout (:func:`~semiseg.methods.perturbations.complementary_dropout`): the two
strong views pass through the encoder together; the features the head reads are multiplied
channel-wise by a ``2 * Bernoulli(0.5)`` mask for the first view of each image and by its
complement ``2 - mask`` for the second, and half of the images (``comp_drop_kept``) keep every
channel in both. On a ViT with the DPT head those are the four intermediate layers, as official;
on DeepLabV3+ the low-level and the deepest feature, on SegFormer all four.

Faithful to the official code:

* the CutMix partner is the batch reversed (``mix_source: in_batch``); ``separate_batch`` takes
  a second unlabelled batch whose pseudo labels come from the teacher;
* the labelled batch has its own student pass (BatchNorm statistics of labelled and strong
  images are not mixed);
* the teacher's momentum is ``min(1 - 1/(i + 1), 0.996)`` after step ``i`` (0-based), over
  parameters and floating-point buffers (:mod:`semiseg.methods.teacher`; integer buffers are
  copied);
* both the student and the teacher are evaluated, the student first (the official best
  checkpoint follows the student's mIoU).

Layer-wise learning rates are the trainer's: the encoder at ``train.lr``, everything else at
``train.lr * train.head_lr_mult`` (official DINOv2 recipe: AdamW, lr 5e-6, multiplier 40,
weight decay 0.01).
"""

from __future__ import annotations

import torch

from semiseg.config.methods import UniMatchV2Config
from semiseg.methods.base import Batch, StepContext, StepResult, register_method
from semiseg.methods.consistency import ConsistencyMethod, mask_ratio
from semiseg.methods.perturbations import complementary_dropout



@register_method("unimatch_v2", UniMatchV2Config)
class UniMatchV2(ConsistencyMethod):
    num_strong_views = 2

    @property
    def uses_teacher(self) -> bool:
        return True

    def strong_logits(self, strong: torch.Tensor) -> torch.Tensor:
        """The student's logits of ``cat(u_s1, u_s2)``, through complementary dropout unless
        ``comp_drop`` is off (then a plain pass: the ablation without it)."""
        if self.mcfg.comp_drop:
            return complementary_dropout(self.model, strong, self.mcfg.comp_drop_kept)
        return self.model(strong)

    def train_step(self, batch: Batch, ctx: StepContext) -> StepResult:
        cfg = self.mcfg
        img_x, mask_x = batch.labeled["image"], batch.labeled["mask"]
        u = batch.unlabeled

        # Pseudo labels of the weak view and of the CutMix partner, from the EMA teacher.
        target_w, target_mix = self.weak_and_partner_targets(None, u, self.separate_partner_target(batch, ctx), ctx,
                                                            mask_x)
        img_u_s = self.mixed_strong_views(batch, 2)

        with ctx.autocast():
            pred_x = self.model(img_x)
            pred_u_s = self.strong_logits(torch.cat(img_u_s)).chunk(2)

        loss_x = self.criterion_l(pred_x.float(), mask_x)
        losses_s = [self.loss_u(pred, target_w.cutmix(target_mix, u[f"box_{k}"]))
                    for k, pred in enumerate(pred_u_s, start=1)]
        loss_s = (losses_s[0] + losses_s[1]) / 2.0
        loss = (cfg.weight_x * loss_x + cfg.weight_s * loss_s) / 2.0

        logs = {"loss_x": loss_x.detach(), "loss_s": loss_s.detach(), "loss_s1": losses_s[0].detach(),
                "loss_s2": losses_s[1].detach(), "mask_ratio": mask_ratio(target_w, self.conf_threshold)}
        return StepResult(loss, logs)
