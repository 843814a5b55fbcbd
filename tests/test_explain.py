"""vitmha.explain (relevance maps, deletion/insertion, object share) and `vitmha explain`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from tests.helpers import REPO, assert_real_png, load_tool, run_tool
from vitmha import VisionTransformer
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import IntegratedGradients, Lime

from vitmha.explain import (METHODS, Target, area_share, auc, chefer_map, deletion_curve, explain, gaussian_blur,
                            gradcam_map, ig_map, insertion_curve, kernelshap_map, lime_map, occlusion_map,
                            patch_mask, relevance_share)
from vitmha.visualize import attention_rollout

explain_tool = load_tool("explain")
SAMPLE = REPO / "data" / "samples" / "astronaut.jpg"
ARCHS = {
    "cls": dict(img_size=32),
    "cls+registers": dict(img_size=32, reg_tokens=2),
    "registers, no cls, avg pool": dict(img_size=32, reg_tokens=2, class_token=False, global_pool="avg"),
    "non-square 32x48": dict(img_size=(32, 48)),
    "dynamic size, padded": dict(img_size=32, dynamic_img_size=True, dynamic_img_pad=True),
}


def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    return VisionTransformer(**{**args, **kw}).eval()


def manual_forward(bb: VisionTransformer, x: torch.Tensor):
    """(logits, [attention probabilities per block], [norm1 output per block]) of a plain class-token ViT,
    written out from its weights: no hooks, not the model's attention code."""
    B = x.shape[0]
    t = torch.cat([bb.cls_token.expand(B, -1, -1), bb.patch_embed(x)], 1) + bb.pos_embed
    probs, normed = [], []
    for blk in bb.blocks:
        h = blk.norm1(t)
        normed.append(h)
        N, D, nh = h.shape[1], h.shape[2], blk.attn.num_heads
        q, k, v = blk.attn.qkv(h).reshape(B, N, 3, nh, D // nh).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / (D // nh) ** 0.5, dim=-1)
        probs.append(a)
        t = t + blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N, D))
        t = t + blk.mlp(blk.norm2(t))
    return bb.head(bb.norm(t)[:, 0]), probs, normed


class OnePatchDecides(nn.Module):
    """Two classes; class 1's logit rises steeply with the mean brightness of patch (1, 2) of a 4×4 grid of
    8-px patches: that patch alone decides. ``vit`` is only there for its patch grid (its patch embedding runs
    on the input, its output unused)."""

    def __init__(self):
        super().__init__()
        self.vit = tiny_vit()

    def forward(self, x):
        self.vit.patch_embed(x)
        s = 20 * (x[:, :, 8:16, 16:24].mean((1, 2, 3)) - 0.8)
        return torch.stack([torch.zeros_like(s), s], 1)


