"""The encoder against its references: timm (same weights), float64 softmax(QKᵀ/√d)V, torch.nn.MultiheadAttention."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vitmha
from vitmha.models import Attention, explicit_attention, resample_patch_embed, resample_pos_embed

from tests.helpers import randomize, rel_err

# (arch, overrides): one per family feature; shrunk so the whole list runs in seconds on a CPU
SMALL = dict(embed_dim=64, num_heads=4, depth=2)
PARITY_CASES = [
    ("vit_tiny_patch16_224", dict(depth=2, img_size=64)),                                   # class token, token pool
    ("vit_small_patch32_224", dict(depth=2, img_size=96, num_classes=7)),
    ("vit_base_patch16_clip_224", dict(SMALL, img_size=64)),                                # CLIP pre-norm, no patch bias
    ("vit_base_patch16_clip_quickgelu_224", dict(SMALL, img_size=64)),                      # QuickGELU
    ("vit_small_patch14_dinov2", dict(depth=2, img_size=56)),                               # LayerScale
    ("vit_small_patch14_reg4_dinov2", dict(depth=2, img_size=56)),                          # registers
    ("vit_giant_patch14_dinov2", dict(SMALL, embed_dim=96, img_size=56)),                               # packed SwiGLU
    ("vit_base_patch16_siglip_224", dict(SMALL, img_size=64)),                              # MAP attention pooling
    ("vit_base_patch16_siglip_gap_224", dict(SMALL, img_size=64)),                          # avg pool, no class token
    ("vit_medium_patch16_reg4_gap_256", dict(SMALL, img_size=64)),                          # regs + avg + fc_norm
    ("vit_base_patch16_gap_224", dict(SMALL, img_size=64)),
    ("vit_base_patch16_rpn_224", dict(SMALL, img_size=64)),                                 # res-post-norm blocks
    ("aimv2_large_patch14_224", dict(SMALL, img_size=56)),                                  # RMSNorm, SwiGLU, patch norm
    ("vit_tiny_patch16_224", dict(depth=2, img_size=64, qk_norm=True, init_values=0.1)),    # qk-norm
    ("vit_tiny_patch16_224", dict(depth=2, img_size=64, no_embed_class=True, reg_tokens=2)),
    ("vit_tiny_patch16_224", dict(depth=2, img_size=64, class_token=False, global_pool="avg")),
    ("vit_tiny_patch16_224", dict(depth=2, img_size=64, global_pool="avgmax", num_classes=0)),
]


def timm_and_ours(arch: str, **kw):
    ref = randomize(timm.create_model(arch, pretrained=False, **kw)).eval()
    ours = vitmha.create_backbone(arch, pretrained=ref.state_dict(), **kw).eval()
    return ref, ours


@pytest.mark.parametrize("arch,kw", PARITY_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(PARITY_CASES)])
def test_parity_with_timm(arch, kw):
    ref, ours = timm_and_ours(arch, **kw)
    size = kw.get("img_size", 224)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        fa, fb = ref.forward_features(x), ours.forward_features(x)
        assert fa.shape == fb.shape
        assert rel_err(fa, fb) < 1e-5
        assert rel_err(ref.forward_head(fa), ours.forward_head(fb)) < 1e-5
        assert rel_err(ref.forward_head(fa, pre_logits=True), ours.forward_head(fb, pre_logits=True)) < 1e-5


def test_dynamic_img_size_non_square_matches_timm():
    ref, ours = timm_and_ours("vit_small_patch14_reg4_dinov2", depth=2, img_size=56, dynamic_img_size=True)
    x = torch.randn(2, 3, 42, 70)
    with torch.no_grad():
        assert rel_err(ref.forward_features(x), ours.forward_features(x)) < 1e-5


def test_fixed_size_model_rejects_other_sizes_clearly():
    m = vitmha.create_backbone("vit_tiny_patch16_224", depth=1, img_size=32)
    with pytest.raises(ValueError, match="built for 32x32"):
        m(torch.randn(1, 3, 48, 48))


def test_gradients_match_timm():
    ref, ours = timm_and_ours("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=5)
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([0, 3, 4])
    F.cross_entropy(ref(x), y).backward()
    F.cross_entropy(ours(x), y).backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(grads_ref[name].grad, p.grad) < 1e-4, name


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_patch_dropout_matches_timm_in_training_and_is_off_in_eval(arch):
    """timm's patch_drop_rate: same kept tokens for the same seed (class and register tokens always kept)."""
    size = 56
    ref, ours = timm_and_ours(arch, depth=2, img_size=size, num_classes=5, patch_drop_rate=0.25)
    assert ours.patch_drop.prob == 0.25 and ours.patch_drop.num_prefix_tokens == ref.num_prefix_tokens
    x = torch.randn(3, 3, size, size)
    ref.train(), ours.train()
    torch.manual_seed(7)
    fa = ref.forward_features(x)
    torch.manual_seed(7)
    fb = ours.forward_features(x)
    n_patches = (size // ours.patch_embed.patch_size[0]) ** 2
    assert fb.shape[1] == ours.num_prefix_tokens + int(n_patches * 0.75)
    assert rel_err(fa, fb) < 1e-5
    torch.manual_seed(8)
    assert not torch.allclose(ours.forward_features(x), fb)          # a new draw keeps other tokens
    ref.eval(), ours.eval()
    with torch.no_grad():
        full = ours.forward_features(x)
        assert full.shape[1] == ours.num_prefix_tokens + n_patches
        assert rel_err(ref.forward_features(x), full) < 1e-5
        ours.train()                                                 # segmentation's path keeps every token
        maps = ours.forward_intermediates(x, indices=[1], intermediates_only=True)
        assert maps[0].shape[-2:] == ours.patch_embed.grid_size
    with pytest.raises(ValueError, match="patch_drop_rate"):
        vitmha.create_backbone("vit_tiny_patch16_224", depth=1, img_size=32, patch_drop_rate=1.0)


def test_forward_intermediates_match_timm():
    ref, ours = timm_and_ours("vit_small_patch14_reg4_dinov2", depth=4, img_size=56)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a = ref.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        b = ours.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        final_a, _ = ref.forward_intermediates(x, indices=2, norm=True)
        final_b, _ = ours.forward_intermediates(x, indices=2, norm=True)
    assert [t.shape for t in b] == [(2, 384, 4, 4)] * 2
    for u, v in zip(a, b):
        assert rel_err(u, v) < 1e-5
    assert rel_err(final_a, final_b) < 1e-5


# ------------------------------------------------------------------------------------------ attention
def _qkv(B=2, h=3, N=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, d, generator=g) for _ in range(3)]


