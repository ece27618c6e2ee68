"""AllSpark: the neck (channel-wise attention, psi, inference mode), the semantic memory (grouping,
FIFO queues), the two training recipes and their wiring, on tiny inputs.

References are written here independently of the library (explicit loops or the official
formulation spelt out with plain tensor operations)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.config import load_config
from semiseg.errors import ConfigError
from semiseg.methods import Batch, StepContext, build_method
from semiseg.methods.allspark import AllSpark, AllSparkUniMatch
from semiseg.models import DeepLabV3PlusHead, SegFormerHead, SegModel, build_model
from semiseg.models.allspark_neck import AllSparkNeck, NeckPass, SemanticMemory, feature_grid, psi_softmax

K = 3  # classes


# ---------------------------------------------------------------------------------------------
# Stand-ins and builders


class _Info:
    def __init__(self, channels, reductions):
        self._c, self._r = list(channels), list(reductions)

    def channels(self):
        return self._c

    def reduction(self):
        return self._r


class TinyEncoder(nn.Module):
    """Four stages at strides 4, 8, 16, 32 (ceil division, like timm's encoders), no BatchNorm."""

    def __init__(self, channels=(4, 6, 8, 12)):
        super().__init__()
        self.stem = nn.Conv2d(3, channels[0], 7, stride=4, padding=3)
        self.stages = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(channels, channels[1:]))
        self.feature_info = _Info(channels, (4, 8, 16, 32))

    def forward(self, x):
        feats = [F.gelu(self.stem(x))]
        for stage in self.stages:
            feats.append(F.gelu(stage(feats[-1])))
        return feats


def tiny_model(seed=0) -> SegModel:
    torch.manual_seed(seed)
    enc = TinyEncoder()
    return SegModel(enc, SegFormerHead(enc.feature_info.channels(), K, embed_dim=8, dropout=0.0), K)


def config(name="allspark", crop=64, batch=2, unlabeled_batch=None, model_keys=None, **method):
    train = {"batch_size": batch}
    if unlabeled_batch is not None:
        train["unlabeled_batch_size"] = unlabeled_batch
    return load_config({"data": {"crop_size": crop}, "model": model_keys or {},
                        "method": {"name": name, "attn_dropout": 0.0, **method}, "train": train})


def build(name="allspark", model=None, **kw):
    cfg = config(name, **kw)
    return build_method(cfg, model if model is not None else tiny_model(), K)


