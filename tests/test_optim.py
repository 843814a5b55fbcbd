"""Parameter groups (layer-wise lr decay, no weight decay on 1-D params/tokens) and the lr schedule."""
import math

import pytest
import torch
from torch import nn

import vitmha
from vitmha.tasks.optim import lr_factor, param_groups

DEPTH = 2


@pytest.fixture(scope="module")
def backbone():
    return vitmha.create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=DEPTH,
                                  num_heads=2, num_classes=3)


def _group_of(groups, name):
    (g,) = [g for g in groups if name in g["param_names"]]
    return g


def test_every_parameter_is_in_exactly_one_group(backbone):
    head = nn.Conv2d(32, 3, 1)
    groups = param_groups(backbone, [head], lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    expected = [id(p) for p in backbone.parameters()] + [id(p) for p in head.parameters()]
    assert sorted(ids) == sorted(expected)


def test_layer_decay_scales_follow_param_layer_id(backbone):
    groups = param_groups(backbone, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    n = backbone.num_layer_ids
    assert n == DEPTH + 2
    expected = {
        "pos_embed": 0.5 ** (n - 1),
        "cls_token": 0.5 ** (n - 1),
        "patch_embed.proj.weight": 0.5 ** (n - 1),
        "blocks.0.attn.qkv.weight": 0.5 ** (n - 2),
        "blocks.1.mlp.fc1.weight": 0.5 ** (n - 3),
        "head.weight": 1.0,
    }
    for name, scale in expected.items():
        g = _group_of(groups, name)
        assert g["lr_scale"] == pytest.approx(scale), name
        assert g["lr"] == pytest.approx(scale), name


def test_no_weight_decay_on_norms_biases_tokens_and_pos_embed(backbone):
    groups = param_groups(backbone, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    for name in ["pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias",
                 "head.bias"]:
        assert _group_of(groups, name)["weight_decay"] == 0.0, name
    for name in ["patch_embed.proj.weight", "blocks.1.attn.proj.weight", "head.weight"]:
        assert _group_of(groups, name)["weight_decay"] == 0.05, name


def test_extra_modules_get_full_lr_and_no_decay_on_biases(backbone):
    head = nn.Sequential(nn.Conv2d(32, 8, 1), nn.GroupNorm(2, 8))
    groups = param_groups(backbone, [head], lr=2e-3, weight_decay=0.05, layer_decay=0.5)
    assert _group_of(groups, "extra0.0.weight")["lr"] == pytest.approx(2e-3)
    assert _group_of(groups, "extra0.0.weight")["weight_decay"] == 0.05
    assert _group_of(groups, "extra0.1.weight")["weight_decay"] == 0.0
    assert _group_of(groups, "extra0.0.bias")["weight_decay"] == 0.0


def test_layer_decay_one_gives_uniform_lr(backbone):
    groups = param_groups(backbone, lr=1e-3, weight_decay=0.05)
    assert {g["lr"] for g in groups} == {1e-3}
    assert len(groups) == 2  # decay and no_decay


def _reference(step, total, warmup, kind, min_ratio):
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / (total - warmup)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else (1 - t) ** 0.9
    return min_ratio + (1 - min_ratio) * shape


@pytest.mark.parametrize("kind", ["cosine", "poly"])
@pytest.mark.parametrize("step", [0, 4, 9, 10, 37, 55, 99, 100])
def test_schedule_matches_closed_form(kind, step):
    got = lr_factor(step, total_steps=100, warmup_steps=10, scheduler=kind, min_lr_ratio=0.01)
    assert got == pytest.approx(_reference(step, 100, 10, kind, 0.01))


def test_schedule_endpoints():
    assert lr_factor(0, total_steps=100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(10, total_steps=100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(100, total_steps=100, warmup_steps=10, min_lr_ratio=0.05) == pytest.approx(0.05)
    assert lr_factor(0, total_steps=100, warmup_steps=0) == pytest.approx(1.0)


def test_unknown_scheduler_is_an_error():
    with pytest.raises(ValueError, match="scheduler"):
        lr_factor(0, total_steps=10, warmup_steps=0, scheduler="step")


def test_trainer_steps_the_schedule_every_optimizer_step():
    """A real fit: the lr after each step equals base_lr * lr_factor(step) (warmup 2 epochs of 4 steps)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from vitmha.tasks import ImageClassifier

    model = ImageClassifier(num_classes=3, lr=1e-3, min_lr=0.0, warmup_epochs=0.5, backbone_kwargs=dict(
        img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2))
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    data = TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 3, (16,)))
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()]).fit(
        model, DataLoader(data, batch_size=4))
    expected = [1e-3 * _reference(s, 8, 2, "cosine", 0.0) for s in range(8)]
    assert seen == pytest.approx(expected)


def _tiny_task(**kw):
    from vitmha.tasks import ImageClassifier

    return ImageClassifier(num_classes=3, backbone_kwargs=dict(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                                               num_heads=2), **kw)


def _big_grads(module):
    torch.manual_seed(0)
    # cross-entropy: non-zero gradients even through the zero-initialised head
    (torch.nn.functional.cross_entropy(module(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 0])) * 1e3).backward()


def _global_norm(params):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()


def test_default_clipping_limits_the_global_gradient_norm_to_one():
    """grad_clip_norm defaults to 1.0: the gradients after clipping equal torch.nn.utils.clip_grad_norm_'s."""
    import lightning as L

    task = _tiny_task()
    task.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    _big_grads(task.model)
    params = [p for p in task.model.parameters()]
    ref = [p.grad.clone() for p in params]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref]))
    assert total > 10
    task.configure_gradient_clipping(torch.optim.AdamW(params))
    scale = 1.0 / (total.item() + 1e-6)
    for p, g in zip(params, ref):
        torch.testing.assert_close(p.grad, g * scale, rtol=1e-5, atol=1e-8)
    assert _global_norm(params) == pytest.approx(1.0, rel=1e-5)


def test_clip_off_leaves_gradients_alone():
    import lightning as L

    task = _tiny_task(grad_clip_norm=None)
    task.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    _big_grads(task.model)
    before = [p.grad.clone() for p in task.model.parameters()]
    task.configure_gradient_clipping(torch.optim.AdamW(task.model.parameters()))
    for p, g in zip(task.model.parameters(), before):
        assert torch.equal(p.grad, g)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed gloo")
def test_norm_clipping_under_fsdp_uses_the_root_module(tmp_path):
    """Lightning refuses norm clipping under FSDP; vitmha clips with the root FSDP module's clip_grad_norm_,
    whose norm covers every shard (one CPU process here: the flat parameters hold everything)."""
    import types

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        task = _tiny_task()
        root = FSDP(task.model, device_id=torch.device("cpu"))
        task._trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(model=root))
        _big_grads(root)
        assert _global_norm(root.parameters()) > 10
        task.configure_gradient_clipping(torch.optim.AdamW(root.parameters()), gradient_clip_val=1.0)
        assert _global_norm(root.parameters()) == pytest.approx(1.0, rel=1e-5)
    finally:
        dist.destroy_process_group()


def test_from_scratch_uses_big_vision_init_unless_told_otherwise(tmp_path):
    """From scratch: zero classifier head (weight_init 'jax'); an explicit weight_init ('' = timm's) wins."""
    assert torch.count_nonzero(_tiny_task().model.head.weight) == 0
    from vitmha.tasks import ImageClassifier

    timm_init = ImageClassifier(num_classes=3, backbone_kwargs=dict(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                                                    num_heads=2, weight_init=""))
    assert torch.count_nonzero(timm_init.model.head.weight) > 0


# ----------------------------------------------------------------- optimisers: adamw | sgd | lamb
def _fake_trainer(steps: int = 10):
    import types

    return types.SimpleNamespace(estimated_stepping_batches=steps, num_training_batches=steps,
                                 accumulate_grad_batches=1, global_rank=0)


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_task_builds_the_named_optimizer_over_the_same_groups(name, cls):
    task = _tiny_task(optimizer=name, momentum=0.8, nesterov=(name == "sgd"), weight_decay=0.05)
    task._trainer = _fake_trainer()
    opt = task.configure_optimizers()["optimizer"]
    assert type(opt) is cls
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    assert wd["blocks.0.norm1.weight"] == 0.0 and wd["head.bias"] == 0.0 and wd["pos_embed"] == 0.0
    assert wd["blocks.0.attn.qkv.weight"] == 0.05
    if name == "sgd":
        assert all(g["momentum"] == 0.8 and g["nesterov"] for g in opt.param_groups)


def test_adamw_on_the_cpu_is_torchs_fused_kernel_and_steps_like_the_default_loop():
    from vitmha.tasks.optim import make_optimizer

    torch.manual_seed(0)
    ws = [nn.Parameter(torch.randn(5, 7)), nn.Parameter(torch.randn(7))]
    refs = [nn.Parameter(w.detach().clone()) for w in ws]
    opt = make_optimizer("adamw", [{"params": ws[:1], "weight_decay": 0.05}, {"params": ws[1:], "weight_decay": 0.0}],
                         lr=1e-2)
    ref_opt = torch.optim.AdamW([{"params": refs[:1], "weight_decay": 0.05}, {"params": refs[1:], "weight_decay": 0.0}],
                                lr=1e-2, foreach=False)
    assert opt.defaults["fused"] is True
    for _ in range(5):
        for w, r in zip(ws, refs):
            g = torch.randn_like(w)
            w.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for w, r in zip(ws, refs):
        assert torch.allclose(w, r, rtol=1e-5, atol=1e-6)
    # tensors that are not plain parameters (FSDP's flat ones) keep torch's default
    plain = make_optimizer("adamw", [{"params": [torch.zeros(3, requires_grad=True)], "weight_decay": 0.0}], lr=1e-2)
    assert not plain.defaults["fused"]


def test_sgd_step_equals_torch_sgd_with_l2_decay():
    from vitmha.tasks.optim import make_optimizer

    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    ref = w.detach().clone().requires_grad_(True)
    opt = make_optimizer("sgd", [{"params": [w], "weight_decay": 0.1}], lr=0.5, momentum=0.9, nesterov=True)
    ref_opt = torch.optim.SGD([ref], lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(3, 4)
        w.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(w, ref, rtol=0, atol=0)


def test_lamb_is_timms_without_a_clip_of_its_own():
    from timm.optim import Lamb

    from vitmha.tasks.optim import make_optimizer

    opt = make_optimizer("lamb", [{"params": [torch.zeros(2, requires_grad=True)], "weight_decay": 0.0}], lr=1e-3,
                         betas=(0.9, 0.95))
    assert type(opt) is Lamb and opt.defaults["max_grad_norm"] is None and opt.defaults["betas"] == (0.9, 0.95)


def test_lamb_first_step_matches_a_hand_computed_one():
    """One LAMB step on a 2x2 weight, by hand: m̂ = g, v̂ = g² after bias correction, so u = g / (|g| + eps)
    + wd * w elementwise; the step is lr * (‖w‖ / ‖u‖) * u."""
    from vitmha.tasks.optim import make_optimizer

    w0 = [[1.0, 2.0], [3.0, 4.0]]
    g = [[0.1, -0.2], [0.3, 0.4]]
    lr, wd, eps = 0.1, 0.01, 1e-6
    u = [[g[i][j] / (abs(g[i][j]) + eps) + wd * w0[i][j] for j in range(2)] for i in range(2)]
    w_norm = math.sqrt(sum(x * x for row in w0 for x in row))
    u_norm = math.sqrt(sum(x * x for row in u for x in row))
    expected = [[w0[i][j] - lr * (w_norm / u_norm) * u[i][j] for j in range(2)] for i in range(2)]

    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    opt = make_optimizer("lamb", [{"params": [w], "weight_decay": wd}], lr=lr)
    assert opt.defaults["eps"] == eps
    w.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-7, atol=1e-7)


def test_lamb_without_weight_decay_steps_like_adam():
    """Groups without weight decay (norms, biases) get plain Adam steps, as in NVIDIA's and timm's LAMB."""
    from vitmha.tasks.optim import make_optimizer

    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ref = w.detach().clone().requires_grad_(True)
    opt = make_optimizer("lamb", [{"params": [w], "weight_decay": 0.0}], lr=1e-2)
    ref_opt = torch.optim.Adam([ref], lr=1e-2, eps=1e-6)
    for _ in range(4):
        g = torch.randn(5, 3, dtype=torch.float64)
        w.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(w, ref, rtol=1e-10, atol=1e-12)


def test_unknown_optimizer_and_nesterov_without_momentum_are_clear_errors():
    from vitmha.tasks.base import TaskConfigError

    with pytest.raises(TaskConfigError, match="optimizer: expected one of adamw, sgd, lamb, got 'adam'"):
        _tiny_task(optimizer="adam")
    with pytest.raises(TaskConfigError, match="nesterov: needs momentum > 0"):
        _tiny_task(optimizer="sgd", momentum=0.0, nesterov=True)


def test_decoder_no_weight_decay_names_are_honoured():
    """Segmenter's mask transformer lists its class embeddings in no_weight_decay(): a (1, K, D) tensor that
    the 1-D rule alone would decay."""
    from vitmha.tasks import SemanticSegmenter

    seg = SemanticSegmenter(num_classes=3, head="mask_transformer", backbone_kwargs=dict(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2))
    assert seg.model.head.cls_emb.ndim == 3
    groups = param_groups(seg.backbone_module(), seg.head_modules(), lr=1e-3, weight_decay=0.05)
    assert _group_of(groups, "extra0.cls_emb")["weight_decay"] == 0.0
    assert _group_of(groups, "extra0.proj_patch")["weight_decay"] == 0.05


# ----------------------------------------------------------------- weight decay under FSDP
def _decisions(groups):
    return {n: (g["name"], g["weight_decay"], g["lr_scale"]) for g in groups for n in g["param_names"]}


FSDP_SCRIPT = r'''
import json, os, sys, types
import torch, torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from vitmha.models.vit import Block
    from vitmha.tasks import ImageClassifier

    torch.manual_seed(0)
    task = ImageClassifier(num_classes=3, layer_decay=0.75, weight_decay=0.05, backbone_kwargs=dict(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2))
    task.setup("fit")  # what Lightning calls before its FSDP strategy wraps the module
    # as lightning.pytorch.strategies.FSDPStrategy._setup_model (it refuses CPU, so wrapped by hand here)
    FSDP(task, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True, device_id=torch.device("cpu"))
    task._trainer = types.SimpleNamespace(estimated_stepping_batches=10, num_training_batches=10,
                                          accumulate_grad_batches=1, global_rank=rank)
    opt = task.configure_optimizers()["optimizer"]
    if rank == 0:
        seen = {n: [g["name"], g["weight_decay"], g["lr_scale"], p.ndim]
                for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}
        json.dump(seen, open(out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    store, out = sys.argv[1], sys.argv[2]
    mp.spawn(run, args=(2, store, out), nprocs=2)
'''


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed gloo")
def test_fsdp_sharded_parameters_get_the_decay_of_their_original_shapes(tmp_path):
    """FSDP FULL_SHARD over 2 gloo processes, use_orig_params=True (Lightning's default): every parameter is a
    1-D view of its shard when the optimiser is built. The groups (names, weight decay, layer-decay lr scale)
    equal those of the unwrapped task: norms, biases and tokens get no decay, matrices do."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from vitmha.tasks import ImageClassifier

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "fsdp_groups.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / "groups.json"
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(out)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(out.read_text())

    task = ImageClassifier(num_classes=3, layer_decay=0.75, weight_decay=0.05, backbone_kwargs=dict(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2))
    plain = _decisions(param_groups(task.backbone_module(), task.head_modules(), lr=1.0, weight_decay=0.05,
                                    layer_decay=0.75))
    assert {n: tuple(v[:3]) for n, v in sharded.items()} == plain
    assert sharded["blocks.0.attn.qkv.weight"][3] == 1  # the sharded view is 1-D: ndim alone would say no decay
    assert sharded["blocks.0.attn.qkv.weight"][1] == 0.05 and sharded["head.weight"][1] == 0.05
    for name in ("blocks.1.norm2.weight", "blocks.0.mlp.fc1.bias", "pos_embed", "cls_token", "norm.weight"):
        assert sharded[name][1] == 0.0, name


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed gloo")
def test_fsdp_flat_parameters_are_refused_with_the_fix(tmp_path):
    """use_orig_params=False: each wrapped block is one flat 1-D parameter (norms and matrices together), which
    no per-parameter rule can split; param_groups says so and names the setting. With use_orig_params=True and
    wrapper-prefixed names, the decisions equal the unwrapped module's (one process, world size 1)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from vitmha.models.vit import Block

    def vit():
        torch.manual_seed(0)
        return vitmha.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)

    plain = _decisions(param_groups(vit(), lr=1.0, weight_decay=0.05, layer_decay=0.75))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        flat = FSDP(vit(), auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=False,
                    device_id=torch.device("cpu"))
        with pytest.raises(ValueError, match="FSDP flat parameter .* use_orig_params: true"):
            param_groups(flat.module, lr=1.0, weight_decay=0.05)
        wrapped = FSDP(vit(), auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
                       device_id=torch.device("cpu"))
        assert any("_fsdp_wrapped_module" in n for n, _ in wrapped.module.named_parameters())
        assert _decisions(param_groups(wrapped.module, lr=1.0, weight_decay=0.05, layer_decay=0.75)) == plain
    finally:
        dist.destroy_process_group()


def test_bf16_mixed_on_the_cpu_trains_with_the_default_clipping(tmp_path):
    """Lightning's mixed-precision plugin refuses to clip the gradients of an optimizer that unscales them itself
    (fused AdamW): under ``*-mixed`` the task builds AdamW unfused, and a clipped bf16-mixed step runs."""
    import lightning as L

    task = _tiny_task(warmup_epochs=0)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(task, loader)
    assert trainer.global_step == 2 and not trainer.optimizers[0].defaults["fused"]
    assert all(torch.isfinite(p).all() for p in task.parameters())