def test_explicit_attention_is_softmax_qk_over_sqrt_d_times_v_in_float64():
    q, k, v = _qkv()
    out, probs = explicit_attention(q, k, v)
    q64, k64, v64 = q.double(), k.double(), v.double()
    p64 = torch.softmax(q64 @ k64.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    assert torch.allclose(probs.double(), p64, atol=1e-6)
    assert torch.allclose(out.double(), p64 @ v64, atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-6)


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    D, H = 48, 6
    ours = Attention(D, H, qkv_bias=True).eval()
    mha = nn.MultiheadAttention(D, H, bias=True, batch_first=True).eval()
    with torch.no_grad():  # same weights: timm's fused qkv layout is nn.MultiheadAttention's in_proj layout
        mha.in_proj_weight.copy_(ours.qkv.weight)
        mha.in_proj_bias.copy_(ours.qkv.bias)
        mha.out_proj.weight.copy_(ours.proj.weight)
        mha.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(3, 9, D)
    ref, ref_w = mha(x, x, x, need_weights=True, average_attn_weights=False)
    out, probs = ours(x, return_attn=True)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(probs, ref_w, atol=1e-6)


def test_forward_attention_uses_the_same_model_and_changes_nothing():
    ref, ours = timm_and_ours("vit_tiny_patch16_224", depth=3, img_size=32)
    x = torch.randn(2, 3, 32, 32)
    before = ours(x)
    maps = ours.forward_attention(x, indices=[0, -1])
    assert [m.shape for m in maps] == [(2, 3, 5, 5)] * 2
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 3, 5), atol=1e-5)
    assert torch.equal(before, ours(x)) and all(m.fused for m in ours.modules() if isinstance(m, Attention))
    # the first block's probabilities from first principles
    blk = ours.blocks[0]
    t = ours.norm_pre(ours._pos_embed(ours.patch_embed(x)))
    q, k, _ = blk.attn.qkv(blk.norm1(t)).reshape(2, 5, 3, 3, 64).permute(2, 0, 3, 1, 4)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 8.0, -1)
    assert torch.allclose(maps[0], expected, atol=1e-5)


