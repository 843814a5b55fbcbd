"""The attributes and methods of timm's VisionTransformer that other libraries read, for vitmha's encoder.

timm.data's ``resolve_data_config``, segmentation libraries' timm encoders, Hugging Face's timm wrapper,
optimiser factories and timm's own scripts use ``pretrained_cfg`` / ``default_cfg``, ``get_classifier``,
``reset_classifier``, ``group_matcher``, ``no_weight_decay``, ``prune_intermediate_layers``,
``get_intermediate_layers`` and ``set_input_size``; :class:`TimmModelAPI` gives vitmha's VisionTransformer
each of them with timm's arguments and results (``forward_intermediates``, ``forward_head(pre_logits=)``,
``set_grad_checkpointing``, ``feature_info``, ``num_features``, ``head_hidden_size`` and
``num_prefix_tokens`` live on the model itself). timm's own tests/test_models.py runs against it:
tests/test_timm_suite.py, benchmarks/timm_suite.md.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from vitmha.models.layers import Size2, to_2tuple

#: parameters that AdamW should not decay, by timm's names (tokens and position embeddings)
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "dist_token", "reg_token", "attn_pool.latent")
#: the parameters before the first block (layer id 0 for layer-wise lr decay; timm's "stem")
STEM = ("patch_embed", "cls_token", "dist_token", "reg_token", "pos_embed", "norm_pre")


class DefaultCfgAlias:
    """``default_cfg``, timm's older name of ``pretrained_cfg`` (the same dict), for any model that has one."""

    # TorchScript compiles a scripted module's properties; this one is Python-side bookkeeping only
    __jit_unused_properties__ = ["default_cfg"]

    @property
    def default_cfg(self) -> Dict[str, Any]:
        """timm's older name of ``pretrained_cfg`` (the same dict)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: Dict[str, Any]) -> None:
        self.pretrained_cfg = cfg


class TimmModelAPI(DefaultCfgAlias):
    """timm's model interface on top of a VisionTransformer (a mixin: it reads the model's modules)."""

    __jit_unused_properties__ = ["default_cfg", "num_layer_ids"]

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Parameter names that AdamW should not decay (tokens and position embeddings) that this model has."""
        return {n for n, _ in self.named_parameters() if n in NO_WEIGHT_DECAY}

    @property
    def num_layer_ids(self) -> int:
        """Depths that :meth:`param_layer_id` gives: embeddings, every block, what comes after."""
        return len(self.blocks) + 2

    def param_layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 embeddings, i+1 for blocks.i, depth+1 after."""
        if name.startswith(STEM):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups by regular expression (for its layer-decay optimiser factory): the stem,
        then one group per block, the final norm with the last block."""
        return dict(stem=r"^cls_token|dist_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> Union[nn.Module, Tuple[nn.Module, nn.Module]]:
        """The classifier ``head`` (a distilled model: ``(head, head_dist)``, as timm's)."""
        return self.head if self.head_dist is None else (self.head, self.head_dist)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh zero-initialised head of ``num_classes`` outputs (0: none), and optionally another pooling.

        As timm's: switching away from 'map' drops the attention pooling; switching to it, or 'token' without
        a class token, is a ValueError; a distilled model keeps 'token' pooling and resets both heads."""
        device = self.patch_embed.proj.weight.device
        if global_pool is not None:
            if self.head_dist is not None:
                if global_pool not in ("", "token"):
                    raise ValueError(f"global_pool={global_pool!r}: a distilled model reads the class and "
                                     "distillation tokens ('token' pooling)")
            elif global_pool not in ("", "token", "avg", "max", "avgmax", "map"):
                raise ValueError(f"global_pool={global_pool!r}: expected '', 'token', 'avg', 'max', 'avgmax' "
                                 "or 'map'")
            elif global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs the class token, which this model has not")
            elif global_pool == "map" and self.attn_pool is None:
                raise ValueError("global_pool='map' needs attention pooling, which reset_classifier cannot add: "
                                 "build the model with global_pool='map'")
            else:
                if global_pool != "map":
                    self.attn_pool = None
                self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = self._new_head(num_classes, device)
        if self.head_dist is not None:
            self.head_dist = self._new_head(num_classes, device)

    def _new_head(self, num_classes: int, device: torch.device) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.embed_dim, num_classes, device=device)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int], None] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what ``forward_intermediates(indices=...)`` never uses (timm's): the blocks after the last one
        taken, with ``prune_norm`` the final norm, with ``prune_head`` the pooling, fc_norm and head.
        Returns the block indices taken."""
        take = self._resolve_indices(indices)
        self.blocks = self.blocks[:max(take) + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take

    def get_intermediate_layers(self, x: torch.Tensor, n: Union[int, Sequence[int]] = 1, reshape: bool = False,
                                return_prefix_tokens: bool = False, norm: bool = False,
                                attn_mask: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """DINO's interface (as timm's): the last ``n`` blocks' (or blocks ``n``'s) tokens, NCHW maps with
        ``reshape``."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True,
                                          attn_mask=attn_mask)

    def set_input_size(self, img_size: Optional[Size2] = None, patch_size: Optional[Size2] = None) -> None:
        """Lay the model out for another input size and/or patch size, as timm's: the position embedding is
        resampled to the new grid and the patch kernel to the new patch size (FlexiViT's pseudo-inverse
        resize, timm's ``resample_patch_embed``)."""
        from timm.layers import resample_patch_embed

        from vitmha.models.resample import resample_pos_embed

        pe = self.patch_embed
        prev_grid = pe.grid_size
        if patch_size is not None and to_2tuple(patch_size) != pe.patch_size:
            new = to_2tuple(patch_size)
            old = pe.proj
            proj = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=new, stride=new,
                             bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                proj.weight.copy_(resample_patch_embed(old.weight, list(new)))
                if old.bias is not None:
                    proj.bias.copy_(old.bias)
            proj.requires_grad_(old.weight.requires_grad)
            pe.proj, pe.patch_size = proj, new
        pe.set_img_size(img_size if img_size is not None else pe.img_size)
        if self.pos_embed is not None and pe.grid_size != prev_grid:
            n_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            with torch.no_grad():
                resampled = resample_pos_embed(self.pos_embed, list(pe.grid_size), list(prev_grid), n_prefix)
            self.pos_embed = nn.Parameter(resampled, requires_grad=self.pos_embed.requires_grad)
        reduction = pe.feat_ratio()
        for info in self.feature_info:
            info["reduction"] = reduction
        self.pretrained_cfg = {**self.pretrained_cfg,
                               "input_size": (self.pretrained_cfg["input_size"][0], *pe.img_size)}