# ------------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_gives_a_finite_map_on_the_patch_grid(arch, method):
    bb = tiny_vit(**ARCHS[arch])
    h, w = (32, 48) if "non-square" in arch else (36, 44) if "padded" in arch else (32, 32)
    x = torch.randn(1, 3, h, w)
    m = explain(bb, bb, x, Target(1), [method])[method]
    assert m.shape == (-(-h // 8), -(-w // 8))
    assert torch.isfinite(m).all() and m.abs().sum() > 0


def test_explaining_leaves_the_model_as_it_was():
    bb = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = bb(x)
    explain(bb, bb, x, Target(0))
    assert all(b.attn.fused for b in bb.blocks)  # the explicit path only while the hooks were on
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bb.modules())
    with torch.no_grad():
        assert torch.equal(bb(x), before)


def test_attention_is_the_last_blocks_class_token_row_averaged_over_heads():
    bb = tiny_vit(img_size=32, reg_tokens=2)
    x = torch.randn(1, 3, 32, 32)
    a = bb.forward_attention(x, indices=[-1])[0][0].mean(0)  # (N, N)
    m = explain(bb, bb, x, Target(2), ["attention"])["attention"]
    assert torch.allclose(m.flatten(), a[0, 3:], atol=1e-6)


def test_without_a_class_token_the_query_is_the_mean_over_patch_rows():
    bb = tiny_vit(img_size=32, reg_tokens=2, class_token=False, global_pool="avg")
    x = torch.randn(1, 3, 32, 32)
    a = bb.forward_attention(x, indices=[-1])[0][0].mean(0)
    m = explain(bb, bb, x, Target(0), ["attention"])["attention"]
    assert torch.allclose(m.flatten(), a[2:, 2:].mean(0), atol=1e-6)


def test_rollout_is_the_class_token_row_of_the_visualize_rollout():
    bb = tiny_vit(img_size=32, reg_tokens=1)
    x = torch.randn(1, 3, 32, 32)
    want = attention_rollout(bb.forward_attention(x, indices=[0, 1]))[0, 0, 2:]
    m = explain(bb, bb, x, Target(0), ["rollout"])["rollout"]
    assert torch.allclose(m.flatten(), want, atol=1e-6)


def test_chefer_matches_the_rule_on_hand_computed_attention_gradients():
    bb = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    logits, probs, _ = manual_forward(bb, x)
    assert torch.allclose(logits, bb(x), atol=1e-5)
    grads = torch.autograd.grad(logits[0, 1], probs)
    r = torch.eye(17, dtype=torch.float64)
    for a, g in zip(probs, grads):
        r = r + (a * g)[0].relu().mean(0).double() @ r
    got = chefer_map(bb, bb, x, Target(1))
    assert torch.allclose(got.flatten().double(), r[0, 1:], rtol=1e-4, atol=1e-7)


def test_gradcam_matches_a_hand_computed_grad_cam_of_the_last_blocks_tokens():
    bb = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    logits, _, normed = manual_forward(bb, x)
    tokens = normed[-1]
    grad, = torch.autograd.grad(logits[0, 2], tokens)
    weights = grad[0, 1:].mean(0)                                  # (D,): gradient averaged over the patches
    want = torch.relu(tokens[0, 1:].detach() @ weights).reshape(4, 4)
    got = gradcam_map(bb, bb, x, Target(2))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    assert got.max() > 0


def test_gradcam_stays_on_the_token_grid_because_an_upsampled_cam_reorders_the_patches():
    """Why vitmha keeps its own Grad-CAM: pytorch-grad-cam 1.5.7 returns the same CAM min-max scaled and resized
    to the input's pixels (cv2.resize, bilinear, in its scale_cam_image); that picture's patch means are not the
    patch values, and their order, which the deletion curves rank by, differs."""
    import cv2

    bb = tiny_vit(img_size=64)                                      # an 8×8 grid
    cam = gradcam_map(bb, bb, torch.randn(1, 3, 64, 64), Target(1))
    scaled = (cam - cam.min()) / (1e-7 + (cam - cam.min()).max())
    picture = torch.from_numpy(cv2.resize(scaled.numpy().astype(np.float32), (64, 64)))
    patch_means = picture.reshape(8, 8, 8, 8).mean((1, 3))
    order = lambda m: torch.argsort(m.flatten(), descending=True, stable=True)  # noqa: E731
    assert not torch.equal(order(cam), order(patch_means))
    assert (patch_means - scaled).abs().max() > 0.05


def test_occlusion_matches_an_explicit_loop_over_the_patches():
    bb = tiny_vit(img_size=(32, 48))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        p0 = bb(x).softmax(-1)[0, 1]
        want = torch.zeros(4, 6)
        for i in range(4):
            for j in range(6):
                xo = x.clone()
                xo[..., i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] = x.mean((-2, -1))[..., None, None]
                want[i, j] = p0 - bb(xo).softmax(-1)[0, 1]
    got = occlusion_map(bb, bb, x, Target(1), batch_size=5)
    assert torch.allclose(got, want, atol=1e-6)


def test_occlusion_with_a_window_averages_the_squares_covering_each_patch_of_a_padded_input():
    bb = tiny_vit(img_size=32, dynamic_img_size=True, dynamic_img_pad=True)
    x = torch.randn(1, 3, 30, 44)                                   # a 4×6 grid, the last row/column partial
    fill = x.mean((-2, -1))[..., None, None]
    total, count = torch.zeros(4, 6), torch.zeros(4, 6)
    with torch.no_grad():
        p0 = bb(x).softmax(-1)[0, 2]
        for i in range(3):
            for j in range(5):
                xo = x.clone()
                xo[..., i * 8:(i + 2) * 8, j * 8:(j + 2) * 8] = fill
                total[i:i + 2, j:j + 2] += p0 - bb(xo).softmax(-1)[0, 2]
                count[i:i + 2, j:j + 2] += 1
    got = occlusion_map(bb, bb, x, Target(2), window=2, batch_size=4)
    assert torch.allclose(got, total / count, atol=1e-6)


@pytest.mark.parametrize("baseline", ["mean", "blur"])
def test_integrated_gradients_are_captums_pixel_attributions_summed_per_patch_of_a_padded_input(baseline):
    """The per-patch sums (partial last row and column included) of Captum's IG from the stated baseline."""
    bb = tiny_vit(img_size=32, dynamic_img_size=True, dynamic_img_pad=True)
    x = torch.randn(1, 3, 30, 44)                                   # padded to a 4×6 grid inside the model
    x0 = x.mean((-2, -1), keepdim=True).expand_as(x) if baseline == "mean" else gaussian_blur(x, 4.0)
    ig = IntegratedGradients(lambda t: bb(t))
    ref = ig.attribute(x, baselines=x0, target=1, n_steps=16, method="riemann_middle")[0].sum(0)   # (30, 44)
    want = torch.zeros(4, 6)
    for i in range(4):
        for j in range(6):
            want[i, j] = ref[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8].sum()
    got = ig_map(bb, bb, x, Target(1), steps=16, baseline=baseline, batch_size=5)
    assert got.shape == (4, 6)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("baseline", ["mean", "blur", "zero"])
def test_integrated_gradients_add_up_to_the_score_difference(baseline):
    """Completeness: the patch sums equal score(x) - score(baseline) as the quadrature gets finer."""
    from vitmha.explain import baseline_image

    bb = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    x0 = torch.zeros_like(x) if baseline == "zero" else baseline_image(x, baseline, (8, 8))
    with torch.no_grad():
        diff = float(bb(x)[0, 2] - bb(x0)[0, 2])
    got = float(ig_map(bb, bb, x, Target(2), steps=256, baseline=baseline).sum())
    assert got == pytest.approx(diff, rel=1e-3, abs=1e-5)


def test_integrated_gradients_of_a_linear_model_are_input_times_weight():
    """For a linear score the path integral is exact with any number of points (Captum's midpoint rule takes
    at least two): (x - x0) · w, summed per patch."""
    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = tiny_vit()                                   # only its patch embedding is read
            self.w = nn.Parameter(torch.randn(3, 3, 32, 32))

        def forward(self, t):
            self.vit.patch_embed(t)
            return torch.einsum("bchw,kchw->bk", t, self.w)

    lin = Linear()
    x = torch.randn(1, 3, 32, 32)
    x0 = x.mean((-2, -1), keepdim=True)
    contrib = ((x - x0) * lin.w[0])[0].sum(0)
    want = contrib.reshape(4, 8, 4, 8).sum((1, 3))
    assert torch.allclose(ig_map(lin, lin.vit, x, Target(0), steps=2), want, atol=1e-5)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        ig_map(lin, lin.vit, x, Target(0), steps=1)


# ------------------------------------------------------------------------------------------- LIME, KernelSHAP
def _prob(model, c):
    return lambda t: model(t).softmax(-1)[:, c]


def test_lime_is_captums_lime_with_one_feature_per_patch_and_the_mean_colour_baseline():
    bb = tiny_vit(img_size=(32, 48))
    x = torch.randn(1, 3, 32, 48)
    mask = torch.arange(24).view(4, 6).repeat_interleave(8, 0).repeat_interleave(8, 1)[None, None]
    torch.manual_seed(7)
    with torch.no_grad():
        want = Lime(_prob(bb, 1), interpretable_model=SkLearnRidge(alpha=1.0)).attribute(
            x, baselines=x.mean((-2, -1), keepdim=True).expand_as(x), feature_mask=mask, n_samples=96,
            return_input_shape=False)
    got = lime_map(bb, bb, x, Target(1), samples=96, seed=7, batch_size=10)
    assert got.shape == (4, 6)
    assert torch.allclose(got.flatten(), want.flatten().float(), atol=1e-5)
    assert torch.equal(patch_mask((4, 6), (8, 8), (32, 48)), mask)


def test_kernelshap_values_add_up_to_the_probability_change_from_the_mean_colour():
    """Efficiency: the Shapley values sum to prob(x) - prob(baseline); Captum's regression pins both ends."""
    bb = tiny_vit(img_size=32, dynamic_img_size=True, dynamic_img_pad=True)
    x = torch.randn(1, 3, 30, 44)                                   # 24 patches, the last row/column partial
    with torch.no_grad():
        diff = float(bb(x).softmax(-1)[0, 0] - bb(x.mean((-2, -1), keepdim=True).expand_as(x)).softmax(-1)[0, 0])
    got = kernelshap_map(bb, bb, x, Target(0), samples=200, seed=0)
    assert got.shape == (4, 6)
    assert float(got.sum()) == pytest.approx(diff, abs=1e-4)


@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_sampled_methods_are_seeded_and_leave_the_global_random_state_alone(method):
    bb = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    fn = METHODS[method]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = fn(bb, bb, x, Target(1), samples=64, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, fn(bb, bb, x, Target(1), samples=64, seed=1))
    assert not torch.equal(a, fn(bb, bb, x, Target(1), samples=64, seed=2))
    assert torch.equal(explain(bb, bb, x, Target(1), [method], samples=64, seed=1)[method], a)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        fn(bb, bb, x, Target(1), samples=0)


@pytest.mark.parametrize("method", ["lime", "kernelshap", "occlusion", "ig"])
def test_perturbation_methods_find_the_one_patch_that_decides(method):
    model = OnePatchDecides()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 0.3
    x[..., 8:16, 16:24] += 1.0
    kw = {"samples": 128} if method in ("lime", "kernelshap") else {}
    m = METHODS[method](model, model.vit, x, Target(1), **kw)
    assert divmod(int(m.argmax()), 4) == (1, 2)


def test_segmentation_target_is_the_class_logits_summed_over_the_region_of_a_padded_input():
    from vitmha.heads.segmentation import build_head
    from vitmha.tasks.segmentation import SegmentationModel

    bb = tiny_vit(img_size=(32, 48), num_classes=0)
    torch.manual_seed(1)
    seg = SegmentationModel(bb, build_head("linear", bb, 4)).eval()
    x = torch.randn(1, 3, 30, 44)                                   # padded to 32×48 inside the model
    region = torch.zeros(30, 44)
    region[8:20, 10:30] = 1
    target = Target(2, region)
    with torch.no_grad():
        out = seg(x)
    assert torch.allclose(target.score(out), (out[0, 2] * region).sum()[None])
    maps = explain(seg, bb, x, target)
    for m in METHODS:
        assert maps[m].shape == (4, 6) and torch.isfinite(maps[m]).all(), m
    assert maps["occlusion"].abs().sum() > 0 and maps["chefer"].sum() > 0


def test_a_multilabel_target_tracks_the_class_sigmoid():
    out = torch.tensor([[2.0, -1.0, 0.5]])
    assert Target(2, multilabel=True).prob(out) == pytest.approx(torch.sigmoid(torch.tensor([0.5])))
    assert Target(2).prob(out) == pytest.approx(out.softmax(-1)[:, 2])


def test_a_class_index_out_of_range_is_an_error():
    bb = tiny_vit()
    with pytest.raises(ValueError, match="class 3 is out of range for a model with 3 classes"):
        explain(bb, bb, torch.randn(1, 3, 32, 32), Target(3), ["gradcam"])
    with pytest.raises(ValueError, match="unknown method 'lrp'"):
        explain(bb, bb, torch.randn(1, 3, 32, 32), Target(0), ["lrp"])


# ------------------------------------------------------------------------------------------- faithfulness


def test_an_oracle_ranking_deletes_faster_and_inserts_faster_than_random_rankings():
    model = OnePatchDecides()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 0.3
    x[..., 8:16, 16:24] += 1.0
    target = Target(1)
    with torch.no_grad():                                          # the true effect of each patch, measured
        p0 = target.prob(model(x))
        effect = torch.zeros(4, 4)
        for i in range(4):
            for j in range(4):
                xo = x.clone()
                xo[..., i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] = x.mean((-2, -1))[..., None, None]
                effect[i, j] = p0 - target.prob(model(xo))
    dele = auc(*deletion_curve(model, x, target, effect, (8, 8), steps=16))
    ins = auc(*insertion_curve(model, x, target, effect, (8, 8), steps=16))
    rand_del, rand_ins = [], []
    for s in range(20):
        r = torch.rand(4, 4, generator=torch.Generator().manual_seed(s))
        rand_del.append(auc(*deletion_curve(model, x, target, r, (8, 8), steps=16)))
        rand_ins.append(auc(*insertion_curve(model, x, target, r, (8, 8), steps=16)))
    assert dele < np.mean(rand_del) - 0.1
    assert ins > np.mean(rand_ins) + 0.1


def test_deletion_runs_from_the_image_to_the_baseline_and_insertion_back():
    model = OnePatchDecides()
    x = torch.rand(1, 3, 32, 32)
    target = Target(1)
    f, p = deletion_curve(model, x, target, torch.rand(4, 4), (8, 8), steps=4)
    assert np.allclose(f, [0, 0.25, 0.5, 0.75, 1])
    mean_img = x.mean((-2, -1), keepdim=True).expand_as(x)
    with torch.no_grad():
        assert p[0] == pytest.approx(float(target.prob(model(x))), abs=1e-6)
        assert p[-1] == pytest.approx(float(target.prob(model(mean_img))), abs=1e-6)
        f, p = insertion_curve(model, x, target, torch.rand(4, 4), (8, 8), steps=16)
        assert p[0] == pytest.approx(float(target.prob(model(gaussian_blur(x, 4.0)))), abs=1e-6)
        assert p[-1] == pytest.approx(float(target.prob(model(x))), abs=1e-6)
    assert len(f) == 17


def test_auc_is_the_trapezoid_area_over_the_unit_interval():
    f = np.linspace(0, 1, 5)
    assert auc(f, np.ones(5)) == pytest.approx(1.0)
    assert auc(f, f) == pytest.approx(0.5)
    assert auc(f, 1 - f) == pytest.approx(0.5)


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(1, 2, 20, 24, dtype=torch.float64)
    want = np.stack([ndimage.gaussian_filter(c, sigma=2.0, mode="mirror", truncate=3.0) for c in x[0].numpy()])
    assert np.allclose(gaussian_blur(x, 2.0)[0].numpy(), want, atol=1e-10)


def test_relevance_share_counts_each_patch_by_its_share_of_the_mask():
    mask = torch.zeros(32, 32)
    mask[:16, :16] = 1                                           # the top-left 2×2 patches of a 4×4 grid
    mask[:16, 16:20] = 1                                         # half of patch (0, 2) and of (1, 2)
    r = torch.zeros(4, 4)
    r[0, 0], r[0, 2], r[3, 3] = 2.0, 1.0, 1.0
    assert relevance_share(r, mask) == pytest.approx((2 + 0.5) / 4)
    assert relevance_share(-r, mask) != relevance_share(-r, mask)  # no positive relevance: NaN
    assert area_share(mask, (4, 4)) == pytest.approx(5 / 16)


def test_the_explain_modules_import_one_way():
    """No import cycle inside vitmha.explain (module-level and deferred imports alike)."""
    import ast

    folder = REPO / "vitmha" / "explain"
    graph = {}
    for f in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vitmha.explain."):
                names.add(node.module.rsplit(".", 1)[-1])
        graph[f.stem] = names - {f.stem}
    done, visiting = set(), []

    def visit(m):
        assert m not in visiting, f"import cycle: {' -> '.join(visiting + [m])}"
        if m not in done:
            visiting.append(m)
            for n in graph.get(m, ()):
                visit(n)
            visiting.pop()
            done.add(m)

    for m in graph:
        visit(m)
    assert "methods" not in graph["faithfulness"] and "faithfulness" not in graph["methods"]


# ------------------------------------------------------------------------------------------- the tool
def test_tool_writes_every_method_side_by_side_for_a_classifier(ckpts, tmp_path):
    out = tmp_path / "ex.png"
    res = explain_tool.main(["--checkpoint", ckpts["clf"], "--input", SAMPLE, "--output", out, "--metrics"])
    img = assert_real_png(out)
    assert img.shape[1] > 5 * 150  # image + five panels
    assert list(res["maps"]) == list(METHODS) and res["maps"]["chefer"].shape == (4, 4)
    assert set(res["notes"]) == set(METHODS) and "del" in res["notes"]["gradcam"]


def test_tool_passes_samples_and_seed_to_lime_and_kernelshap(ckpts, tmp_path):
    def run(seed):
        return explain_tool.main(["--checkpoint", ckpts["clf"], "--input", SAMPLE, "--output", tmp_path / "l.png",
                                  "--method", "lime,kernelshap", "--samples", "48", "--seed", str(seed)])["maps"]

    a, b, c = run(0), run(0), run(1)
    assert list(a) == ["lime", "kernelshap"] and a["lime"].shape == (4, 4)
    assert all(torch.equal(a[m], b[m]) for m in a) and not torch.equal(a["kernelshap"], c["kernelshap"])


def test_tool_explains_a_class_by_name_over_a_segmenters_box(ckpts, tmp_path):
    out = tmp_path / "seg.png"
    image = ckpts["seg_root"] / "val" / "images" / "s0001.jpg"
    res = explain_tool.main(["--checkpoint", ckpts["seg"], "--input", image, "--output", out,
                             "--method", "gradcam,chefer", "--class", "circle", "--box", "0", "0", "20", "30"])
    assert_real_png(out)
    assert res["target"].class_index == 1 and res["class_name"] == "circle"
    region = res["target"].region
    assert region.shape == (32, 32) and region[:30, :20].all() and region.sum() == 20 * 30


def test_tool_runs_on_a_backbone_and_weights_file(tmp_path):
    from safetensors.torch import save_file

    from vitmha import create_backbone

    kw = {"img_size": 32, "patch_size": 8, "depth": 2}
    weights = tmp_path / "bb.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone("vit_tiny_patch16_224", **kw).state_dict().items()},
              str(weights))
    out = tmp_path / "bb.png"
    res = explain_tool.main(["--backbone", "vit_tiny_patch16_224", "--pretrained", weights, "--backbone-kwargs",
                             json.dumps(kw), "--input", SAMPLE, "--output", out, "--method", "attention,rollout",
                             "--class", "7"])
    assert_real_png(out)
    assert res["target"].class_index == 7 and res["maps"]["rollout"].shape == (4, 4)


