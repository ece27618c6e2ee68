"""The AllSpark neck (Wang et al., CVPR 2024) and its semantic memory.

AllSpark "reborns" the labelled features from the unlabelled ones: on the deepest encoder
feature, before the SegFormer head, a channel-wise attention block lets the labelled features
be rebuilt from unlabelled channels. Written from the paper and the official code
(xmed-lab/AllSpark, ``model/semseg/allspark.py``, classes ``AllSpark`` and ``CrossAttnMem``).

Block (official order)::

    e   = GELU(map_in(x))                   1x1 conv to the embedding width E (E = C_in as official)
    t   = LayerNorm(tokens(e))              (B, N, E), N = h*w patches, eps 1e-6
    a   = [ cross-attention(labelled t  -> unlabelled t or memory) ;   labelled part
            self-attention(unlabelled t) ]                               unlabelled part
    out = GELU(map_out(map(LayerNorm(a + tokens(e)))))               residual from *before* the norm

Channel-wise attention: the tokens are the *channels*; a channel is a vector of length N (its
values at every patch), so the similarity matrix is C x C. For one head::

    Q, K, V = W_q t, W_k t', W_v t'               Linear(E, heads*E, bias=False) on each patch
    A = softmax(psi(Q^T K))                       (E x E'), psi = instance norm of the whole matrix
    out = W_o (A V^T)^T                           Linear(heads*E, E, bias=False), then dropout

``psi`` (``InstanceNorm2d(num_heads)``, no affine) standardises each head's score matrix over
all its entries; it replaces the usual ``1/sqrt(d)`` scaling, which it would cancel anyway.
Attention and projection dropout are both ``attn_dropout`` (0.1), as official.

The two branches (official ``CrossAttnMem``):

* unlabelled images: channel-wise *self*-attention per image and per head (``q_u, k_u, v_u,
  out_u``); the labelled images never influence it;
* labelled images: channel-wise *cross*-attention (``q_l, k_l, v_l, out_l``, the official
  ``*_l2u``): queries from the labelled features, keys and values from the unlabelled features
  of the whole batch, every unlabelled image's channels stacked into one key set (the
  labelled gradient therefore reaches the unlabelled features through K and V), or, once the
  method switches it on, from the semantic memory (:class:`SemanticMemory`).

Official code versus paper, and what is followed here:

* Heads of the cross-attention (``cross_heads``). The official code flattens the projected
  keys ``b n c -> n (b c)`` with ``c = heads * E`` and runs *one* attention in which all
  ``heads*E`` query channels attend over all ``S*heads*E`` key channels (``psi`` normalises that
  one matrix). The paper describes ordinary multi-head attention. ``"merged"`` (default) follows
  the official code; ``"per_head"`` is the paper's reading: each head's ``E`` queries attend to
  that head's ``S*E`` keys. The self-attention is per head in both.
* Channel order into the self-attention's output projection: the official code flattens the
  attended channels of ``out_u``'s input as ``(E, heads)``, here ``(heads, E)``: the same model up
  to a fixed permutation of the *columns* of ``out_u.weight`` (semiseg column ``h*E + e`` is the
  official column ``e*heads + h``). The merged cross-attention has one group, so ``out_l`` (and
  every other weight) has the official layout as it is.
* Inference (eval mode) needs no unlabelled data. The official block runs ``cat(x, x)`` and
  keeps the first (labelled) half: every image goes through the *cross-attention* branch with
  keys and values from the images themselves, and the memory is never used. That is what the
  eval mode does here, without computing the discarded half. Official evaluation runs one image
  at a time; with a batch, the official code lets every image attend to the channels of the
  whole batch. ``eval_kv_scope`` chooses: ``"image"`` (default: each image attends to its own
  channels, so a prediction never depends on the other images of an evaluation batch, and equals
  official evaluation) or ``"batch"`` (official behaviour for a batch; the AllSpark method uses it
  for its pseudo-labelling pass, as the official script predicts the whole unlabelled batch at
  once). Any input size works in eval mode: the patch count only matters for the memory.
* Patch count of the memory. The official code sets it to ``(crop // 32 + 1) ** 2``, right
  only when 32 does not divide the crop (512 gives 17x17 instead of the encoder's 16x16) and
  only for square crops. Here the grid is whatever the encoder produces at the training crop
  (:func:`feature_grid`, a dummy forward pass), i.e. ``ceil(crop / reduction)`` per side for the
  timm encoders.

Which images of a training forward are labelled is given by the method through :meth:`AllSparkNeck.plan`
(one :class:`NeckPass` per training forward). Without a plan a training-mode forward splits the
batch into equal halves, labelled first: the official layout ``model(cat(img_x, img_u))``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.config.methods import CrossHeads, KVScope
from semiseg.models.common import eval_mode, gather_from_ranks

# ---------------------------------------------------------------------------------------------
# Helpers


@torch.no_grad()
def feature_grid(model: nn.Module, crop_size: int) -> tuple[int, int]:
    """``(h, w)`` of the deepest encoder feature for a ``crop_size`` x ``crop_size`` input, from a
    dummy forward pass of ``model.encode`` (encoder in eval mode, so BatchNorm statistics stay
    untouched). For timm's ResNets and PVTv2 this is ``ceil(crop_size / reduction)`` per side."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with eval_mode(getattr(model, "encoder", model)):
        deepest = model.encode(torch.zeros(1, 3, crop_size, crop_size, device=device))[-1]
    return int(deepest.shape[-2]), int(deepest.shape[-1])


