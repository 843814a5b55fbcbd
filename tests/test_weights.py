"""Weight files: formats, foreign layouts (checked against timm's own converters), the timm round trip, and
bad files that must fail clearly and run nothing."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import timm
import torch

import vitmha
from vitmha.models import WeightsError, save_timm_safetensors

from tests.helpers import randomize, rel_err

TINY = dict(depth=2, img_size=32)


def _ref(arch="vit_tiny_patch16_224", **kw):
    return randomize(timm.create_model(arch, pretrained=False, **(kw or TINY))).eval()


def _same_outputs(ref, ours, size=32, tol=1e-5):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert rel_err(ref.forward_features(x), ours.forward_features(x)) < tol
        assert rel_err(ref(x), ours(x)) < tol


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_load_from_file(tmp_path, suffix):
    from safetensors.torch import save_file

    ref = _ref()
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"model": sd, "epoch": 3}, path)           # wrapped, as many training scripts save
    _same_outputs(ref, vitmha.create_backbone("vit_tiny_patch16_224", pretrained=str(path), **TINY))


def test_timm_round_trip(tmp_path):
    ours = randomize(vitmha.create_backbone("vit_small_patch14_reg4_dinov2", depth=2, img_size=56)).eval()
    path = save_timm_safetensors(ours, tmp_path / "backbone.safetensors")
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=True, depth=2, img_size=56,
                            pretrained_cfg_overlay=dict(file=str(path))).eval()
    _same_outputs(ref, ours, size=56)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_head_of_another_size_is_reinitialised_with_a_warning(tmp_path):
    ref = _ref(num_classes=1000, **TINY)
    with pytest.warns(UserWarning, match="head re-initialised for 7 classes"):
        ours = vitmha.create_backbone("vit_tiny_patch16_224", pretrained=ref.state_dict(), num_classes=7, **TINY)
    assert torch.equal(ours.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # no head at all: dropped silently
        vitmha.create_backbone("vit_tiny_patch16_224", pretrained=ref.state_dict(), num_classes=0, **TINY)


def test_other_architecture_is_an_error_listing_keys():
    other = _ref("vit_small_patch16_224", **TINY).state_dict()
    with pytest.raises(WeightsError, match=r"shape mismatch.*blocks\.0\.attn\.qkv\.weight: checkpoint \(1152, 384\)"):
        vitmha.create_backbone("vit_tiny_patch16_224", pretrained=other, **TINY)
    deeper = _ref(depth=3, img_size=32).state_dict()
    with pytest.raises(WeightsError, match=r"unexpected \(\d+\): blocks\.2\."):
        vitmha.create_backbone("vit_tiny_patch16_224", pretrained=deeper, **TINY)
    partial = {k: v for k, v in _ref().state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(WeightsError, match=r"missing \(\d+\): blocks\.1\."):
        vitmha.create_backbone("vit_tiny_patch16_224", pretrained=partial, **TINY)


def test_keep_blocks_loads_the_first_blocks_of_a_deeper_checkpoint():
    deeper = _ref(depth=3, img_size=32)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()   # timm, 2 blocks
    ref.load_state_dict({k: v for k, v in deeper.state_dict().items() if not k.startswith("blocks.2.")})
    with pytest.warns(UserWarning, match=r"keeping the first 2 of the checkpoint's 3 blocks"):
        ours = vitmha.create_backbone("vit_tiny_patch16_224", pretrained=deeper.state_dict(), keep_blocks=2,
                                      img_size=32)
    assert len(ours.blocks) == 2
    _same_outputs(ref, ours)
    with pytest.raises(WeightsError, match=r"missing \(\d+\): blocks\.3\."):        # deeper than the checkpoint
        vitmha.create_backbone("vit_tiny_patch16_224", pretrained=deeper.state_dict(), keep_blocks=4, img_size=32)
    for bad, msg in [(dict(keep_blocks=0), "keep_blocks=0"), (dict(keep_blocks=2.5), "keep_blocks=2.5"),
                     (dict(keep_blocks=2, depth=3), "keep_blocks=2 and depth=3 disagree")]:
        with pytest.raises(ValueError, match=msg):
            vitmha.create_backbone("vit_tiny_patch16_224", pretrained=deeper.state_dict(), img_size=32, **bad)


def test_truncated_files_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _ref().state_dict().items()}
    st, pth = tmp_path / "w.safetensors", tmp_path / "w.pth"
    save_file(sd, str(st))
    torch.save(sd, pth)
    for path in (st, pth):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(WeightsError, match=f"{path.name}.*(truncated|corrupt)"):
            vitmha.create_backbone("vit_tiny_patch16_224", pretrained=str(path), **TINY)
    with pytest.raises(WeightsError, match="not found"):
        vitmha.create_backbone("vit_tiny_patch16_224", pretrained=str(tmp_path / "nope.safetensors"), **TINY)


class _Payload:
    """Unpickling this object would create a marker file: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_carrying_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(str(marker))}, f)
    assert not marker.exists()
    with pytest.raises(WeightsError, match="refused to unpickle"):
        vitmha.create_backbone("vit_tiny_patch16_224", pretrained=str(path), **TINY)
    assert not marker.exists()
    raw = tmp_path / "evil.bin"                                   # a bare (non-zip) pickle too
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(WeightsError):
        vitmha.create_backbone("vit_tiny_patch16_224", pretrained=str(raw), **TINY)
    assert not marker.exists()