@pytest.mark.parametrize("extra, message", [
    (["--input", "no/such.jpg"], "error: no/such.jpg: no such image file"),
    (["--method", "gradcam,lrp"], "error: --method lrp: unknown method; expected attention, rollout, chefer, "
                                  "gradcam, ig, occlusion, lime, kernelshap or all"),
    (["--samples", "0"], "error: --samples 0: expected a positive number of samples"),
    (["--class", "3"], "error: --class 3: out of range; the model has 3 classes (0-2)"),
    (["--class", "purple"], "error: --class purple: no such class name; the classes are blue, green, red"),
])
def test_bad_input_is_one_clean_line(ckpts, tmp_path, capsys, extra, message):
    args = ["--checkpoint", ckpts["clf"], "--input", SAMPLE, "--output", tmp_path / "x.png", *extra]
    with pytest.raises(SystemExit) as e:
        explain_tool.main(args)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "x.png").exists()


def test_command_line_errors_have_no_traceback(tmp_path):
    r = run_tool("explain", "--checkpoint", tmp_path / "missing.ckpt", "--input", SAMPLE,
                 "--output", tmp_path / "x.png")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.ckpt'}: checkpoint not found"]


def test_help_lists_the_methods(capsys):
    with pytest.raises(SystemExit) as e:
        explain_tool.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--method" in out and "--class" in out and all(m in out for m in METHODS)


