"""UniMatch (Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
Segmentation", CVPR 2023), following the official ``unimatch.py`` (LiheYoung/UniMatch).

FixMatch (see :mod:`semiseg.methods.fixmatch`) plus two perturbation streams:

* UniPerb, feature perturbation: the labelled and weak images are encoded once and decoded twice,
  from clean features and from a ``Dropout2d(fp_dropout)`` copy of them
  (``preds, preds_fp = feature_perturbation(model, cat(img_x, img_u_w))``, a function of the
  network's ``encode``/``decode`` in :mod:`semiseg.methods.perturbations`; the dropout of one
  feature is the hook :meth:`UniMatch.perturb_feature`). The perturbed weak prediction
  ``pred_u_w_fp`` learns the weak view's own (un-mixed) pseudo labels with the weak ignore mask.
* DusPerb, dual strong views: two strong views, each CutMix-ed with the partner's corresponding
  strong view through its own box, predicted together (``model(cat(img_u_s1, img_u_s2))``); each
  learns the weak pseudo labels mixed with the partner's through its own box.

Loss (official and paper, lambda = mu = 0.5)::

    loss = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2
         = (weight_x L_x + weight_s * mean_k L_sk + weight_fp L_fp) / 2     weight_x=1, weight_s=weight_fp=0.5

Medical scenario (official ``more-scenarios/medical/unimatch.py``, ``configs/acdc.yaml``): the
same streams and weights with ``train.loss: ce_dice`` (``L_x = (CE + Dice) / 2``) and
``method.loss_u: dice`` (every ``L_s``/``L_fp`` the Dice loss over the confident pixels,
:func:`~semiseg.methods.consistency.unsupervised_dice_loss`), on the medical UNet, whose fp
stream drops channels of all five encoder features the decoder reads. Official medical
UniMatch uses a separate CutMix batch (``method.mix_source: separate_batch`` in
``configs/acdc.yaml``).

Ablation switches (the paper's Table 5 rows as configs):

* ``feature_perturbation: false``: no fp stream; a plain ``model(cat(img_x, img_u_w))`` pass and
  the fp weight goes to the strong views (``weight_s + weight_fp``), so the unsupervised part keeps
  its total weight;
* ``dual_strong: false``: one strong view (``num_strong_views`` becomes 1 on the instance, so the
  data pipeline builds one), which takes the whole strong weight: ``(L_x + 0.5 L_s + 0.5 L_fp)/2``;
* both off: ``(L_x + L_s) / 2`` with FixMatch's forward passes, i.e. exactly FixMatch.

``teacher: ema`` (not in the UniMatch V1 code; UniMatch V2's EMA teacher applied to V1): the
pseudo labels of the weak view and of the CutMix partner come from the EMA teacher (eval mode,
no grad) and supervise the strong views *and* the fp stream. The fp stream still needs the
student's encoder features of the weak image, so the student keeps its
``feature_perturbation(model, cat(img_x, img_u_w))`` pass (its clean weak logits are then
unused). Without the fp stream the student skips the weak view: ``model(cat(img_x, img_u_s1, img_u_s2))``, as in
UniMatch V2's FixMatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg.config.methods import UniMatchConfig
from semiseg.methods.base import Batch, StepContext, StepResult, register_method
from semiseg.methods.consistency import ConsistencyMethod, mask_ratio
from semiseg.methods.perturbations import feature_perturbation



@register_method("unimatch", UniMatchConfig)
class UniMatch(ConsistencyMethod):
    num_strong_views = 2  # class default; the instance says 1 when dual_strong is off

    def __init__(self, cfg, model, num_classes: int, ignore_index: int = 255):
        super().__init__(cfg, model, num_classes, ignore_index)
        self.feature_perturbation = self.mcfg.feature_perturbation
        self.num_strong_views = 2 if self.mcfg.dual_strong else 1

    @property
    def joint_strong_pass(self) -> bool:
        """One student pass ``model(cat(img_x, img_u_s1, img_u_s2))`` only with an EMA teacher and
        no fp stream (the fp stream needs the student's features of the weak view)."""
        return self.teacher is not None and not self.feature_perturbation

    def perturb_feature(self, feature: torch.Tensor) -> torch.Tensor:
        """UniPerb's perturbation of one feature the head reads: ``Dropout2d(fp_dropout)``, active
        while the network is in training mode."""
        return F.dropout2d(feature, self.mcfg.fp_dropout, training=self.model.training)

    def loss_weights(self) -> tuple[float, float, float]:
        """(weight of L_x, of each strong view's L_s, of L_fp) inside ``(...) / 2``."""
        cfg = self.mcfg
        weight_s, weight_fp = cfg.weight_s, cfg.weight_fp
        if not self.feature_perturbation:
            weight_s, weight_fp = weight_s + weight_fp, 0.0
        return cfg.weight_x, weight_s / self.num_strong_views, weight_fp

    def train_step(self, batch: Batch, ctx: StepContext) -> StepResult:
        cfg, n = self.mcfg, self.num_strong_views
        img_x, mask_x = batch.labeled["image"], batch.labeled["mask"]
        u = batch.unlabeled
        img_u_w = u["weak"]
        cutmix_boxes = [u[f"box_{k}"] for k in range(1, n + 1)]

        # CutMix each strong view with the partner's corresponding strong view, through its own box.
        img_u_s = self.mixed_strong_views(batch, n)
        plan = self.plan_forwards(batch, img_u_s, ctx)
        target_mix = self.separate_partner_target(batch, ctx)

        num_lb, num_ulb = img_x.shape[0], img_u_w.shape[0]
        pred_u_w = pred_u_w_fp = None
        with plan.scope, ctx.autocast():
            if self.feature_perturbation:
                preds, preds_fp = feature_perturbation(self.model, torch.cat((img_x, img_u_w)),
                                                       drop=self.perturb_feature)
                pred_x, pred_u_w = preds.split([num_lb, num_ulb])
                pred_u_w_fp = preds_fp[num_lb:]
                pred_u_s = self.model(torch.cat(img_u_s)).chunk(n)
            elif not self.joint_strong_pass:
                pred_x, pred_u_w = self.model(torch.cat((img_x, img_u_w))).split([num_lb, num_ulb])
                pred_u_s = self.model(torch.cat(img_u_s)).chunk(n)
            else:
                pred_x, *pred_u_s = self.model(torch.cat((img_x, *img_u_s))).split([num_lb] + [num_ulb] * n)

        weak_logits = plan.weak_logits if plan.weak_logits is not None else pred_u_w
        target_w, target_mix = self.weak_and_partner_targets(weak_logits, u, target_mix, ctx, mask_x)

        weight_x, weight_s, weight_fp = self.loss_weights()
        loss_x = self.criterion_l(pred_x.float(), mask_x)
        loss = weight_x * loss_x
        logs = {"loss_x": loss_x.detach()}
        for k, (pred, box) in enumerate(zip(pred_u_s, cutmix_boxes), start=1):
            loss_s = self.loss_u(pred, target_w.cutmix(target_mix, box))
            loss = loss + weight_s * loss_s
            logs[f"loss_s{k}"] = loss_s.detach()
        if self.feature_perturbation:
            loss_fp = self.loss_u(pred_u_w_fp, target_w)
            loss = loss + weight_fp * loss_fp
            logs["loss_fp"] = loss_fp.detach()
        loss = loss / 2.0

        logs["mask_ratio"] = mask_ratio(target_w, self.conf_threshold)
        logs.update(plan.logs)
        return StepResult(loss, logs)