def test_lightning_checkpoint_prefix_is_unwrapped():
    ref = _ref()
    ckpt = {"state_dict": {f"model.{k}": v for k, v in ref.state_dict().items()}, "epoch": 1}
    _same_outputs(ref, vitmha.create_backbone("vit_tiny_patch16_224", pretrained=ckpt, **TINY))


# ------------------------------------------------------------------ foreign layouts vs timm's converters
def test_openai_clip_layout_matches_timm_conversion():
    from timm.models.vision_transformer import checkpoint_filter_fn

    arch, kw = "vit_base_patch16_clip_224", dict(embed_dim=64, num_heads=4, depth=2, img_size=32)
    ref = _ref(arch, **kw)
    sd = ref.state_dict()
    openai = {"visual.conv1.weight": sd["patch_embed.proj.weight"], "visual.class_embedding": sd["cls_token"][0, 0],
              "visual.positional_embedding": sd["pos_embed"][0], "visual.ln_pre.weight": sd["norm_pre.weight"],
              "visual.ln_pre.bias": sd["norm_pre.bias"], "visual.ln_post.weight": sd["norm.weight"],
              "visual.ln_post.bias": sd["norm.bias"], "visual.proj": torch.randn(64, 32)}
    for i in range(2):
        b, o = f"blocks.{i}.", f"visual.transformer.resblocks.{i}."
        for ours_k, theirs in [("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.proj", "attn.out_proj"),
                               ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
            for t in ("weight", "bias"):
                openai[f"{o}{theirs}.{t}"] = sd[f"{b}{ours_k}.{t}"]
        openai[o + "attn.in_proj_weight"] = sd[b + "attn.qkv.weight"]
        openai[o + "attn.in_proj_bias"] = sd[b + "attn.qkv.bias"]
    timm_model = timm.create_model(arch, pretrained=False, num_classes=32, **kw).eval()
    timm_model.load_state_dict(checkpoint_filter_fn(dict(openai), timm_model))
    ours = vitmha.create_backbone(arch, pretrained=dict(openai), num_classes=32, **kw).eval()
    _same_outputs(timm_model, ours)


def test_dinov2_original_layout_matches_timm_conversion():
    from timm.models.vision_transformer import checkpoint_filter_fn

    arch, kw = "vit_giant_patch14_dinov2", dict(embed_dim=96, num_heads=4, depth=2, img_size=56, num_classes=0)
    sd = _ref(arch, **kw).state_dict()
    orig = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in sd.items()}
    orig["mask_token"] = torch.zeros(1, 96)
    timm_model = timm.create_model(arch, pretrained=False, **kw).eval()
    timm_model.load_state_dict(checkpoint_filter_fn(dict(orig), timm_model))
    _same_outputs(timm_model, vitmha.create_backbone(arch, pretrained=dict(orig), **kw).eval(), size=56)


