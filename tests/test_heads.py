"""Segmentation heads: output shapes at several (also non-square) input sizes, gradients reach everything."""
import pytest
import torch

import vitmha
from vitmha.heads import HEADS, build_head, run_head
from vitmha.heads.segmentation import spread_indices

K = 3
HEAD_KW = {"linear": {}, "mask_transformer": {"num_layers": 1}, "uper": {"channels": 16}, "setr_pup": {"channels": 16}}


def tiny_backbone(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    args.update(kw)
    return vitmha.create_backbone("vit_tiny_patch16_224", **args)


@pytest.fixture(scope="module")
def dynamic_backbone():
    return tiny_backbone(dynamic_img_size=True)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("size", [(32, 32), (64, 96), (48, 32)])
def test_head_logits_are_at_input_resolution(dynamic_backbone, name, size):
    head = build_head(name, dynamic_backbone, K, **HEAD_KW[name])
    out = run_head(dynamic_backbone, head, torch.randn(2, 3, *size))
    assert out.shape == (2, K, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", HEADS)
def test_head_on_a_non_square_fixed_size_backbone(name):
    bb = tiny_backbone(img_size=(64, 96))
    head = build_head(name, bb, K, **HEAD_KW[name])
    assert run_head(bb, head, torch.randn(1, 3, 64, 96)).shape == (1, K, 64, 96)


@pytest.mark.parametrize("name", HEADS)
def test_gradients_reach_head_and_backbone(dynamic_backbone, name):
    head = build_head(name, dynamic_backbone, K, **HEAD_KW[name])
    dynamic_backbone.zero_grad()
    run_head(dynamic_backbone, head, torch.randn(2, 3, 32, 48)).square().mean().backward()
    for n, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert dynamic_backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert dynamic_backbone.blocks[-1].mlp.fc2.weight.grad is not None


def test_heads_read_the_expected_blocks():
    bb = tiny_backbone(depth=12)
    assert build_head("linear", bb, K).indices == [11]
    assert build_head("uper", bb, K, channels=16).indices == [2, 5, 8, 11]
    assert spread_indices(2, 4) == [0, 0, 1, 1]


def test_mask_transformer_masks_are_layer_normed_over_classes(dynamic_backbone):
    head = build_head("mask_transformer", dynamic_backbone, K, num_layers=1)
    feats = dynamic_backbone.forward_intermediates(torch.randn(1, 3, 32, 32), indices=head.indices, norm=True,
                                                   intermediates_only=True)
    out = head(feats, (4, 4))  # 4x4 patch grid: no resampling, the masks as computed
    assert torch.allclose(out.mean(1), torch.zeros(1, 4, 4), atol=1e-5)


def test_unknown_head_is_an_error(dynamic_backbone):
    with pytest.raises(ValueError, match="unknown head 'fcn'"):
        build_head("fcn", dynamic_backbone, K)
