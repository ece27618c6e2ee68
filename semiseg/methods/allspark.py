"""AllSpark (Wang et al., "AllSpark: Reborn Labeled Features from Unlabeled in Transformer for
Semi-Supervised Semantic Segmentation", CVPR 2024), after the official ``train_allspark.py``
(xmed-lab/AllSpark).

The network is the segmentation model with an :class:`~semiseg.models.allspark_neck.AllSparkNeck`
on its deepest feature (set as ``model.neck`` at construction, so :class:`SegModel` applies it in
``forward``, and UniMatch's feature perturbation between ``encode`` and ``decode``): in every
training forward the labelled features are rebuilt by channel-wise cross-attention from the
unlabelled channels of the batch, or, after a warm-up, from the class-wise semantic memory filled
with them. See that module for the block itself.

``method.name: allspark`` -- one step of the official script::

    logits_u = f_eval(u)                       eval mode, no grad: neck in inference mode
    pseudo_label = argmax logits_u
    pred_x, pred_u = f(cat(x_strong, u))       training mode; the neck splits labelled | unlabelled
                                               and enqueues u's channels grouped by logits_u first
    L_x = criterion_l(pred_x, y)
    L_u = CE(pred_u, pseudo_label)             no confidence threshold
    loss = (L_x + L_u) / 2

What the official script does, and is followed here:

* the unlabelled images are the *weak* view only (random rescale, crop, flip; the script's
  variable is called ``img_u_s`` but its dataset returns ``normalize(img)``); the pseudo labels
  and the grouping map come from an eval-mode pass on that same view, and the student predicts
  that same view: there is no strong unlabelled view and no CutMix;
* the labelled images get the photometric strong augmentation (colour jitter, grey, blur):
  ``strong_labeled = True`` (``method.strong_labeled``), which the data layer applies;
* the channels are grouped against the eval-mode *logits* (``grouping_source: logits``;
  ``probs`` groups against softmax probabilities, the paper's "probability map");
* the pseudo-labelling pass predicts the whole unlabelled batch at once, so in the neck's
  inference mode each image attends to the channels of the whole batch
  (``pseudo_label_kv: batch``; ``image``: each image to its own channels, as at evaluation);
* the memory is filled from the first step and read once ``iteration >= warm-up``
  (official: ``epoch >= warmup_epoch``, 5 of 80 epochs on Pascal, 15 of 240 on Cityscapes);
  ``memory_warmup_iters`` overrides ``memory_warmup_epochs * iters_per_epoch``;
* one batch size for both loaders: the official layout ``cat(labelled, unlabelled)`` has two
  equal halves, so ``train.unlabeled_batch_size`` different from ``train.batch_size`` is a
  :class:`ConfigError`;
* the SegFormer head's logits are resized to the input size with ``align_corners=False`` (the
  official ``SemiDecoder.forward``), where UniMatch's DeepLabV3+ uses True: with a SegFormer
  head the method sets :attr:`SegModel.align_corners <semiseg.models.SegModel.align_corners>`
  to False, unless ``model.align_corners`` is set. It holds in training (the pseudo labels,
  the grouping map and so the memory's contents depend on it) and in every evaluation of the
  trained network, which is rebuilt through this method from its checkpoint. A DeepLabV3+ head
  (not an official AllSpark network) keeps DeepLabV3+'s True (UniMatch, and the AllSpark
  repository's ``deeplabv3plus.py``), so that network is the supervised one plus the neck.

Deviation: the official ``criterion_u`` is a plain mean of the cross-entropy over every pixel,
including the pixels the crop padded (the script drops the unlabelled padding mask). Here the
unsupervised loss is the codebase's :func:`~semiseg.methods.consistency.unsupervised_loss`: padded
pixels are excluded and the sum is divided by the number of non-padding pixels; with the default
``conf_thresh: 0`` every other pixel counts, as official.

``method.name: allspark_unimatch`` -- the AllSpark neck inside UniMatch's weak-to-strong training
(:class:`AllSparkUniMatch`, a subclass of :class:`~semiseg.methods.unimatch.UniMatch` that reuses
its ``train_step`` unchanged and only tells the neck how each of UniMatch's training forwards is
laid out; see that class).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from semiseg.config import Config
from semiseg.config.methods import AllSparkConfig, AllSparkKeys, AllSparkUniMatchConfig
from semiseg.errors import ConfigError
from semiseg.methods.base import Batch, Method, StepContext, StepResult, register_method
from semiseg.methods.consistency import ForwardPlan, mask_ratio, pseudo_target, unsupervised_loss
from semiseg.methods.unimatch import UniMatch
from semiseg.models.allspark_neck import AllSparkNeck, NeckPass, feature_grid
from semiseg.models.common import eval_mode
from semiseg.models.heads import SegFormerHead


# ---------------------------------------------------------------------------------------------
# Pieces shared by both recipes


def check_equal_batches(cfg: Config, method: str) -> None:
    """The neck's labelled | unlabelled layout needs as many unlabelled as labelled images."""
    tc = cfg.train
    if tc.unlabeled_batch_size is not None and tc.unlabeled_batch_size != tc.batch_size:
        raise ConfigError(
            f"config error: keys 'train.batch_size' ({tc.batch_size}) and 'train.unlabeled_batch_size' "
            f"({tc.unlabeled_batch_size}) must be equal for method {method!r}: the AllSpark neck pairs every "
            "batch of labelled images with as many unlabelled ones (unset train.unlabeled_batch_size)")