def test_deit3_gamma_layout():
    sd = _ref(init_values=1e-3, **TINY).state_dict()
    renamed = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v for k, v in sd.items()}
    ours = vitmha.create_backbone("vit_tiny_patch16_224", pretrained=renamed, init_values=1e-3, **TINY)
    assert torch.equal(ours.blocks[0].ls2.gamma, sd["blocks.0.ls2.gamma"])


def test_jax_npz_matches_timm_npz_loader(tmp_path):
    """A big_vision/AugReg-layout .npz read by timm's own loader and by vitmha gives the same model."""
    D, h, depth, n = 64, 4, 2, 4 * 4
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.1
    z = {"embedding/kernel": r(8, 8, 3, D), "embedding/bias": r(D), "cls": r(1, 1, D),
         "Transformer/posembed_input/pos_embedding": r(1, n + 1, D), "Transformer/encoder_norm/scale": 1 + r(D),
         "Transformer/encoder_norm/bias": r(D), "head/kernel": r(D, 5), "head/bias": r(5)}
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        m = b + "MultiHeadDotProductAttention_1/"
        z.update({b + "LayerNorm_0/scale": 1 + r(D), b + "LayerNorm_0/bias": r(D), b + "LayerNorm_2/scale": 1 + r(D),
                  b + "LayerNorm_2/bias": r(D), m + "out/kernel": r(h, D // h, D), m + "out/bias": r(D),
                  b + "MlpBlock_3/Dense_0/kernel": r(D, 4 * D), b + "MlpBlock_3/Dense_0/bias": r(4 * D),
                  b + "MlpBlock_3/Dense_1/kernel": r(4 * D, D), b + "MlpBlock_3/Dense_1/bias": r(D)})
        for p in ("query", "key", "value"):
            z[m + f"{p}/kernel"], z[m + f"{p}/bias"] = r(D, h, D // h), r(h, D // h)
    path = tmp_path / "augreg.npz"
    np.savez(path, **z)
    kw = dict(img_size=32, patch_size=8, embed_dim=D, num_heads=h, depth=depth, num_classes=5)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    ref.load_pretrained(str(path))
    _same_outputs(ref, vitmha.create_backbone("vit_tiny_patch16_224", pretrained=str(path), **kw).eval())


def test_pretrained_true_reads_the_offline_hub_cache(tmp_path, monkeypatch):
    """pretrained=True resolves timm's pretrained cfg through the Hugging Face cache with HF_HUB_OFFLINE=1."""
    from safetensors.torch import save_file

    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    ref = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)).eval()
    repo = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    ours = vitmha.create_backbone(name, pretrained=True, depth=2).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(ref(x), ours(x)) < 1e-5
    with pytest.raises(WeightsError, match="not available here"):
        vitmha.create_backbone("vit_small_patch16_224.augreg_in21k_ft_in1k", pretrained=True, depth=1)


