"""Self-supervised pre-training: a masked autoencoder (MAE, He et al. 2022) on any vitmha backbone.

The encoder (``self.model``, a plain vitmha ViT without a head) sees only the patches left visible; a light
decoder (``self.decoder``) predicts the pixels of the masked ones, and the loss is their mean squared error.
No labels are read: a batch is an image tensor or an ``(images, targets)`` pair, so every image data module
feeds it (:class:`~vitmha.data.UnlabeledFolderDataModule` for a folder of images without classes). The result
is a backbone: ``encoder.safetensors`` in timm's key layout, written into the run folder at the end of fit
(``vitmha export --format safetensors`` writes the same from any checkpoint), for ``pretrained:`` in every task.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn

from vitmha.heads.mae import (MaeDecoder, default_decoder_heads, encode_visible, mask_noise, masked_loss,
                              normalize_patches, num_visible, patchify, random_masking, token_grid, unpatchify)
from vitmha.tasks.base import BackboneTask, TaskConfigError, batch_images

#: backbone_kwargs a masked autoencoder cannot take: they drop or merge tokens inside the encoder
TOKEN_DROPPING = ("patch_drop_rate", "tome_r")
#: backbone_kwargs that only affect how the encoder was built or trained, not what a fine-tune must rebuild
BUILD_ONLY = ("weight_init", "fused_attn", "drop_path_rate", "tome_r", "patch_drop_rate")


class MaskedAutoencoder(BackboneTask):
    """Masked autoencoding: ``forward(x)`` (B, C, H, W) -> the encoder's pooled features (B, D).

    Each image gets its own random mask; the draws are keyed by (seed, epoch, batch index, rank, position in the
    batch), so a run resumed in the middle of an epoch masks exactly as one that never stopped, on any device.
    Validation masks are keyed by the batch alone: the same every epoch, so ``val/loss`` is comparable across
    epochs. Logs ``train/loss``, ``train/lr``, ``val/loss`` (and ``test/loss``). Every option of
    :class:`~vitmha.tasks.base.BackboneTask` applies too (with MAE's ``betas`` and ``warmup_epochs`` as defaults;
    ``pretrained`` continues pre-training from those weights); ``ema_decay`` keeps an EMA of the encoder, which
    then validates and is exported.

    Args:
        mask_ratio: share of the patches masked per image (MAE: 0.75); at least one patch stays visible.
        decoder_dim: decoder width; None = half the encoder's width in multiples of 32, from 32 to 512 (ViT-Ti
            96, ViT-S 192, ViT-B 384, ViT-L 512: MAE's is 512, half of ViT-L's; its Table 1b fine-tunes as well
            with 128 as with 512). A decoder as wide as a small encoder would cost more than the encoder saves.
        decoder_depth: decoder blocks. MAE's fine-tuning accuracy is the same from 2 to 8 blocks (its
            Table 1a: 84.9 %); linear probing improves with depth (MAE's default 8, for probing).
        decoder_heads: decoder attention heads; None = about one per 32 channels (MAE: 16 for 512).
        decoder_pos_embed: ``sincos`` (fixed 2-D sine-cosine, MAE's) or ``learned``.
        norm_pix_loss: predict each patch normalised by its own mean and standard deviation (MAE's recipe,
            +0.5 fine-tuning accuracy in its Table 1d); False = the normalised pixels themselves.
        base_lr: with ``lr`` None the peak lr is ``base_lr * effective batch / 256`` (MAE's rule; the effective
            batch is batch size x devices x gradient accumulation), printed when fit starts.
        reconstruct_every_n_epochs: write ``reconstructions/epoch_NNNN.png`` (original | masked | reconstruction)
            into the run folder every N epochs (and to TensorBoard); 0 = off.
        reconstruct_images: images in each such figure (the first validation batch's, else the first
            training batch's).
        betas: AdamW's moment decays (MAE: 0.9, 0.95).
        warmup_epochs: linear warm-up (MAE: 40 of 800 epochs; at most half of any run).
        num_classes: the classes of labelled data, when the data has them (the CLI links it from the data
            module, as for every task); pre-training reads no labels and does not use it.
    """

    task = "pretraining"
    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(self, *, mask_ratio: float = 0.75, decoder_dim: Optional[int] = None, decoder_depth: int = 2,
                 decoder_heads: Optional[int] = None, decoder_pos_embed: str = "sincos", norm_pix_loss: bool = True,
                 base_lr: float = 1.5e-4, reconstruct_every_n_epochs: int = 0, reconstruct_images: int = 8,
                 betas: Tuple[float, float] = (0.9, 0.95), warmup_epochs: float = 40.0, num_classes: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(betas=betas, warmup_epochs=warmup_epochs, **kwargs)
        if not 0.0 <= mask_ratio < 1.0:
            raise TaskConfigError(f"mask_ratio: expected a share in [0, 1), got {mask_ratio}")
        if decoder_pos_embed not in ("sincos", "learned"):
            raise TaskConfigError(f"decoder_pos_embed: expected 'sincos' or 'learned', got {decoder_pos_embed!r}")
        if decoder_depth < 0 or reconstruct_every_n_epochs < 0 or reconstruct_images < 1:
            raise TaskConfigError("decoder_depth and reconstruct_every_n_epochs must be >= 0, reconstruct_images >= 1; "
                                  f"got {decoder_depth}, {reconstruct_every_n_epochs}, {reconstruct_images}")
        if base_lr <= 0:
            raise TaskConfigError(f"base_lr: must be > 0, got {base_lr}")
        dropping = [k for k in TOKEN_DROPPING if (self.hparams.backbone_kwargs or {}).get(k)]
        if dropping:
            raise TaskConfigError(f"backbone_kwargs.{dropping[0]}: a masked autoencoder chooses the encoder's tokens "
                                  "itself (mask_ratio); remove it for pre-training")
        self.model = self.build_backbone(num_classes=0)
        if not hasattr(self.model, "patch_embed") or not hasattr(self.model, "_pos_embed"):
            raise TaskConfigError(f"backbone: {self.hparams.backbone} with these backbone_kwargs is not a plain "
                                  "VisionTransformer (features_only is not for pre-training)")
        enc = self.model
        grid = tuple(enc.patch_embed.grid_size)
        if num_visible(grid[0] * grid[1], mask_ratio) < 1:
            raise TaskConfigError(f"mask_ratio: {mask_ratio} leaves no visible patch of {grid[0] * grid[1]}")
        dim = int(decoder_dim) if decoder_dim is not None else default_decoder_dim(enc.embed_dim)
        heads = int(decoder_heads) if decoder_heads is not None else default_decoder_heads(dim)
        if dim < 1 or dim % heads or (decoder_pos_embed == "sincos" and dim % 4):
            raise TaskConfigError(f"decoder_dim: {dim} must be divisible by decoder_heads ({heads})"
                                  + (" and by 4 (sin-cos position embedding)" if decoder_pos_embed == "sincos" else ""))
        ph, pw = enc.patch_embed.patch_size
        self.decoder = MaeDecoder(encoder_dim=enc.embed_dim, patch_dim=ph * pw * enc.in_chans, grid=grid,
                                  num_prefix_tokens=enc.num_prefix_tokens, dim=dim, depth=int(decoder_depth),
                                  num_heads=heads, pos_embed=decoder_pos_embed)
        self.attach_ema()
        self._resolved_lr: Optional[float] = None
        self._figure_images: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------- the model
    def head_modules(self) -> List[nn.Module]:
        return [self.decoder]

    def noise(self, stream: str, epoch: int, batch_idx: int, images: torch.Tensor) -> torch.Tensor:
        """(B, N) keyed uniforms that decide the masks of a batch (see :func:`vitmha.heads.mae.mask_noise`)."""
        from vitmha.data.sampling import resolve_seed

        h, w = token_grid(self.model, images)
        rank = self.global_rank if self._trainer is not None else 0
        return mask_noise(resolve_seed(None), stream, epoch, batch_idx, images.shape[0], h * w, rank).to(images.device)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, ph*pw*C): what the decoder predicts, per patch (normalised per patch with ``norm_pix_loss``)."""
        target = patchify(images, self.model.patch_embed.patch_size)
        return normalize_patches(target)[0] if self.hparams.norm_pix_loss else target

    def masked_forward(self, encoder: nn.Module, images: torch.Tensor, noise: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, prediction (B, N, ph*pw*C), mask (B, N), 1 = masked) of ``images`` masked by ``noise`` (B, N)."""
        grid = token_grid(encoder, images)
        ids_keep, mask, ids_restore = random_masking(noise, float(self.hparams.mask_ratio))
        pred = self.decoder(encode_visible(encoder, images, ids_keep), ids_restore, grid)
        return masked_loss(pred, self.targets(images), mask), pred, mask

    # ----------------------------------------------------------------- steps
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        x = batch_images(batch)
        if self._figure_images is None and self.hparams.reconstruct_every_n_epochs:
            self._figure_images = x[: self.hparams.reconstruct_images].detach().cpu()
        noise = self.noise("train", self.current_epoch, batch_idx, x)
        loss = self.check_loss(self.masked_forward(self.model, x, noise)[0])
        if loss is None:
            return None
        self.log_train(loss, x.shape[0])
        return loss

    def _eval_step(self, batch: Any, batch_idx: int, stage: str) -> torch.Tensor:
        x = batch_images(batch)
        loss = self.masked_forward(self.inference_model, x, self.noise("val", 0, batch_idx, x))[0]
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch_images(batch)
        if batch_idx == 0 and self.hparams.reconstruct_every_n_epochs:
            self._figure_images = x[: self.hparams.reconstruct_images].detach().cpu()
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """The encoder's pooled features (B, D) of every image (all patches visible)."""
        return self(batch_images(batch))

    # ----------------------------------------------------------------- optimisation
    @property
    def learning_rate(self) -> float:
        hp = self.hparams
        if hp.lr is not None:
            return float(hp.lr)
        if self._resolved_lr is None:
            batch = self.effective_batch_size()
            self._resolved_lr = float(hp.base_lr) * batch / 256
            rank_zero_only(print)(f"MaskedAutoencoder: lr = base_lr {hp.base_lr:g} x effective batch {batch} / 256 "
                                  f"= {self._resolved_lr:.3g}", flush=True)
        return self._resolved_lr

    def effective_batch_size(self) -> int:
        """Images per optimizer step over every device: batch size x devices x gradient accumulation (256 when
        no trainer is attached)."""
        if self._trainer is None:
            return 256
        trainer = self.trainer
        trainer.estimated_stepping_batches  # noqa: B018 - sets up the train dataloader if it is not yet
        loader = trainer.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        size = getattr(loader, "batch_size", None) or getattr(sampler, "batch_size", None)
        if size is None:
            size = (getattr(trainer.datamodule, "hparams", None) or {}).get("batch_size")
        if size is None:
            raise TaskConfigError("lr: cannot tell the batch size from the train dataloader for MAE's rule "
                                  "(base_lr x batch / 256); set lr")
        return int(size) * int(trainer.world_size) * int(trainer.accumulate_grad_batches)

    # ----------------------------------------------------------------- results
    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        n = int(self.hparams.reconstruct_every_n_epochs)
        if n and (self.current_epoch + 1) % n == 0 and self._figure_images is not None:
            self.write_figure(run_folder(self.trainer) / "reconstructions" / f"epoch_{self.current_epoch:04d}.png")

    @rank_zero_only
    def write_figure(self, path: Path) -> None:
        """The reconstruction figure of the kept images, written to ``path`` (and to TensorBoard, if logged)."""
        mean, std = data_mean_std(self.trainer.datamodule, self.model.in_chans)
        was_training = self.training
        self.eval()
        with torch.no_grad():
            x = self._figure_images.to(self.device)
            panels = self.reconstruction_panels(x, self.noise("figure", 0, 0, x))
        self.train(was_training)
        figure = save_reconstructions(panels, mean, std, path, title=f"epoch {self.current_epoch}")
        for logger in self.loggers:
            if type(logger).__name__ == "TensorBoardLogger":
                logger.experiment.add_image("reconstructions", figure, self.current_epoch, dataformats="HWC")

    def reconstruction_panels(self, images: torch.Tensor, noise: torch.Tensor
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, masked images, reconstructions, per-image loss): the masked images have their masked
        patches set to the mean (0 after normalisation); the reconstructions are the visible patches as they
        are and the predicted ones in the masked places (``norm_pix_loss`` predictions scaled back with each
        patch's own mean and standard deviation), all (B, C, H, W) in the normalised space of the input."""
        enc = self.inference_model
        patch = enc.patch_embed.patch_size
        grid = token_grid(enc, images)
        _, pred, mask = self.masked_forward(enc, images, noise)
        pixels = patchify(images, patch)
        target = self.targets(images)
        loss = ((pred.float() - target.float()) ** 2).mean(-1).mul(mask).sum(1) / mask.sum(1)
        if self.hparams.norm_pix_loss:
            _, mean, std = normalize_patches(pixels)
            pred = pred * std + mean
        m = mask.unsqueeze(-1).to(pixels.dtype)
        c = images.shape[1]
        masked = unpatchify(pixels * (1 - m), patch, grid, c)
        recon = unpatchify(pred.to(pixels.dtype) * m + pixels * (1 - m), patch, grid, c)
        return images, masked, recon, loss

    def on_fit_end(self) -> None:
        if type(self.trainer.strategy).__name__.startswith("FSDP"):
            rank_zero_only(print)("MaskedAutoencoder: under FSDP the encoder is not written at the end of fit; "
                                  "write it from a checkpoint: vitmha export --checkpoint C --format safetensors "
                                  "--output encoder.safetensors")
            return
        if self.trainer.is_global_zero:
            self.write_encoder(run_folder(self.trainer) / "encoder.safetensors")

    def write_encoder(self, path: Path) -> Path:
        """The encoder (its EMA copy with ``ema_decay``) in timm's key layout at ``path``, written atomically;
        prints the ``pretrained:`` lines that fine-tune from it."""
        from vitmha.models import save_timm_safetensors

        path = save_timm_safetensors(self.inference_model, path)
        kwargs = {k: v for k, v in (self.hparams.backbone_kwargs or {}).items() if k not in BUILD_ONLY}
        print(f"MaskedAutoencoder: wrote the encoder to {path} (timm key layout). Fine-tune from it with\n"
              f"  model.init_args.backbone: {self.hparams.backbone}\n"
              f"  model.init_args.pretrained: {path.resolve()}\n"
              f"  model.init_args.backbone_kwargs: {kwargs}", flush=True)
        return path


def default_decoder_dim(encoder_dim: int) -> int:
    """Half the encoder's width, rounded down to a multiple of 32, within [32, 512]."""
    return int(min(512, max(32, encoder_dim // 2 // 32 * 32)))


def run_folder(trainer: Any) -> Path:
    """The run's folder: its logger's version folder, else ``default_root_dir``."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def data_mean_std(datamodule: Any, channels: int) -> Tuple[Sequence[float], Sequence[float]]:
    """The mean/std the data module normalised with (0 / 1 when it says none), one value per channel."""
    mean = getattr(datamodule, "mean", None)
    std = getattr(datamodule, "std", None)
    if mean is None or std is None:
        return [0.0] * channels, [1.0] * channels
    mean, std = list(np.ravel(mean)), list(np.ravel(std))
    return (mean * channels if len(mean) == 1 else mean), (std * channels if len(std) == 1 else std)


def to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (C, H, W) image -> (H, W, 3) uint8 for display (grey replicated; the first 3 of more bands)."""
    from vitmha.inference import display_rgb

    c = x.shape[0]
    m = torch.as_tensor(mean, dtype=torch.float32)[:c].view(c, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32)[:c].view(c, 1, 1)
    img = (x.detach().float().cpu() * s + m).clamp(0, 1)
    return display_rgb(img.permute(1, 2, 0).numpy())


def save_reconstructions(panels: Tuple[torch.Tensor, ...], mean: Sequence[float], std: Sequence[float],
                         path: os.PathLike, title: str = "") -> np.ndarray:
    """One row per image: original | masked | reconstruction (with its loss on the masked patches), written as
    a PNG at ``path`` (atomically). Returns the three panels of every row side by side, (H', W', 3) uint8."""
    from vitmha.visualize import _pyplot, _save

    images, masked, recon, loss = panels
    rows = [[to_display(t[i], mean, std) for t in (images, masked, recon)] for i in range(images.shape[0])]
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, (name, panel) in enumerate(zip(("original", "masked", "reconstruction"), row)):
            axes[r, c].imshow(panel, interpolation="nearest")
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
        axes[r, 2].text(1.02, 0.5, f"loss {float(loss[r]):.3f}", transform=axes[r, 2].transAxes, fontsize=7,
                        rotation=90, va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()) if title else None)  # room for the title
    _save(fig, path)
    return np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
