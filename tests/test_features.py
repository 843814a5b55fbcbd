"""create_backbone(..., features_only=True): maps and feature_info equal to timm's features_only (same weights),
the ViTDet pyramid, and the backbone inside torchvision's Faster R-CNN and segmentation heads."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import vitmha
from vitmha.models import FPNBackbone
from vitmha.models.features import LayerNorm2d

from tests.helpers import randomize, rel_err

SMALL = dict(embed_dim=64, num_heads=2)
# (arch, overrides, out_indices): a plain ViT, registers + LayerScale, no class token, patch 32; None = default
CASES = [
    ("vit_tiny_patch16_224", dict(depth=4, img_size=64), (1, 3)),
    ("vit_tiny_patch16_224", dict(depth=4, img_size=64), None),                           # timm's default: last 3
    ("vit_small_patch14_reg4_dinov2", dict(SMALL, depth=3, img_size=56), (0, -1)),        # 4 registers
    ("vit_base_patch16_siglip_gap_224", dict(SMALL, depth=3, img_size=64), 2),            # no class token
    ("vit_small_patch32_224", dict(SMALL, depth=3, img_size=96), (-3, 1)),
]
TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def timm_weights(tmp_path, arch, **kw):
    """A timm model of `arch` with perturbed random weights, saved as .safetensors; (model, path)."""
    ref = randomize(timm.create_model(arch, pretrained=False, **kw)).eval()
    path = tmp_path / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, path


def both_features(tmp_path, arch, kw, out_indices):
    """timm's features_only model and ours, both loaded from the same file."""
    _, path = timm_weights(tmp_path, arch, **kw)
    extra = {} if out_indices is None else dict(out_indices=out_indices)
    ref = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            features_only=True, **kw, **extra).eval()
    ours = vitmha.create_backbone(arch, pretrained=path, features_only=True, **kw, **extra).eval()
    return ref, ours


@pytest.mark.parametrize("arch,kw,out_indices", CASES, ids=[f"{a}-{o}" for a, _, o in CASES])
def test_feature_info_equals_timms(tmp_path, arch, kw, out_indices):
    ref, ours = both_features(tmp_path, arch, kw, out_indices)
    a, b = ref.feature_info, ours.feature_info
    assert b.channels() == a.channels()
    assert b.reduction() == a.reduction()
    assert b.module_name() == a.module_name()
    assert b.get_dicts() == a.get_dicts()
    assert b.get_dicts(keys=["num_chs", "reduction"]) == a.get_dicts(keys=["num_chs", "reduction"])
    assert b.channels(0) == a.channels(0) and b.reduction([0, 1]) == a.reduction([0, 1])
    assert b.out_indices == a.out_indices and len(b) == len(a)
    assert list(ours.out_indices) == list(ref.out_indices)


@pytest.mark.parametrize("arch,kw,out_indices", CASES, ids=[f"{a}-{o}" for a, _, o in CASES])
def test_maps_equal_timms_features_only(tmp_path, arch, kw, out_indices):
    ref, ours = both_features(tmp_path, arch, kw, out_indices)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    with torch.no_grad():
        fa, fb = ref(x), ours(x)
    grid = kw["img_size"] // ref.feature_info.reduction()[0]
    assert [tuple(t.shape) for t in fb] == [(2, c, grid, grid) for c in ref.feature_info.channels()]
    for u, v in zip(fa, fb):
        assert rel_err(u, v) < 1e-5


def test_state_dict_keys_are_timms_so_weights_load_either_way(tmp_path):
    ref, ours = both_features(tmp_path, "vit_small_patch14_reg4_dinov2", dict(SMALL, depth=4, img_size=56), (0, 2))
    assert list(ours.state_dict()) == list(ref.state_dict())       # blocks after 2, norm and head dropped
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert len(ours.model.blocks) == 3


def test_non_square_input_with_dynamic_img_size_matches_timm(tmp_path):
    kw = dict(SMALL, depth=3, img_size=56, dynamic_img_size=True)
    ref, ours = both_features(tmp_path, "vit_small_patch14_reg4_dinov2", kw, (1, 2))
    x = torch.randn(2, 3, 42, 70)
    with torch.no_grad():
        fa, fb = ref(x), ours(x)
    assert [tuple(t.shape) for t in fb] == [(2, 64, 3, 5)] * 2
    for u, v in zip(fa, fb):
        assert rel_err(u, v) < 1e-5