def test_pretrained_true_offline_fails_fast_with_the_recipe(tmp_path):
    """Not cached, hub unreachable (HF_ENDPOINT at a closed local port, HF_HUB_OFFLINE unset): one WeightsError
    line naming the weights and the offline recipe, in seconds (the hub client alone retries for ~25 s per
    file)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:                                   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(tmp_path / "empty"), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    code = ("import time, vitmha\n"
            "t = time.perf_counter()\n"
            "try:\n"
            "    vitmha.create_backbone('vit_small_patch16_224', pretrained=True, depth=1)\n"
            "except vitmha.models.WeightsError as e:\n"
            "    print(f'{time.perf_counter() - t:.2f}'); print(e)\n")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stdout + out.stderr
    assert float(lines[0]) < 10 and wall < 30, (lines[0], wall)  # the call itself; the process with its imports
    msg = lines[1]
    assert msg.startswith("vit_small_patch16_224.augreg_in21k_ft_in1k: ")  # the arch and the tag it resolved
    assert f"127.0.0.1:{port}" in msg and "cannot be reached" in msg
    assert "vitmha seed-cache --name vit_small_patch16_224.augreg_in21k_ft_in1k --weights FILE" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "pretrained: path/to/weights.safetensors" in msg


def test_pretrained_true_with_hf_hub_offline_fails_without_network(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:1")     # never asked: offline means no request
    with pytest.raises(WeightsError, match=r"^deit_tiny_distilled_patch16_224\.fb_in1k: .*HF_HUB_OFFLINE is set; "
                                           r"offline: `vitmha seed-cache --name deit_tiny_distilled_patch16_224"):
        vitmha.create_backbone("deit_tiny_distilled_patch16_224", pretrained=True, depth=1)


# ------------------------------------------------------------------ a PEFT task checkpoint as pretrained
def _peft_task_checkpoint(tmp_path, peft):
    """A tiny classifier with ``peft`` fitted two steps by Lightning and saved by Trainer.save_checkpoint."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from vitmha.tasks import ImageClassifier

    L.seed_everything(0, verbose=False)
    task = ImageClassifier(num_classes=3, backbone_kwargs=dict(img_size=16, patch_size=4, embed_dim=16, depth=2,
                                                               num_heads=2), warmup_epochs=0, lr=0.05, peft=peft)
    with torch.no_grad():                                        # B starts at zero: make the update non-trivial
        for n, p in task.model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))), batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, train_dataloaders=data)
    path = tmp_path / "peft.ckpt"
    trainer.save_checkpoint(path)
    return task.eval(), path


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_task_checkpoint_loads_merged_as_pretrained(tmp_path, method):
    task, path = _peft_task_checkpoint(tmp_path, {"method": method, "r": 2, "alpha": 4,
                                                  "targets": ["q", "v", "fc1"]})
    bb = vitmha.create_backbone("vit_tiny_patch16_224", pretrained=str(path), img_size=16, patch_size=4,
                                embed_dim=16, depth=2, num_heads=2, num_classes=3).eval()
    assert not any("lora" in k for k in bb.state_dict())          # a plain model: timm's keys only
    assert type(bb.blocks[0].attn.qkv) is torch.nn.Linear
    assert all(p.requires_grad for p in bb.parameters())          # as any freshly built backbone
    x = torch.randn(4, 3, 16, 16)
    base = {k: v for k, v in torch.load(path, weights_only=True)["state_dict"].items() if "lora_" not in k}
    unmerged = vitmha.create_backbone("vit_tiny_patch16_224", pretrained=base, img_size=16, patch_size=4,
                                      embed_dim=16, depth=2, num_heads=2, num_classes=3).eval()
    with torch.no_grad():
        assert rel_err(task.model(x), bb(x)) < 1e-5               # the task's LoRA model, merged
        assert rel_err(task.model(x), unmerged(x)) > 1e-2         # which the base weights alone are not


@pytest.mark.parametrize("peft,what", [({"method": "vpt", "tokens": 2}, "vpt"),
                                       ({"method": "adapter", "hidden": 4}, "adapter")])
def test_prompt_or_adapter_task_checkpoint_as_pretrained_is_a_clear_error(tmp_path, peft, what):
    _, path = _peft_task_checkpoint(tmp_path, peft)
    with pytest.raises(WeightsError, match=rf"peft.ckpt: a task trained with peft {what}: VPT prompts and adapters "
                                           r"have no place in plain ViT weights"):
        vitmha.create_backbone("vit_tiny_patch16_224", pretrained=str(path), img_size=16, patch_size=4,
                               embed_dim=16, depth=2, num_heads=2, num_classes=3)


def test_lora_factors_without_their_spec_are_a_clear_error(tmp_path):
    _, path = _peft_task_checkpoint(tmp_path, {"method": "lora", "r": 2})
    sd = torch.load(path, weights_only=True)["state_dict"]        # the tensors alone: no scaling to merge with
    with pytest.raises(WeightsError, match=r"holds LoRA factors \(blocks\.\d\.attn\.qkv\.lora_[AB]\.[qv]\) but no "
                                           r"lora/dora peft spec"):
        vitmha.create_backbone("vit_tiny_patch16_224", pretrained=sd, img_size=16, patch_size=4, embed_dim=16,
                               depth=2, num_heads=2, num_classes=3)