# ------------------------------------------------------------------------------------------- real weights
def test_real_vit_ti_puts_more_gradient_relevance_on_the_cat_than_its_area(real_weights):
    from vitmha.inference import eval_transform, pretrained_backbone, read_image

    outline = json.loads((REPO / "data" / "samples" / "chelsea_cat_outline.json").read_text())
    photo = read_image(str(REPO / "data" / "samples" / outline["image"]))
    drawn = Image.new("L", (photo.shape[1], photo.shape[0]), 0)
    ImageDraw.Draw(drawn).polygon([tuple(p) for p in outline["polygon"]], fill=255)
    mask = torch.as_tensor(np.asarray(drawn) / 255.0, dtype=torch.float32)
    bb, pre = pretrained_backbone("vit_tiny_patch16_224.augreg_in21k_ft_in1k", str(real_weights))
    pre.crop_pct = None  # the whole photo, squeezed to 224 px: the outline is drawn on the whole photo
    x = eval_transform(pre, "classification")(image=photo)["image"][None]
    with torch.no_grad():
        c = int(bb(x).argmax())
    assert "cat" in pre.classes[c]
    maps = explain(bb, bb, x, Target(c), ["chefer", "gradcam"])
    chance = area_share(mask, (14, 14))
    shares = {m: relevance_share(r, mask) for m, r in maps.items()}
    assert 0.8 < chance < 0.85
    assert max(shares.values()) > chance, shares