def make_batch(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def unlabeled():
        ignore = torch.zeros(b, size, size, dtype=torch.long)
        ignore[:, -5:, :] = 255  # padding at the bottom
        box = torch.zeros(b, size, size, dtype=torch.long)
        box[:, : size // 2, : size // 2] = 1
        return {"weak": torch.randn(b, 3, size, size, generator=g),
                "strong_1": torch.randn(b, 3, size, size, generator=g),
                "strong_2": torch.randn(b, 3, size, size, generator=g),
                "ignore_mask": ignore, "box_1": box, "box_2": box.flip(-1)}

    labeled = {"image": torch.randn(b, 3, size, size, generator=g),
               "mask": torch.randint(0, K, (b, size, size), generator=g)}
    return Batch(labeled, unlabeled(), unlabeled())


def ctx(iteration=0, iters_per_epoch=1):
    return StepContext(iteration=iteration, total_iters=100, lr=0.01, iters_per_epoch=iters_per_epoch)


def neck(e=6, grid=(2, 3), heads=2, cross_heads="merged", seed=0):
    torch.manual_seed(seed)
    return AllSparkNeck(e, K, grid, num_heads=heads, attn_dropout=0.0, cross_heads=cross_heads)


@pytest.fixture(scope="module")
def pvt():
    torch.manual_seed(0)
    cfg = load_config({"model": {"encoder": "pvt_v2_b0", "head": "segformer", "output_stride": 32, "embed_dim": 16}})
    return cfg, build_model(cfg.model, K)


# ---------------------------------------------------------------------------------------------
# psi and the attention, against hand-written references


def test_psi_then_softmax_matches_hand_written_reference():
    torch.manual_seed(0)
    scores = torch.randn(2, 2, 3, 4) * 3 + 1  # (batch, heads, Cq, Ck)
    ref = torch.empty_like(scores)
    for b in range(2):
        for h in range(2):
            m = scores[b, h]
            vals = [float(v) for v in m.flatten()]
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / len(vals)  # biased, as InstanceNorm
            z = [[(float(m[i, j]) - mean) / math.sqrt(var + 1e-5) for j in range(4)] for i in range(3)]
            for i in range(3):
                denom = sum(math.exp(v) for v in z[i])
                for j in range(4):
                    ref[b, h, i, j] = math.exp(z[i][j]) / denom
    assert torch.allclose(psi_softmax(scores), ref, atol=1e-6)
    official = nn.Softmax(dim=3)(nn.InstanceNorm2d(2)(scores))  # the official modules
    assert torch.allclose(psi_softmax(scores), official, atol=1e-6)


def _reference_attention(q, k, v):
    """Channel tokens q (Cq, N), k/v (Ck, N): softmax(instance-norm(q k^T)) v, by hand."""
    s = q @ k.T
    s = (s - s.mean()) / torch.sqrt(s.var(unbiased=False) + 1e-5)
    return s.softmax(-1) @ v


@pytest.mark.parametrize("cross_heads", ["merged", "per_head"])
def test_cross_attention_matches_reference(cross_heads):
    n = neck(cross_heads=cross_heads)
    e, heads, N = 6, 2, 6
    labeled, sources = torch.randn(2, N, e), torch.randn(3, N, e)
    with torch.no_grad():
        out = n.cross_attention(labeled, sources, shared=True)
        q = n.q_l(labeled).transpose(1, 2)  # (B, heads*E, N): one row per channel
        k = torch.cat(list(n.k_l(sources).transpose(1, 2)))  # (S*heads*E, N): every source's channels
        v = torch.cat(list(n.v_l(sources).transpose(1, 2)))
        for b in range(2):
            if cross_heads == "merged":  # official: all heads*E queries over all S*heads*E keys
                att = _reference_attention(q[b], k, v)
            else:  # paper: head h's E queries over head h's E channels of every source
                rows = []
                for h in range(heads):
                    idx = torch.cat([torch.arange(s * heads * e + h * e, s * heads * e + (h + 1) * e) for s in range(3)])
                    rows.append(_reference_attention(q[b, h * e:(h + 1) * e], k[idx], v[idx]))
                att = torch.cat(rows)
            assert torch.allclose(out[b], n.out_l(att.T), atol=1e-5)


def test_self_attention_is_per_image_and_per_head():
    n = neck()
    e, heads, N = 6, 2, 6
    tokens = torch.randn(3, N, e)
    with torch.no_grad():
        out = n.self_attention(tokens)
        for b in range(3):
            q, k, v = (proj(tokens[b]).T for proj in (n.q_u, n.k_u, n.v_u))  # (heads*E, N)
            att = torch.cat([_reference_attention(q[h * e:(h + 1) * e], k[h * e:(h + 1) * e], v[h * e:(h + 1) * e])
                             for h in range(heads)])
            assert torch.allclose(out[b], n.out_u(att.T), atol=1e-5)


def _official_layout_attention(emb_l, emb_u, w, heads):
    """The official CrossAttnMem arithmetic (train mode, no memory, no dropout) for labelled
    tokens ``emb_l`` (B, N, E) and unlabelled ``emb_u`` (S, N, E), with weights ``w`` in the
    official layout (``nn.Linear`` convention, out x in). Returns ``cat(out_l2u, out_u)``.

    Projections are viewed as (heads, E): head h owns projected channels h*E .. h*E+E-1. The
    self-attention result of channel e of head h is flattened at column e*heads + h (the
    official permute(0, 3, 2, 1) then view); the merged cross-attention keeps the projected
    channel order (one group, so column = channel)."""
    e = emb_u.shape[-1]
    out_u = []
    for t in emb_u:  # (N, E)
        q, k, v = (t @ w[name].T for name in ("q_u", "k_u", "v_u"))  # (N, heads*E)
        flat = torch.empty(t.shape[0], heads * e)
        for h in range(heads):
            cols = slice(h * e, (h + 1) * e)
            att = _reference_attention(q[:, cols].T, k[:, cols].T, v[:, cols].T)  # (E, N)
            for ch in range(e):
                flat[:, ch * heads + h] = att[ch]
        out_u.append(flat @ w["out_u"].T)
    keys = torch.cat([(t @ w["k_l2u"].T).T for t in emb_u])  # (S*heads*E, N)
    values = torch.cat([(t @ w["v_l2u"].T).T for t in emb_u])
    out_l = [_reference_attention((t @ w["q_l2u"].T).T, keys, values).T @ w["out_l2u"].T for t in emb_l]
    return torch.stack(out_l + out_u)


def test_official_weights_load_with_out_u_columns_permuted_and_out_l_as_is():
    """The official ``out_u`` reads the attended channels as (E, heads), semiseg's as (heads, E):
    only ``out_u``'s input columns are permuted; every other weight, ``out_l`` included, maps as is."""
    e, heads, N = 6, 2, 6
    g = torch.Generator().manual_seed(1)
    w = {name: torch.randn(heads * e, e, generator=g) / e
         for name in ("q_u", "k_u", "v_u", "q_l2u", "k_l2u", "v_l2u")}
    w["out_u"], w["out_l2u"] = (torch.randn(e, heads * e, generator=g) / e for _ in range(2))
    emb_l, emb_u = torch.randn(2, N, e, generator=g), torch.randn(2, N, e, generator=g)
    official = _official_layout_attention(emb_l, emb_u, w, heads)

    n = neck(e=e, heads=heads)
    # semiseg column h*E + c holds what the official column c*heads + h holds
    perm = torch.tensor([c * heads + h for h in range(heads) for c in range(e)])
    with torch.no_grad():
        for ours, theirs in (("q_u", "q_u"), ("k_u", "k_u"), ("v_u", "v_u"),
                             ("q_l", "q_l2u"), ("k_l", "k_l2u"), ("v_l", "v_l2u"), ("out_l", "out_l2u")):
            getattr(n, ours).weight.copy_(w[theirs])
        n.out_u.weight.copy_(w["out_u"][:, perm])

        def ours():
            return torch.cat((n.cross_attention(emb_l, emb_u, shared=True), n.self_attention(emb_u)))

        assert torch.allclose(ours(), official, atol=1e-5)
        n.out_u.weight.copy_(w["out_u"])  # without the permutation the unlabelled half differs
        assert not torch.allclose(ours()[2:], official[2:], atol=1e-3)
        assert torch.allclose(ours()[:2], official[:2], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Shapes and the patch grid


def test_patch_grid_follows_crop_size_and_encoder(pvt):
    _, model = pvt
    for crop in (64, 65, 96):
        side = math.ceil(crop / 32)  # what the encoder produces (the official (crop//32+1) is wrong at 64, 96)
        assert feature_grid(model, crop) == (side, side)
    assert feature_grid(tiny_model(), 70) == (3, 3)


@pytest.mark.parametrize("grid", [(2, 2), (3, 3), (2, 5)])
def test_neck_shapes(grid):
    n = neck(e=6, grid=grid)
    x = torch.randn(4, 6, *grid)
    assert n.train()(x).shape == x.shape
    assert n.eval()(torch.randn(1, 6, 7, 5)).shape == (1, 6, 7, 5)  # any size in eval mode
    wide = AllSparkNeck(6, K, grid, embed_dim=10, out_channels=5, attn_dropout=0.0)
    assert wide.train()(x).shape == (4, 5, *grid) and wide.memory.queue.shape == (K, 10, grid[0] * grid[1])


def test_method_shapes_for_several_crops():
    for crop in (64, 96):
        m = build(crop=crop)
        side = math.ceil(crop / 32)
        assert m.neck.grid == (side, side) and m.neck.memory.queue.shape == (K, 12, side * side)
        m.train()
        result = m.train_step(make_batch(size=crop), ctx())
        assert result.loss.ndim == 0 and torch.isfinite(result.loss)


def test_eval_network_runs_on_whole_odd_sized_images(pvt):
    cfg, _ = pvt
    cfg = load_config({**cfg.to_dict(), "data": {"crop_size": 64}, "method": {"name": "allspark"}})
    model = build_model(cfg.model, K)
    m = build_method(cfg, model, K).eval()
    net = m.inference_model()
    assert net.neck is m.neck
    with torch.no_grad():
        assert net(torch.randn(1, 3, 180, 240)).shape == (1, K, 180, 240)
        assert net(torch.randn(1, 3, 75, 97)).shape == (1, K, 75, 97)


def test_inference_is_the_cross_branch_on_the_image_itself():
    """Official inference runs cat(x, x) and keeps the labelled half; with the default
    eval_kv_scope 'image' a prediction does not depend on the other images of the batch."""
    n = neck().eval()
    x = torch.randn(3, 6, 2, 3)
    with torch.no_grad():
        together = n(x)
        alone = n(x[:1])
        n.train()
        with n.plan([NeckPass(1)]):
            official = n(torch.cat((x[:1], x[:1])))[:1]  # the official cat(x, x), labelled half
        n.eval()
        with n.kv_scope("batch"):
            batch_scope = n(x)
    assert torch.allclose(together[:1], alone, atol=1e-5)
    assert torch.allclose(alone, official, atol=1e-5)
    assert not torch.allclose(batch_scope[:1], alone, atol=1e-4)  # attends to all three images
    assert n.eval_kv_scope == "image"


# ---------------------------------------------------------------------------------------------
# The semantic memory


def test_queue_pointer_wraps_around():
    mem = SemanticMemory(num_classes=2, size=4, length=3)
    ch = torch.arange(1, 8).float()[:, None].repeat(1, 3)  # channel i holds the value i+1
    mem.enqueue(ch[None, :3], torch.zeros(1, 3, dtype=torch.long))  # class 0: slots 0..2
    assert mem.ptr.tolist() == [3, 0]
    mem.enqueue(ch[None, 3:6], torch.zeros(1, 3, dtype=torch.long))  # slots 3, 0, 1
    assert mem.ptr.tolist() == [2, 0]
    assert mem.queue[0, :, 0].tolist() == [5, 6, 3, 4]
    queue1 = mem.queue[1].clone()
    mem.enqueue(ch[None, :6], torch.tensor([[0, 0, 0, 0, 0, 0]]))  # more than size at once: the last 4 stay
    assert mem.ptr.tolist() == [0, 0]  # (2 + 6) % 4
    assert mem.queue[0, :, 0].tolist() == [3, 4, 5, 6]  # values 1..6 written at 2,3,0,1,2,3: last ones win
    assert torch.equal(mem.queue[1], queue1)
    mem.enqueue(ch[None, :2], torch.tensor([[1, 0]]))  # one channel each, image order kept
    assert mem.ptr.tolist() == [1, 1] and mem.queue[1, 0, 0] == 1 and mem.queue[0, 0, 0] == 2


def test_enqueue_matches_one_by_one_fifo():
    g = torch.Generator().manual_seed(0)
    mem = SemanticMemory(num_classes=3, size=5, length=2)
    ref_queue, ref_ptr = mem.queue.clone(), [0, 0, 0]
    for _ in range(3):
        channels = torch.randn(2, 7, 2, generator=g)
        cls = torch.randint(0, 3, (2, 7), generator=g)
        cls[0, :6] = 1  # more channels of one class than slots
        mem.enqueue(channels, cls)
        for b in range(2):  # the reference: one channel at a time
            for c in range(7):
                k = int(cls[b, c])
                ref_queue[k, ref_ptr[k]] = channels[b, c]
                ref_ptr[k] = (ref_ptr[k] + 1) % 5
        assert torch.equal(mem.queue, ref_queue) and mem.ptr.tolist() == ref_ptr


def test_grouping_puts_each_channel_into_the_class_it_matches():
    grid = (2, 2)
    # Class tokens on a 2x2 grid: class 0 on the top-left patch, class 1 on the top-right, class 2 below.
    cls_map = torch.zeros(1, K, 8, 8)
    cls_map[0, 0, :4, :4] = 5.0
    cls_map[0, 1, :4, 4:] = 5.0
    cls_map[0, 2, 4:, :] = 5.0
    tokens = torch.zeros(1, 4, 6)  # (B, N, E): 6 channels over 4 patches (row-major)
    wanted = [2, 0, 1, 2, 1, 0]
    patterns = {0: [1.0, 0.1, 0.0, 0.0], 1: [0.0, 2.0, 0.1, 0.0], 2: [0.1, 0.0, 3.0, 3.0]}
    for c, cls in enumerate(wanted):
        tokens[0, :, c] = torch.tensor(patterns[cls]) * (c + 1)  # the scale must not matter
    assert SemanticMemory.group_channels(tokens, cls_map, grid).tolist() == [wanted]

    mem = SemanticMemory(K, size=6, length=4)
    mem.update(tokens, cls_map, grid)
    assert mem.ptr.tolist() == [2, 2, 2]
    for cls in range(K):
        stored = [c for c in range(6) if wanted[c] == cls]
        assert torch.equal(mem.queue[cls, :2], tokens[0, :, stored].T)


def test_training_forward_enqueues_the_unlabelled_channels():
    n = neck(e=6, grid=(2, 3)).train()
    x = torch.randn(4, 6, 2, 3)
    grouping = torch.randn(2, K, 8, 12)
    initial = n.memory.queue.clone()
    with n.plan([NeckPass(2, grouping)]):
        n(x)
    with torch.no_grad():
        tokens = n.attn_norm(n.map_in(x[2:]).flatten(2).transpose(1, 2))
    cls = SemanticMemory.group_channels(tokens, grouping, (2, 3))
    counts = torch.bincount(cls.flatten(), minlength=K)  # the 12 unlabelled channels, none of the labelled
    assert n.memory.ptr.tolist() == (counts % 6).tolist()
    assert (n.memory.queue != initial).any(-1).sum() == counts.clamp(max=6).sum()
    assert counts[0] <= 6  # (this seed) so image 0's class-0 channels are still first in queue 0
    first = tokens[0, :, cls[0] == 0].T
    assert torch.allclose(n.memory.queue[0, :first.shape[0]], first, atol=1e-6)


def test_memory_not_used_before_warmup_nor_in_eval(monkeypatch):
    m = build(memory_warmup_epochs=2)
    reads = []
    original = m.neck.memory.as_tokens
    monkeypatch.setattr(m.neck.memory, "as_tokens", lambda: reads.append(1) or original())
    batch = make_batch()
    initial = m.neck.memory.queue.clone()
    m.train()
    for it in range(6):  # warm-up = 2 epochs x 3 iterations
        assert m.train_step(batch, ctx(it, iters_per_epoch=3)).logs["memory_in_use"] == 0.0
    assert reads == [] and not torch.equal(m.neck.memory.queue, initial)  # filled in the warm-up, never read
    assert m.train_step(batch, ctx(6, iters_per_epoch=3)).logs["memory_in_use"] == 1.0
    assert reads == [1]
    # Eval: never read, and the prediction does not depend on the memory's content.
    net = m.inference_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = net(x)
        m.neck.memory.queue.normal_()
        after = net(x)
    assert reads == [1] and torch.equal(before, after)
    assert build(memory_warmup_iters=4).memory_warmup(ctx(0, iters_per_epoch=100)) == 4


def test_memory_replaces_the_unlabelled_keys_after_warmup():
    n = neck().train()
    x = torch.randn(4, 6, 2, 3)
    with torch.no_grad(), n.plan([NeckPass(2)], use_memory=True):
        out = n(x)
    with torch.no_grad():
        tokens = n.attn_norm(n.map_in(x).flatten(2).transpose(1, 2))
        cross = n.cross_attention(tokens[:2], n.memory.queue.transpose(1, 2), shared=True)
        expected = n.out_norm(cross + n.map_in(x[:2]).flatten(2).transpose(1, 2))
    assert torch.allclose(out[:2], n.map_out(expected.transpose(1, 2).reshape(2, 6, 2, 3)), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradients


def test_labelled_loss_reaches_the_unlabelled_features_through_keys_and_values():
    n = neck().train()
    x_l = torch.randn(2, 6, 2, 3, requires_grad=True)
    x_u = torch.randn(2, 6, 2, 3, requires_grad=True)
    out = n(torch.cat((x_l, x_u)))
    (out[:2] * torch.randn_like(out[:2])).sum().backward()  # a loss on the labelled half only
    assert x_u.grad is not None and x_u.grad.abs().sum() > 0  # through K and V of the cross-attention
    for proj in (n.k_l, n.v_l, n.q_l, n.out_l):
        assert proj.weight.grad.abs().sum() > 0
    for proj in (n.q_u, n.k_u, n.v_u, n.out_u):  # the unlabelled self-attention is not involved
        assert proj.weight.grad is None or proj.weight.grad.abs().sum() == 0

    # With the memory as keys/values the unlabelled images no longer feed the labelled output.
    n.zero_grad()
    x_u.grad = None
    with n.plan([NeckPass(2)], use_memory=True):
        out = n(torch.cat((x_l, x_u)))
    out[:2].sum().backward()
    assert x_u.grad is None or x_u.grad.abs().sum() == 0
    assert n.k_l.weight.grad.abs().sum() > 0 and n.memory.queue.grad is None


# ---------------------------------------------------------------------------------------------
# The recipes


def _record_model_calls(model):
    calls = []
    model.register_forward_hook(lambda mod, inp, out: calls.append((mod.training, inp[0].detach(), out.detach())))
    layouts = []
    model.neck.register_forward_pre_hook(lambda mod, inp: layouts.append((mod.training, inp[0].shape[0])))
    return calls, layouts


def test_official_step_pseudo_labels_from_eval_pass_and_loss(monkeypatch):
    m = build()
    enqueued = []
    enqueue = m.neck.memory.enqueue
    monkeypatch.setattr(m.neck.memory, "enqueue", lambda ch, cls: enqueued.append(ch.shape) or enqueue(ch, cls))
    assert m.strong_labeled and m.num_strong_views == 0 and m.uses_unlabeled
    calls, _ = _record_model_calls(m.model)
    batch = make_batch(seed=3)
    m.train()
    result = m.train_step(batch, ctx())
    (eval_mode, eval_in, eval_out), (train_mode, train_in, train_out) = calls
    u = batch.unlabeled
    assert not eval_mode and torch.equal(eval_in, u["weak"])  # pseudo labels: eval pass on the weak view
    assert train_mode and torch.equal(train_in, torch.cat((batch.labeled["image"], u["weak"])))
    assert m.model.training and m.neck.training

    pred_x, pred_u = train_out[:2], train_out[2:]
    label = eval_out.argmax(1)
    keep = (u["ignore_mask"] != 255).float()
    loss_u = (F.cross_entropy(pred_u, label, reduction="none") * keep).sum() / keep.sum()
    loss_x = F.cross_entropy(pred_x, batch.labeled["mask"], ignore_index=255)
    assert torch.allclose(result.logs["loss_u"], loss_u, atol=1e-5)
    assert torch.allclose(result.logs["loss_x"], loss_x, atol=1e-5)
    assert torch.allclose(result.loss, (loss_x + loss_u) / 2, atol=1e-5)
    assert enqueued == [(2, 12, 4)]  # the unlabelled images' 12 channels of 2x2 patches, once


def test_grouping_source_and_pseudo_label_scope():
    m = build(grouping_source="probs", pseudo_label_kv="image")
    logits = torch.randn(2, K, 4, 4)
    assert torch.allclose(m.grouping_map(logits), logits.softmax(1))
    assert torch.equal(build().grouping_map(logits), logits)
    scopes = []
    m.neck.register_forward_pre_hook(lambda mod, inp: scopes.append((mod.training, mod.eval_kv_scope)))
    m.train()
    m.train_step(make_batch(), ctx())
    assert scopes[0] == (False, "image") and m.neck.eval_kv_scope == "image"


@pytest.mark.parametrize("keys,layout", [
    ({}, [(True, 4, 2), (True, 4, 0)]),  # feature_perturbation(model, cat(x, u_w)); model(cat(u_s1, u_s2))
    ({"feature_perturbation": False}, [(True, 4, 2), (True, 4, 0)]),
    ({"feature_perturbation": False, "teacher": "ema"}, [(True, 6, 2)]),  # model(cat(x, u_s1, u_s2))
])
def test_allspark_unimatch_tells_the_neck_which_images_are_labelled(keys, layout, monkeypatch):
    m = build("allspark_unimatch", conf_thresh=0.0, memory_warmup_iters=0, mix_source="in_batch", **keys)
    assert isinstance(m, AllSparkUniMatch) and not m.strong_labeled and m.num_strong_views == 2
    seen = []
    take = m.neck._next_pass
    monkeypatch.setattr(m.neck, "_next_pass", lambda b: seen.append(take(b)) or seen[-1])
    _, layouts = _record_model_calls(m.model)
    m.train()
    result = m.train_step(make_batch(), ctx())
    training = [(t, b) for t, b in layouts if t]
    assert [(t, b, p.num_labeled) for (t, b), p in zip(training, seen)] == layout
    assert seen[0].grouping_map is not None and all(p.grouping_map is None for p in seen[1:])
    assert result.logs["memory_in_use"] == 1.0 and torch.isfinite(result.loss)
    result.loss.backward()
    assert m.neck.k_l.weight.grad is not None
    if keys.get("teacher") == "ema":
        assert isinstance(m.teacher.module.neck, AllSparkNeck) and m.teacher.module.neck is not m.neck
        assert set(m.eval_models()) == {"student", "teacher"}


@pytest.mark.parametrize("memory", [True, False])
def test_allspark_unimatch_pseudo_labels_come_from_the_labelled_branch_by_default(memory, monkeypatch):
    """Default pseudo_label_source 'eval_pass': the weak target is made from an eval-mode pass
    (the neck's cross-attention branch, keys/values of the whole batch), with or without the
    memory; every unsupervised term (strong views, fp stream) learns that target."""
    import copy

    from semiseg.methods.consistency import pseudo_target

    m = build("allspark_unimatch", conf_thresh=0.0, mix_source="in_batch", memory=memory)
    assert m.mcfg.pseudo_label_source == "eval_pass"
    batch = make_batch(seed=5)
    reference = copy.deepcopy(m.model).eval()
    with torch.no_grad(), reference.neck.kv_scope("batch"):
        expected = pseudo_target(reference(batch.unlabeled["weak"]), batch.unlabeled["ignore_mask"])
    seen, targets = [], []
    weak_target = m.weak_target
    monkeypatch.setattr(m, "weak_target", lambda logits, u: seen.append(logits) or weak_target(logits, u))
    import semiseg.methods.consistency as consistency_module

    loss = consistency_module.unsupervised_loss
    monkeypatch.setattr(consistency_module, "unsupervised_loss", lambda p, t, c: targets.append(t) or loss(p, t, c))
    m.train()
    m.train_step(batch, ctx())
    assert len(seen) == 1 and not seen[0].requires_grad  # no-grad eval pass, not the training forward
    fp_target = targets[-1]
    assert torch.equal(fp_target.pseudo_label, expected.pseudo_label)
    assert torch.allclose(fp_target.confidence, expected.confidence, atol=1e-5)
    box = batch.unlabeled["box_1"]
    assert torch.equal(targets[0].pseudo_label, expected.pseudo_label.where(box != 1, expected.pseudo_label.flip(0)))
    assert not hasattr(m, "_eval_logits_u")  # the logits travel in the step's ForwardPlan, nothing is kept


def test_allspark_unimatch_weak_forward_takes_the_training_forward_prediction(monkeypatch):
    m = build("allspark_unimatch", conf_thresh=0.0, mix_source="in_batch", memory=False,
              pseudo_label_source="weak_forward")
    evals = []
    monkeypatch.setattr(m, "eval_logits", lambda *a: evals.append(a))
    seen = []
    weak_target = m.weak_target
    monkeypatch.setattr(m, "weak_target", lambda logits, u: seen.append(logits) or weak_target(logits, u))
    m.train()
    m.train_step(make_batch(seed=5), ctx())
    assert evals == []  # no memory and labels from the training forward: no eval-mode pass at all
    assert len(seen) == 1 and seen[0].requires_grad  # the clean weak logits of the fp pass


def test_plan_must_match_the_forwards():
    n = neck().train()
    with pytest.raises(RuntimeError, match="not made"):
        with n.plan([NeckPass(1), NeckPass(0)]):
            n(torch.randn(2, 6, 2, 3))
    with pytest.raises(RuntimeError, match="more training forwards"):
        with n.plan([NeckPass(1)]):
            n(torch.randn(2, 6, 2, 3))
            n(torch.randn(2, 6, 2, 3))
    with pytest.raises(ValueError, match="halves"):
        n(torch.randn(3, 6, 2, 3))


def test_memory_state_round_trips_through_a_checkpoint(tmp_path):
    a = build("allspark", memory_warmup_iters=0)
    a.train()
    a.train_step(make_batch(seed=1), ctx())
    a.train_step(make_batch(seed=2), ctx(1))
    assert not torch.equal(a.neck.memory.queue, build("allspark").neck.memory.queue)  # filled
    path = tmp_path / "method.pt"
    torch.save(a.state_dict(), path)
    b = build("allspark", model=tiny_model(seed=5))
    assert not torch.equal(a.neck.memory.queue, b.neck.memory.queue)
    b.load_state_dict(torch.load(path, weights_only=True))
    assert {"model.neck.memory.queue", "model.neck.memory.ptr"} <= set(a.state_dict())
    assert torch.equal(a.neck.memory.queue, b.neck.memory.queue)
    assert torch.equal(a.neck.memory.ptr, b.neck.memory.ptr)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# ---------------------------------------------------------------------------------------------
# The final logit resize


def bilinear_reference(x, size, align_corners):
    """Bilinear resize written out. Output index i samples the input at i * (n_in - 1) / (n_out - 1)
    with aligned corners, else at (i + 0.5) * n_in / n_out - 0.5 clamped at 0 (half-pixel centres:
    the official AllSpark decoder's F.interpolate(..., align_corners=False))."""
    def taps(n_in, n_out):
        out = []
        for i in range(n_out):
            if align_corners:
                src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
            else:
                src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            out.append((i0, min(i0 + 1, n_in - 1), src - i0))
        first, second, frac = zip(*out)
        return torch.tensor(first), torch.tensor(second), torch.tensor(frac, dtype=x.dtype)

    y0, y1, fy = taps(x.shape[-2], size[0])
    x0, x1, fx = taps(x.shape[-1], size[1])
    rows = x[..., y0, :] * (1 - fy)[:, None] + x[..., y1, :] * fy[:, None]  # (B, K, H, w_in)
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


@pytest.mark.parametrize("training", [False, True])
def test_allspark_resizes_logits_without_aligned_corners_as_official(training):
    """Official SemiDecoder.forward: F.interpolate(out, (h, w), 'bilinear', align_corners=False),
    in the eval-mode pseudo-label pass and in the training forward alike."""
    m = build("allspark")
    model = m.model.train(training)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plan = (lambda: m.neck.plan([NeckPass(2)])) if training else nullcontext
    with torch.no_grad():
        with plan():
            logits = model(x)
        with plan():
            low = model.decode(model.features(x))  # (4, K, 16, 16): the head's stride-4 logits
    assert low.shape[-2:] == (16, 16)
    assert torch.allclose(logits, bilinear_reference(low, (64, 64), align_corners=False), atol=1e-5)
    assert not torch.allclose(logits, bilinear_reference(low, (64, 64), align_corners=True), atol=1e-2)


def test_final_resize_is_the_methods_choice_unless_configured(pvt):
    assert tiny_model().align_corners is True  # SegModel's default: UniMatch's DeepLabV3+
    assert build("allspark").model.align_corners is False  # the SegFormer head: official AllSpark
    enc = TinyEncoder()
    deeplab = SegModel(enc, DeepLabV3PlusHead(enc.feature_info.channels(), enc.feature_info.reduction(), K,
                                              output_stride=32, channels=8), K)
    assert build("allspark", model=deeplab).model.align_corners is True  # DeepLabV3+ keeps its own
    assert build("allspark_unimatch").model.align_corners is True  # UniMatch's forward
    assert build("allspark", model_keys={"align_corners": True}).model.align_corners is True
    m = build("allspark_unimatch", model_keys={"align_corners": False}, teacher="ema")
    assert m.model.align_corners is False and m.teacher.module.align_corners is False
    x = torch.randn(1, 3, 40, 56)
    for keys, expected in (({}, True), ({"align_corners": False}, False)):
        cfg = load_config({"model": {**pvt[0].model.model_dump(), **keys}})
        model = build_model(cfg.model, K).eval()
        assert model.align_corners is expected
        with torch.no_grad():
            low = model.decode(model.features(x))
            assert torch.allclose(model(x), bilinear_reference(low, (40, 56), expected), atol=1e-5)


def test_allspark_checkpoint_predicts_with_the_official_resize(tmp_path, pvt):
    """A network trained with method allspark is rebuilt from its checkpoint through the method,
    so evaluation, predict and export resize as it was trained."""
    from semiseg.api import Predictor, build_method_from_checkpoint
    from semiseg.engine.checkpoint import save_checkpoint
    from semiseg.engine.evaluator import predict_logits

    cfg, _ = pvt
    cfg = load_config({**cfg.to_dict(), "data": {"crop_size": 64}, "method": {"name": "allspark"}})
    torch.manual_seed(0)
    trained = build_method(cfg, build_model(cfg.model, K), K)
    path = save_checkpoint(tmp_path / "best.safetensors",
                           {f"model.{k}": v for k, v in trained.state_dict().items()},
                           {"config": cfg.to_dict(), "num_classes": K, "method": "allspark"})
    loaded_cfg, method, _ = build_method_from_checkpoint(path)
    net = method.inference_model()
    assert net.align_corners is False
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = bilinear_reference(net.decode(net.features(x)), (64, 96), align_corners=False)
        assert torch.allclose(net(x), ref, atol=1e-5)
        sliding = cfg.eval.model_copy(update={"mode": "sliding_window"})
        window = predict_logits(net, x[..., :64], sliding, K, crop_size=64)  # one window: log-softmax of it
        ref_window = bilinear_reference(net.decode(net.features(x[..., :64])), (64, 64), False)
        assert torch.allclose(window, ref_window.log_softmax(1), atol=1e-4)
    image = (torch.rand(64, 96, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8).numpy()
    predictor = Predictor(loaded_cfg, net, [f"c{i}" for i in range(K)])
    x = predictor.preprocess(image)
    with torch.no_grad():
        ref = bilinear_reference(net.decode(net.features(x)), (64, 96), align_corners=False)
    assert torch.allclose(predictor.predict_logits(image), ref[0], atol=1e-5)


@pytest.mark.parametrize("name", ["allspark", "allspark_unimatch"])
def test_unequal_batch_sizes_are_a_config_error(name):
    with pytest.raises(ConfigError, match=r"train\.batch_size.*train\.unlabeled_batch_size"):
        build(name, batch=4, unlabeled_batch=2)
    build(name, batch=2, unlabeled_batch=2)  # equal: fine


def test_oracle_pseudo_labels_are_refused_for_allspark_unimatch():
    with pytest.raises(ConfigError, match=r"'method.oracle_pseudo_labels': not available for allspark_unimatch"):
        build("allspark_unimatch", oracle_pseudo_labels=True)


def test_bf16_autocast_step_is_finite():
    m = build(memory_warmup_iters=0)
    m.train()
    c = StepContext(iteration=0, total_iters=10, lr=0.01, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    result = m.train_step(make_batch(), c)
    assert torch.isfinite(result.loss) and m.neck.memory.queue.dtype == torch.float32


def test_shipped_camvid_config_validates():
    cfg = load_config("semiseg/configs/camvid_v1_allspark.yaml")
    assert cfg.method.name == "allspark" and cfg.model.encoder == "pvt_v2_b0" and cfg.model.output_stride == 32
    assert cfg.model.head == "segformer" and cfg.data.crop_size == 128
    assert (cfg.train.unlabeled_batch_size or cfg.train.batch_size) == cfg.train.batch_size
    assert isinstance(AllSpark, type)


def test_init_from_offers_the_neck_weights_to_the_method():
    """``train.init_from`` an AllSpark run: the bare network takes its own weights, the method its neck's."""
    source = build("allspark", model=tiny_model(seed=1))
    source.train()
    source.train_step(make_batch(seed=1), ctx())  # a filled memory too
    extra = {k: v for k, v in source.model.state_dict().items() if k.startswith("neck.")}
    target = build("allspark", model=tiny_model(seed=2))
    target.take_init_weights({**extra, "something.else": torch.zeros(1)})
    for k, v in extra.items():
        assert torch.equal(target.model.state_dict()[k], v), k