def psi_softmax(scores: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``softmax(psi(scores))`` over the last dimension, in float32.

    ``scores`` is ``(B, G, Cq, Ck)``: for every image and head (group) a ``Cq x Ck`` matrix;
    ``psi`` is the instance norm over the heads as channels (``InstanceNorm2d(G)``, no affine,
    no running statistics, biased variance): each matrix minus its mean, divided by
    ``sqrt(var + eps)``, over all its ``Cq*Ck`` entries.
    """
    return F.instance_norm(scores.float(), eps=eps).softmax(dim=-1)


def _to_channels(tokens: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, N, G*c)`` projected patch tokens -> ``(B, G, c, N)``: ``c`` channel tokens of length N
    in each of ``G`` groups (heads)."""
    b, n, gc = tokens.shape
    return tokens.reshape(b, n, groups, gc // groups).permute(0, 2, 3, 1)


def _to_tokens(channels: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_channels`: ``(B, G, c, N)`` -> ``(B, N, G*c)``."""
    b, g, c, n = channels.shape
    return channels.permute(0, 3, 1, 2).reshape(b, n, g * c)


# ---------------------------------------------------------------------------------------------
# Semantic memory


class SemanticMemory(nn.Module):
    """S-Mem: one first-in-first-out queue per class of ``size`` channel vectors of length ``d``.

    Buffers (so they are in every checkpoint): ``queue`` ``(K, size, d)``, initialised with
    standard normal noise as official, and ``ptr`` ``(K,)`` long, the next slot of each queue.

    Filling (:meth:`update`), official order: *channel-wise semantic grouping* assigns every
    unlabelled channel to the class whose token of the grouping map it is most similar to
    (:meth:`group_channels`); then, image by image and class by class (ascending), the channels
    of that class are written at the class's pointer, wrapping around the end of the queue.

    The attention reads the memory as keys/values with the ``size`` slots of a class in place of
    the channels of an image, so ``size`` equals the embedding width (official).

    Distributed: with ``torch.distributed`` initialised, the channels and their classes are
    gathered from every process before enqueueing (``all_gather``, rank order), so every process
    holds the same memory. The official code enqueues only its own batch on each GPU and relies
    on DistributedDataParallel re-broadcasting rank 0's buffers at every forward pass; semiseg
    does not wrap the model in DDP, so it gathers explicitly (as MoCo-style queues do).
    """

    def __init__(self, num_classes: int, size: int, length: int):
        super().__init__()
        self.num_classes, self.size, self.length = num_classes, size, length
        self.register_buffer("queue", torch.randn(num_classes, size, length))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))

    @staticmethod
    @torch.no_grad()
    def group_channels(tokens: torch.Tensor, grouping_map: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Class of every channel: ``(B, E)`` long.

        ``tokens`` ``(B, N, E)`` unlabelled features (N = h*w patches of ``grid``);
        ``grouping_map`` ``(B, K, H, W)`` the class map of the same images (logits or
        probabilities), resized bilinearly (``align_corners=False``) to the grid and flattened
        into K class tokens of length N. Both class tokens and channels are L2-normalised over
        the patches; each channel goes to the class of highest cosine similarity.
        """
        h, w = grid
        if tokens.shape[1] != h * w:
            raise ValueError(f"{tokens.shape[1]} tokens do not fit a {h}x{w} grid")
        class_tokens = F.interpolate(grouping_map.float(), size=(h, w), mode="bilinear", align_corners=False)
        class_tokens = F.normalize(class_tokens.flatten(2), dim=-1)  # (B, K, N)
        channels = F.normalize(tokens.float(), dim=1)  # (B, N, E): each channel over the patches
        return torch.bmm(class_tokens, channels).argmax(dim=1)  # (B, K, E) -> (B, E)

    @torch.no_grad()
    def enqueue(self, channels: torch.Tensor, channel_class: torch.Tensor) -> None:
        """Write ``channels`` ``(B, E, d)`` into the queues of ``channel_class`` ``(B, E)``:
        image by image, class by class, FIFO with wrap-around. Should more than ``size`` channels
        of one class arrive at once, only the last ``size`` of them remain (as if written one by one)."""
        if channels.shape[-1] != self.length:
            raise ValueError(f"channels of length {channels.shape[-1]} do not fit a memory of length {self.length} "
                             "(the memory's patch count comes from data.crop_size)")
        channels = channels.to(self.queue.dtype)
        for b in range(channels.shape[0]):  # image by image; all classes of an image at once
            cls = channel_class[b]
            counts = torch.bincount(cls, minlength=self.num_classes)
            order = torch.argsort(cls, stable=True)  # grouped by class, channel order kept
            cls_sorted = cls[order]
            rank = torch.arange(cls.numel(), device=cls.device) - (counts.cumsum(0) - counts)[cls_sorted]
            keep = rank >= counts[cls_sorted] - self.size  # only the last `size` of a class survive
            slots = (self.ptr[cls_sorted] + rank) % self.size
            self.queue[cls_sorted[keep], slots[keep]] = channels[b, order[keep]]
            self.ptr.copy_((self.ptr + counts) % self.size)

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, grouping_map: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Group the unlabelled ``tokens`` ``(B, N, E)`` by ``grouping_map`` and enqueue them (after
        gathering from every process); returns this process's channel classes ``(B, E)``."""
        channel_class = self.group_channels(tokens, grouping_map, grid)
        channels = tokens.detach().transpose(1, 2)  # (B, E, N)
        self.enqueue(gather_from_ranks(channels), gather_from_ranks(channel_class))
        return channel_class

    def as_tokens(self) -> torch.Tensor:
        """The memory as ``K`` pseudo-images of patch tokens, ``(K, d, size)``: a detached copy
        (official ``kv_queue.clone()``), safe against later in-place enqueues."""
        return self.queue.detach().clone().transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# The neck


class NeckPass(NamedTuple):
    """How the neck treats one training-mode forward: the first ``num_labeled`` images are
    labelled (cross-attention queries), the rest unlabelled (self-attention; keys/values of the
    cross-attention). ``grouping_map`` ``(B_u, K, H, W)``, the class map of the unlabelled
    images, puts their channels into the memory before the attention (official order); None
    enqueues nothing."""

    num_labeled: int
    grouping_map: Optional[torch.Tensor] = None


class AllSparkNeck(nn.Module):
    """AllSpark's channel-wise attention block on the deepest feature ``(B, C_in, h, w)``.

    Args:
        in_channels: channels of the deepest encoder feature.
        num_classes: classes of the memory.
        grid: ``(h, w)`` of the deepest feature at the training crop (:func:`feature_grid`); the
            memory holds channel vectors of length ``h*w``.
        embed_dim: attention width E (default ``in_channels``, official).
        out_channels: output channels (default ``in_channels``: the head is unchanged).
        num_heads: heads (official configs: 2).
        attn_dropout: dropout on the attention weights and after the output projections (0.1).
        cross_heads: ``"merged"`` (official) or ``"per_head"`` (paper); see the module docstring.
        eval_kv_scope: keys/values in eval mode: ``"image"`` (default) or ``"batch"`` (official
            for a batch); :meth:`kv_scope` changes it for a block of code.
    """

    def __init__(self, in_channels: int, num_classes: int, grid: Sequence[int], embed_dim: Optional[int] = None,
                 out_channels: Optional[int] = None, num_heads: int = 2, attn_dropout: float = 0.1,
                 cross_heads: CrossHeads = "merged", eval_kv_scope: KVScope = "image"):
        super().__init__()
        if cross_heads not in ("merged", "per_head"):
            raise ValueError(f"cross_heads must be 'merged' or 'per_head', got {cross_heads!r}")
        if eval_kv_scope not in ("image", "batch"):
            raise ValueError(f"eval_kv_scope must be 'image' or 'batch', got {eval_kv_scope!r}")
        e = embed_dim or in_channels
        self.embed_dim, self.num_heads, self.cross_heads = e, num_heads, cross_heads
        self.grid = (int(grid[0]), int(grid[1]))
        self.eval_kv_scope: KVScope = eval_kv_scope

        self.map_in = nn.Sequential(nn.Conv2d(in_channels, e, 1), nn.GELU())
        self.attn_norm = nn.LayerNorm(e, eps=1e-6)
        # Unlabelled branch: channel-wise self-attention.
        self.q_u, self.k_u, self.v_u = (nn.Linear(e, e * num_heads, bias=False) for _ in range(3))
        self.out_u = nn.Linear(e * num_heads, e, bias=False)
        # Labelled branch: channel-wise cross-attention to the unlabelled channels (official *_l2u).
        self.q_l, self.k_l, self.v_l = (nn.Linear(e, e * num_heads, bias=False) for _ in range(3))
        self.out_l = nn.Linear(e * num_heads, e, bias=False)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.proj_drop = nn.Dropout(attn_dropout)
        self.out_norm = nn.LayerNorm(e, eps=1e-6)
        self.map_out = nn.Sequential(nn.Conv2d(e, out_channels or in_channels, 1), nn.GELU())
        self.memory = SemanticMemory(num_classes, size=e, length=self.grid[0] * self.grid[1])
        for m in self.modules():  # official _init_weights: Xavier-uniform linear weights
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

        self._plan: Optional[list[NeckPass]] = None
        self._use_memory = False

    # --- what a method controls -----------------------------------------------------------
    @contextmanager
    def plan(self, passes: Sequence[NeckPass], use_memory: bool = False) -> Iterator[None]:
        """Within the block, the i-th training-mode forward is laid out by ``passes[i]``, and the
        labelled cross-attention reads the memory instead of the unlabelled batch when
        ``use_memory``. Eval-mode forwards (pseudo-label passes) do not consume the plan. Leaving
        the block with planned forwards not made, or making more, is an error."""
        if self._plan is not None:
            raise RuntimeError("AllSparkNeck.plan blocks cannot be nested")
        self._plan, self._use_memory = list(passes), bool(use_memory)
        completed = False
        try:
            yield
            completed = True
        finally:
            left, self._plan, self._use_memory = self._plan, None, False
        if completed and left:
            raise RuntimeError(f"AllSparkNeck.plan: {len(left)} planned training forward(s) were not made")

    @contextmanager
    def kv_scope(self, scope: KVScope) -> Iterator[None]:
        """Temporarily set :attr:`eval_kv_scope`."""
        if scope not in ("image", "batch"):
            raise ValueError(f"scope must be 'image' or 'batch', got {scope!r}")
        old, self.eval_kv_scope = self.eval_kv_scope, scope
        try:
            yield
        finally:
            self.eval_kv_scope = old

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        embedded = self.map_in(x).flatten(2).transpose(1, 2)  # (B, N, E)
        tokens = self.attn_norm(embedded)
        if self.training:
            attended = self._train_attention(tokens, (h, w))
        else:
            attended = self.cross_attention(tokens, tokens, shared=self.eval_kv_scope == "batch")
        out = self.out_norm(attended + embedded)
        return self.map_out(out.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w))

    def _next_pass(self, batch_size: int) -> NeckPass:
        if self._plan is None:
            if batch_size % 2:
                raise ValueError(f"AllSparkNeck in training mode splits the batch into labelled and unlabelled "
                                 f"halves, but got {batch_size} images (use eval mode, or a plan)")
            return NeckPass(batch_size // 2)
        if not self._plan:
            raise RuntimeError("AllSparkNeck.plan: more training forwards than planned")
        step = self._plan.pop(0)
        if not 0 <= step.num_labeled <= batch_size:
            raise ValueError(f"planned {step.num_labeled} labelled images in a batch of {batch_size}")
        return step

    def _train_attention(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        step = self._next_pass(tokens.shape[0])
        labeled, unlabeled = tokens[:step.num_labeled], tokens[step.num_labeled:]
        if step.grouping_map is not None and len(unlabeled):
            self._check_grid(grid, "enqueue into")
            self.memory.update(unlabeled.detach(), step.grouping_map, grid)
        parts = []
        if len(labeled):
            if self._use_memory:
                self._check_grid(grid, "read")
                kv = self.memory.as_tokens().to(tokens.dtype)
            elif len(unlabeled):
                kv = unlabeled
            else:
                raise ValueError("labelled images need unlabelled images (or the memory) in the same forward")
            parts.append(self.cross_attention(labeled, kv, shared=True))
        if len(unlabeled):
            parts.append(self.self_attention(unlabeled))
        return torch.cat(parts)

    def _check_grid(self, grid: tuple[int, int], what: str) -> None:
        if grid[0] * grid[1] != self.memory.length:
            raise ValueError(f"cannot {what} the memory: the feature grid is {grid[0]}x{grid[1]} but the memory holds "
                             f"{self.grid[0]}x{self.grid[1]} patches (training crops must be data.crop_size)")

    # --- the two attentions ---------------------------------------------------------------
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Channel tokens ``q`` ``(B, G, Cq, N)``, ``k``/``v`` ``(B or 1, G, Ck, N)`` ->
        ``(B, G, Cq, N)``: ``dropout(softmax(psi(q k^T))) v``."""
        attn = self.attn_drop(psi_softmax(q @ k.transpose(-1, -2))).to(v.dtype)
        return attn @ v

    def self_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unlabelled branch, ``(B, N, E)`` -> ``(B, N, E)``: per image and head."""
        heads = self.num_heads
        q, k, v = (_to_channels(proj(tokens), heads) for proj in (self.q_u, self.k_u, self.v_u))
        return self.proj_drop(self.out_u(_to_tokens(self._attend(q, k, v))))

    def cross_attention(self, queries: torch.Tensor, sources: torch.Tensor, shared: bool = True) -> torch.Tensor:
        """Labelled branch, ``(B, N, E)`` queries -> ``(B, N, E)``.

        ``sources`` ``(S, N, E)``: the unlabelled images, the memory (S = K classes) or, in eval
        mode, the images themselves. ``shared``: every query image attends to the channels of all
        ``S`` sources stacked; otherwise image ``i`` attends to source ``i`` only (S = B).
        """
        groups = self.num_heads if self.cross_heads == "per_head" else 1
        q = _to_channels(self.q_l(queries), groups)
        k, v = (_to_channels(proj(sources), groups) for proj in (self.k_l, self.v_l))  # (S, G, c, N)
        if shared:
            s, g, c, n = k.shape
            k, v = (t.transpose(0, 1).reshape(1, g, s * c, n) for t in (k, v))
        return self.proj_drop(self.out_l(_to_tokens(self._attend(q, k, v))))
