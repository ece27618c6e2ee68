"""The contrastive module of Alonso et al., "Semi-Supervised Semantic Segmentation with Pixel-Level
Contrastive Learning from a Class-wise Memory Bank" (ICCV 2021; official code
Shathe/SemiSeg-Contrastive), as small pieces that :mod:`semiseg.methods.contrastive_memory` puts
together:

* :class:`ContrastiveHeads`: the per-pixel MLPs on the decoder features -- a projection head and a
  prediction head (Linear-BN-ReLU-Linear, 256-d), and for every class ``c`` two *selectors*
  (Linear-BN-LeakyReLU(0.2)-Linear to 1, then a sigmoid): ``S_c`` weights the network's feature
  vectors, ``S_c^mem`` weights the memory entries;
* :class:`ClassMemory`: the class-wise memory bank, a FIFO of ``memory_per_class`` projected
  feature vectors per class, held in buffers (so it is in every checkpoint);
* :func:`memory_candidates` / :func:`rank_for_memory`: which teacher features enter the memory;
* :func:`class_memory_loss`: the contrastive loss of student features against the memory;
* :func:`semiseg.models.common.gather_from_ranks`: all-gather of a variable number of rows across
  processes, which every rank feeds its memory from.

Memory update (official ``FeatureMemory.add_features_from_sample_learned``)::

    labelled pixels at the feature resolution (labels downsampled nearest to the feature grid),
    kept where the teacher's prediction (also downsampled nearest) equals the label and its
    confidence is > 0.95;  z = teacher projection head(teacher decoder feature)
    for each class c:  rank the z of class c by sigmoid(S_c(z)) (the teacher's *feature*
    selector, as official) and keep the first ``batch_size * per_image`` of the ranking;
    prepend them to the class queue and truncate it to ``memory_per_class`` (newest first)

``ranking``: the paper keeps the best-ranked (highest-scored) vectors; the official code sorts the
scores in *ascending* order and keeps the first ones, i.e. the lowest-scored, and sorts only when
a class has more candidates than the limit: otherwise every candidate enters, in pixel order
(image, row, column). ``"paper"`` (default) keeps the highest, best first, whatever their
number; ``"official"`` reproduces the code, both branches.

Loss (official ``contrastive_class_to_class_learned_memory``), for student features already passed
through the projection and the prediction head, ``f_i`` of class ``c`` (``M`` of them) and the
class-``c`` memory entries ``m_j`` (``N`` of them)::

    d_ij   = 1 - cos(f_i, m_j)
    a_i    = sigmoid(S_c(f_i.detach()))          rescaled: a_i * M / sum_i a_i   (mean 1)
    b_j    = sigmoid(S_c^mem(m_j / |m_j|))       rescaled: b_j * N / sum_j b_j   (mean 1)
    L_c    = mean_ij (d_ij * a_i * b_j)           over classes with M > 1 and N > 1, else 0
    L      = sum_c L_c / K                        (divided by the number of classes K, as official)

The memory is a constant (a buffer, never back-propagated); the feature selector sees the features
detached (official ``selector(features_c.detach())``), so it learns its weights without steering
the features, while the distances train the heads and the network.

Deviation: the official code rescales the memory weights with ``shape[0] / sum(dim=0)`` *after*
transposing them to ``(1, N)``, so each weight is divided by itself and ``b_j`` is identically 1
(the memory selector has no effect and gets no gradient). Here ``b_j`` is rescaled to mean 1 over
the memory entries, as the paper describes (and as the feature weights are rescaled officially).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

Ranking = Literal["paper", "official"]


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, leaky_slope: Optional[float] = None) -> nn.Sequential:
    """``Linear - BatchNorm1d - (Leaky)ReLU - Linear``, applied to ``(N, in_dim)`` rows (pixels)."""
    act = nn.ReLU(inplace=True) if leaky_slope is None else nn.LeakyReLU(leaky_slope, inplace=True)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), act,
                         nn.Linear(hidden_dim, out_dim))


class ContrastiveHeads(nn.Module):
    """Projection and prediction heads, and the two selectors of every class.

    Official ``model/deeplabv2.py``: ``projection_head`` (in 2048 -> 256 -> 256) and
    ``prediction_head`` (256 -> 256 -> 256) with ReLU; the selectors
    ``contrastive_class_selector_<c>`` and ``contrastive_class_selector_memory<c>``
    (256 -> 256 -> 1) with ``LeakyReLU(0.2)``, followed by a sigmoid where they are used.
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.dim = dim
        self.projection = mlp_head(in_dim, dim, dim)
        self.prediction = mlp_head(dim, dim, dim)
        self.feature_selectors = nn.ModuleList(mlp_head(dim, dim, 1, 0.2) for _ in range(num_classes))
        self.memory_selectors = nn.ModuleList(mlp_head(dim, dim, 1, 0.2) for _ in range(num_classes))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Projection then prediction: the student's vectors that are compared with the memory."""
        return self.prediction(self.projection(x))

    def feature_weights(self, c: int, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(S_c(x))``, shape ``(N,)``."""
        return torch.sigmoid(self.feature_selectors[c](x)).squeeze(1)

    def memory_weights(self, c: int, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(S_c^mem(x))``, shape ``(N,)``."""
        return torch.sigmoid(self.memory_selectors[c](x)).squeeze(1)


class ClassMemory(nn.Module):
    """A FIFO of at most ``size`` vectors per class, newest first.

    Buffers ``bank`` ``(K, size, dim)`` and ``counts`` ``(K,)``: class ``c``'s entries are
    ``bank[c, :counts[c]]``, the newest at index 0 (official: ``concatenate((new, memory))[:size]``).
    Being buffers, they are saved in checkpoints and restored on resume.
    """

    def __init__(self, num_classes: int, size: int, dim: int):
        super().__init__()
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.register_buffer("bank", torch.zeros(num_classes, size, dim))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.long))

    def entries(self, c: int) -> torch.Tensor:
        """Class ``c``'s stored vectors ``(counts[c], dim)``, newest first (a view)."""
        return self.bank[c, : int(self.counts[c])]

    @torch.no_grad()
    def push(self, c: int, vectors: torch.Tensor) -> None:
        """Prepend ``vectors`` ``(n, dim)`` to class ``c``'s queue (their order kept) and drop the
        oldest entries beyond ``size``; with ``n > size`` only the first ``size`` are kept."""
        new = vectors.detach()[: self.size].to(self.bank.dtype)
        n = new.shape[0]
        if n == 0:
            return
        keep = min(int(self.counts[c]), self.size - n)
        old = self.bank[c, :keep].clone()
        self.bank[c, :n] = new
        self.bank[c, n : n + keep] = old
        self.counts[c] = n + keep

    def fill_ratio(self) -> float:
        return float(self.counts.sum()) / float(self.num_classes * self.size)