def attach_neck(cfg: Config, model: nn.Module, num_classes: int) -> AllSparkNeck:
    """Build the AllSpark neck for ``model``'s deepest feature and set it as ``model.neck``.

    The memory's patch count is the deepest feature's grid at ``data.crop_size`` (a dummy
    encoder pass), not the official ``(crop // 32 + 1) ** 2``."""
    if not hasattr(model, "neck") or not hasattr(model, "feature_channels"):
        raise TypeError("AllSpark needs a SegModel-like network with a 'neck' slot and 'feature_channels'")
    if model.neck is not None:
        raise ValueError("the model already has a neck; AllSpark sets its own")
    mcfg = cfg.method
    grid = feature_grid(model, cfg.data.crop_size)
    neck = AllSparkNeck(model.feature_channels[-1], num_classes, grid, embed_dim=mcfg.neck_dim,
                        num_heads=mcfg.num_heads, attn_dropout=mcfg.attn_dropout, cross_heads=mcfg.cross_heads)
    param = next(model.parameters(), None)
    if param is not None:
        neck.to(param.device)
    model.neck = neck
    return neck


def choose_logit_resize(cfg: Config, model: nn.Module, align_corners: bool) -> None:
    """Set ``model.align_corners`` (the final logit resize of a SegModel): the config's
    ``model.align_corners`` when set, else the method's ``align_corners``."""
    if hasattr(model, "align_corners"):
        model.align_corners = align_corners if cfg.model.align_corners is None else cfg.model.align_corners


def neck_of(net: nn.Module) -> Optional[AllSparkNeck]:
    """The AllSpark neck of a SegModel or of an EMA teacher wrapping one."""
    neck = getattr(getattr(net, "module", net), "neck", None)
    return neck if isinstance(neck, AllSparkNeck) else None


