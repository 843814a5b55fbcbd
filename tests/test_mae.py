"""Masked autoencoding: patches, masks, the visible-only encoder, the decoder's un-shuffle and the loss
against straightforward per-image reference code; pre-training any channel count and fine-tuning from the
encoder; the encoder file in timm; the installed commands; resume in the middle of an epoch."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import vitmha
from tests.helpers import VITMHA, assert_real_png, load_tool, randomize
from vitmha.heads.mae import (encode_visible, final_norm, mask_noise, masked_loss, normalize_patches, num_visible,
                              patchify, random_masking, unpatchify)
from vitmha.tasks import ImageClassifier, MaskedAutoencoder, SemanticSegmenter

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
DECODER = dict(decoder_dim=16, decoder_depth=1, decoder_heads=2)


def tiny_mae(**kwargs) -> MaskedAutoencoder:
    backbone_kwargs = {**TINY, **kwargs.pop("backbone_kwargs", {})}
    return MaskedAutoencoder(backbone_kwargs=backbone_kwargs, **{**DECODER, "warmup_epochs": 0, **kwargs})


def reference_patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C) one patch at a time: row-major patches, pixels (row, column, channel)."""
    B, C, H, W = images.shape
    rows = []
    for b in range(B):
        patches = []
        for i in range(H // p):
            for j in range(W // p):
                block = images[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # (C, p, p)
                patches.append(block.permute(1, 2, 0).reshape(-1))
        rows.append(torch.stack(patches))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------------ patches
def test_patchify_matches_a_per_patch_reference_and_unpatchify_inverts_it():
    x = torch.randn(2, 3, 8, 12)
    patches = patchify(x, (4, 4))
    assert patches.shape == (2, 6, 48)
    assert torch.equal(patches, reference_patches(x, 4))
    assert torch.equal(unpatchify(patches, (4, 4), (2, 3), 3), x)
    with pytest.raises(ValueError, match="9x12 is not a whole number of 4x4 patches"):
        patchify(torch.randn(1, 3, 9, 12), (4, 4))


# ------------------------------------------------------------------------------------------------ masking
def test_masks_are_per_image_keyed_and_independent_of_the_batch_size():
    noise = mask_noise(0, "train", 3, 5, 8, 49)
    assert torch.equal(mask_noise(0, "train", 3, 5, 4, 49), noise[:4])  # row i depends on i, not the batch size
    assert not torch.equal(mask_noise(0, "train", 4, 5, 8, 49), noise)  # another epoch, other masks
    assert not torch.equal(mask_noise(1, "train", 3, 5, 8, 49), noise)  # another seed, other masks
    assert not torch.equal(mask_noise(0, "val", 3, 5, 8, 49), noise)    # another stream, other masks
    ids_keep, mask, ids_restore = random_masking(noise, 0.75)
    keep = num_visible(49, 0.75)
    assert keep == 12 and ids_keep.shape == (8, 12)
    assert torch.equal(mask.sum(1), torch.full((8,), 49.0 - 12))
    assert len({tuple(m.tolist()) for m in mask}) == 8  # every image its own mask
    for b in range(8):  # reference: the 12 patches of smallest noise stay visible, the others are masked
        visible = set(torch.argsort(noise[b])[:keep].tolist())
        assert set(ids_keep[b].tolist()) == visible
        assert [int(m) for m in mask[b]] == [0 if j in visible else 1 for j in range(49)]
        assert torch.equal(torch.argsort(ids_restore[b]), torch.argsort(noise[b]))


def test_the_encoder_sees_only_the_visible_patches_as_a_per_image_reference_computes_them():
    torch.manual_seed(0)
    mae = tiny_mae(backbone_kwargs=dict(reg_tokens=2)).eval()   # class token + 2 register tokens
    enc = mae.model
    x = torch.randn(3, 3, 16, 16)
    ids_keep, _, _ = random_masking(mask_noise(0, "train", 0, 0, 3, 16), 0.75)
    got = encode_visible(enc, x, ids_keep)
    assert got.shape == (3, 3 + 4, 32)
    P = enc.num_prefix_tokens
    assert P == 3 and enc.pos_embed.shape[1] == P + 16
    with torch.no_grad():
        for b in range(3):
            tokens = enc.patch_embed(x[b:b + 1])                                # (1, 16, D)
            prefix_pos, patch_pos = enc.pos_embed[:, :P], enc.pos_embed[:, P:]   # timm: prefix tokens have one too
            visible = (tokens + patch_pos)[:, ids_keep[b]]                        # (1, 4, D) the visible ones only
            prefix = torch.cat([enc.cls_token, enc.reg_token], dim=1) + prefix_pos
            seq = torch.cat([prefix, visible], dim=1)
            for block in enc.blocks:
                seq = block(seq)
            torch.testing.assert_close(got[b:b + 1], enc.norm(seq), rtol=1e-5, atol=1e-5)
        # nothing masked: the encoder's own full forward
        everything = torch.arange(16).expand(3, 16)
        torch.testing.assert_close(encode_visible(enc, x, everything), enc.forward_features(x), rtol=1e-5, atol=1e-5)


def test_the_decoder_puts_every_token_back_in_its_patch_place():
    """With no decoder blocks each output depends on its own token only: the projected visible token at its
    patch, the mask token elsewhere, plus that patch's position embedding."""
    torch.manual_seed(0)
    mae = tiny_mae(decoder_depth=0).eval()
    dec = mae.decoder
    x = torch.randn(2, 3, 16, 16)
    ids_keep, mask, ids_restore = random_masking(mask_noise(0, "train", 0, 1, 2, 16), 0.75)
    tokens = encode_visible(mae.model, x, ids_keep)                             # (2, 1 + 4, D)
    with torch.no_grad():
        got = dec(tokens, ids_restore)
        for b in range(2):
            for j in range(16):
                if mask[b, j]:
                    t = dec.mask_token[0, 0]
                else:
                    k = ids_keep[b].tolist().index(j)
                    t = dec.decoder_embed(tokens[b, 1 + k])
                want = dec.decoder_pred(dec.decoder_norm(t + dec.decoder_pos_embed[0, j]))
                torch.testing.assert_close(got[b, j], want, rtol=1e-5, atol=1e-6)


def test_the_loss_is_the_mean_squared_error_over_the_masked_patches_only():
    torch.manual_seed(0)
    pred = torch.randn(3, 16, 48, requires_grad=True)
    target = torch.randn(3, 16, 48)
    _, mask, _ = random_masking(mask_noise(0, "train", 0, 0, 3, 16), 0.75)
    loss = masked_loss(pred, target, mask)
    errors = [((pred[b, j] - target[b, j]) ** 2).mean() for b in range(3) for j in range(16) if mask[b, j]]
    torch.testing.assert_close(loss, torch.stack(errors).mean())
    loss.backward()
    assert (pred.grad[mask == 0] == 0).all() and (pred.grad[mask == 1] != 0).any()  # visible patches: no gradient


def test_the_task_loss_is_that_reference_on_its_own_predictions():
    torch.manual_seed(0)
    for norm_pix in (False, True):
        mae = tiny_mae(norm_pix_loss=norm_pix).eval()
        x = torch.randn(2, 3, 16, 16)
        noise = mae.noise("train", 0, 0, x)
        loss, pred, mask = mae.masked_forward(mae.model, x, noise)
        target = reference_patches(x, 4)
        if norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        errors = [((pred[b, j] - target[b, j]) ** 2).mean() for b in range(2) for j in range(16) if mask[b, j]]
        torch.testing.assert_close(loss, torch.stack(errors).mean(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ norm_pix_loss
def test_norm_pix_loss_normalises_each_patch_by_its_own_mean_and_unbiased_std():
    x = torch.rand(2, 3, 8, 8) * 4 + 1
    patches = patchify(x, (4, 4))
    normed, mean, std = normalize_patches(patches)
    for b in range(2):
        for j in range(4):
            p = patches[b, j].double()
            want = (p - p.mean()) / torch.sqrt(p.var(unbiased=True) + 1e-6)
            torch.testing.assert_close(normed[b, j].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normed * std + mean, patches)
    mae = tiny_mae(norm_pix_loss=True)
    torch.testing.assert_close(mae.targets(torch.rand(1, 3, 16, 16) * 7 + 3).std(-1),
                               torch.ones(1, 16), rtol=1e-3, atol=1e-3)  # scale-free targets
    raw = tiny_mae(norm_pix_loss=False)
    y = torch.rand(1, 3, 16, 16)
    assert torch.equal(raw.targets(y), reference_patches(y, 4))


def test_reconstructions_keep_the_visible_patches_and_undo_norm_pix():
    torch.manual_seed(0)
    mae = tiny_mae(norm_pix_loss=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        images, masked, recon, loss = mae.reconstruction_panels(x, mae.noise("figure", 0, 0, x))
        _, pred, mask = mae.masked_forward(mae.model, x, mae.noise("figure", 0, 0, x))
    visible = (mask == 0).unsqueeze(-1)
    pr, px = patchify(recon, (4, 4)), patchify(x, (4, 4))
    assert torch.equal(pr * visible, px * visible) and torch.equal(patchify(masked, (4, 4)) * ~visible, 0 * px)
    _, m, s = normalize_patches(px)
    torch.testing.assert_close(pr[~visible.expand_as(pr)], (pred * s + m)[~visible.expand_as(pr)])
    assert loss.shape == (2,) and (loss > 0).all()


# ------------------------------------------------------------------------------------------------ options
def test_bad_options_are_one_line_errors_naming_the_key():
    from vitmha.tasks.base import TaskConfigError

    for kwargs, key in ((dict(mask_ratio=1.0), "mask_ratio"), (dict(decoder_pos_embed="rope"), "decoder_pos_embed"),
                        (dict(decoder_dim=18, decoder_heads=4), "decoder_dim"),
                        (dict(backbone_kwargs=dict(patch_drop_rate=0.5)), "backbone_kwargs.patch_drop_rate")):
        with pytest.raises(TaskConfigError, match=key):
            tiny_mae(**kwargs)


def test_the_learned_decoder_position_embedding_trains_and_is_saved():
    mae = tiny_mae(decoder_pos_embed="learned")
    assert "decoder.decoder_pos_embed" in mae.state_dict()
    assert "decoder.decoder_pos_embed" not in tiny_mae().state_dict()  # sin-cos: a fixed buffer
    x = torch.randn(2, 3, 16, 16)
    mae.masked_forward(mae.model, x, mae.noise("train", 0, 0, x))[0].backward()
    assert mae.decoder.decoder_pos_embed.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ training
def bands(n: int = 16, c: int = 13, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, c, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=8)


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    return vitmha.Trainer(default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, **kwargs)


def test_a_13_band_mae_pretrains_and_every_task_starts_from_its_encoder(tmp_path):
    L.seed_everything(0)
    mae = tiny_mae(backbone_kwargs=dict(in_chans=13), lr=1e-3)
    before = {k: v.clone() for k, v in mae.model.state_dict().items()}
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(mae, train_dataloaders=bands())
    path = tmp_path / "encoder.safetensors"
    saved = load_file(path)
    assert saved.keys() == before.keys() and saved["patch_embed.proj.weight"].shape == (32, 13, 4, 4)
    assert not torch.equal(saved["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])  # it trained
    assert not any(k.startswith("decoder") for k in saved)
    kwargs = {**TINY, "in_chans": 13}
    clf = ImageClassifier(backbone_kwargs=kwargs, pretrained=str(path), num_classes=3, warmup_epochs=0, lr=1e-3)
    seg = SemanticSegmenter(backbone_kwargs=kwargs, pretrained=str(path), num_classes=3)
    for task in (clf, seg):
        state = task.backbone_module().state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items()), type(task).__name__
    quiet_trainer(tmp_path / "ft", max_steps=2, limit_val_batches=0).fit(clf, train_dataloaders=bands(seed=1))
    assert clf(torch.randn(2, 13, 16, 16)).shape == (2, 3)


def test_continued_pretraining_starts_from_the_pretrained_weights(tmp_path):
    src = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY))
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    mae = tiny_mae(pretrained=str(tmp_path / "w.safetensors"))
    assert all(torch.equal(mae.model.state_dict()[k], v) for k, v in src.state_dict().items())


def test_the_exported_encoder_is_timms_model_with_equal_outputs(tmp_path):
    """At the end of fit and through `vitmha export --format safetensors`: the same file, which
    timm.create_model loads as is; features and pooled outputs equal within 1e-5."""
    L.seed_everything(0)
    kwargs = dict(reg_tokens=2)
    mae = tiny_mae(backbone_kwargs=kwargs, lr=1e-3)
    trainer = vitmha.Trainer(default_root_dir=tmp_path, max_steps=2, limit_val_batches=0, accelerator="cpu",
                             enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(mae, train_dataloaders=bands(c=3))
    run = Path(trainer.log_dir)
    end_of_fit = run / "encoder.safetensors"
    exported = tmp_path / "exported.safetensors"
    load_tool("export").main(["--checkpoint", run / "checkpoints" / "last.ckpt", "--format", "safetensors",
                              "--output", exported])
    a, b = load_file(end_of_fit), load_file(exported)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, **TINY, **kwargs,
                            pretrained_cfg_overlay=dict(file=str(exported), num_classes=0)).eval()
    mine = mae.model.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(mine.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)
        assert not torch.equal(ref(x), timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY,
                                                         **kwargs).eval()(x))  # the weights, not the init


class Crash(RuntimeError):
    pass


class StopAt(Callback):
    """Raises at the start of batch ``batch`` of epoch ``epoch``, after the checkpoint of the previous step
    (a crash: nothing after that checkpoint is saved)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Crash


def test_a_run_stopped_mid_epoch_resumes_to_the_same_weights_bitwise(tmp_path):
    """Masks (and augmentation, drop-path) are keyed by (seed, epoch, batch): resuming from a checkpoint
    written one batch into epoch 2 ends with the weights of a run that never stopped."""
    from vitmha.data import DigitsDataModule

    def run(root, callbacks=(), ckpt=None):
        L.seed_everything(0)
        task = tiny_mae(backbone_kwargs=dict(in_chans=1), drop_path_rate=0.1, lr=1e-3, warmup_epochs=1)
        dm = DigitsDataModule(image_size=16, batch_size=16, in_chans=1)
        tr = vitmha.Trainer(default_root_dir=root, max_epochs=3, limit_train_batches=3, limit_val_batches=1,
                            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_last=True),
                                       *callbacks])
        tr.fit(task, datamodule=dm, ckpt_path=ckpt)
        return task.state_dict()

    straight = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", [StopAt(epoch=1, batch=1)])
    last = tmp_path / "b" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 4)      # one batch into the 2nd epoch
    resumed = run(tmp_path / "c", ckpt=str(last))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not all(torch.equal(straight[k], v) for k, v in ckpt["state_dict"].items())  # it did train on


# ------------------------------------------------------------------------------------------------ commands
def image_folder(root: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        img = np.zeros((20, 20, 3), np.uint8)
        img[rng.integers(0, 10):, :, rng.integers(0, 3)] = rng.integers(100, 255)
        Image.fromarray(img).save(sub / f"{i}.png")
    return root


CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  max_epochs: 2
  limit_train_batches: 2
  enable_progress_bar: false
  default_root_dir: {root}
model:
  class_path: vitmha.tasks.MaskedAutoencoder
  init_args:
    backbone_kwargs: {{img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}}
    decoder_dim: 16
    decoder_depth: 1
    warmup_epochs: 0.5
    reconstruct_every_n_epochs: 1
    reconstruct_images: 2
data:
  class_path: vitmha.data.UnlabeledFolderDataModule
  init_args: {{root: {images}, image_size: 16, batch_size: 4, num_workers: 0, val_split: 0.25}}
"""


def test_vitmha_fit_pretrains_from_a_config_and_reconstruct_draws_the_checkpoint(tmp_path, capsys):
    images = image_folder(tmp_path / "images")
    config = tmp_path / "mae.yaml"
    config.write_text(CONFIG.format(root=tmp_path / "runs", images=images))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    fit = subprocess.run([str(VITMHA), "fit", "--config", str(config)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "lightning_logs").iterdir()
    assert (run / "encoder.safetensors").is_file() and "pretrained:" in fit.stdout
    for epoch in (0, 1):
        assert_real_png(run / "reconstructions" / f"epoch_{epoch:04d}.png")
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    assert {"train/loss", "val/loss"} <= set(header.split(","))
    out = tmp_path / "drawn.png"
    reconstruct = load_tool("reconstruct")
    info = reconstruct.main(["--checkpoint", run / "checkpoints" / "last.ckpt", "--image", images / "a" / "1.png",
                             images / "b" / "c" / "0.png", "--output", out])
    assert f"wrote {out}: 2 image(s) at 16 px, 4x4 patches, 75% masked" in capsys.readouterr().out
    assert_real_png(out)
    assert len(info["loss"]) == 2
    with pytest.raises(SystemExit) as exc:
        reconstruct.main(["--checkpoint", run / "checkpoints" / "last.ckpt", "--image", tmp_path / "missing.png"])
    assert exc.value.code == 2 and capsys.readouterr().err.strip().endswith("missing.png: no such image file")


@pytest.mark.parametrize("kwargs", [dict(), dict(reg_tokens=2, no_embed_class=True), dict(dynamic_img_size=True),
                                    dict(in_chans=13, class_token=False, global_pool="avg")])
def test_projecting_only_the_visible_patches_equals_the_convolution_over_every_patch(kwargs):
    """encode_visible projects the visible patches alone (one matmul on their pixels); the reference is the
    encoder's own path: its convolutional patch embedding over the whole image, then the visible tokens."""
    torch.manual_seed(0)
    enc = tiny_mae(backbone_kwargs=kwargs).model.train()
    x = torch.randn(3, enc.in_chans, 16, 16)
    ids_keep, _, _ = random_masking(mask_noise(0, "train", 0, 0, 3, 16), 0.75)
    got = encode_visible(enc, x, ids_keep)
    got.sum().backward()
    grad = enc.patch_embed.proj.weight.grad.clone()
    enc.zero_grad()
    x_full = enc._pos_embed(enc.patch_embed(x))
    P = enc.num_prefix_tokens
    D = x_full.shape[-1]
    seq = torch.cat([x_full[:, :P], torch.gather(x_full[:, P:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))], 1)
    want = final_norm(enc)(enc._run_blocks(enc.norm_pre(seq))[0])
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, enc.patch_embed.proj.weight.grad, rtol=1e-4, atol=1e-5)