def test_fixed_size_backbone_rejects_another_size():
    fx = vitmha.create_backbone("vit_tiny_patch16_224", features_only=True, out_indices=2, **TINY)
    with pytest.raises(ValueError, match="built for 64x64"):
        fx(torch.randn(1, 3, 48, 64))


@pytest.mark.parametrize("out_indices,match", [
    ((0, 4), r"out_indices=\(0, 4\) is out of range for a model of depth 4: block indices run 0..3 or -4..-1"),
    ((-5,), r"out_indices=\(-5,\) is out of range for a model of depth 4"),
    (5, r"out_indices=5 is out of range for a model of depth 4: .* an int n takes the last n blocks \(1 <= n <= 4\)"),
    ((), r"out_indices is empty"),
])
def test_out_of_range_out_indices_are_a_clear_error(out_indices, match):
    with pytest.raises(ValueError, match=match):
        vitmha.create_backbone("vit_tiny_patch16_224", features_only=True, out_indices=out_indices,
                               **dict(TINY, depth=4))


def test_feature_arguments_need_features_only():
    with pytest.raises(ValueError, match="out_indices, pyramid need features_only=True"):
        vitmha.create_backbone("vit_tiny_patch16_224", out_indices=(0, 1), pyramid=True, **TINY)


def test_real_vit_tiny_maps_at_blocks_3_7_11_equal_timms(real_weights):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=True, features_only=True, out_indices=(3, 7, 11),
                            pretrained_cfg_overlay=dict(file=str(real_weights))).eval()
    fx = vitmha.create_backbone("vit_tiny_patch16_224", pretrained=real_weights, features_only=True,
                                out_indices=(3, 7, 11)).eval()
    assert fx.feature_info.channels() == ref.feature_info.channels() == [192] * 3
    assert fx.feature_info.reduction() == ref.feature_info.reduction() == [16] * 3
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for u, v in zip(ref(x), fx(x)):
            assert v.shape == (1, 192, 14, 14)
            assert rel_err(u, v) < 1e-5


# ------------------------------------------------------------------------------------------ pyramid
@pytest.mark.parametrize("patch,strides", [(16, [4, 8, 16, 32]), (14, [3.5, 7, 14, 28])])
def test_pyramid_levels_and_their_feature_info(patch, strides):
    size = 4 * patch
    fx = vitmha.create_backbone("vit_tiny_patch16_224", features_only=True, out_indices=1, pyramid=True,
                                pyramid_channels=24, **dict(TINY, img_size=size, patch_size=patch))
    assert fx.feature_info.reduction() == strides
    assert fx.feature_info.channels() == [24] * 4
    assert fx.feature_info.module_name() == [f"pyramid.out.{i}" for i in range(4)]
    maps = fx(torch.randn(2, 3, size, size))
    assert [tuple(m.shape) for m in maps] == [(2, 24, round(size / s), round(size / s)) for s in strides]
    for name, m in zip(fx.feature_info.module_name(), maps):     # the named module makes that map
        assert name in dict(fx.named_modules()) and m.isfinite().all()


def test_pyramid_reads_the_last_chosen_block_as_timm_gives_it(tmp_path):
    kw = dict(SMALL, depth=3, img_size=64)
    _, path = timm_weights(tmp_path, "vit_tiny_patch16_224", **kw)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=True, features_only=True, out_indices=(1,),
                            pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()
    fx = vitmha.create_backbone("vit_tiny_patch16_224", pretrained=path, features_only=True, out_indices=(0, 1),
                                pyramid=True, pyramid_channels=16, **kw).eval()
    assert len(fx.model.blocks) == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last = ref(x)[-1]                                                     # (2, 64, 4, 4), stride 16
        maps = fx(x)
        assert rel_err(fx.pyramid.out[2](last), maps[2]) < 1e-5               # identity level
        pooled = F.max_pool2d(last, 2, ceil_mode=True)
        assert rel_err(fx.pyramid.out[3](pooled), maps[3]) < 1e-5             # max-pooled level


def test_layer_norm_2d_normalises_channels_at_every_position():
    ln = LayerNorm2d(6, eps=1e-6)
    y = ln(torch.randn(2, 6, 3, 5) * 3 + 1)
    assert torch.allclose(y.mean(1), torch.zeros(2, 3, 5), atol=1e-5)
    assert torch.allclose(y.var(1, unbiased=False), torch.ones(2, 3, 5), atol=1e-4)


