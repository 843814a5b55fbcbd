"""The encoder against its references: timm (same weights), float64 softmax(QKᵀ/√d)V, torch.nn.MultiheadAttention."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vitmha
from vitmha.models import Attention, explicit_attention, resample_pos_embed

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
    ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=64)),                      # DeiT distillation token
    ("deit_small_distilled_patch16_224", dict(SMALL, img_size=64, num_classes=7)),
    ("deit3_small_patch16_224", dict(depth=2, img_size=64)),                              # LayerScale, no_embed_class
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
def test_forward_time_pos_embed_resampling_equals_timm():
    """The encoder's own resampling (dynamic_img_size) gives timm's resample_abs_pos_embed, any grid to any."""
    from timm.layers import resample_abs_pos_embed

    pe = torch.randn(1, 1 + 14 * 14, 32)
    for new in [(10, 10), (7, 12), (20, 16), (14, 14)]:
        assert torch.allclose(resample_pos_embed(pe, list(new), [14, 14], num_prefix_tokens=1),
                              resample_abs_pos_embed(pe, list(new), num_prefix_tokens=1), atol=1e-6)
    wide = torch.randn(1, 2 + 6 * 9, 16)                                           # non-square, two prefix tokens
    assert torch.allclose(resample_pos_embed(wide, [8, 5], [6, 9], num_prefix_tokens=2),
                          resample_abs_pos_embed(wide, [8, 5], old_size=[6, 9], num_prefix_tokens=2), atol=1e-6)
    half = pe.to(torch.bfloat16)                                                    # resampled in float32
    assert resample_pos_embed(half, [7, 7], [14, 14]).dtype == torch.bfloat16
    assert torch.equal(resample_pos_embed(half, [7, 7], [14, 14]),
                       resample_abs_pos_embed(half, [7, 7], num_prefix_tokens=1))


def test_patch_embed_resampling_at_load_preserves_outputs():
    """Weights of another patch size load through timm's resample_patch_embed (FlexiViT's property: an
    upsampled patch through the resized kernel gives the old embedding)."""
    from timm.layers import resample_patch_embed

    w8 = torch.randn(8, 3, 8, 8)
    w16 = resample_patch_embed(w8, [16, 16])
    patch = torch.randn(1, 3, 8, 8)
    big = F.interpolate(patch, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(F.conv2d(patch, w8), F.conv2d(big, w16), atol=1e-3)
    ours = vitmha.create_backbone("vit_tiny_patch16_224", depth=1, img_size=64, embed_dim=8, num_heads=2,
                                  patch_size=16)
    own = ours.state_dict()
    own["patch_embed.proj.weight"] = w8
    vitmha.models.load_into(ours, own)
    assert torch.equal(ours.patch_embed.proj.weight, w16)


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


# ------------------------------------------------------------------------------------------ DeiT distilled
DISTILLED = ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=32, num_classes=5))


def test_distilled_weights_load_key_for_key():
    ref = randomize(timm.create_model(DISTILLED[0], pretrained=False, **DISTILLED[1]))
    ours = vitmha.create_backbone(DISTILLED[0], **DISTILLED[1])
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    ours.load_state_dict(ref.state_dict(), strict=True)            # timm's own layout, nothing converted
    assert ours.num_prefix_tokens == ref.num_prefix_tokens == 2
    assert ours.pos_embed.shape == (1, 2 + 4, 192)


def test_distilled_training_gives_both_heads_as_timm():
    ref, ours = timm_and_ours(*DISTILLED[:1], **DISTILLED[1])
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
    for m in (ref, ours):
        m.train()
    assert torch.allclose(ref(x), ours(x), atol=1e-6)               # off: the mean, while training too
    for m in (ref, ours):
        m.set_distilled_training(True)
    (a, a_dist), (b, b_dist) = ref(x), ours(x)
    assert rel_err(a, b) < 1e-5 and rel_err(a_dist, b_dist) < 1e-5 and rel_err(a, a_dist) > 1e-3
    (F.cross_entropy(a, y) + F.cross_entropy(a_dist, y)).backward()
    (F.cross_entropy(b, y) + F.cross_entropy(b_dist, y)).backward()
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(grads[name].grad, p.grad) < 1e-4, name
    ours.eval()                                                      # eval: the mean, always
    with torch.no_grad():
        assert torch.allclose(ours(x), (ours.head(ours.forward_features(x)[:, 0])
                                        + ours.head_dist(ours.forward_features(x)[:, 1])) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="no distillation token"):
        vitmha.create_backbone("vit_tiny_patch16_224", depth=1, img_size=32).set_distilled_training(True)


def test_distilled_classifier_api_is_timms():
    ref, ours = timm_and_ours(*DISTILLED[:1], **DISTILLED[1])
    assert isinstance(ours.get_classifier(), tuple) and len(ours.get_classifier()) == 2
    assert ours.default_cfg["classifier"] == ref.default_cfg["classifier"] == ("head", "head_dist")
    ours.reset_classifier(7)
    assert ours.head.out_features == ours.head_dist.out_features == 7
    ours.reset_classifier(0, "")
    ref.reset_classifier(0, "")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(ref(x), ours(x)) < 1e-5                      # pooled features: mean of the two tokens
    with pytest.raises(ValueError, match="distilled model reads the class and distillation tokens"):
        ours.reset_classifier(3, "avg")
    with pytest.raises(ValueError, match="needs global_pool='token' and no register tokens"):
        vitmha.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, distilled=True,
                                 global_pool="avg")


def test_distilled_layer_decay_groups_put_the_dist_token_with_the_embeddings():
    from vitmha.tasks.optim import param_groups

    ours = vitmha.create_backbone(*DISTILLED[:1], **DISTILLED[1])
    assert ours.param_layer_id("dist_token") == 0 and ours.param_layer_id("head_dist.weight") == 3
    groups = {n: g for g in param_groups(ours, lr=1.0, weight_decay=0.05, layer_decay=0.5)
              for n in g["param_names"]}
    assert groups["dist_token"]["lr_scale"] == groups["cls_token"]["lr_scale"] == 0.5 ** 3
    assert groups["dist_token"]["weight_decay"] == 0.0
    assert groups["head_dist.weight"]["lr_scale"] == 1.0 and groups["head_dist.weight"]["weight_decay"] == 0.05
    assert "dist_token" in ours.no_weight_decay() and "dist_token" in timm.create_model(DISTILLED[0]).no_weight_decay()


# ------------------------------------------------------------------------------------------ timm's interface
API_CASES = [("vit_tiny_patch16_224", dict(depth=3, img_size=32)),
             ("vit_base_patch16_siglip_224", dict(SMALL, depth=3, img_size=32)),             # MAP pooling
             ("vit_small_patch14_reg4_dinov2", dict(depth=3, img_size=28)),                  # registers
             (DISTILLED[0], dict(DISTILLED[1], depth=3))]


@pytest.mark.parametrize("arch,kw", API_CASES, ids=[a for a, _ in API_CASES])
def test_timm_attributes_and_config_are_timms(arch, kw):
    from timm.data import resolve_data_config

    ref, ours = timm_and_ours(arch, **kw)
    for attr in ("num_classes", "num_features", "head_hidden_size", "embed_dim", "num_prefix_tokens",
                 "num_reg_tokens", "has_class_token", "no_embed_class", "dynamic_img_size", "global_pool",
                 "in_chans", "feature_info"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.patch_embed.feat_ratio() == ref.patch_embed.feat_ratio()
    assert ours.patch_embed.dynamic_feat_size((40, 56)) == ref.patch_embed.dynamic_feat_size((40, 56))
    assert ours.default_cfg is ours.pretrained_cfg
    size = (3, kw["img_size"], kw["img_size"])                    # the model's; timm's config keeps 224
    assert ours.pretrained_cfg == dict(ref.pretrained_cfg, input_size=size)
    assert resolve_data_config(model=ours) == dict(resolve_data_config(model=ref), input_size=size)
    assert ours.no_weight_decay() <= ref.no_weight_decay() | {"attn_pool.latent"}
    assert timm.models.group_parameters(ours, ours.group_matcher()) == \
        timm.models.group_parameters(ref, ref.group_matcher())


@pytest.mark.parametrize("arch,kw", API_CASES, ids=[a for a, _ in API_CASES])
def test_timm_methods_give_timms_results(arch, kw):
    ref, ours = timm_and_ours(arch, **kw)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    with torch.no_grad():
        for args in (dict(indices=2, output_dict=True), dict(indices=[0, 2], output_dict=True, norm=True,
                                                              return_prefix_tokens=True, intermediates_only=True)):
            a, b = ref.forward_intermediates(x, **args), ours.forward_intermediates(x, **args)
            assert a.keys() == b.keys()
            for k in a:
                as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
                for u, v in zip(as_list(a[k]), as_list(b[k])):
                    assert rel_err(u, v) < 1e-5, k
        ours_layers = ours.get_intermediate_layers(x, 2, reshape=True)
        for u, v in zip(ref.get_intermediate_layers(x, 2, reshape=True), ours_layers):
            assert rel_err(u, v) < 1e-5
        assert rel_err(ref(x, is_causal=True), ours(x, is_causal=True)) < 1e-5
        assert rel_err(ref(x, is_causal=True), ref(x)) > 1e-4
    assert ours.prune_intermediate_layers([0, 1]) == ref.prune_intermediate_layers([0, 1]) == [0, 1]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    with torch.no_grad():
        assert rel_err(ref(x), ours(x)) < 1e-5                       # pruned: blocks 0-1, no head


def test_set_input_size_equals_timms():
    ref, ours = timm_and_ours("vit_small_patch14_reg4_dinov2", depth=2, img_size=28)
    ref.set_input_size((42, 56), patch_size=7)
    ours.set_input_size((42, 56), patch_size=7)
    assert ours.patch_embed.grid_size == ref.patch_embed.grid_size == (6, 8)
    assert ours.pretrained_cfg["input_size"] == (3, 42, 56)
    x = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        assert rel_err(ref(x), ours(x)) < 1e-4


def test_reset_classifier_follows_timm():
    ref, ours = timm_and_ours("vit_base_patch16_siglip_224", **dict(SMALL, img_size=32))
    for m in (ref, ours):
        m.reset_classifier(0, "avg")                                 # away from 'map': the pooling is dropped
    assert ours.attn_pool is None and ours.global_pool == "avg"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(ref(x), ours(x)) < 1e-5
    with pytest.raises(ValueError, match="cannot add"):
        ours.reset_classifier(3, "map")
    with pytest.raises(ValueError, match="needs the class token"):
        ours.reset_classifier(3, "token")
    for m in (ref, ours):
        m.reset_classifier(4, "")                                    # no pooling: a head on every token
    assert ours(x).shape == ref(x).shape == (2, 4, 4)


# ------------------------------------------------------------------------------------------ TorchScript, FX
# families the CI's run of timm's suite (tests/test_timm_suite.py) does not cover with a small arch
EXPORT_CASES = [
    ("vit_tiny_patch16_224", dict(depth=2, img_size=32, qk_norm=True, init_values=0.1)),      # qk-norm
    ("aimv2_large_patch14_224", dict(SMALL, img_size=28)),                                  # SwiGLU, RMSNorm
    ("vit_giant_patch14_dinov2", dict(SMALL, embed_dim=96, img_size=28)),                   # packed SwiGLU
    ("vit_base_patch16_clip_quickgelu_224", dict(SMALL, img_size=32)),                      # QuickGELU
    ("vit_base_patch32_siglip_256", dict(SMALL, img_size=64)),                              # MAP, tanh GELU
    ("vit_small_patch14_reg4_dinov2", dict(depth=2, img_size=28, dynamic_img_size=True)),   # resampled per input
]


@pytest.mark.parametrize("arch,kw", EXPORT_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(EXPORT_CASES)])
def test_torchscript_and_fx_give_the_eager_outputs_and_gradients(arch, kw):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    m = randomize(vitmha.create_backbone(arch, **kw)).eval()
    size = kw["img_size"]
    x = torch.randn(2, 3, size, size + (14 if kw.get("dynamic_img_size") else 0))
    with torch.no_grad():
        y = m(x)
        assert torch.equal(torch.jit.script(m)(x), y)
        fx = create_feature_extractor(m, return_nodes=[get_graph_node_names(m)[1][-1]])
        assert torch.equal(next(iter(fx(x).values())), y)
        assert torch.equal(next(iter(torch.jit.script(fx)(x).values())), y)
    fx.train()
    next(iter(fx(x).values())).square().mean().backward()
    m.train()
    m(x).square().mean().backward()
    grads = dict(fx.named_parameters())
    for name, p in m.named_parameters():
        assert torch.allclose(grads[name].grad, p.grad, atol=1e-6), name


def test_a_traced_fixed_size_model_still_rejects_other_sizes():
    from torch.fx import symbolic_trace

    gm = symbolic_trace(vitmha.create_backbone("vit_tiny_patch16_224", depth=1, img_size=32))
    assert gm(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    with pytest.raises(ValueError, match="built for 32x32"):
        gm(torch.randn(1, 3, 48, 48))


def test_parity_command_covers_the_distilled_archs(capsys):
    from vitmha.commands import parity

    assert {"deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
            "deit_base_distilled_patch16_384"} <= set(parity.pretrained_vit_archs("deit*"))
    assert parity.main(["--filter", "deit_tiny_distilled*", "--depth", "1"]) == 0
    assert "PASS deit_tiny_distilled_patch16_224" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2.lvd142m", "vit_tiny_patch16_224.augreg_in21k",
                                  "vit_base_patch16_clip_224.openai"])
def test_a_tag_gives_timms_defaults(name):
    """As timm.create_model: a tag's pretrained config sets the defaults (its classes, input size)."""
    ref = timm.create_model(name, pretrained=False, depth=1)
    ours = vitmha.create_backbone(name, depth=1)
    assert ours.num_classes == ref.num_classes and ours.patch_embed.img_size == ref.patch_embed.img_size
    assert ours.pretrained_cfg["tag"] == name.split(".")[1]


def test_an_unknown_tag_is_a_clear_error():
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224\.augreg: timm has no tag 'augreg' for "
                                         r"vit_tiny_patch16_224; its tags: \['augreg_in21k', 'augreg_in21k_ft_in1k'\]"):
        vitmha.create_backbone("vit_tiny_patch16_224.augreg", depth=1)