class AllSparkMixin:
    """Memory schedule, grouping map and eval-mode prediction, for both recipes."""

    mcfg: AllSparkKeys
    model: nn.Module

    @property
    def neck(self) -> AllSparkNeck:
        return self.model.neck

    def memory_warmup(self, ctx: StepContext) -> int:
        """First iteration at which the labelled cross-attention reads the memory."""
        if self.mcfg.memory_warmup_iters is not None:
            return self.mcfg.memory_warmup_iters
        return math.ceil(self.mcfg.memory_warmup_epochs * ctx.iters_per_epoch)

    def memory_in_use(self, ctx: StepContext) -> bool:
        return self.mcfg.memory and ctx.iteration >= self.memory_warmup(ctx)

    def grouping_map(self, logits: torch.Tensor) -> torch.Tensor:
        """The class map the channels are grouped against: the logits (official) or their softmax."""
        logits = logits.detach().float()
        return logits if self.mcfg.grouping_source == "logits" else logits.softmax(dim=1)

    def take_init_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """``train.init_from`` a run with an AllSpark neck: its ``neck.*`` weights (the memory too)."""
        neck = {k: v for k, v in weights.items() if k.startswith("neck.")}
        if neck:
            self.model.load_state_dict(neck, strict=False)

    @torch.no_grad()
    def eval_logits(self, net: nn.Module, image: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Logits of an eval-mode, no-grad pass of ``net`` (restoring its mode afterwards), the
        neck's keys/values scoped by ``pseudo_label_kv``."""
        neck = neck_of(net)
        with eval_mode(net), neck.kv_scope(self.mcfg.pseudo_label_kv) if neck is not None else nullcontext():
            with ctx.autocast():
                logits = net(image)
        return logits.detach()


# ---------------------------------------------------------------------------------------------
# The official recipe


@register_method("allspark", AllSparkConfig)
class AllSpark(AllSparkMixin, Method):
    """The official AllSpark recipe (see the module docstring)."""

    uses_unlabeled = True
    num_strong_views = 0  # the unlabelled images are used in their weak view only
    strong_labeled = True  # class default; the instance follows method.strong_labeled

    def __init__(self, cfg: Config, model: nn.Module, num_classes: int, ignore_index: int = 255):
        check_equal_batches(cfg, "allspark")
        attach_neck(cfg, model, num_classes)
        # official SemiDecoder.forward resizes the SegFormer head's logits with align_corners=False
        choose_logit_resize(cfg, model, align_corners=not isinstance(getattr(model, "decoder", None), SegFormerHead))
        super().__init__(cfg, model, num_classes, ignore_index)
        self.strong_labeled = self.mcfg.strong_labeled

    def train_step(self, batch: Batch, ctx: StepContext) -> StepResult:
        cfg = self.mcfg
        img_x, mask_x = batch.labeled["image"], batch.labeled["mask"]
        img_u, ignore_mask = batch.unlabeled["weak"], batch.unlabeled["ignore_mask"]
        num_lb, num_ulb = img_x.shape[0], img_u.shape[0]

        # Pseudo labels and grouping map: eval-mode pass on the unlabelled images, before the student's.
        logits_u = self.eval_logits(self.model, img_u, ctx)
        target = pseudo_target(logits_u, ignore_mask)
        grouping = self.grouping_map(logits_u) if cfg.memory else None

        use_memory = self.memory_in_use(ctx)
        with self.neck.plan([NeckPass(num_lb, grouping)], use_memory=use_memory):
            with ctx.autocast():
                pred_x, pred_u = self.model(torch.cat((img_x, img_u))).split([num_lb, num_ulb])

        loss_x = self.criterion_l(pred_x.float(), mask_x)
        loss_u = unsupervised_loss(pred_u, target, cfg.conf_thresh)
        loss = (loss_x + loss_u) / 2.0
        logs = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                "mask_ratio": mask_ratio(target, cfg.conf_thresh), "memory_in_use": float(use_memory)}
        return StepResult(loss, logs)


# ---------------------------------------------------------------------------------------------
# AllSpark inside UniMatch