@torch.no_grad()
def memory_candidates(features: torch.Tensor, labels: torch.Tensor, prediction: torch.Tensor,
                      confidence: torch.Tensor, conf_thresh: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's feature vectors allowed into the memory.

    ``features`` ``(B, C, h, w)``; ``labels``, ``prediction``, ``confidence`` ``(B, h, w)`` at the
    feature resolution. Kept: ``prediction == labels`` and ``confidence > conf_thresh`` (strict, as
    official); the ignore label is never a prediction, so ignored pixels never enter. Returns
    ``(vectors (n, C), their labels (n,))``.
    """
    keep = (prediction == labels) & (confidence > conf_thresh)
    return features.permute(0, 2, 3, 1)[keep], labels[keep]


def rank_for_memory(scores: torch.Tensor, limit: int, ranking: Ranking = "paper") -> torch.Tensor:
    """Indices of the ``min(limit, n)`` vectors to enqueue, in the order they enter the memory.

    ``"paper"``: the highest ``scores``, best first. ``"official"``: with more than ``limit``
    candidates, the lowest ``scores`` (the official ascending sort); with at most ``limit``, all of
    them unsorted, in the candidates' (pixel) order, as the official code then skips the sort."""
    if ranking == "official" and scores.shape[0] <= limit:
        return torch.arange(scores.shape[0], device=scores.device)
    order = torch.argsort(scores, descending=(ranking == "paper"), stable=True)
    return order[:limit]


def rescale_to_mean_one(weights: torch.Tensor) -> torch.Tensor:
    """``weights * n / sum(weights)`` (official ``shape[0] / sum(dim=0) * w``)."""
    return weights * (weights.shape[0] / weights.sum())


def class_memory_loss(features: torch.Tensor, labels: torch.Tensor, memory: Callable[[int], torch.Tensor],
                      feature_weights: Callable[[int, torch.Tensor], torch.Tensor],
                      memory_weights: Callable[[int, torch.Tensor], torch.Tensor],
                      num_classes: int) -> torch.Tensor:
    """The contrastive loss of the module docstring.

    ``features`` ``(N, D)``: student vectors after the projection and prediction heads;
    ``labels`` ``(N,)``: their classes (ignored pixels already removed); ``memory(c)``: class
    ``c``'s entries ``(N_c, D)``; ``feature_weights(c, x)`` / ``memory_weights(c, x)``: the
    sigmoid outputs of the selectors of class ``c``, shape ``(n,)``. Classes with fewer than two
    features or two memory entries contribute 0 (official; BatchNorm in the selectors needs two).
    """
    loss = features.new_zeros(())
    for c in range(num_classes):
        f = features[labels == c]
        bank = memory(c)
        if f.shape[0] < 2 or bank.shape[0] < 2:
            continue
        bank = F.normalize(bank.detach().to(f.dtype), dim=1)
        distances = 1.0 - F.normalize(f, dim=1) @ bank.t()  # (M, N), in [0, 2]
        a = rescale_to_mean_one(feature_weights(c, f.detach()))
        b = rescale_to_mean_one(memory_weights(c, bank))
        loss = loss + (distances * a[:, None] * b[None, :]).mean()
    return loss / num_classes
