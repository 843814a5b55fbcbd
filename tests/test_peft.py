"""Parameter-efficient fine-tuning (vitmha.peft and the tasks' ``peft`` option): what is frozen stays frozen,
fresh LoRA / adapters equal the base model, LoRA on q touches q only, merging changes no output, VPT keeps the
token grid, merged exports load in timm, PEFT runs resume bit-exactly, and a bad spec is one clean line."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import CLF_BACKBONE, REPO, SEG_BACKBONE, classifier_args, load_tool, randomize, run_dirs, run_tool
from vitmha import VisionTransformer
from vitmha.cli import cli_main
from vitmha.inference import load_task
from vitmha.peft import (LoRALinear, PeftError, apply_peft, load_trainable, merge_peft, parameter_counts,
                         parse_peft, task_from_trainable)
from vitmha.tasks import ImageClassifier, SemanticSegmenter

export = load_tool("export")
METHODS = {
    "lora": {"method": "lora", "r": 2, "targets": ["q", "v"]},
    "lora_all": {"method": "lora", "r": 2, "alpha": 4, "targets": ["q", "k", "v", "proj", "fc1", "fc2"],
                 "rslora": True},
    "dora": {"method": "dora", "r": 2, "targets": ["q", "k", "v", "proj", "fc1", "fc2"]},
    "bitfit": {"method": "bitfit"},
    "vpt": {"method": "vpt", "tokens": 3},
    "adapter": {"method": "adapter", "hidden": 4},
}
MERGEABLE = ("lora", "lora_all", "dora", "bitfit")


def tiny_vit(seed: int = 0, **kw) -> VisionTransformer:
    """A small ViT with every weight perturbed (timm zero-inits heads and biases, which would hide bugs)."""
    torch.manual_seed(seed)
    return randomize(VisionTransformer(**{**CLF_BACKBONE, "num_classes": 3, **kw}), seed).eval()


def perturb_peft(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every trainable parameter away from its initial value (B = 0 would make LoRA a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fit(task: L.LightningModule, steps: int = 3, seg: bool = False, size: int = 0) -> L.Trainer:
    """``steps`` optimizer steps on random images (batches of 4) and labels of 3 classes."""
    g = torch.Generator().manual_seed(0)
    size = size or (SEG_BACKBONE["img_size"] if seg else CLF_BACKBONE["img_size"])
    x = torch.randn(4 * steps, 3, size, size, generator=g)
    y = torch.randint(0, 3, (4 * steps, size, size) if seg else (4 * steps,), generator=g)
    tr = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    tr.fit(task, DataLoader(TensorDataset(x, y), batch_size=4))
    return tr


# ------------------------------------------------------------------------------------------ the spec
@pytest.mark.parametrize("spec, key", [
    ({"method": "lorra"}, "peft.method"),
    ({"method": "lora", "targets": ["q", "qkv"]}, "peft.targets"),
    ({"method": "lora", "r": 0}, "peft.r"),
    ({"method": "dora", "rank": -2}, "peft.r"),
    ({"method": "lora", "lora_alpha": 16}, "peft.lora_alpha"),
    ({"method": "bitfit", "r": 8}, "peft.r"),
    ({"method": "vpt", "tokens": 2.5}, "peft.tokens"),
    ({"r": 8}, "peft.method"),
])
def test_a_bad_spec_is_a_one_line_error_naming_the_key(spec, key):
    with pytest.raises(PeftError) as e:
        parse_peft(spec)
    msg = str(e.value)
    assert msg.startswith(key + ":") and "\n" not in msg


def test_full_is_plain_fine_tuning_and_rank_is_r():
    assert parse_peft({"method": "full"}) is None and parse_peft(None) is None
    spec = parse_peft({"method": "lora", "rank": 4, "alpha": 16, "targets": ["v", "q"]})
    assert (spec.r, spec.scaling, spec.targets) == (4, 4.0, ("q", "v"))
    assert parse_peft({"method": "lora", "r": 4, "alpha": 16, "rslora": True}).scaling == 8.0
    assert parse_peft(spec.to_dict()) == spec


def test_a_bad_spec_on_the_command_line_is_one_error_line_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", *classifier_args(tmp_path, "--model.init_args.peft", "{method: lora, r: 0}")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err.startswith("error: ") and "peft.r" in err and len(err.splitlines()) == 1


def test_peft_and_freeze_backbone_do_not_mix():
    with pytest.raises(PeftError, match="freeze_backbone"):
        ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, peft=METHODS["lora"], freeze_backbone=True)


def test_a_target_the_model_lacks_is_named():
    with pytest.raises(PeftError, match=r"peft.targets: fc1 .*blocks.0.mlp.fc1"):
        apply_peft(tiny_vit(mlp_layer="swiglu"), {"method": "lora", "targets": ["fc1"]})


# ------------------------------------------------------------------------------------------ the methods
@pytest.mark.parametrize("method", ["lora", "lora_all", "dora", "adapter"])
def test_a_fresh_method_equals_the_base_model(method):
    base = tiny_vit()
    model = apply_peft(tiny_vit(), METHODS[method])
    x = images()
    with torch.no_grad():
        want, got = base(x), model(x)
    if method == "dora":  # g = m / ||W|| = 1 up to rounding
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("target", ["q", "k", "v"])
def test_lora_on_one_of_q_k_v_changes_only_its_rows_of_the_qkv_output(target):
    model = perturb_peft(apply_peft(tiny_vit(), {"method": "lora", "r": 2, "targets": [target]}))
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear)
    h = torch.randn(2, 17, CLF_BACKBONE["embed_dim"])
    with torch.no_grad():
        base = torch.nn.functional.linear(h, qkv.weight, qkv.bias)
        out = qkv(h)
    dim = CLF_BACKBONE["embed_dim"]
    i = "qkv".index(target)
    for j in range(3):
        rows = slice(j * dim, (j + 1) * dim)
        assert torch.equal(out[..., rows], base[..., rows]) == (j != i), f"rows of {'qkv'[j]}"


def test_lora_keeps_the_base_weights_and_their_keys():
    plain = tiny_vit()
    model = apply_peft(tiny_vit(), METHODS["lora_all"])
    sd = model.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(sd[k], v), k  # blocks.N.attn.qkv.weight etc., unchanged, same layout
    added = sorted(set(sd) - set(plain.state_dict()))
    assert "blocks.0.attn.qkv.lora_A.q" in added and "blocks.1.mlp.fc2.lora_B.fc2" in added
    assert all(".lora_" in k for k in added)


@pytest.mark.parametrize("method", MERGEABLE)
def test_merging_gives_a_plain_backbone_with_the_same_outputs(method):
    model = perturb_peft(apply_peft(tiny_vit(), METHODS[method]))
    x = images()
    with torch.no_grad():
        want = model(x)
        merged = merge_peft(model)
        got = merged(x)
    assert (got - want).abs().max() <= 1e-5
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    plain = tiny_vit(seed=5)
    plain.load_state_dict(merged.state_dict(), strict=True)  # timm's keys and shapes, nothing else
    with torch.no_grad():
        assert (plain(x) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["vpt", "adapter"])
def test_prompts_and_adapters_cannot_be_merged_into_plain_weights(method):
    model = apply_peft(tiny_vit(), METHODS[method])
    with pytest.raises(PeftError, match="cannot be merged"):
        merge_peft(model)


def test_vpt_deep_keeps_the_token_grid_and_changes_the_output():
    base, model = tiny_vit(), perturb_peft(apply_peft(tiny_vit(), METHODS["vpt"]))
    x = images()
    with torch.no_grad():
        assert model.forward_features(x).shape == base.forward_features(x).shape == (2, 17, 16)
        maps = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape for m in maps] == [(2, 16, 4, 4)] * 2
        assert [a.shape for a in model.forward_attention(x, indices=[0, 1])] == [(2, 2, 17, 17)] * 2
        assert not torch.allclose(model(x), base(x))
    assert model.blocks[1].attn.prompt.tokens.shape == (3, 16)


def test_vpt_prompts_enter_through_the_blocks_norm_and_only_via_attention():
    """Reference: prompts concatenated to the block input, the whole block run, their outputs dropped."""
    model, plain = perturb_peft(apply_peft(tiny_vit(), METHODS["vpt"])), tiny_vit()
    x = torch.randn(2, 17, 16)
    with torch.no_grad():
        prompts = model.blocks[0].attn.prompt.tokens.expand(2, -1, -1)
        want = plain.blocks[0](torch.cat([x, prompts], dim=1))[:, :17]
        torch.testing.assert_close(model.blocks[0](x), want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("method", ["lora", "dora", "bitfit", "vpt", "adapter"])
def test_frozen_parameters_get_no_gradient_and_do_not_change(method):
    L.seed_everything(0)
    task = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, warmup_epochs=0, peft=METHODS[method])
    assert task.learning_rate == 1e-3  # PEFT trains few fresh parameters: the linear-probe default
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainer = fit(task)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    for name, p in task.model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert p.grad is None, name
            assert torch.equal(p, before[name]), f"{name} changed"
    in_groups = [id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in task.parameters() if p.requires_grad)


def test_vpt_prompts_get_no_weight_decay_and_lora_factors_do():
    from vitmha.tasks.optim import param_groups

    task = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, peft=METHODS["vpt"])
    wd = {n: g["weight_decay"] for g in param_groups(task.model, lr=1e-3, weight_decay=0.05, trainable_only=True)
          for n in g["param_names"]}
    assert wd["blocks.0.attn.prompt.tokens"] == 0.0 and wd["head.weight"] == 0.05
    assert not any(n.startswith("blocks.0.attn.qkv.") for n in wd)  # frozen: in no group
    lora = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, peft=METHODS["lora"])
    wd = {n: g["weight_decay"] for g in param_groups(lora.model, lr=1e-3, weight_decay=0.05, trainable_only=True)
          for n in g["param_names"]}
    assert wd["blocks.1.attn.qkv.lora_B.v"] == 0.05 and "blocks.1.attn.qkv.weight" not in wd


def test_norms_true_trains_the_norm_layers_too():
    model = apply_peft(tiny_vit(), {**METHODS["lora"], "norms": True})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"blocks.0.norm1.weight", "blocks.1.norm2.bias", "norm.weight"} <= trainable
    assert "blocks.0.attn.qkv.bias" not in trainable


def test_linear_probe_is_freeze_backbone():
    task = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, warmup_epochs=0,
                           peft={"method": "linear_probe"})
    assert task.freezes_backbone and not task.uses_peft and task.learning_rate == 1e-3
    fit(task, steps=1)
    assert {n for n, p in task.model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert not task.model.blocks[0].training  # the frozen backbone runs in eval mode, as with freeze_backbone


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_segmenter_trains_its_decoder_and_the_method_only(method):
    L.seed_everything(0)
    task = SemanticSegmenter(num_classes=3, backbone_kwargs=SEG_BACKBONE, warmup_epochs=0, peft=METHODS[method])
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    fit(task, seg=True)
    for name, p in task.model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name
    assert task.model.head.proj.weight.requires_grad  # the linear decoder
    with torch.no_grad():
        assert task.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------ shipping
@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    """A tiny classifier trained 3 steps with DoRA on q, k, v, proj, fc1, fc2 and a weight EMA (the exports
    take the EMA weights, which the task evaluates with), saved as a checkpoint."""
    root = tmp_path_factory.mktemp("peft_ckpt")
    L.seed_everything(0)
    task = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, warmup_epochs=0, lr=3e-2, ema_decay=0.5,
                           peft=METHODS["dora"])
    trainer = fit(task)
    trainer.save_checkpoint(root / "dora.ckpt")
    return root / "dora.ckpt"


def test_the_exported_merged_file_loads_in_timm_with_the_same_logits(lora_ckpt, tmp_path):
    timm = pytest.importorskip("timm")
    info = export.main(["--checkpoint", lora_ckpt, "--format", "safetensors", "--output", tmp_path / "m.safetensors"])
    model = eval(info["timm"], {"timm": timm}).eval()
    x = images(3)
    with torch.no_grad():
        want = load_task(str(lora_ckpt))(x)  # unmerged
        assert (model(x) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("merge", [[], ["--no-merge"]], ids=["merged", "unmerged"])
def test_onnx_export_matches_the_unmerged_task(lora_ckpt, tmp_path, merge):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    info = export.main(["--checkpoint", lora_ckpt, "--format", "onnx", "--output", tmp_path / "m.onnx", *merge])
    assert info["max_abs_diff"] < 1e-4
    x = images(3)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - load_task(str(lora_ckpt))(x).numpy()).max() < 1e-4


def test_trainable_only_file_is_small_and_rebuilds_the_task_on_the_base_weights(tmp_path):
    base = tmp_path / "base.safetensors"
    from vitmha.models import save_timm_safetensors

    save_timm_safetensors(tiny_vit(), base)
    L.seed_everything(0)
    task = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, pretrained=str(base), warmup_epochs=0,
                           lr=3e-2, peft=METHODS["lora"])
    fit(task).save_checkpoint(tmp_path / "lora.ckpt")
    info = export.main(["--checkpoint", tmp_path / "lora.ckpt", "--format", "peft",
                        "--output", tmp_path / "t.safetensors"])
    counts = parameter_counts(task.model)
    assert info["params"] == counts["trainable"] and info["backbone_params"] == counts["base"]
    assert info["params"] < 0.25 * counts["base"]  # 2 blocks x (q, v) x rank 2, and the head
    rebuilt = task_from_trainable(tmp_path / "t.safetensors")
    x = images()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), task.eval()(x))
    other = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, peft={**METHODS["lora"], "r": 4})
    with pytest.raises(PeftError, match="shapes differ"):
        load_trainable(other.model, tmp_path / "t.safetensors")


def test_export_refuses_a_timm_file_for_prompts_with_one_line(tmp_path, capsys):
    L.seed_everything(0)
    task = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, warmup_epochs=0, peft=METHODS["vpt"])
    fit(task, steps=1).save_checkpoint(tmp_path / "vpt.ckpt")
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", tmp_path / "vpt.ckpt", "--format", "safetensors", "--output", tmp_path / "m.st"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "cannot be merged" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.st").exists()
    info = export.main(["--checkpoint", tmp_path / "vpt.ckpt", "--format", "torchscript",
                        "--output", tmp_path / "m.pt"])
    assert info["max_abs_diff"] < 1e-5  # prompts are traced along


# ------------------------------------------------------------------------------------------ the CLI
def train(root: Path, max_epochs: int, *extra: str) -> Path:
    """``vitmha fit`` on tiny digits with LoRA (with dropout), drop-path and augmentation on."""
    cli_main(["fit", *classifier_args(
        root, "--trainer.max_epochs", str(max_epochs), "--trainer.limit_train_batches", "3",
        "--trainer.deterministic", "true", "--model.init_args.drop_path_rate", "0.2",
        "--model.init_args.scheduler", "constant", "--data.init_args.augment", "true",
        "--model.init_args.peft", "{method: lora, r: 2, targets: [q, v, fc1], dropout: 0.1}", *extra)])
    return run_dirs(root)[-1] / "checkpoints" / "last.ckpt"


def test_resume_with_peft_is_bitwise_exact(tmp_path):
    first = train(tmp_path / "a", 1)
    resumed = train(tmp_path / "a", 2, "--ckpt_path", str(first))
    straight = train(tmp_path / "b", 2)
    sa = torch.load(resumed, weights_only=True, map_location="cpu")["state_dict"]
    sb = torch.load(straight, weights_only=True, map_location="cpu")["state_dict"]
    assert sa.keys() == sb.keys() and "model.blocks.0.attn.qkv.lora_B.q" in sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    s1 = torch.load(first, weights_only=True, map_location="cpu")["state_dict"]
    assert not torch.equal(s1["model.blocks.0.attn.qkv.lora_B.q"], sb["model.blocks.0.attn.qkv.lora_B.q"])
    assert torch.equal(s1["model.blocks.0.attn.qkv.weight"], sb["model.blocks.0.attn.qkv.weight"])  # frozen


def _write_config(path: Path, task: str, peft: dict) -> Path:
    import yaml

    vit = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}
    model = {"backbone_kwargs": vit, "warmup_epochs": 0, "peft": peft}
    if task == "segmentation":
        model_path, data = "vitmha.tasks.SemanticSegmenter", {
            "class_path": "vitmha.data.SyntheticShapesDataModule",
            "init_args": {"image_size": 16, "batch_size": 8, "n_train": 16, "n_val": 8}}
    else:
        model_path, data = "vitmha.tasks.ImageClassifier", {
            "class_path": "vitmha.data.DigitsDataModule", "init_args": {"image_size": 16, "batch_size": 32}}
    config = {"seed_everything": 0, "model": {"class_path": model_path, "init_args": model}, "data": data,
              "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
                          "enable_model_summary": False, "default_root_dir": str(path.parent / "runs")}}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("method", ["lora", "dora", "bitfit", "vpt", "adapter"])
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_tools_train_runs_a_peft_config(tmp_path, task, method):
    config = _write_config(tmp_path / "peft.yaml", task, METHODS[method])
    load_tool("train").main(["--config", str(config)])
    ckpt = run_dirs(tmp_path / "runs")[-1] / "checkpoints" / "last.ckpt"
    loaded = load_task(str(ckpt))
    assert loaded.peft_spec == parse_peft(METHODS[method])


def test_python_tools_train_with_a_peft_option_as_a_subprocess(tmp_path):
    config = _write_config(tmp_path / "peft.yaml", "classification", METHODS["adapter"])
    r = run_tool("train", "--config", config, "--model.init_args.peft", json.dumps(METHODS["dora"]))
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = run_dirs(tmp_path / "runs")[-1] / "checkpoints" / "last.ckpt"
    assert "model.blocks.1.mlp.fc2.lora_magnitude.fc2" in torch.load(ckpt, weights_only=True)["state_dict"]


@pytest.mark.parametrize("name", ["peft_lora_fashion_mnist", "peft_lora_nuclei"])
def test_the_peft_recipes_parse(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
    assert e.value.code in (0, None)
    assert "method: lora" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ real weights
def test_real_vit_ti_lora_trains_under_2_percent_and_its_merged_export_runs_in_timm_and_onnx(real_weights, tmp_path):
    timm = pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    L.seed_everything(0)
    task = ImageClassifier(backbone="vit_tiny_patch16_224", pretrained=str(real_weights), num_classes=3,
                           backbone_kwargs={"img_size": 32, "patch_size": 8}, warmup_epochs=0, lr=1e-2,
                           peft={"method": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]})
    counts = parameter_counts(task.model)
    assert counts["base"] > 5_000_000 and counts["added"] / counts["base"] < 0.02
    assert 250_000 < 4 * counts["trainable"] < 400_000  # a few hundred KB in float32
    fit(task, steps=2, size=32).save_checkpoint(tmp_path / "real.ckpt")
    info = export.main(["--checkpoint", tmp_path / "real.ckpt", "--format", "safetensors",
                        "--output", tmp_path / "real.safetensors"])
    model = eval(info["timm"], {"timm": timm}).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - task.eval()(x)).abs().max() <= 1e-5
    onnx = export.main(["--checkpoint", tmp_path / "real.ckpt", "--format", "onnx", "--output", tmp_path / "m.onnx"])
    assert onnx["max_abs_diff"] <= export.TOLERANCE