# ------------------------------------------------------------------------------------------ other libraries
def _detection_batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)]
    targets = [dict(boxes=torch.tensor([[4.0, 6.0, 30.0, 40.0], [34.0, 10.0, 60.0, 28.0]]),
                    labels=torch.tensor([1, 2])),
               dict(boxes=torch.tensor([[10.0, 8.0, 50.0, 44.0]]), labels=torch.tensor([2]))]
    return images, targets


@pytest.mark.parametrize("pyramid", [False, True], ids=["maps+fpn", "pyramid+fpn"])
def test_faster_rcnn_trains_and_predicts(pyramid):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    fx = vitmha.create_backbone("vit_tiny_patch16_224", features_only=True, out_indices=(0, 1), pyramid=pyramid,
                                pyramid_channels=32, dynamic_img_size=True, **TINY)
    backbone = FPNBackbone(fx, out_channels=32)
    levels = len(backbone.featmap_names) + 1                                  # + the 'pool' level
    anchors = AnchorGenerator(sizes=tuple((8 * 2 ** i,) for i in range(levels)),
                              aspect_ratios=((0.5, 1.0, 2.0),) * levels)
    model = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64, rpn_anchor_generator=anchors,
                       box_roi_pool=MultiScaleRoIAlign(backbone.featmap_names, output_size=7, sampling_ratio=2),
                       image_mean=fx.pretrained_cfg["mean"], image_std=fx.pretrained_cfg["std"])
    images, targets = _detection_batch()

    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(v.isfinite() for v in losses.values())
    torch.optim.SGD(model.parameters(), lr=0.01).zero_grad()
    sum(losses.values()).backward()
    grad = fx.model.patch_embed.proj.weight.grad
    assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0   # the loss reaches the ViT

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det, img in zip(out, images):
        assert set(det) == {"boxes", "labels", "scores"}
        n = len(det["scores"])
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,)
        if n:
            assert (det["boxes"][:, 2] <= img.shape[2]).all() and (det["boxes"][:, 3] <= img.shape[1]).all()


def test_fpn_backbone_needs_a_dynamic_size_encoder():
    fx = vitmha.create_backbone("vit_tiny_patch16_224", features_only=True, out_indices=2, **TINY)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        FPNBackbone(fx)


@pytest.mark.parametrize("head", ["fcn", "deeplabv3"])
def test_torchvision_segmentation_head_trains_on_the_last_map(head):
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead
    from torchvision.models.segmentation.fcn import FCNHead

    torch.manual_seed(0)
    fx = vitmha.create_backbone("vit_tiny_patch16_224", features_only=True, out_indices=1,
                                **dict(TINY, img_size=32))
    dim = fx.feature_info.channels()[-1]
    model = nn.ModuleDict(dict(backbone=fx, head=FCNHead(dim, 4) if head == "fcn" else DeepLabHead(dim, 4)))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4, 32, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> float:
        logits = F.interpolate(model["head"](model["backbone"](x)[-1]), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        assert logits.shape == (4, 4, 32, 32)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    first = step()
    assert math.isfinite(first) and abs(first - math.log(4)) < 1.0           # near chance at the start
    assert fx.model.patch_embed.proj.weight.grad.abs().sum() > 0
    last = [step() for _ in range(5)][-1]
    assert last < first                                                       # it learns the fixed batch


def test_distilled_features_only_equals_timms(tmp_path):
    kw = dict(depth=3, img_size=32)
    ref, ours = both_features(tmp_path, "deit_tiny_distilled_patch16_224", kw, (0, 2))
    assert list(ours.state_dict()) == list(ref.state_dict())       # heads (both) and norm dropped, as timm's
    assert ours.feature_info.get_dicts() == ref.feature_info.get_dicts()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for u, v in zip(ref(x), ours(x)):
            assert v.shape == (2, 192, 2, 2) and rel_err(u, v) < 1e-5


def test_timms_feature_cls_getter_and_default_cfg():
    fx = vitmha.create_backbone("vit_tiny_patch16_224", features_only=True, feature_cls="getter", out_indices=2,
                                **TINY)
    assert fx.default_cfg is fx.pretrained_cfg and fx.default_cfg["input_size"] == (3, 64, 64)
    with pytest.raises(ValueError, match="feature_cls='hook': vitmha's features_only is timm's 'getter'"):
        vitmha.create_backbone("vit_tiny_patch16_224", features_only=True, feature_cls="hook", **TINY)
