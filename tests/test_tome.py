"""Token Merging (vitmha.models.tome) against plainly written references: one bipartite-soft-matching merge
step written with loops, a whole ToMe forward written out with explicit attention, and proportional attention
as attention over duplicated tokens. Tiny models, CPU, float32 unless stated."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vitmha
from vitmha.models import Attention
from vitmha.models.tome import (MergeTrace, ToMeError, ToMeVisionTransformer, apply_tome,
                                bipartite_soft_matching, proportional_bias, tome_block)
from vitmha.models.vit import Block, ResPostBlock

from tests.helpers import randomize

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)   # 64 patches


def tiny(**kw) -> vitmha.VisionTransformer:
    torch.manual_seed(0)
    return randomize(vitmha.create_backbone(NAME, **{**TINY, **kw})).eval()


def reference_merge(x, size, metric, r, p):
    """One bipartite soft matching step, per sample, with loops: patch tokens alternately into A and B, each
    A token's most cosine-similar B token, the r best edges merged (size-weighted means). Returns tokens,
    sizes in the order [prefix, kept A in order, B in order]."""
    xs, ss = [], []
    for b in range(x.shape[0]):
        patches = list(range(p, x.shape[1]))
        set_a, set_b = patches[0::2], patches[1::2]
        edges = []
        for i in set_a:
            sims = torch.stack([F.cosine_similarity(metric[b, i], metric[b, j], dim=0) for j in set_b])
            j = int(sims.argmax())
            edges.append((float(sims[j]), i, set_b[j]))
        into = {i: j for _, i, j in sorted(edges, key=lambda e: -e[0])[:min(r, len(patches) // 2)]}
        rows = [x[b, t] for t in range(p)] + [x[b, i] for i in set_a if i not in into]
        sizes = [size[b, t] for t in range(p)] + [size[b, i] for i in set_a if i not in into]
        for j in set_b:
            group = [j] + [i for i, dst in into.items() if dst == j]
            total = sum(size[b, t] for t in group)
            rows.append(sum(x[b, t] * size[b, t] for t in group) / total)
            sizes.append(total)
        xs.append(torch.stack(rows))
        ss.append(torch.stack(sizes))
    return torch.stack(xs), torch.stack(ss)


def reference_tome_logits(model, x, r):
    """The ToMe forward of a pre-norm, class-token model written out: explicit softmax(QKᵀ/√d + log size)V,
    keys averaged over heads as the matching metric, reference_merge between attention and MLP."""
    p, H = model.num_prefix_tokens, model.num_heads
    t = model._embed(x)
    size = torch.ones(t.shape[0], t.shape[1], 1)
    for blk in model.blocks:
        B, T, D = t.shape
        qkv = F.linear(blk.norm1(t), blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(B, T, 3, H, D // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                              # each (B, H, T, d)
        logits = q @ k.transpose(-1, -2) / math.sqrt(D // H) + size.log().reshape(B, 1, 1, T)
        y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        t = t + blk.attn.proj(y)
        t, size = reference_merge(t, size, k.mean(1), r, p)
        t = t + blk.mlp(blk.norm2(t))
    return model.head(model.norm(t)[:, 0])


def tokens_per_block(model, x):
    """The token count each block's MLP saw (after that block's merge)."""
    seen = []
    hooks = [b.mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_tome_r_zero_is_the_plain_model():
    plain, zero = tiny(), tiny(tome_r=0)
    assert type(zero) is vitmha.VisionTransformer
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), zero(x))
    merging = tiny(tome_r=4)
    assert isinstance(merging, ToMeVisionTransformer)
    assert merging.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in merging.state_dict().items())
    apply_tome(merging, 0)                                              # off again: the same numbers as plain
    with torch.no_grad():
        assert torch.equal(plain(x), merging(x))


@pytest.mark.parametrize("p, n, r", [(1, 16, 5), (3, 15, 4), (0, 9, 9), (1, 2, 1)],
                         ids=["cls-even", "cls+regs-odd", "no-prefix-capped", "two-patches"])
def test_merge_step_equals_the_reference(p, n, r):
    g = torch.Generator().manual_seed(p + n)
    x = torch.randn(2, p + n, 6, generator=g)
    size = torch.randint(1, 5, (2, p + n, 1), generator=g).float()
    metric = torch.randn(2, p + n, 4, generator=g)
    merge = bipartite_soft_matching(metric, r, p)
    got_x, got_s = merge.apply(x, size)
    ref_x, ref_s = reference_merge(x, size, metric, r, p)
    assert got_x.shape == ref_x.shape == (2, p + n - min(r, n // 2), 6)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_s, ref_s)


def test_whole_forward_equals_the_written_out_reference():
    model = tiny(tome_r=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_tome_logits(model, x, 5), rtol=1e-5, atol=1e-5)


def test_token_count_drops_by_r_per_block_and_is_capped():
    x = torch.randn(1, 3, 32, 32)
    assert tokens_per_block(tiny(tome_r=6), x) == [1 + 64 - 6 * (i + 1) for i in range(4)]
    # 16 patches, r=6: 16 -> 10, then capped at half: 10 -> 5 -> 3 -> 2 -> 1 -> 1 (at least one patch token)
    model = tiny(tome_r=6, img_size=16, depth=6)
    assert tokens_per_block(model, torch.randn(1, 3, 16, 16)) == [1 + n for n in (10, 5, 3, 2, 1, 1)]


def test_prefix_tokens_are_never_merged():
    x = torch.randn(2, 10, 8)
    metric = x[:, :1].repeat(1, 10, 1) + 1e-3 * torch.randn(2, 10, 8)   # every token all but equal to the class token
    merge = bipartite_soft_matching(metric, 4, num_prefix=2)
    out, size = merge.apply(x, None)
    assert torch.equal(out[:, :2], x[:, :2]) and torch.equal(size[:, :2], torch.ones(2, 2, 1))
    assert out.shape[1] == 6 and torch.equal(size[:, 2:].sum(1), torch.full((2, 1), 8.0))


def test_sizes_sum_to_the_patches_and_unmerge_gives_each_patch_its_token():
    model = tiny(reg_tokens=2)
    t = model._embed(torch.randn(2, 3, 32, 32))
    size, trace = None, MergeTrace()
    with torch.no_grad():
        for blk in model.blocks:
            t, size, merge = tome_block(blk, t, size, 7, model.num_prefix_tokens)
            trace.pending.append(merge)
            assert torch.equal(size[:, 3:].sum(1), torch.full((2, 1), 64.0))
            assert torch.equal(size[:, :3], torch.ones(2, 3, 1))
            full = trace.unmerge(t)
            assert full.shape == (2, 67, 32)
            for b in range(2):   # a token of size s fills exactly s positions of the grid
                counts = torch.bincount(trace.source[b], minlength=t.shape[1]).float()
                assert torch.equal(counts, size[b, :, 0])
                assert torch.equal(full[b], t[b, trace.source[b]])


def test_avg_pool_is_the_size_weighted_average():
    model = tiny(class_token=False, global_pool="avg", num_classes=0, tome_r=6)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t, size = model._embed(x), None
        for blk in model.blocks:
            t, size, _ = tome_block(blk, t, size, 6, 0)
        weighted = (t * size).sum(1) / size.sum(1)
        torch.testing.assert_close(model(x), model.fc_norm(weighted), rtol=1e-5, atol=1e-5)


def test_proportional_attention_is_attention_over_duplicated_tokens():
    torch.manual_seed(0)
    attn = randomize(Attention(16, num_heads=2)).eval()
    x = torch.randn(2, 5, 16)
    size = torch.tensor([1, 3, 1, 2, 4]).float().reshape(1, 5, 1).expand(2, -1, -1)
    dup = x.repeat_interleave(size[0, :, 0].long(), dim=1)               # each token as `size` copies
    first = torch.cumsum(size[0, :, 0].long(), 0) - size[0, :, 0].long()
    with torch.no_grad():
        want = attn(dup)[:, first]
        for fused in (True, False):
            attn.fused = fused
            torch.testing.assert_close(attn(x, attn_mask=proportional_bias(size, x.dtype)), want,
                                       rtol=1e-5, atol=1e-6)


def test_proportional_attention_equals_softmax_with_log_size_bias():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64) for _ in range(3))
    size = torch.randint(1, 9, (2, 7, 1)).double()
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + size.log().reshape(2, 1, 1, 7), -1) @ v
    bias = proportional_bias(size, q.dtype)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), want)
    torch.testing.assert_close(vitmha.models.explicit_attention(q, k, v, attn_mask=bias)[0], want)


def test_fused_and_explicit_attention_paths_agree():
    model = tiny(tome_r=8, reg_tokens=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        model.set_fused_attn(False)
        torch.testing.assert_close(model(x), fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [Block, ResPostBlock])
def test_block_without_merge_is_the_block(block):
    """tome_block reproduces the block's own forward when nothing merges (it re-states Block's two halves)."""
    torch.manual_seed(0)
    blk = randomize(block(16, 2, mlp_hidden_dim=32, norm_layer=torch.nn.LayerNorm, init_values=0.5)).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y, size, merge = tome_block(blk, x, None, 0, 1)
        assert merge is None and size is None and torch.equal(y, blk(x))


def test_training_backward_gives_finite_gradients_and_checkpointing_the_same():
    model = tiny(tome_r=6, drop_path_rate=0.1).train()
    x, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad()
        torch.manual_seed(1)                                            # the same drop-path draws
        F.cross_entropy(model(x), target).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.isfinite(g).all() for g in grads[0].values())
    assert grads[0]["patch_embed.proj.weight"].abs().sum() > 0 and grads[0]["blocks.0.attn.qkv.weight"].abs().sum() > 0
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6)


def test_dense_outputs_keep_the_patch_grid():
    model = tiny(tome_r=8)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 65, 32)
        maps = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [m.shape for m in maps] == [(2, 32, 8, 8)] * 2
    fx = vitmha.create_backbone(NAME, **{**TINY, "num_classes": 0}, tome_r=8, features_only=True, out_indices=(1, 3))
    assert [m.shape for m in fx(x)] == [(2, 32, 8, 8)] * 2


def test_refuses_attention_maps_masks_and_bad_r():
    model = tiny(tome_r=4)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ToMeError, match="tome_r=4: attention maps"):
        model.forward_attention(x)
    with pytest.raises(ToMeError, match="attn_mask"):
        model.forward_features(x, attn_mask=torch.ones(65, 65, dtype=torch.bool))
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ToMeError, match="tome_r="):
            tiny(tome_r=bad)
    apply_tome(model, 0)
    assert model.forward_attention(x)[0].shape == (1, 2, 65, 65)         # same model, merging off


def test_image_classifier_with_tome_backbone_kwargs_runs_forward_and_backward():
    from vitmha.tasks import ImageClassifier

    task = ImageClassifier(num_classes=3, backbone_kwargs={**TINY, "num_classes": 3, "tome_r": 4})
    assert isinstance(task.model, ToMeVisionTransformer) and task.model.tome_r == 4
    logits = task(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)


def test_real_vit_tiny_keeps_its_photo_classes(real_weights):
    from vitmha.inference import eval_transform, pretrained_backbone, read_image
    from tests.conftest import REPO

    _, pre = pretrained_backbone(NAME, False)
    tf = eval_transform(pre, "classification")
    x = torch.cat([tf(image=read_image(str(REPO / "data" / "samples" / f)))["image"][None]
                   for f in ("chelsea.jpg", "coffee.jpg")])
    model = vitmha.create_backbone(NAME, pretrained=str(real_weights)).eval()
    with torch.no_grad():
        plain = model(x).argmax(-1)
        apply_tome(model, 8)
        merged = model(x).argmax(-1)
    assert torch.equal(plain, merged) and merged[1] == 967 and 281 <= merged[0] <= 285


def test_segmenter_with_tome_gets_full_resolution_masks():
    from vitmha.tasks import SemanticSegmenter

    task = SemanticSegmenter(num_classes=3, head="linear", backbone_kwargs={**TINY, "tome_r": 8})
    assert isinstance(task.model.backbone, ToMeVisionTransformer)
    x = torch.randn(2, 3, 32, 32)
    out = task(x)
    assert out.shape == (2, 3, 32, 32)
    out.mean().backward()


def test_bf16_autocast_and_bf16_weights_stay_near_fp32():
    model = tiny(tome_r=6)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x)
        model.to(torch.bfloat16)
        cast = model(x.bfloat16())
    for got in (auto, cast):
        assert got.dtype == torch.bfloat16
        assert ((got.float() - want).abs().max() / want.abs().max()).item() < 5e-2
