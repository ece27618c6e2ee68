"""Shared pieces of the weak-to-strong consistency methods (FixMatch, UniMatch, Mean Teacher).

The recipe, in the notation of the official UniMatch code (LiheYoung/UniMatch):

1. Pseudo labels from the weak view: ``pseudo_label = argmax p_w``, ``confidence = max p_w``
   with ``p_w = softmax(logits_w)``, never back-propagated (:func:`pseudo_target`).
2. CutMix: inside ``cutmix_box`` the strong image is replaced by a partner image's strong view,
   and the target (pseudo label, confidence *and* ignore mask) by the partner's, with the same
   box (:func:`semiseg.data.mixing.cutmix`, :meth:`PseudoTarget.cutmix`).
3. The unsupervised loss (:func:`unsupervised_loss`)::

       L_u = sum_pixels CE(logits_s, pseudo_label) * [confidence >= tau] * [ignore_mask != 255]
             / #{pixels with ignore_mask != 255}

   i.e. normalised by the number of non-padding pixels, not by the number of confident ones
   (official code; the UniMatch paper writes the same average over all pixels of the batch).
   ``method.loss_u: dice`` replaces it by the Dice loss over the confident pixels
   (:func:`unsupervised_dice_loss`, the official medical scenario).

:class:`ConsistencyMethod` is their common base: the optional EMA teacher, where the CutMix
partner comes from (``mix_source``) and what is scored at evaluation.

Image tags (``method.use_tags: true``, beyond the papers): when the unlabelled images carry
class tags (``data.tags``, see :mod:`semiseg.data.tags`), the weak-view pseudo labels -- of the
batch and of the CutMix partner, from the student or the EMA teacher -- come from the softmax
restricted to the image's tags (the class-aware softmax of Wang et al., PR 2022,
:mod:`semiseg.methods.cce`): an untagged class is never a pseudo label, and the confidence is the
restricted softmax's. :meth:`ConsistencyMethod.weak_target`, :meth:`~ConsistencyMethod.weak_and_partner_targets`
and :meth:`~ConsistencyMethod.separate_partner_target` pass each batch's ``tags`` to
:func:`pseudo_target` (FixMatch, UniMatch, AllSpark-UniMatch).

Class imbalance (beyond the papers): ``method.adaptive_thresh: freematch`` gives each class its
own threshold (:class:`SelfAdaptiveThresholds`); ``method.dist_align: true`` aligns the weak
softmax to the labelled masks' class frequency before the pseudo labels are read
(:class:`DistributionAlignment`). Both act where :meth:`ConsistencyMethod.weak_and_partner_targets`
makes the targets (FixMatch, UniMatch, UniMatch V2, AllSpark-UniMatch).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.data import IGNORE_INDEX
from semiseg.data.mixing import cutmix as apply_cutmix
from semiseg.errors import ConfigError
from semiseg.methods.base import Batch, Method, StepContext
from semiseg.methods.cce import restrict_logits
from semiseg.methods.losses import dice_loss
from semiseg.methods.teacher import EMATeacher
from semiseg.models.common import eval_mode


class PseudoTarget(NamedTuple):
    """What the weak view teaches the strong one, per pixel."""

    pseudo_label: torch.Tensor  # (B,H,W) long: argmax class of the weak prediction
    confidence: torch.Tensor  # (B,H,W) float32: its softmax probability
    ignore_mask: torch.Tensor  # (B,H,W) long: 255 on padding, else 0

    def cutmix(self, partner: "PseudoTarget", cutmix_box: torch.Tensor) -> "PseudoTarget":
        """The target of a CutMix-ed image: the partner's target inside the box."""
        return PseudoTarget(*(apply_cutmix(mine, theirs, cutmix_box) for mine, theirs in zip(self, partner)))

    def flip(self) -> "PseudoTarget":
        """The batch in reverse order (the in-batch CutMix partner)."""
        return PseudoTarget(*(t.flip(0) for t in self))