@register_method("allspark_unimatch", AllSparkUniMatchConfig)
class AllSparkUniMatch(AllSparkMixin, UniMatch):
    """UniMatch (feature perturbation, dual strong views, CutMix partner, optional EMA teacher,
    every ablation switch) with the AllSpark neck in the network; the loss is UniMatch's.

    UniMatch's ``train_step`` runs unchanged; this class only overrides the consistency base's
    :meth:`~semiseg.methods.consistency.ConsistencyMethod.plan_forwards` hook, which tells the
    neck, through :meth:`AllSparkNeck.plan`, which images of each of UniMatch's training
    forwards (laid out as its ``joint_strong_pass`` says) are labelled:

    * ``feature_perturbation(model, cat(img_x, img_u_w))`` (or ``model(cat(img_x, img_u_w))``
      without the fp stream): ``img_x`` labelled, the weak views unlabelled -- the official AllSpark layout. The
      labelled features are rebuilt from the weak views' channels (or the memory), whose
      channels fill the memory;
    * ``model(cat(img_u_s1, img_u_s2))``: every image unlabelled. The unlabelled branch is
      channel-wise *self*-attention within each image, so a strong view's prediction needs no
      labelled partner; pairing the strong views with (again) the labelled images would only
      add labelled predictions that UniMatch's loss has no use for;
    * with ``teacher: ema`` and no fp stream UniMatch makes one pass ``model(cat(img_x,
      img_u_s1, img_u_s2))``: ``img_x`` labelled, the CutMix-ed strong views unlabelled (they
      feed the cross-attention and the memory).

    The grouping map of the images that fill the memory must exist before the forward that
    enqueues them (official order: enqueue, then attend), while UniMatch's weak predictions come
    out of that same forward; so, as in official AllSpark, it comes from an extra eval-mode,
    no-grad pass of the pseudo-labelling network (the EMA teacher if any) on those images.

    Pseudo labels (``pseudo_label_source``). In the neck, an unlabelled image in a training
    forward goes through the *self*-attention branch, and an eval-mode pass runs every image
    through the labelled *cross*-attention branch. Official AllSpark takes its pseudo labels from
    an eval-mode pass, so the labelled branch, which the labels train, teaches the unlabelled
    one. UniMatch's own weak prediction (``"weak_forward"``) would come from the self-attention
    branch, so that branch would teach itself and no label would ever anchor it; on CamVid
    (track W, pvt_v2_b0, seed 0) it drifted to one class everywhere with the mask ratio rising
    to 1 (BENCHMARKS.md). The default ``"eval_pass"`` keeps AllSpark's anchor: without a teacher,
    the weak view's pseudo labels (and, with ``in_batch``, the partner's) come from the eval-mode
    pass above (keys/values scoped by ``pseudo_label_kv``), which is made even with ``memory:
    false``; the clean weak logits of the training forward are then unused, and the fp stream
    and the strong views learn from the labelled branch. An EMA teacher already predicts in eval
    mode, so the key changes nothing with ``teacher: ema``.

    ``strong_labeled`` defaults to false here (UniMatch's labelled pipeline); set
    ``method.strong_labeled: true`` for AllSpark's. Likewise the logits are resized with
    UniMatch's ``align_corners=True`` (as the UniMatch-style SegFormer model of the AllSpark
    repository, ``segformerhead.py``); ``model.align_corners: false`` gives the resize of
    AllSpark's own decoder.

    With ``teacher: ema`` the teacher is a copy of the network, neck included; it always runs in
    eval mode, so its memory is never filled nor read (the EMA merely averages it with the
    student's, which is harmless).
    """

    strong_labeled = False

    def __init__(self, cfg: Config, model: nn.Module, num_classes: int, ignore_index: int = 255):
        if cfg.method.oracle_pseudo_labels:  # the memory groups by predictions, not by the pseudo labels
            raise ConfigError("key 'method.oracle_pseudo_labels': not available for allspark_unimatch "
                              "(fixmatch, unimatch and unimatch_v2 only)")
        check_equal_batches(cfg, "allspark_unimatch")
        attach_neck(cfg, model, num_classes)  # before UniMatch's __init__, so an EMA teacher copies the neck
        choose_logit_resize(cfg, model, align_corners=True)  # UniMatch's forward
        super().__init__(cfg, model, num_classes, ignore_index)
        self.strong_labeled = self.mcfg.strong_labeled

    def labels_from_eval_pass(self) -> bool:
        """Whether the weak view's pseudo labels come from the eval-mode pass (the labelled branch)."""
        return self.teacher is None and self.mcfg.pseudo_label_source == "eval_pass"

    def plan_forwards(self, batch: Batch, strong_images, ctx: StepContext) -> ForwardPlan:
        """The neck's layout of UniMatch's training forwards, and the eval-mode pass on the first
        forward's unlabelled images (those that fill the memory): its logits give the grouping
        map, and with ``eval_pass`` the weak view's pseudo labels."""
        num_lb = batch.labeled["image"].shape[0]
        first_unlabeled = torch.cat(list(strong_images)) if self.joint_strong_pass else batch.unlabeled["weak"]
        grouping = weak_logits = None
        if self.mcfg.memory or self.labels_from_eval_pass():
            logits = self.eval_logits(self.pseudo_labeler, first_unlabeled, ctx)
            grouping = self.grouping_map(logits) if self.mcfg.memory else None
            weak_logits = logits if self.labels_from_eval_pass() else None
        passes = [NeckPass(num_lb, grouping)]
        if not self.joint_strong_pass:
            passes.append(NeckPass(0))  # the strong views' pass
        use_memory = self.memory_in_use(ctx)
        return ForwardPlan(self.neck.plan(passes, use_memory=use_memory), weak_logits,
                           {"memory_in_use": float(use_memory)})
