"""The Vision Transformer encoder: patch embedding -> prefix tokens + position embedding -> pre-norm blocks
-> final norm -> pooling -> head.

Argument and module names follow timm's `VisionTransformer`, so `create_backbone` can pass timm's
overrides through and timm checkpoints load key for key.
"""
# no `from __future__ import annotations`: torch.fx writes the forward's annotations into the code it
# generates, and TorchScript then reads them, so they must be real types
from functools import partial
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitmha.models.attention import Attention, AttentionPool
from vitmha.models.compat import TimmModelAPI
from vitmha.models.layers import (DropPath, GluMlp, LayerScale, Mlp, PatchDropout, PatchEmbed, Size2, SwiGLU,
                                  lecun_normal_, make_norm, mlp_hidden, to_2tuple, trunc_normal_)
from vitmha.models.resample import resample_pos_embed

# a leaf under torch.fx in this module too (the grid is a value only when the model runs)
torch.fx.wrap("resample_pos_embed")


#: timm's MLP variants by name: the feed-forward part of a block
MLP_LAYERS = {
    "mlp": Mlp,
    "swiglu": SwiGLU,                                # separate gate and value projections
    "swiglu_packed": partial(GluMlp, gate_last=False),  # one fc1 holding [value, gate]
    "glu": partial(GluMlp, gate_last=False),
    "glu_gate_last": partial(GluMlp, gate_last=True),
}


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each with LayerScale and DropPath."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_hidden_dim: int,
        mlp_layer: str = "mlp",
        act_layer: str = "gelu",
        norm_layer,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        scale_attn_norm: bool = False,
        scale_mlp_norm: bool = False,
        proj_bias: bool = True,
        init_values: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        if mlp_layer not in MLP_LAYERS:
            raise ValueError(f"unknown mlp_layer {mlp_layer!r}; expected one of {sorted(MLP_LAYERS)}")
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_attn_norm,
                              proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                              norm_layer=norm_layer, fused=fused_attn)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        glu = mlp_layer.startswith("glu") or mlp_layer == "swiglu_packed"   # the gated half is normed
        mlp_norm = norm_layer(mlp_hidden_dim // 2 if glu else mlp_hidden_dim) if scale_mlp_norm else None
        self.mlp = MLP_LAYERS[mlp_layer](dim, mlp_hidden_dim, act=act_layer, bias=proj_bias, drop=proj_drop,
                                         norm=mlp_norm)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_with_attn(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(output, attention probabilities (B, heads, N, N)): the same block on the explicit attention path."""
        y, attn = self.attn(self.norm1(x), attn_mask=attn_mask, return_attn=True)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), attn


class ResPostBlock(Block):
    """Res-post-norm block (Swin-V2 style, timm's ResPostBlock): x + norm(f(x)) instead of x + f(norm(x));
    ``init_values`` initialises the norm scales instead of a LayerScale."""

    def __init__(self, dim: int, num_heads: int, *, init_values: Optional[float] = None, **kwargs) -> None:
        super().__init__(dim, num_heads, init_values=None, **kwargs)
        if init_values is not None:
            nn.init.constant_(self.norm1.weight, init_values)
            nn.init.constant_(self.norm2.weight, init_values)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.norm1(self.attn(x, attn_mask=attn_mask)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))

    def forward_with_attn(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn(x, attn_mask=attn_mask, return_attn=True)
        x = x + self.drop_path1(self.norm1(y))
        return x + self.drop_path2(self.norm2(self.mlp(x))), attn


def default_pretrained_cfg(in_chans: int, img_size: Size2, num_classes: int, dynamic: bool,
                           distilled: bool) -> Dict[str, Any]:
    """The pretrained config of a model built without one (timm's ViT defaults, ImageNet mean/std)."""
    return dict(input_size=(in_chans, *to_2tuple(img_size)), fixed_input_size=not dynamic,
                mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD), crop_pct=0.9,
                crop_mode="center", interpolation="bicubic", num_classes=num_classes, pool_size=None,
                first_conv="patch_embed.proj", classifier=("head", "head_dist") if distilled else "head")


class VisionTransformer(TimmModelAPI, nn.Module):
    """Vision Transformer (Dosovitskiy et al., 2021) with the variations timm's ViT families use.

    (B, in_chans, H, W) -> logits (B, num_classes), or pooled features (B, embed_dim) when num_classes=0.
    It has timm's attributes and methods besides (``pretrained_cfg``, ``get_classifier``, ``reset_classifier``,
    ``forward_intermediates``, ...: :class:`vitmha.models.compat.TimmModelAPI`), so code written for timm's ViT
    takes it, and TorchScript and torch.fx take its forward.

    Args:
        img_size: input size the position embedding is laid out for (int or (H, W)).
        patch_size: side of the square (or (h, w)) patches.
        in_chans: image channels.
        num_classes: classifier outputs; 0 for no head.
        global_pool: '' (none), 'token' (class token), 'avg', 'max', 'avgmax', or 'map' (attention pooling).
        embed_dim: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads per block; head width is embed_dim / num_heads.
        mlp_ratio: MLP hidden width over embed_dim.
        qkv_bias: bias on the fused qkv projection.
        qk_norm: normalise queries and keys per head before the dot product.
        scale_attn_norm: norm on the attention output before its projection.
        scale_mlp_norm: norm inside the MLP before fc2.
        proj_bias: bias on the attention output projection and the MLP layers.
        init_values: LayerScale initial value; None disables LayerScale.
        class_token: prepend a learned class token.
        reg_tokens: number of register tokens after the class token.
        no_embed_class: position embedding covers patches only (prefix tokens get none).
        pos_embed: 'learn' (learned absolute) or 'none'.
        pre_norm: norm after the embeddings, before the blocks (CLIP's ln_pre).
        final_norm: apply the final norm (before pooling, or after it as fc_norm).
        fc_norm: norm after pooling instead of before; None = on for avg/max pooling.
        pool_include_prefix: average over prefix tokens as well.
        dynamic_img_size: accept any input size, resampling the position embedding on the fly.
        dynamic_img_pad: pad inputs up to a multiple of the patch size (with dynamic_img_size).
        drop_rate: dropout before the head.
        pos_drop_rate: dropout after adding the position embedding.
        patch_drop_rate: share of the patch tokens dropped at random per sample while training (PatchDropout;
            classification forward only: ``forward_intermediates`` and segmentation keep every token).
        proj_drop_rate: dropout after attention/MLP projections.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth, growing linearly to this value over the blocks.
        patch_bias: bias in the patch projection; None = not pre_norm (as CLIP).
        patch_norm: norm the patch tokens inside the patch embedding.
        norm_layer: 'layernorm' or 'rmsnorm'.
        norm_eps: epsilon of every norm.
        norm_bias: LayerNorm with bias.
        act_layer: MLP activation: gelu, gelu_tanh, quick_gelu, silu, relu.
        mlp_layer: mlp, swiglu (separate gate), swiglu_packed / glu (packed gate first), glu_gate_last.
        attn_pool_heads: heads of the 'map' pooling; None = num_heads.
        attn_pool_mlp_ratio: MLP ratio of the 'map' pooling; None = mlp_ratio.
        attn_pool_latent_len: latent queries of the 'map' pooling.
        attn_pool_act: activation in the 'map' pooling MLP; None = act_layer.
        fused_attn: use F.scaled_dot_product_attention (False: explicit softmax path, same numbers).
        res_post_norm: blocks norm the branch output (x + norm(f(x))) instead of its input.
        distilled: DeiT's distillation token (``dist_token``, after the class token) and second head
            (``head_dist``) on it, in timm's layout; the output is the mean of the two heads, or both
            ``(x, x_dist)`` while training after ``set_distilled_training(True)``. Needs 'token' pooling.
        weight_init: 'timm' (trunc-normal 0.02 linears) or 'jax' (xavier / lecun as big_vision).
    """

    def __init__(
        self,
        *,
        img_size: Size2 = 224,
        patch_size: Size2 = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: Literal["", "token", "avg", "max", "avgmax", "map"] = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        scale_attn_norm: bool = False,
        scale_mlp_norm: bool = False,
        proj_bias: bool = True,
        init_values: Optional[float] = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        pos_embed: str = "learn",
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: Optional[bool] = None,
        pool_include_prefix: bool = False,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        patch_bias: Optional[bool] = None,
        patch_norm: bool = False,
        norm_layer: str = "layernorm",
        norm_eps: float = 1e-6,
        norm_bias: bool = True,
        act_layer: str = "gelu",
        mlp_layer: str = "mlp",
        attn_pool_heads: Optional[int] = None,
        attn_pool_mlp_ratio: Optional[float] = None,
        attn_pool_latent_len: int = 1,
        attn_pool_act: Optional[str] = None,
        fused_attn: bool = True,
        res_post_norm: bool = False,
        distilled: bool = False,
        weight_init: str = "timm",
    ) -> None:
        super().__init__()
        if global_pool not in ("", "token", "avg", "max", "avgmax", "map"):
            raise ValueError(f"global_pool={global_pool!r}: expected '', 'token', 'avg', 'max', 'avgmax' or 'map'")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if pos_embed not in ("learn", "none", ""):
            raise ValueError(f"pos_embed={pos_embed!r}: expected 'learn' or 'none'")
        if distilled and (global_pool != "token" or reg_tokens):
            raise ValueError("distilled=True (DeiT's distillation token) needs global_pool='token' and no "
                             f"register tokens; got global_pool={global_pool!r}, reg_tokens={reg_tokens}")
        use_fc_norm = global_pool in ("avg", "max", "avgmax") if fc_norm is None else fc_norm
        norm = partial(make_norm, norm_layer, eps=norm_eps, bias=norm_bias)

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.has_class_token = class_token
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + int(distilled) + reg_tokens
        self.no_embed_class = no_embed_class
        self.pool_include_prefix = pool_include_prefix
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.distilled_training = False
        self.pretrained_cfg: Dict[str, Any] = default_pretrained_cfg(in_chans, img_size, num_classes,
                                                                     dynamic_img_size, distilled)

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            bias=(not pre_norm) if patch_bias is None else patch_bias,
            norm=norm(embed_dim) if patch_norm else None,
            dynamic=dynamic_img_size, dynamic_pad=dynamic_img_pad)
        n_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = n_patches if no_embed_class else n_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim)) if pos_embed == "learn" else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None   # timm's key order
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.patch_drop = (PatchDropout(patch_drop_rate, self.num_prefix_tokens) if patch_drop_rate > 0
                           else nn.Identity())
        self.norm_pre = norm(embed_dim) if pre_norm else nn.Identity()

        hidden = mlp_hidden(embed_dim, mlp_ratio)
        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        block = ResPostBlock if res_post_norm else Block
        self.blocks = nn.Sequential(*[
            block(embed_dim, num_heads, mlp_hidden_dim=hidden, mlp_layer=mlp_layer, act_layer=act_layer,
                  norm_layer=norm, qkv_bias=qkv_bias, qk_norm=qk_norm, scale_attn_norm=scale_attn_norm,
                  scale_mlp_norm=scale_mlp_norm, proj_bias=proj_bias, init_values=init_values,
                  attn_drop=attn_drop_rate, proj_drop=proj_drop_rate, drop_path=dpr[i], fused_attn=fused_attn)
            for i in range(depth)])
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction)
                             for i in range(depth)]
        self.norm = norm(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        if global_pool == "map":
            self.attn_pool = AttentionPool(
                embed_dim, attn_pool_heads or num_heads,
                mlp_hidden=mlp_hidden(embed_dim, attn_pool_mlp_ratio or mlp_ratio),
                latent_len=attn_pool_latent_len, norm_layer=norm, act=attn_pool_act or act_layer, fused=fused_attn)
        else:
            self.attn_pool = None
        self.fc_norm = norm(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = ((nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity())
                          if distilled else None)
        self.init_weights(weight_init)

    # ------------------------------------------------------------------ init / bookkeeping
    def init_weights(self, mode: str = "timm") -> None:
        """Random init as timm's: 'timm' = trunc-normal(0.02) linears, PyTorch's default patch conv;
        'jax' = xavier-uniform linears, lecun-normal patch conv, zero heads. Tokens near zero in both (the
        distillation token trunc-normal(0.02), as timm's)."""
        if mode not in ("timm", "jax"):
            raise ValueError(f"weight_init={mode!r}: expected 'timm' or 'jax'")
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        for tok in (self.cls_token, self.reg_token):
            if tok is not None:
                nn.init.normal_(tok, std=1e-6)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if mode == "jax":
                    nn.init.zeros_(m.weight) if name in ("head", "head_dist") else nn.init.xavier_uniform_(m.weight)
                else:
                    trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and mode == "jax":
                lecun_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of keeping its activations (training only)."""
        self.grad_checkpointing = enable

    def set_fused_attn(self, enable: bool = True) -> None:
        """Switch every attention between the fused and the explicit path (same numbers)."""
        for m in self.modules():
            if isinstance(m, (Attention, AttentionPool)):
                m.fused = enable

    def set_distilled_training(self, enable: bool = True) -> None:
        """A distilled model (``distilled=True``) returns both heads' logits ``(x, x_dist)`` while training,
        for a distillation loss on each (timm's switch); otherwise, and always in eval, their mean."""
        if self.head_dist is None:
            raise ValueError("set_distilled_training: this model has no distillation token (distilled=False)")
        self.distilled_training = enable

    # ------------------------------------------------------------------ forward
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D), or the grid (B, h, w, D) with dynamic_img_size -> (B, prefix + N, D) with
        the position embedding."""
        B = x.shape[0]
        prefix: List[torch.Tensor] = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(B, -1, -1))
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        pos_embed = self.pos_embed
        if self.dynamic_img_size:                                        # (B, h, w, D): resample to the grid
            h, w = x.shape[1], x.shape[2]
            if pos_embed is not None:
                pos_embed = resample_pos_embed(
                    pos_embed, [h, w], list(self.patch_embed.grid_size),
                    num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens)
            x = x.reshape(B, h * w, -1)
        if pos_embed is None:
            return torch.cat(prefix + [x], dim=1)
        if self.no_embed_class:
            x = torch.cat(prefix + [x + pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos_embed
        return self.pos_drop(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self._pos_embed(self.patch_embed(x)))

    def _run_blocks(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, take: Sequence[int] = (),
                    last: Optional[int] = None, attention: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The one block loop: embedded tokens through blocks 0..``last`` (default all). Returns the last
        block's output and, for the blocks in ``take``, their outputs, or with ``attention`` their attention
        probabilities (those blocks then run the explicit attention path)."""
        out = []
        run = self.blocks[:len(self.blocks) if last is None else last + 1]
        for i, blk in enumerate(run):
            if attention and i in take:
                x, attn = blk.forward_with_attn(x, attn_mask)
                out.append(attn)
                continue
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, attn_mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask)
            if i in take:
                out.append(x)
        return x, out

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + N, D): every token after the final norm. ``attn_mask`` as
        ``F.scaled_dot_product_attention``'s; ``is_causal`` lets each token attend to itself and earlier ones."""
        x = self._pos_embed(self.patch_embed(x))
        if not torch.jit.is_scripting():
            if attn_mask is not None and self.training and not isinstance(self.patch_drop, nn.Identity):
                raise ValueError("patch_drop_rate > 0 drops tokens while training; it cannot take an attn_mask")
        x = self.norm_pre(self.patch_drop(x))
        attn_mask = causal_mask(x, attn_mask, is_causal)
        if torch.jit.is_scripting():
            for blk in self.blocks:
                x = blk(x, attn_mask)
        else:
            x, _ = self._run_blocks(x, attn_mask)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """(B, prefix + N, D) -> (B, D) by the configured pooling."""
        if self.attn_pool is not None:
            return self.attn_pool(x if self.pool_include_prefix else x[:, self.num_prefix_tokens:])
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        x = x if self.pool_include_prefix else x[:, self.num_prefix_tokens:]
        if pool_type == "avg":
            return x.mean(1)
        if pool_type == "max":
            return x.amax(1)
        return 0.5 * (x.amax(1) + x.mean(1))                             # avgmax

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> pooled features (pre_logits) or logits. A distilled model: the mean of the class and
        distillation tokens' (pre_logits) or of their heads' outputs; ``(x, x_dist)`` while training after
        ``set_distilled_training(True)``."""
        if self.head_dist is not None:
            x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
            if pre_logits:
                return (x + x_dist) / 2
            x, x_dist = self.head(x), self.head_dist(x_dist)
            if not torch.jit.is_scripting():  # one return type under TorchScript: the mean
                if self.distilled_training and self.training:
                    return x, x_dist
            return (x + x_dist) / 2
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes), or pooled features when num_classes=0."""
        return self.forward_head(self.forward_features(x, attn_mask, is_causal))

    def _resolve_indices(self, indices: Union[int, Sequence[int], None]) -> List[int]:
        depth = len(self.blocks)
        if indices is None:
            return list(range(depth))
        if isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"indices={indices}: asked for the last {indices} of {depth} blocks")
            return list(range(depth - indices, depth))
        out = []
        for i in indices:
            j = i + depth if i < 0 else i
            if not 0 <= j < depth:
                raise ValueError(f"block index {i} is out of range for a model of depth {depth}")
            out.append(j)
        return out

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Union[int, Sequence[int], None] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ):
        """Outputs of chosen blocks, as (B, D, h, w) maps ('NCHW') or (B, N, D) tokens ('NLC'); timm's
        arguments and returns.

        `indices`: an int n takes the last n blocks, a list takes those blocks (negative counts from the end),
        None every block. Returns the list, or (final normed tokens, list) unless `intermediates_only`; with
        `return_prefix_tokens` each entry is (map, prefix tokens). `output_dict`: {'image_intermediates': list,
        'image_features': final tokens (unless `intermediates_only`), 'image_intermediates_prefix': prefix
        tokens (with `return_prefix_tokens`)}. Every token is kept (no patch dropout).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}: expected 'NCHW' or 'NLC'")
        take = self._resolve_indices(indices)
        h, w = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        B = x.shape[0]
        last = max(take) if (stop_early or intermediates_only) else None
        x = self._embed(x)
        attn_mask = causal_mask(x, attn_mask, is_causal)
        x, feats = self._run_blocks(x, attn_mask, take, last)
        feats = [self.norm(f) for f in feats] if norm else feats
        prefix = [f[:, :self.num_prefix_tokens] for f in feats]
        feats = [f[:, self.num_prefix_tokens:] for f in feats]
        if output_fmt == "NCHW":
            feats = [f.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for f in feats]
        if output_dict:
            out: Dict[str, Any] = {"image_intermediates": feats}
            if return_prefix_tokens and self.num_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens:
            feats = list(zip(feats, prefix))
        if intermediates_only:
            return feats
        return self.norm(x), feats

    @torch.no_grad()
    def forward_attention(self, x: torch.Tensor, indices: Union[int, Sequence[int], None] = None,
                          attn_mask: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Attention probabilities (B, heads, N, N) of the chosen blocks, N including prefix tokens.

        Runs this same model, taking the explicit attention path only in the chosen blocks.
        """
        take = self._resolve_indices([-1] if indices is None else indices)
        _, maps = self._run_blocks(self._embed(x), attn_mask, take, max(take), attention=True)
        return maps


@torch.fx.wrap  # a leaf under torch.fx: whether there is a mask is known only when the model runs
def causal_mask(x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> Optional[torch.Tensor]:
    """``attn_mask``, or with ``is_causal`` the (N, N) bool mask that lets token i of ``x`` (B, N, D) attend to
    tokens 0..i, combined with ``attn_mask`` (bool: both must allow; float: -inf where causality forbids)."""
    if not is_causal:
        return attn_mask
    n = x.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))