def test_explicit_model_equals_fused_model():
    m = randomize(vitmha.create_backbone("vit_tiny_patch16_224", depth=2, img_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = m(x)
    m.set_fused_attn(False)
    assert torch.allclose(fused, m(x), atol=1e-5)


# ------------------------------------------------------------------------------------------ resampling
def test_pos_embed_resampling_equals_timm():
    from timm.layers import resample_abs_pos_embed

    pe = torch.randn(1, 1 + 14 * 14, 32)
    for new in [(10, 10), (7, 12), (20, 16)]:
        assert torch.allclose(resample_pos_embed(pe, new, num_prefix_tokens=1),
                              resample_abs_pos_embed(pe, new, num_prefix_tokens=1), atol=1e-6)


def test_patch_embed_resampling_equals_timm_and_preserves_outputs():
    from timm.layers import resample_patch_embed as timm_resample

    w = torch.randn(8, 3, 16, 16)
    ours = resample_patch_embed(w, (8, 8))
    assert torch.allclose(ours, timm_resample(w, [8, 8]), atol=1e-4)
    # FlexiViT property: an upsampled patch through the resized kernel gives the old embedding
    w8 = torch.randn(8, 3, 8, 8)
    w16 = resample_patch_embed(w8, (16, 16))
    patch = torch.randn(1, 3, 8, 8)
    big = F.interpolate(patch, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(F.conv2d(patch, w8), F.conv2d(big, w16), atol=1e-3)


def test_load_at_new_image_size_matches_timm(tmp_path):
    from safetensors.torch import save_file

    ref224 = randomize(timm.create_model("vit_small_patch16_224", pretrained=False, depth=2))
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref224.state_dict().items()}, str(path))
    ref = timm.create_model("vit_small_patch16_224", pretrained=True, depth=2, img_size=160,
                            pretrained_cfg_overlay=dict(file=str(path))).eval()
    ours = vitmha.create_backbone("vit_small_patch16_224", pretrained=str(path), depth=2, img_size=160).eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert (ref.forward_features(x) - ours.forward_features(x)).abs().max() < 1e-3
        assert (ref(x) - ours(x)).abs().max() < 1e-3


def test_load_at_new_patch_size_resamples_kernel(tmp_path):
    ref = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=64))
    ours = vitmha.create_backbone("vit_tiny_patch16_224", pretrained=ref.state_dict(), depth=1, img_size=64,
                                  patch_size=8)
    assert ours.patch_embed.proj.weight.shape == (192, 3, 8, 8)
    assert ours.pos_embed.shape == (1, 1 + 64, 192)


# ------------------------------------------------------------------------------------------ structure
def test_no_timm_class_inside_a_vitmha_model():
    for arch in ["vit_base_patch16_siglip_224", "aimv2_large_patch14_224", "vit_giant_patch14_dinov2"]:
        m = vitmha.create_backbone(arch, **dict(SMALL, embed_dim=96))
        offenders = [type(mod).__module__ for mod in m.modules() if type(mod).__module__.startswith("timm")]
        assert not offenders, offenders


def test_custom_vision_transformer_and_helpers():
    m = vitmha.VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    assert m.forward_features(x).shape == (2, 65, 48)
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}
    assert [m.param_layer_id(n) for n in ("pos_embed", "blocks.0.attn.qkv.weight", "blocks.2.mlp.fc1.bias",
                                          "norm.weight", "head.weight")] == [0, 1, 3, 4, 4]
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    m.set_grad_checkpointing(True)
    m.train()
    m(x).sum().backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None
