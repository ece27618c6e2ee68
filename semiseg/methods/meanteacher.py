"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) for segmentation, in the form used by
segmentation baselines since French et al.'s CutMix-Seg ("Semi-supervised semantic segmentation
needs strong, varied perturbations", BMVC 2020): an EMA teacher predicts the weak view, the
student is trained on the strong, CutMix-ed view to agree with it.

One step::

    p_t    = softmax(teacher(u_w))                         eval mode, no grad
    u_s    = CutMix(strong view of u, strong view of partner, cutmix_box)
    target = CutMix(p_t of u, p_t of partner, cutmix_box)   (and the ignore masks alike)
    L_u    = consistency(student(u_s), target)  over confident non-padding pixels,
             divided by the number of non-padding pixels
    loss   = L_x + unsup_weight * ramp(iteration) * L_u

``consistency``:

* ``ce`` (default): cross-entropy with the teacher's hard pseudo labels, the form of the mean-teacher
  baselines of recent segmentation work (U2PL's and UniMatch V2's EMA-teacher self-training).
  With ``conf_thresh`` 0 (default) every non-padding pixel teaches; 0.95 gives UniMatch V2's
  "FixMatch with an EMA teacher" up to the loss weights (``fixmatch`` with ``teacher: ema`` is
  that method exactly).
* ``mse``: Tarvainen & Valpola's consistency, the squared distance between the student's and the
  teacher's softmax probabilities, summed over classes as in CutMix-Seg's ``var`` loss (the
  original's mean over classes is the same up to a factor K, absorbed by ``unsup_weight``).
  CutMix-Seg used ``conf_thresh`` 0.97 with it; set it explicitly.

``ramp``: the sigmoid ramp-up of Tarvainen & Valpola, ``exp(-5 (1 - t)^2)`` with
``t = min(iteration / rampup_iters, 1)``; ``rampup_iters: 0`` (default, as CutMix-Seg) disables it.

The EMA momentum defaults to 0.99 (CutMix-Seg's ``teacher_alpha``, U2PL's ``ema_decay``), with the
usual warm-up ``min(1 - 1/(iteration + 1), 0.99)``. Student and teacher are both evaluated; the
student is the default inference network.
"""

from __future__ import annotations

import math

import torch

from semiseg.config.methods import MeanTeacherConfig
from semiseg.methods.base import Batch, StepContext, StepResult, register_method
from semiseg.methods.consistency import (
    ConsistencyMethod,
    PseudoTarget,
    apply_cutmix,
    mask_ratio,
    masked_mean,
    pseudo_target_from_probs,
    unsupervised_loss,
)


def sigmoid_rampup(iteration: int, rampup_iters: int) -> float:
    """Tarvainen & Valpola's ramp-up ``exp(-5 (1 - t)^2)``, ``t = iteration / rampup_iters`` in [0, 1]."""
    if rampup_iters <= 0:
        return 1.0
    t = min(max(iteration, 0) / rampup_iters, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


@register_method("meanteacher", MeanTeacherConfig)
class MeanTeacher(ConsistencyMethod):
    num_strong_views = 1

    @property
    def uses_teacher(self) -> bool:
        return True

    @torch.no_grad()
    def _teacher_probs(self, image: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        with ctx.autocast():
            return self.teacher(image).float().softmax(dim=1)

    def train_step(self, batch: Batch, ctx: StepContext) -> StepResult:
        cfg = self.mcfg
        img_x, mask_x = batch.labeled["image"], batch.labeled["mask"]
        u = batch.unlabeled
        img_u_w, ignore_mask, cutmix_box = u["weak"], u["ignore_mask"], u["box_1"]

        # The teacher's probabilities of the weak view and of the CutMix partner's, mixed like the images.
        probs_w = self._teacher_probs(img_u_w, ctx)
        probs_mix, ignore_mask_mix = self.partner_of(
            batch, (probs_w, ignore_mask), lambda mix: (self._teacher_probs(mix["weak"], ctx), mix["ignore_mask"]))

        (img_u_s,) = self.mixed_strong_views(batch, 1)
        probs_s = apply_cutmix(probs_w, probs_mix, cutmix_box)
        target_s = pseudo_target_from_probs(probs_s, apply_cutmix(ignore_mask, ignore_mask_mix, cutmix_box))

        num_lb, num_ulb = img_x.shape[0], img_u_s.shape[0]
        with ctx.autocast():
            pred_x, pred_u_s = self.model(torch.cat((img_x, img_u_s))).split([num_lb, num_ulb])

        loss_x = self.criterion_l(pred_x.float(), mask_x)
        if cfg.consistency == "ce":
            loss_u = unsupervised_loss(pred_u_s, target_s, cfg.conf_thresh)
        else:
            squared_distance = (pred_u_s.float().softmax(dim=1) - probs_s).pow(2).sum(dim=1)
            loss_u = masked_mean(squared_distance, target_s, cfg.conf_thresh)
        weight_u = cfg.unsup_weight * sigmoid_rampup(ctx.iteration, cfg.rampup_iters)
        loss = loss_x + weight_u * loss_u

        target_w: PseudoTarget = pseudo_target_from_probs(probs_w, ignore_mask)
        logs = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "unsup_weight": weight_u,
                "mask_ratio": mask_ratio(target_w, cfg.conf_thresh)}
        return StepResult(loss, logs)
