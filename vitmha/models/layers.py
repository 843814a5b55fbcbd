"""Small building blocks of the encoder: activations, norms, patch embedding, MLPs, LayerScale, DropPath.

Module and parameter names follow timm's (`patch_embed.proj`, `mlp.fc1`, `ls1.gamma`, ...) so that timm
checkpoints load key for key. Only torch.nn / torch.nn.functional are used.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

Size2 = Union[int, Tuple[int, int]]


def to_2tuple(x: Size2) -> Tuple[int, int]:
    if isinstance(x, (tuple, list)):
        assert len(x) == 2, f"expected an int or a pair, got {x!r}"
        return int(x[0]), int(x[1])
    return int(x), int(x)


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}


def make_act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def make_norm(name: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """`layernorm` or `rmsnorm` over the last dimension."""
    if name == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if name == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm layer {name!r}; expected 'layernorm' or 'rmsnorm'")


@torch.fx.wrap
def check_img_size(H: int, W: int, img_size: Tuple[int, int]) -> None:
    """ValueError unless an input of H x W is the size a fixed-size model was built for (a leaf under torch.fx,
    so a traced model still checks its input)."""
    if H != img_size[0] or W != img_size[1]:
        raise ValueError(f"input image is {H}x{W} but the model was built for {img_size[0]}x{img_size[1]}; "
                         "build it with img_size=(H, W), or dynamic_img_size=True for varying sizes")


@torch.fx.wrap
def check_patch_multiple(H: int, W: int, patch_size: Tuple[int, int]) -> None:
    """ValueError unless H and W are multiples of the patch size (a leaf under torch.fx)."""
    if H % patch_size[0] != 0 or W % patch_size[1] != 0:
        raise ValueError(f"input image {H}x{W} is not a multiple of the patch size {patch_size[0]}x{patch_size[1]}")


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution: (B, C, H, W) -> (B, N, D) or (B, h, w, D).

    With `dynamic=True` any image size whose sides are multiples of the patch size is accepted (or padded
    up to one with `dynamic_pad`) and the output keeps its grid shape so the position embedding can be
    resampled to it. Attributes and methods that other code reads follow timm's PatchEmbed (`img_size`,
    `grid_size`, `num_patches`, `strict_img_size`, `feat_ratio()`, `dynamic_feat_size()`).
    """

    def __init__(
        self,
        *,
        img_size: Optional[Size2] = 224,
        patch_size: Size2 = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        norm: Optional[nn.Module] = None,
        dynamic: bool = False,
        dynamic_pad: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.dynamic = dynamic
        self.dynamic_pad = dynamic_pad
        self.strict_img_size = not dynamic
        self.set_img_size(img_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm if norm is not None else nn.Identity()

    def set_img_size(self, img_size: Optional[Size2]) -> None:
        """The input size the model is laid out for (`img_size`, `grid_size`, `num_patches`)."""
        self.img_size = to_2tuple(img_size) if img_size is not None else None
        self.grid_size = (                    # floor, as timm's: the position embedding's layout
            (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
            if self.img_size is not None else None)
        self.num_patches = self.grid_size[0] * self.grid_size[1] if self.grid_size else None

    def feat_ratio(self, as_scalar: bool = True) -> Union[int, Tuple[int, int]]:
        """The stride of the token grid: the patch size (its larger side with `as_scalar`)."""
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """The token grid (h, w) of an input of `img_size` (H, W): rounded up with `dynamic_pad`, else down."""
        ph, pw = self.patch_size
        if self.dynamic_pad:
            return -(-img_size[0] // ph), -(-img_size[1] // pw)
        return img_size[0] // ph, img_size[1] // pw

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` checked against the layout (or padded up to a patch multiple with ``dynamic_pad``)."""
        H, W = x.shape[-2], x.shape[-1]
        ph, pw = self.patch_size
        if not self.dynamic:
            if self.img_size is not None:
                check_img_size(H, W, self.img_size)
        elif self.dynamic_pad:
            x = F.pad(x, [0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph])
        else:
            check_patch_multiple(H, W, self.patch_size)
        return x

    def forward_patches(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) and patch indices (B, n) in row-major grid order -> the tokens (B, n, D) of those
        patches only: the projection as one matmul on the gathered pixels (the convolution's weights), so a
        masked autoencoder does not project the patches it drops. Equals ``forward(x)`` gathered at ``ids``
        up to float rounding."""
        x = self._checked(x)
        B, C = x.shape[:2]
        ph, pw = self.patch_size
        h, w = x.shape[-2] // ph, x.shape[-1] // pw
        pixels = x[..., :h * ph, :w * pw].reshape(B, C, h, ph, w, pw).permute(0, 2, 4, 1, 3, 5)
        pixels = pixels.reshape(B, h * w, C * ph * pw)             # (B, N, C*ph*pw) in the weight's order
        pixels = torch.gather(pixels, 1, ids.unsqueeze(-1).expand(-1, -1, pixels.shape[-1]))
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return self.norm(F.linear(pixels, weight, self.proj.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._checked(x)
        x = self.proj(x)                      # (B, D, h, w)
        x = x.permute(0, 2, 3, 1)             # (B, h, w, D)
        x = self.norm(x)
        return x if self.dynamic else x.flatten(1, 2)


class LayerScale(nn.Module):
    """Per-channel learnable scale (CaiT / DeiT-3): x * gamma."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchDropout(nn.Module):
    """Keep a random ``1 - prob`` of the patch tokens per sample while training (Liu et al., 2022,
    *PatchDropout*): the prefix (class/register) tokens stay, the kept patches keep their position embedding,
    so the blocks simply see fewer tokens and each step costs about ``1 - prob`` of the compute. The same draw
    as timm's ``patch_drop_rate`` (``argsort`` of one normal sample per token), so seeded runs agree."""

    def __init__(self, prob: float = 0.0, num_prefix_tokens: int = 1, ordered: bool = False) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch_drop_rate={prob}: expected a value in [0, 1)")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens
        self.ordered = ordered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        n = self.num_prefix_tokens
        prefix, patches = x[:, :n], x[:, n:]
        B, L = patches.shape[:2]
        keep = max(1, int(L * (1.0 - self.prob)))
        idx = torch.argsort(torch.randn(B, L, device=x.device), dim=-1)[:, :keep]
        if self.ordered:
            idx = idx.sort(dim=-1).values
        patches = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, patches], dim=1) if n else patches

    def extra_repr(self) -> str:
        return f"prob={self.prob}, num_prefix_tokens={self.num_prefix_tokens}"


class Mlp(nn.Module):
    """fc1 -> act -> dropout -> (norm) -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, *, act: str = "gelu", bias: bool = True, drop: float = 0.0,
                 norm: Optional[nn.Module] = None, out_dim: Optional[int] = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = make_act(act)
        self.drop1 = nn.Dropout(drop)
        self.norm = norm if norm is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class GluMlp(nn.Module):
    """Gated MLP with one packed input projection: fc1 gives [a | b], out = fc2(act(a) * b).

    `gate_last=True` gates the other way round, a * act(b). With SiLU and gate_last=False this is the
    "packed" SwiGLU of DINOv2-giant.
    """

    def __init__(self, dim: int, hidden: int, *, act: str = "silu", gate_last: bool = False, bias: bool = True,
                 drop: float = 0.0, norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        assert hidden % 2 == 0, f"GluMlp needs an even hidden size, got {hidden}"
        self.gate_last = gate_last
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = make_act(act)
        self.drop1 = nn.Dropout(drop)
        self.norm = norm if norm is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden // 2, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        x = a * self.act(b) if self.gate_last else self.act(a) * b
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class SwiGLU(nn.Module):
    """SwiGLU with separate gate and value projections: fc2(silu(fc1_g x) * fc1_x x)."""

    def __init__(self, dim: int, hidden: int, *, act: str = "silu", bias: bool = True, drop: float = 0.0,
                 norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden, bias=bias)
        self.fc1_x = nn.Linear(dim, hidden, bias=bias)
        self.act = make_act(act)
        self.drop1 = nn.Dropout(drop)
        self.norm = norm if norm is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1_g(x)) * self.fc1_x(x)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


def mlp_hidden(dim: int, mlp_ratio: float) -> int:
    # floor like timm, with a guard so that a ratio derived as hidden/dim gives back `hidden` exactly
    return int(dim * mlp_ratio + 1e-6)


def trunc_normal_(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    # truncated at ±2 absolute, as timm and big_vision do: at std 0.02 that is an untruncated normal
    return nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


def lecun_normal_(t: torch.Tensor) -> torch.Tensor:
    fan_in = t.shape[1] * math.prod(t.shape[2:]) if t.ndim > 1 else t.shape[0]
    return nn.init.trunc_normal_(t, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)
