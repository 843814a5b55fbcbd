"""`vitmha attention` and the attention helpers of vitmha.visualize: per-head maps, rollout, the PNG grid."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import REPO, assert_real_png, load_tool, run_tool  # noqa: F401
from vitmha import VisionTransformer
from vitmha.inference import load_task
from vitmha.visualize import attention_maps, attention_rollout

attention = load_tool("attention")
SAMPLE = REPO / "data" / "samples" / "astronaut.jpg"


def test_rollout_of_one_layer_is_the_head_mean_plus_identity_renormalised():
    a = torch.softmax(torch.randn(1, 3, 5, 5), -1)
    want = (a.mean(1) + torch.eye(5)) / 2  # rows of mean + I sum to 2
    assert torch.allclose(attention_rollout([a]), want, atol=1e-6)


def test_rollout_multiplies_the_layers_last_on_the_left():
    a1, a2 = torch.softmax(torch.randn(2, 1, 2, 4, 4), -1)
    r1, r2 = attention_rollout([a1]), attention_rollout([a2])
    rolled = attention_rollout([a1, a2])
    assert torch.allclose(rolled, r2 @ r1, atol=1e-6)
    assert torch.allclose(rolled.sum(-1), torch.ones(1, 4), atol=1e-6)


def test_uniform_attention_rolls_out_to_uniform_plus_identity_mixing():
    n = 4
    uniform = torch.full((1, 2, n, n), 1.0 / n)
    r = attention_rollout([uniform, uniform])
    assert torch.allclose(r.sum(-1), torch.ones(1, n))
    assert torch.allclose(r[0].diagonal(), r[0, 0, 0].expand(n))  # symmetric: every token alike


def test_maps_are_the_models_own_attention_rows_and_leave_it_unchanged(ckpts):
    task = load_task(str(ckpts["clf"]))
    bb = task.model
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        before = task(x)
    maps = attention_maps(bb, x, layer=0)
    with torch.no_grad():
        attn = bb.forward_attention(x, indices=[0])[0]
        assert torch.equal(task(x), before)
    assert maps["query"] == 0 and maps["query_name"] == "CLS token"
    assert maps["heads"].shape == (2, 4, 4)
    assert torch.allclose(maps["heads"].flatten(1), attn[0, :, 0, 1:])
    assert all(m.fused for m in bb.modules() if hasattr(m, "fused"))  # no flag left on the model


def test_models_without_a_class_token_use_a_patch_query():
    bb = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=0,
                           class_token=False, global_pool="avg").eval()
    x = torch.randn(1, 3, 16, 16)
    centre = attention_maps(bb, x)
    assert centre["query"] == 2 * 4 + 2 and centre["query_patch"] == (2, 2)
    chosen = attention_maps(bb, x, patch=(1, 3))
    assert chosen["query"] == 1 * 4 + 3
    with pytest.raises(ValueError, match="outside the 4×4 patch grid"):
        attention_maps(bb, x, patch=(4, 0))


def test_tool_writes_one_png_grid_for_a_classifier(ckpts, tmp_path):
    out = tmp_path / "att.png"
    maps = attention.main(["--checkpoint", ckpts["clf"], "--input", SAMPLE, "--output", out])
    img = assert_real_png(out)
    assert img.shape[1] > 3 * 200  # image | rollout | 2 heads side by side
    assert maps["layer"] == 1 and maps["rollout"].shape == (4, 4)


def test_tool_takes_a_layer_and_patch_for_a_segmenter(ckpts, tmp_path):
    out = tmp_path / "seg_att.png"
    maps = attention.main(["--checkpoint", ckpts["seg"], "--input", ckpts["seg_root"] / "val" / "images" / "s0001.jpg",
                           "--output", out, "--layer", "0", "--patch", "1", "2"])
    assert_real_png(out)
    assert maps["layer"] == 0 and maps["query_patch"] == (1, 2)


def test_tool_runs_on_a_backbone_and_weights_file(ckpts, tmp_path):
    export = load_tool("export")
    weights = tmp_path / "bb.safetensors"
    export.main(["--checkpoint", ckpts["clf"], "--format", "safetensors", "--output", weights])
    out = tmp_path / "bb.png"
    attention.main(["--backbone", "vit_tiny_patch16_224", "--pretrained", weights, "--backbone-kwargs",
                    '{"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 3}',
                    "--input", SAMPLE, "--output", out])
    assert_real_png(out)


def test_bad_layer_is_a_clean_error(ckpts, tmp_path):
    r = run_tool("attention", "--checkpoint", ckpts["clf"], "--input", SAMPLE, "--output", tmp_path / "a.png",
                 "--layer", "7")
    assert r.returncode == 2
    assert "layer 7 is out of range for a model with 2 blocks" in r.stderr and "Traceback" not in r.stderr
