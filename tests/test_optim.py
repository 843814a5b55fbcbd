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