@torch.no_grad()
def pseudo_target_from_probs(probs: torch.Tensor, ignore_mask: torch.Tensor,
                             align: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> PseudoTarget:
    """Hard pseudo labels and confidences from class probabilities ``(B,K,H,W)``, read after
    ``align`` maps them when given (:class:`DistributionAlignment`)."""
    confidence, pseudo_label = (align(probs) if align is not None else probs).float().max(dim=1)
    return PseudoTarget(pseudo_label, confidence, ignore_mask)


@torch.no_grad()
def pseudo_target(logits: torch.Tensor, ignore_mask: torch.Tensor, tags: Optional[torch.Tensor] = None,
                  align: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> PseudoTarget:
    """Pseudo labels from weak-view logits ``(B,K,H,W)`` (detached, softmax in float32).

    With ``tags`` ``(B,K)`` the softmax is restricted to each image's tagged classes; ``align``
    maps it before the labels are read."""
    return pseudo_target_from_probs(weak_probs(logits, tags), ignore_mask, align)


@torch.no_grad()
def weak_probs(logits: torch.Tensor, tags: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The softmax (float32, detached) that pseudo labels come from, restricted to ``tags``."""
    logits = logits.detach().float()
    if tags is not None:
        logits = restrict_logits(logits, tags)
    return logits.softmax(dim=1)


class SelfAdaptiveThresholds(nn.Module):
    """``method.adaptive_thresh: freematch``: FreeMatch's self-adaptive thresholds (Wang et al.,
    "FreeMatch: Self-adaptive Thresholding for Semi-supervised Learning", ICLR 2023), per pixel.
    Each step, over the non-padding pixels of the weak view's softmax ``p``::

        tau      <- m tau + (1 - m) mean_pixels max_c p(c)          the global threshold
        ptilde   <- m ptilde + (1 - m) mean_pixels p                 (K,) the class expectations
        tau(c)    = ptilde(c) / max_c ptilde(c) * tau                the class threshold

    both starting at ``1 / K`` and updated before the step's masks are drawn (official USB
    ``FreeMatchThresholingHook``); a pixel teaches when its confidence reaches the threshold of its
    pseudo label. Classes the network rarely predicts get lower thresholds, so their confident
    pixels still teach. ``method.conf_thresh`` is not read. Under ``torchrun`` the batch means
    are averaged over the ranks, so every rank holds the same thresholds. The state is buffers:
    checkpointed and resumed with the method."""

    def __init__(self, num_classes: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("global_conf", torch.tensor(1.0 / num_classes))
        self.register_buffer("class_prob", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def update(self, probs: torch.Tensor, ignore_mask: torch.Tensor) -> None:
        p = probs.float().permute(0, 2, 3, 1)[ignore_mask != IGNORE_INDEX]  # (pixels, K)
        stats = torch.cat((p.max(dim=1).values.mean().view(1), p.mean(dim=0))) if p.numel() else None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if stats is None:  # a rank whose crops are all padding still joins the reduction
                stats = torch.cat((self.global_conf.view(1), self.class_prob))
            torch.distributed.all_reduce(stats)
            stats /= torch.distributed.get_world_size()
        if stats is None:
            return
        stats = stats.to(self.class_prob.device)
        m = self.momentum
        self.global_conf.mul_(m).add_(stats[0], alpha=1 - m)
        self.class_prob.mul_(m).add_(stats[1:], alpha=1 - m)

    def thresholds(self) -> torch.Tensor:
        """``(K,)``: the threshold of each class."""
        return self.class_prob / self.class_prob.max() * self.global_conf


class DistributionAlignment(nn.Module):
    """``method.dist_align: true``: distribution alignment (Berthelot et al., "ReMixMatch",
    ICLR 2020, as USB's ``DistAlignEMAHook``), per pixel. Each step, before the pseudo labels are
    read::

        p_model  <- m p_model  + (1 - m) mean_pixels p       (K,) the weak softmax, non-padding pixels
        p_target <- m p_target + (1 - m) class frequency      (K,) of the labelled masks, void left out
        p~ = p * (p_target + 1e-6) / (p_model + 1e-6),  renormalised over the classes

    and the pseudo label and its confidence are the argmax and max of ``p~``: a class the network
    predicts less often than the labelled masks hold it gains pixels, and the confidence threshold
    is compared with the aligned probability (USB). Both averages are set from the first batch (USB
    starts ``p_model`` the same way; its ``p_target`` is the labelled set's frequency, here a
    running average of the labelled batches, which the step already holds). Under ``torchrun`` the
    sums and counts are reduced over the ranks first, so every rank holds the same averages. The
    state is buffers: checkpointed and resumed with the method."""

    EPS = 1e-6

    def __init__(self, num_classes: int, momentum: float):
        super().__init__()
        self.num_classes = num_classes
        self.momentum = momentum
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("p_target", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("started", torch.zeros(2, dtype=torch.bool))  # (p_model, p_target) set once

    @torch.no_grad()
    def update(self, probs: torch.Tensor, ignore_mask: torch.Tensor, labeled_mask: torch.Tensor) -> None:
        """One step's statistics: ``probs`` ``(B,K,H,W)`` the weak softmax before alignment,
        ``ignore_mask`` its padding (255), ``labeled_mask`` the labelled masks (255: void)."""
        k = self.num_classes
        p = probs.float().permute(0, 2, 3, 1)[ignore_mask != IGNORE_INDEX]  # (pixels, K)
        labels = labeled_mask[(labeled_mask != IGNORE_INDEX) & (labeled_mask >= 0) & (labeled_mask < k)]
        sums = torch.cat((p.sum(dim=0), p.new_tensor([p.shape[0]]),
                          torch.bincount(labels.flatten(), minlength=k).to(p), p.new_tensor([labels.numel()])))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        sums = sums.to(self.p_model.device)
        for i, (avg, total, count) in enumerate(((self.p_model, sums[:k], sums[k]),
                                                 (self.p_target, sums[k + 1:2 * k + 1], sums[2 * k + 1]))):
            if count <= 0:
                continue
            mean = total / count
            if self.started[i]:
                avg.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)
            else:
                avg.copy_(mean)
                self.started[i] = True

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """``(B,K,H,W)`` probabilities aligned to the labelled class frequency."""
        ratio = (self.p_target + self.EPS) / (self.p_model + self.EPS)
        aligned = probs.float() * ratio.to(probs.device).view(1, -1, 1, 1)
        return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def oracle_target(unlabeled: dict) -> PseudoTarget:
    """``method.oracle_pseudo_labels``: the unlabelled crops' true masks as pseudo labels, with
    confidence 1, void (255 in ``"mask"``) ignored like padding. A diagnostic: it measures what
    the recipe gives when every pseudo label is right."""
    mask = unlabeled["mask"]
    void = mask == IGNORE_INDEX
    ignore = torch.where(void, torch.full_like(unlabeled["ignore_mask"], IGNORE_INDEX), unlabeled["ignore_mask"])
    return PseudoTarget(mask.masked_fill(void, 0), torch.ones(mask.shape, dtype=torch.float32, device=mask.device),
                        ignore)


@torch.no_grad()
def predict_eval(model: nn.Module, image: torch.Tensor, ignore_mask: torch.Tensor,
                 autocast: Callable = nullcontext, tags: Optional[torch.Tensor] = None,
                 align: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> PseudoTarget:
    """Pseudo labels from an eval-mode, no-grad pass (BatchNorm running statistics, no dropout),
    leaving the model in the mode it was in: the official code's prediction of the CutMix partner
    batch (``model.eval()``; ``model(img_u_w_mix)``; ``model.train()``). ``align`` maps the
    softmax before the labels are read (:class:`DistributionAlignment`)."""
    with eval_mode(model), autocast():
        logits = model(image)
    return pseudo_target(logits, ignore_mask, tags, align)


def confident_pixels(target: PseudoTarget, conf_thresh: Union[float, torch.Tensor]) -> torch.Tensor:
    """``(confidence >= conf_thresh) & (ignore_mask != 255)``: the pixels that teach.
    ``conf_thresh`` is a number, or a ``(K,)`` tensor of per-class thresholds against which each
    pixel's confidence is compared at its pseudo label (:class:`SelfAdaptiveThresholds`)."""
    if torch.is_tensor(conf_thresh) and conf_thresh.ndim == 1:
        conf_thresh = conf_thresh.to(target.confidence.device)[target.pseudo_label]
    return (target.confidence >= conf_thresh) & (target.ignore_mask != IGNORE_INDEX)


def num_valid_pixels(ignore_mask: torch.Tensor) -> torch.Tensor:
    """Number of non-padding pixels (at least 1, so that an all-padding batch gives a zero loss
    instead of the official code's 0/0 = NaN)."""
    return (ignore_mask != IGNORE_INDEX).sum().clamp_min(1)


def masked_mean(per_pixel_loss: torch.Tensor, target: PseudoTarget, conf_thresh: float) -> torch.Tensor:
    """Sum of ``per_pixel_loss`` (B,H,W) over the confident non-padding pixels, divided by the
    number of non-padding pixels. Padding pixels get an exactly zero gradient."""
    keep = confident_pixels(target, conf_thresh)
    return (per_pixel_loss * keep).sum() / num_valid_pixels(target.ignore_mask)


def unsupervised_loss(logits: torch.Tensor, target: PseudoTarget, conf_thresh: float) -> torch.Tensor:
    """Confidence-masked cross-entropy of the strong (or perturbed) prediction against the pseudo
    labels, normalised by the number of non-padding pixels (official ``criterion_u``)."""
    per_pixel = F.cross_entropy(logits.float(), target.pseudo_label, reduction="none")
    return masked_mean(per_pixel, target, conf_thresh)


def unsupervised_dice_loss(logits: torch.Tensor, target: PseudoTarget, conf_thresh: float) -> torch.Tensor:
    """``method.loss_u: dice``, the official medical scenario's unsupervised loss: the Dice loss
    (:func:`semiseg.methods.losses.dice_loss`) of the softmax against the pseudo labels over the
    confident non-padding pixels (official ``criterion_dice(pred.softmax(1), mask,
    ignore=(conf < thresh))``; ACDC crops have no padding)."""
    return dice_loss(logits.float().softmax(dim=1), target.pseudo_label, confident_pixels(target, conf_thresh))


@torch.no_grad()
def mask_ratio(target: PseudoTarget, conf_thresh: float) -> torch.Tensor:
    """Share of the non-padding pixels whose pseudo label is confident enough to teach."""
    return confident_pixels(target, conf_thresh).sum() / num_valid_pixels(target.ignore_mask)


# ---------------------------------------------------------------------------------------------
# Common base of FixMatch, UniMatch and Mean Teacher


@dataclass
class ForwardPlan:
    """What a subclass adds around one step's training forwards (:meth:`ConsistencyMethod.plan_forwards`).

    ``scope``: a context entered around the training forwards (AllSpark: the neck's layout of
    each forward); ``weak_logits``: logits of the weak view made before the forwards, which the
    weak pseudo labels then come from instead of the student's weak forward (AllSpark: an
    eval-mode pass through the labelled branch); ``logs``: extra step logs."""

    scope: AbstractContextManager = field(default_factory=nullcontext)
    weak_logits: Optional[torch.Tensor] = None
    logs: dict = field(default_factory=dict)


T = TypeVar("T", bound=Union[torch.Tensor, Sequence[torch.Tensor]])


class ConsistencyMethod(Method):
    """Base class: EMA teacher (optional), CutMix partner, evaluation of student and teacher.

    Subclasses write ``train_step`` from the pieces here, and extend a recipe by overriding a
    hook instead of copying its step:

    * :meth:`partner_of` / :meth:`mix_partner_images` / :meth:`mixed_strong_views`: who the
      CutMix partner is (the separate batch or the batch reversed) and the mixed strong views;
    * :attr:`joint_strong_pass`: how the student's training forwards are laid out (labelled +
      weak, then the strong views; or labelled + strong views in one pass);
    * :meth:`plan_forwards`: what goes around those forwards, and where the weak view's
      pseudo-label logits come from when not from the student's weak forward (the teacher, if
      any, always makes them: :meth:`weak_and_partner_targets`).

    ``self.teacher`` is an :class:`EMATeacher` or None; pseudo labels come from
    :attr:`pseudo_labeler`, the teacher when there is one.
    """

    uses_unlabeled = True

    def __init__(self, cfg, model: nn.Module, num_classes: int, ignore_index: int = 255):
        super().__init__(cfg, model, num_classes, ignore_index)
        self.teacher: Optional[EMATeacher] = EMATeacher(model) if self.uses_teacher else None
        self.use_tags = getattr(self.mcfg, "use_tags", False)
        self.oracle = getattr(self.mcfg, "oracle_pseudo_labels", False)
        if self.use_tags and getattr(cfg.data, "tags", None) is None:
            raise ConfigError("key 'method.use_tags': needs image tags; set data.tags to 'masks' or a tags file")
        self.adaptive: Optional[SelfAdaptiveThresholds] = (
            SelfAdaptiveThresholds(num_classes, self.mcfg.adaptive_momentum)
            if getattr(self.mcfg, "adaptive_thresh", "none") == "freematch" else None)
        self.align: Optional[DistributionAlignment] = (
            DistributionAlignment(num_classes, self.mcfg.dist_align_momentum)
            if getattr(self.mcfg, "dist_align", False) else None)
        self.weak_labels_from_eval = getattr(self.mcfg, "weak_labels", "train") == "eval"
        if self.weak_labels_from_eval and (self.teacher is not None or self.oracle
                                           or type(self).plan_forwards is not ConsistencyMethod.plan_forwards):
            raise ConfigError(f"key 'method.weak_labels': 'eval' is for the student's own pseudo labels; "
                              f"{self.mcfg.name} with these keys takes them from "
                              + ("the EMA teacher, already in eval mode" if self.teacher is not None else
                                 "the true masks" if self.oracle else "its own eval-mode pass")
                              + ": expected weak_labels 'train'")

    @property
    def uses_teacher(self) -> bool:
        return getattr(self.mcfg, "teacher", "none") == "ema"

    @property
    def unlabeled_masks(self) -> bool:
        """The oracle pseudo labels are the unlabelled crops' true masks: the data layer adds them."""
        return self.oracle

    @property
    def needs_mix_batch(self) -> bool:
        return self.mcfg.mix_source == "separate_batch"

    @property
    def pseudo_labeler(self) -> nn.Module:
        """The network whose predictions become pseudo labels: the teacher, else the student."""
        return self.teacher if self.teacher is not None else self.model

    def tags_of(self, unlabeled: dict) -> Optional[torch.Tensor]:
        """The batch's image tags when ``use_tags`` restricts pseudo labels to them."""
        return unlabeled.get("tags") if self.use_tags else None

    def weak_target(self, logits: torch.Tensor, unlabeled: dict) -> PseudoTarget:
        """Pseudo target of an unlabelled batch from the student's weak-view logits (aligned with
        ``method.dist_align``)."""
        return pseudo_target(logits, unlabeled["ignore_mask"], self.tags_of(unlabeled), self.align)

    @torch.no_grad()
    def teacher_logits(self, unlabeled: dict, ctx: StepContext) -> torch.Tensor:
        """The EMA teacher's logits of an unlabelled batch's weak view (eval mode, no grad)."""
        with eval_mode(self.teacher), ctx.autocast():
            return self.teacher(unlabeled["weak"])

    @property
    def conf_threshold(self) -> Union[float, torch.Tensor]:
        """What a pseudo label's confidence must reach to teach: ``method.conf_thresh``, or with
        ``method.adaptive_thresh: freematch`` the ``(K,)`` class thresholds of this step."""
        return self.adaptive.thresholds() if self.adaptive is not None else self.mcfg.conf_thresh

    def weak_and_partner_targets(self, weak_logits: Optional[torch.Tensor], unlabeled: dict,
                                 partner: Optional[PseudoTarget], ctx: StepContext,
                                 labeled_mask: Optional[torch.Tensor] = None
                                 ) -> tuple[PseudoTarget, PseudoTarget]:
        """(weak target, CutMix partner's target). The weak target comes from the teacher when
        there is one, else from the student's weak-view logits; the partner's is the separate
        batch's (``partner``) or, in-batch, the weak target reversed. With ``method.dist_align``
        the alignment's averages take this batch's weak softmax and ``labeled_mask`` (the
        labelled batch's masks) first; a separate partner batch was labelled before, with the
        averages of the steps before this one."""
        if self.oracle:
            target_w = oracle_target(unlabeled)
        else:
            if self.teacher is not None:
                weak_logits = self.teacher_logits(unlabeled, ctx)
            if self.align is not None or self.adaptive is not None:  # the running statistics take this batch
                probs, ignore_mask = weak_probs(weak_logits, self.tags_of(unlabeled)), unlabeled["ignore_mask"]
                if self.align is not None:
                    if labeled_mask is None:
                        raise ValueError("method.dist_align: weak_and_partner_targets needs the labelled masks")
                    self.align.update(probs, ignore_mask, labeled_mask)
                if self.adaptive is not None:  # this step's thresholds include this batch (FreeMatch)
                    self.adaptive.update(probs, ignore_mask)
            target_w = self.weak_target(weak_logits, unlabeled)
        return target_w, partner if partner is not None else target_w.flip()

    def partner_of(self, batch: Batch, own: T, of_mix_batch: Callable[[dict], T]) -> T:
        """The CutMix partner's counterpart of ``own`` (a tensor, or a list or tuple of tensors,
        of the unlabelled batch): ``of_mix_batch(batch.unlabeled_mix)`` with ``mix_source:
        separate_batch``, else ``own`` reversed along the batch (image ``i`` mixes with image
        ``B - 1 - i``, UniMatch V2's in-batch partner)."""
        if self.mcfg.mix_source == "separate_batch":
            return of_mix_batch(batch.unlabeled_mix)
        if isinstance(own, torch.Tensor):
            return own.flip(0)
        return type(own)(t.flip(0) for t in own)

    def mix_partner_images(self, batch: Batch, num_views: int) -> list[torch.Tensor]:
        """The partner's strong views, one per strong view of the unlabelled batch."""
        views = [f"strong_{k}" for k in range(1, num_views + 1)]
        return self.partner_of(batch, [batch.unlabeled[v] for v in views], lambda mix: [mix[v] for v in views])

    def mixed_strong_views(self, batch: Batch, num_views: int) -> list[torch.Tensor]:
        """Strong view ``k`` of the unlabelled batch CutMix-ed with the partner's strong view ``k``
        through its own box ``box_k``, for ``k = 1 .. num_views``."""
        u = batch.unlabeled
        return [apply_cutmix(u[f"strong_{k}"], partner, u[f"box_{k}"])
                for k, partner in enumerate(self.mix_partner_images(batch, num_views), start=1)]

    @property
    def joint_strong_pass(self) -> bool:
        """The layout of the student's training forwards: True when the labelled and the strong
        images share one pass and the student never sees the weak view (with an EMA teacher,
        UniMatch V2's layout); False for ``model(cat(img_x, img_u_w))`` and then the strong views."""
        return self.teacher is not None

    def plan_forwards(self, batch: Batch, strong_images: Sequence[torch.Tensor], ctx: StepContext) -> ForwardPlan:
        """Called once a step, after the strong views are mixed and before any forward pass:
        what goes around the training forwards (see :class:`ForwardPlan`). Nothing by default;
        with ``method.weak_labels: eval`` the weak view's logits from an eval-mode, no-grad pass
        of the student (BatchNorm running statistics, no dropout), made before this step's
        training forwards update those statistics."""
        if not self.weak_labels_from_eval:
            return ForwardPlan()
        with torch.no_grad(), eval_mode(self.model), ctx.autocast():
            return ForwardPlan(weak_logits=self.model(batch.unlabeled["weak"]))

    def separate_partner_target(self, batch: Batch, ctx: StepContext) -> Optional[PseudoTarget]:
        """With ``separate_batch``: the partner batch's pseudo labels from an eval-mode pass of
        the pseudo-labelling network, made before the training forward pass as official (so
        BatchNorm's running statistics are not yet updated by this step). None with
        ``in_batch``: the partner's target is then the weak target reversed."""
        if self.mcfg.mix_source != "separate_batch":
            return None
        mix = batch.unlabeled_mix
        if self.oracle:
            return oracle_target(mix)
        return predict_eval(self.pseudo_labeler, mix["weak"], mix["ignore_mask"], ctx.autocast, self.tags_of(mix),
                            self.align)

    def loss_u(self, logits: torch.Tensor, target: PseudoTarget) -> torch.Tensor:
        """The unsupervised loss of a strong (or perturbed) prediction against its pseudo target at
        ``method.conf_thresh``: :func:`unsupervised_loss` (cross-entropy), or with ``method.loss_u:
        dice`` (the official medical scenario) :func:`unsupervised_dice_loss`."""
        dice = getattr(self.mcfg, "loss_u", "ce") == "dice"
        return (unsupervised_dice_loss if dice else unsupervised_loss)(logits, target, self.conf_threshold)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self.teacher is not None:
            self.teacher.update(self.model, ctx.iteration, self.mcfg.ema_momentum)

    def eval_models(self) -> dict[str, nn.Module]:
        if self.teacher is None:
            return {"student": self.model}
        return {"student": self.model, "teacher": self.teacher.module}
