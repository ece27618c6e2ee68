"""Alonso et al., "Semi-Supervised Semantic Segmentation with Pixel-Level Contrastive Learning from
a Class-wise Memory Bank" (ICCV 2021), after the official ``trainSSL.py``
(Shathe/SemiSeg-Contrastive). ``method.name: contrastive_memory``.

Two parts, trained together.

**Self-training with a mean teacher.** One step, ``i`` the 0-based iteration::

    p_t = softmax(teacher(u))                     u: the weak (geometrically augmented) unlabelled
    y_u, c_u = argmax p_t, max p_t                   batch; eval mode, no grad; padding -> ignore
    (u1, y1, c1), (u2, y2, c2) = two strong copies of (u, y_u, c_u):
        ClassMix with probability 0.75, only once i > rampup_iters (each copy decides alone),
        then flip (p 0.5), colour jitter (p 0.8, strength 0.25), Gaussian blur (p 0.2)
    x, y_x = the labelled batch after ClassMix (p 0.2, with its labels) and colour jitter
        (p 0.2, strength 0.125): the official "weak" labelled augmentation
    logits_u, feat_u = student(cat(u1, u2));  logits_x, feat_x = student(x)   (two passes)
    L_x   = CE(logits_x, y_x)
    L_u   = ramp(i) * sum_pixels w[y] c^6 CE(logits_u, y) / #non-ignored pixels
    L_ent = mean over non-ignored pixels of the entropy of softmax(logits_u), divided by log K

ClassMix (official ``augment_samples``): for every image ``j`` of the batch, the classes of its
pseudo label (ignore label removed, and ``classmix_exclude`` removed -- background ``[0]`` for
Pascal -- each only if another class remains) are shuffled and ``n // 2 + 1`` of the ``n`` are
chosen (the official count; the ClassMix paper takes ``ceil(n / 2)``); the pixels of those
classes of image ``j + 1`` are pasted onto image ``j`` (``transformsgpu.mix``), and the pseudo
labels and confidences are mixed with the same mask.

``w[y]`` is 1, or with ``class_balance: true`` the official class-balancing weight (used on
Cityscapes): ``sqrt(median(f) / f_c)`` from the pixel counts ``f`` of the labelled masks and of the
teacher's pseudo labels over the last ``class_balance_window`` steps (all ones until the window is
full); the same weights then weight ``L_x``.

**Contrastive learning from a class-wise memory** (:mod:`semiseg.methods.memory_bank`): from
iteration ``memory_start_iter`` the teacher's projected decoder features of correctly and
confidently (> 0.95) predicted labelled pixels fill a per-class FIFO; from
``contrastive_start_iter`` the student's decoder features of the labelled pixels (by their label)
and of the strong unlabelled pixels (by their pseudo label), through the projection and prediction
heads, are pulled towards their class's memory entries::

    loss = L_x + L_u + 0.01 L_ent + 0.1 L_contr(labelled) + 0.1 L_contr(unlabelled)

Features are the decoder's last map before the classifier (stride 4 for DeepLabV3+; the official
DeepLabV2 uses ResNet's last stage, stride 8); labels are downsampled to it with nearest
interpolation. The heads are in the optimiser's head group; the teacher's heads are the EMA of the
student's (:class:`EMATeacher`, as the official ``update_ema_variables`` over all parameters).

**Teacher momentum** (official, the cosine schedule of the later scripts)::

    m_i = 1 - (1 - ema_momentum) * (cos(pi * i / total_iters) + 1) / 2     0.995 -> 1
    m_i = min(1 - 1 / (10 i + 1), m_i)                                      warm-up

``ema_schedule: constant`` keeps ``m_i = ema_momentum`` under the warm-up (official ``trainSSL.py``
at some commits: 0.99, then 0.996).

What the official code does, and is followed here: the schedule above; ``RAMP_UP_ITERS = 2000``
for the sigmoid ramp-up of ``L_u`` and the start of ClassMix; the memory from iteration 1000
(``> RAMP_UP_ITERS - 1000``) and the contrastive terms from 2000 (all comparisons strict); the
confidence power 6 and the entropy weight 0.01; the two strong copies built from the *same*
unlabelled batch, each with its own ClassMix decision; the flip / jitter / blur decisions drawn
once per batch (the jitter factors per image); no confidence threshold on the unlabelled pixels of
the contrastive term (only the ignore label is removed); all valid pixels of a class take part
(``max_pixels_per_class: null``); the ``batch_size * per_image`` cap on the vectors a class
enqueues per step, taken over the whole batch, with the official ``per_image`` rule when
``memory_per_image`` is unset.

Deviations, each documented where it is implemented:

* ``memory_ranking: paper`` (default) enqueues the highest-ranked vectors; the official code keeps
  the lowest, and leaves a class's candidates unsorted when they are no more than the limit
  (``official``, both behaviours);
* the memory weights are rescaled to mean 1 (the official rescaling makes them identically 1);
* the teacher is always in eval mode (the codebase's :class:`EMATeacher`; the official EMA model
  stays in train mode, so its BatchNorm uses batch statistics), and buffers are averaged too;
* the strong augmentation has no random rescale-crop: the weak view is already rescaled and
  cropped by the data layer (official: scale ``U(0.75, 1.75)`` with p 0.8 on the GPU);
* blur: sigma ``U(0.1, 1.5)`` per image, kernel 23. The official code passes ``(0.1, 1.5)`` to
  kornia's ``GaussianBlur2d`` as ``(sigma_x, sigma_y)``, i.e. one fixed anisotropic blur;
* ``L_u`` is divided by the number of non-ignored pixels (padding excluded), as the codebase's
  other methods; the official ``torch.mean`` also counts the padded pixels;
* class balancing keeps one sliding window for labelled and unlabelled counts (official: the
  labelled counts of the first labelled epoch, the unlabelled counts of the last unlabelled epoch).

Batch sizes: the official unlabelled batch is half the labelled one (two strong copies each); set
``train.unlabeled_batch_size`` to ``batch_size / 2`` to match.
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from semiseg.config.methods import ContrastiveMemoryConfig
from semiseg.data import IGNORE_INDEX
from semiseg.data.batch_transforms import color_jitter, denormalize, gaussian_blur, normalize
from semiseg.data.mixing import classmix_masks, mix_with_next
from semiseg.methods.base import Batch, Method, StepContext, StepResult, register_method
from semiseg.methods.meanteacher import sigmoid_rampup
from semiseg.methods.memory_bank import (
    ClassMemory,
    ContrastiveHeads,
    class_memory_loss,
    memory_candidates,
    rank_for_memory,
)
from semiseg.methods.teacher import EMATeacher
from semiseg.models.common import eval_mode, gather_from_ranks

# Official photometric parameters (``augment_samples``): strong (unlabelled) and weak (labelled).
STRONG_JITTER_STRENGTH = 0.25
WEAK_JITTER_STRENGTH = 0.125
STRONG_JITTER_PROB = 0.8
BLUR_PROB = 0.2
BLUR_SIGMA = (0.1, 1.5)
BLUR_KERNEL = 23
FLIP_PROB = 0.5
MASK_RATIO_THRESH = 0.95  # the logged ``mask_ratio``: share of unlabelled pixels this confident


# ---------------------------------------------------------------------------------------------
# Pure pieces


def teacher_momentum(iteration: int, total_iters: int, momentum: float = 0.995,
                     schedule: str = "cosine") -> float:
    """The official EMA momentum after 0-based step ``iteration``::

        cosine:   m = 1 - (1 - momentum) * (cos(pi * iteration / total_iters) + 1) / 2
        constant: m = momentum
        then      min(1 - 1 / (10 * iteration + 1), m)
    """
    m = momentum
    if schedule == "cosine":
        m = 1.0 - (1.0 - momentum) * (math.cos(math.pi * iteration / max(total_iters, 1)) + 1.0) / 2.0
    return min(1.0 - 1.0 / (10 * iteration + 1), m)


def official_memory_per_image(memory_per_class: int, num_labeled: int, num_classes: int,
                              pascal: bool = False) -> int:
    """Vectors a class may enqueue per labelled image and step (official ``FeatureMemory``):
    ``max(1, round(memory_per_class / num_labeled))``, times ``num_classes / 3`` on Pascal (about
    three classes per image there)."""
    ratio = round(memory_per_class / num_labeled)
    return max(1, int(num_classes / 3 * ratio)) if pascal else max(1, int(ratio))


def downsample_nearest(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, H, W)`` labels or confidences to ``size`` with nearest interpolation (dtype kept)."""
    out = F.interpolate(maps[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
    return out.to(maps.dtype)


def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor,
                      power: float = 6.0, class_weights: Optional[torch.Tensor] = None,
                      ignore_index: int = 255) -> torch.Tensor:
    """``sum w[y] * confidence**power * CE(logits, y) / #{y != ignore}`` (official
    ``CrossEntropyLoss2dPixelWiseWeighted`` with ``pixelWiseWeight = max_probs ** 6``; see the
    module docstring for the normaliser). Ignored pixels contribute nothing and get no gradient."""
    ce = F.cross_entropy(logits.float(), labels, weight=class_weights, ignore_index=ignore_index, reduction="none")
    valid = labels != ignore_index
    return (ce * confidence.detach().float().pow(power)).sum() / valid.sum().clamp_min(1)


def entropy_loss(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Official ``entropy_loss``: the entropy (base 2) of ``softmax(logits)`` averaged over the
    ``valid`` pixels and divided by ``log2 K``."""
    num_classes = logits.shape[1]
    if num_classes < 2:
        return logits.float().sum() * 0.0
    p = logits.float().softmax(dim=1)
    entropy = -(p * torch.log2(p + 1e-30)).sum(dim=1)
    return (entropy * valid).sum() / (math.log2(num_classes) * valid.sum().clamp_min(1))


def forward_with_features(net: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits at the input size, decoder features before the classifier)``."""
    return net.decode(net.features(images), out_size=images.shape[-2:], return_features=True)


def decoder_feature_dim(model: nn.Module) -> int:
    """Channels of the decoder features: the classifier's input, else measured on a dummy image."""
    classifier = getattr(getattr(model, "decoder", None), "classifier", None)
    if isinstance(classifier, nn.Conv2d):
        return classifier.in_channels
    with eval_mode(model), torch.no_grad():
        param = next(model.parameters())
        _, feature = forward_with_features(model, torch.zeros(1, 3, 64, 64, device=param.device))
    return feature.shape[1]


class ClassBalance(nn.Module):
    """Official ``ClassBalancing``: ``sqrt(median(f) / f_c)`` from the per-class pixel counts ``f`` of
    the labelled masks and unlabelled pseudo labels of the last ``window`` steps; all ones until
    ``window`` steps were seen. A class never seen gets the largest weight (official: the maximum
    of the finite weights and 1).

    The window length may be decided at the first update (one unlabelled epoch), so the count
    buffers start empty and are resized when a checkpoint is loaded into them. Under
    ``torch.distributed`` the counts are summed over ranks, so every rank has the same weights.

    Deviations: one sliding window for both counts (official: the labelled counts of the first
    labelled epoch); when more than half of the classes were never seen (median 0) the median is
    taken over the seen classes (official: weights 0 and NaN).
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("labeled_counts", torch.zeros(0, num_classes, dtype=torch.float64))
        self.register_buffer("unlabeled_counts", torch.zeros(0, num_classes, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("labeled_counts", "unlabeled_counts"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                setattr(self, name, current.new_zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def counts(self, labels: torch.Tensor) -> torch.Tensor:
        valid = (labels >= 0) & (labels < self.num_classes)
        return torch.bincount(labels[valid].flatten(), minlength=self.num_classes).to(torch.float64)

    @torch.no_grad()
    def update(self, labeled: torch.Tensor, unlabeled: torch.Tensor, window: int) -> None:
        both = torch.stack([self.counts(labeled), self.counts(unlabeled)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(both)
        if self.labeled_counts.shape[0] == 0:
            self.labeled_counts = self.labeled_counts.new_zeros(window, self.num_classes)
            self.unlabeled_counts = self.unlabeled_counts.new_zeros(window, self.num_classes)
        row = int(self.steps) % self.labeled_counts.shape[0]
        self.labeled_counts[row] = both[0]
        self.unlabeled_counts[row] = both[1]
        self.steps += 1

    @torch.no_grad()
    def weights(self) -> torch.Tensor:
        window = self.labeled_counts.shape[0]
        if window == 0 or int(self.steps) < window:
            return torch.ones(self.num_classes, device=self.steps.device)
        freqs = self.labeled_counts.sum(0) + self.unlabeled_counts.sum(0)
        seen = freqs > 0
        median = torch.quantile(freqs, 0.5)
        if median == 0:
            median = torch.quantile(freqs[seen], 0.5)
        weights = torch.where(seen, median / freqs.clamp_min(1e-12), torch.zeros_like(freqs))
        fill = max(1.0, float(weights[seen].max())) if bool(seen.any()) else 1.0
        weights = torch.where(seen, weights, torch.full_like(weights, fill))
        return weights.sqrt().float()


# ---------------------------------------------------------------------------------------------
# The method


STARTS_NEVER = {
    "memory_start_iter": "the memory bank is never filled",
    "contrastive_start_iter": "the contrastive terms never start",
    "rampup_iters": "the pseudo-label loss never reaches full weight and ClassMix never starts",
}


@register_method("contrastive_memory", ContrastiveMemoryConfig)
class ContrastiveMemory(Method):
    uses_unlabeled = True
    num_strong_views = 0  # the strong copies are made here, on the weak view, as official on GPU

    def __init__(self, cfg, model: nn.Module, num_classes: int, ignore_index: int = 255):
        super().__init__(cfg, model, num_classes, ignore_index)
        mc = self.mcfg
        self.heads = ContrastiveHeads(decoder_feature_dim(model), num_classes, mc.proj_dim)
        self.teacher = EMATeacher(model)
        self.teacher_heads = EMATeacher(self.heads)
        self.memory = ClassMemory(num_classes, mc.memory_per_class, mc.proj_dim)
        self.balance = ClassBalance(num_classes) if mc.class_balance else None
        self.memory_per_image = self._resolve_memory_per_image(cfg)
        iters = cfg.train.iters
        for key in ("memory_start_iter", "contrastive_start_iter", "rampup_iters"):
            if getattr(mc, key) >= iters:
                warnings.warn(f"method.{key}={getattr(mc, key)} is not below train.iters={iters}: "
                              f"{STARTS_NEVER[key]} in this run; scale it to the schedule")

    def _resolve_memory_per_image(self, cfg) -> int:
        """``memory_per_image``, or the official rule when ``data.labeled`` is an image count
        (Pascal's variant for ``data.dataset: pascal``), else 1 (what the rule gives for the usual
        splits of more than ``2 * memory_per_class / 3`` labelled images)."""
        if self.mcfg.memory_per_image is not None:
            return self.mcfg.memory_per_image
        labeled = getattr(cfg.data, "labeled", None)
        if isinstance(labeled, int):
            return official_memory_per_image(self.mcfg.memory_per_class, labeled, self.num_classes,
                                             pascal=cfg.data.dataset == "pascal")
        return 1

    # --- what the trainer asks ---------------------------------------------------------------
    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        enc, head = self.model.param_groups()
        return list(enc), list(head) + list(self.heads.parameters())

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self.model, "teacher": self.teacher.module}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        m = teacher_momentum(ctx.iteration, ctx.total_iters, self.mcfg.ema_momentum, self.mcfg.ema_schedule)
        self.teacher.update_with_momentum(self.model, m)
        self.teacher_heads.update_with_momentum(self.heads, m)

    # --- augmentation ------------------------------------------------------------------------
    def _photometric(self, images: torch.Tensor, jitter: Optional[float], blur: bool) -> torch.Tensor:
        """Colour jitter of strength ``jitter`` (None: none), then the blur when ``blur``, on the
        normalised ``images``: done on their [0, 1] colours."""
        mean, std = self.cfg.data.mean, self.cfg.data.std
        rgb = denormalize(images.float(), mean, std).clamp(0, 1)
        if jitter is not None:
            rgb = color_jitter(rgb, jitter)
        if blur:
            rgb = gaussian_blur(rgb, BLUR_SIGMA, BLUR_KERNEL)
        return normalize(rgb, mean, std).to(images.dtype)

    def classmix(self, images: torch.Tensor, labels: torch.Tensor, confidence: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, ...]:
        """ClassMix of a batch with itself (image ``j + 1`` onto image ``j``); returns the mixed
        ``(images, labels[, confidence], masks)`` where ``masks[j]`` is image ``j``'s class mask."""
        masks = classmix_masks(labels, self.mcfg.classmix_exclude, variant="alonso", ignore_index=self.ignore_index)
        tensors = [images, labels] if confidence is None else [images, labels, confidence]
        return (*mix_with_next(tensors, masks), masks)

    @torch.no_grad()
    def strong_copy(self, images: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor,
                    do_classmix: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One strongly augmented copy: ClassMix (when asked), flip, colour jitter, blur."""
        if do_classmix:
            images, labels, confidence, _ = self.classmix(images, labels, confidence)
        if random.random() < FLIP_PROB:
            images, labels, confidence = images.flip(-1), labels.flip(-1), confidence.flip(-1)
        jitter, blur = random.random() < STRONG_JITTER_PROB, random.random() < BLUR_PROB
        if jitter or blur:
            images = self._photometric(images, STRONG_JITTER_STRENGTH if jitter else None, blur)
        return images, labels, confidence

    @torch.no_grad()
    def weak_labeled(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The official labelled augmentation on top of the data layer's: ClassMix with the ground
        truth (p ``labeled_classmix_prob``) and light colour jitter (p ``labeled_jitter_prob``)."""
        if random.random() < self.mcfg.labeled_classmix_prob:
            images, masks, _ = self.classmix(images, masks)
        if random.random() < self.mcfg.labeled_jitter_prob:
            images = self._photometric(images, WEAK_JITTER_STRENGTH, blur=False)
        return images, masks

    # --- contrastive pieces ------------------------------------------------------------------
    @torch.no_grad()
    def update_memory(self, images: torch.Tensor, masks: torch.Tensor, ctx: StepContext) -> int:
        """Enqueue the teacher's projected features of well-predicted labelled pixels; returns the
        number of vectors enqueued (over all ranks)."""
        heads = self.teacher_heads.module
        with ctx.autocast():
            logits, features = forward_with_features(self.teacher.module, images)
        confidence, prediction = logits.float().softmax(dim=1).max(dim=1)
        size = features.shape[-2:]
        vectors, labels = memory_candidates(features.float(), downsample_nearest(masks, size),
                                            downsample_nearest(prediction, size),
                                            downsample_nearest(confidence, size), self.mcfg.memory_conf_thresh)
        limit = images.shape[0] * self.memory_per_image
        rows = [torch.zeros(0, heads.dim + 1, device=features.device)]
        if vectors.shape[0] > 0:
            projected = heads.project(vectors).float()
            for c in labels.unique().tolist():
                z = projected[labels == c]
                chosen = z[rank_for_memory(heads.feature_weights(c, z), limit, self.mcfg.memory_ranking)]
                rows.append(torch.cat([chosen, chosen.new_full((chosen.shape[0], 1), float(c))], dim=1))
        everything = gather_from_ranks(torch.cat(rows))
        for c in range(self.num_classes):
            self.memory.push(c, everything[everything[:, -1] == c, :-1])
        return everything.shape[0]

    def contrastive_term(self, feature_map: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The memory loss of the student's features ``(B, C, h, w)`` whose labels ``(B, H, W)``
        (ground truth or pseudo labels) are not the ignore label, downsampled nearest."""
        labels = downsample_nearest(labels, feature_map.shape[-2:])
        valid = labels != self.ignore_index
        vectors, labels = feature_map.permute(0, 2, 3, 1)[valid].float(), labels[valid]
        cap = self.mcfg.max_pixels_per_class
        if cap is not None:  # a random subset of at most `cap` pixels per class (not official)
            keep = [labels.new_zeros(0)]
            for c in labels.unique().tolist():
                idx = torch.nonzero(labels == c).squeeze(1)
                keep.append(idx[torch.randperm(idx.numel(), device=idx.device)[:cap]])
            keep = torch.cat(keep)
            vectors, labels = vectors[keep], labels[keep]
        if vectors.shape[0] < 2:
            return feature_map.float().sum() * 0.0
        predicted = self.heads.predict(vectors)
        return class_memory_loss(predicted, labels, self.memory.entries, self.heads.feature_weights,
                                 self.heads.memory_weights, self.num_classes)

    # --- one step ----------------------------------------------------------------------------
    def train_step(self, batch: Batch, ctx: StepContext) -> StepResult:
        mc = self.mcfg
        it = ctx.iteration
        img_x, mask_x = batch.labeled["image"], batch.labeled["mask"]
        u = batch.unlabeled
        img_u, padding = u["weak"], u["ignore_mask"] == IGNORE_INDEX

        # Pseudo labels from the teacher on the weak view.
        with torch.no_grad():
            with ctx.autocast():
                logits_t = self.teacher(img_u)
            confidence, pseudo = logits_t.float().softmax(dim=1).max(dim=1)
            pseudo = pseudo.masked_fill(padding, self.ignore_index)
            confidence = confidence.masked_fill(padding, 0.0)

        class_weights = None
        if self.balance is not None:
            self.balance.update(mask_x, pseudo, mc.class_balance_window or ctx.iters_per_epoch)
            class_weights = self.balance.weights().to(img_x.device)

        img_x, mask_x = self.weak_labeled(img_x, mask_x)
        copies = [self.strong_copy(img_u, pseudo, confidence,
                                   it > mc.rampup_iters and random.random() < mc.classmix_prob) for _ in range(2)]
        img_s, pseudo_s, conf_s = (torch.cat(parts) for parts in zip(*copies))

        with ctx.autocast():
            logits_u, features_u = forward_with_features(self.model, img_s)
            logits_x, features_x = forward_with_features(self.model, img_x)

        if class_weights is None:
            loss_x = self.criterion_l(logits_x.float(), mask_x)
        else:
            loss_x = F.cross_entropy(logits_x.float(), mask_x, weight=class_weights, ignore_index=self.ignore_index)
        ramp = sigmoid_rampup(it, mc.rampup_iters)
        loss_u = ramp * pseudo_label_loss(logits_u, pseudo_s, conf_s, mc.confidence_power, class_weights,
                                          self.ignore_index)
        loss_entropy = entropy_loss(logits_u, pseudo_s != self.ignore_index)
        loss = loss_x + loss_u + mc.entropy_weight * loss_entropy

        if it > mc.memory_start_iter:
            self.update_memory(img_x, mask_x, ctx)
        zero = loss.new_zeros(())
        loss_cl, loss_cu = zero, zero
        if it > mc.contrastive_start_iter:
            loss_cl = self.contrastive_term(features_x, mask_x)
            loss_cu = self.contrastive_term(features_u, pseudo_s)
            loss = loss + mc.contrastive_weight_l * loss_cl + mc.contrastive_weight_u * loss_cu
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # The trainer all-reduces the gradients that exist: give every head parameter one
                # (zero for the selectors of classes absent on this rank) so the ranks agree.
                loss = loss + 0.0 * sum(p.sum() for p in self.heads.parameters())

        valid_w = pseudo != self.ignore_index
        n_valid = valid_w.sum().clamp_min(1)
        logs = {
            "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "loss_entropy": loss_entropy.detach(),
            "loss_contrastive_l": loss_cl.detach(), "loss_contrastive_u": loss_cu.detach(),
            "mask_ratio": ((confidence > MASK_RATIO_THRESH) & valid_w).sum() / n_valid,
            "pseudo_weight": (confidence.pow(mc.confidence_power) * valid_w).sum() / n_valid,
            "rampup": ramp, "memory_fill": self.memory.fill_ratio(),
            "ema_momentum": teacher_momentum(it, ctx.total_iters, mc.ema_momentum, mc.ema_schedule),
        }
        return StepResult(loss, logs)
