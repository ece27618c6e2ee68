"""FixMatch for segmentation, as reproduced in UniMatch (Yang et al., CVPR 2023, official
``fixmatch.py``): weak-to-strong consistency with a confidence threshold and CutMix.

One step::

    L_x = criterion_l(f(x), y)                                   labelled batch
    pseudo_label, confidence = argmax / max softmax f(u_w)         weak view, no gradient
    u_s    = CutMix(strong view of u, strong view of partner, cutmix_box)
    target = CutMix(pseudo target of u, pseudo target of partner, cutmix_box)
    L_s = sum CE(f(u_s), pseudo_label) [confidence >= tau] [not padding] / #non-padding pixels
    loss = (weight_x * L_x + weight_s * L_s) / 2                  official: weights 1 and 1

Faithful to the official code, where the paper is silent:

* the labelled and the weak images go through the network together, in training mode
  (``model(cat(img_x, img_u_w))``), and the strong images in a second pass;
* with ``mix_source: separate_batch`` (official) the CutMix partner is a second unlabelled batch
  whose pseudo labels come from an *eval-mode* pass made before the training passes;
  ``in_batch`` (UniMatch V2's code, semiseg's default because it saves that pass) takes the batch
  reversed and reuses the weak predictions;
* ``mask_ratio`` is measured on the weak view's own pseudo labels (before CutMix).

``teacher: ema`` follows UniMatch V2's "FixMatch with an EMA teacher": the pseudo labels of the
weak view and of the partner come from the EMA teacher (eval mode, no grad), the student never
sees the weak view, and the labelled and strong images share one student forward pass
(``model(cat(img_x, img_u_s))``).
"""

from __future__ import annotations

import torch

from semiseg.config.methods import FixMatchConfig
from semiseg.methods.base import Batch, StepContext, StepResult, register_method
from semiseg.methods.consistency import ConsistencyMethod, mask_ratio



@register_method("fixmatch", FixMatchConfig)
class FixMatch(ConsistencyMethod):
    num_strong_views = 1

    def train_step(self, batch: Batch, ctx: StepContext) -> StepResult:
        cfg = self.mcfg
        img_x, mask_x = batch.labeled["image"], batch.labeled["mask"]
        u = batch.unlabeled
        img_u_w, cutmix_box = u["weak"], u["box_1"]
        (img_u_s,) = self.mixed_strong_views(batch, 1)
        plan = self.plan_forwards(batch, [img_u_s], ctx)

        # The CutMix partner: its pseudo labels now (eval-mode pass) or, in-batch, after the weak pass.
        target_mix = self.separate_partner_target(batch, ctx)

        num_lb, num_ulb = img_x.shape[0], img_u_w.shape[0]
        pred_u_w = None  # with an EMA teacher the student does not see the weak view
        with plan.scope, ctx.autocast():
            if not self.joint_strong_pass:
                pred_x, pred_u_w = self.model(torch.cat((img_x, img_u_w))).split([num_lb, num_ulb])
                pred_u_s = self.model(img_u_s)
            else:
                pred_x, pred_u_s = self.model(torch.cat((img_x, img_u_s))).split([num_lb, num_ulb])

        weak_logits = plan.weak_logits if plan.weak_logits is not None else pred_u_w
        target_w, target_mix = self.weak_and_partner_targets(weak_logits, u, target_mix, ctx, mask_x)
        target_s = target_w.cutmix(target_mix, cutmix_box)

        loss_x = self.criterion_l(pred_x.float(), mask_x)
        loss_s = self.loss_u(pred_u_s, target_s)
        loss = (cfg.weight_x * loss_x + cfg.weight_s * loss_s) / 2.0

        logs = {"loss_x": loss_x.detach(), "loss_s": loss_s.detach(),
                "mask_ratio": mask_ratio(target_w, self.conf_threshold), **plan.logs}
        return StepResult(loss, logs)
