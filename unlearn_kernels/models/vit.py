"""A small Vision Transformer (Dosovitskiy et al. 2021) for tiny images."""
from __future__ import annotations

import torch
from torch import nn

from ..checks import check_int


class Attention(nn.Module):
    """Multi-head self-attention written out (q k^T / sqrt(d), softmax, times v).

    Written with plain tensor ops rather than ``nn.MultiheadAttention``/SDPA so that every
    autodiff mode (forward-over-reverse Hessian-vector products included) works on it.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        """The head count, shown in the module's repr."""
        # the heads are no parameter: without them here a checkpoint of one head count (model_signature,
        # Retrain's architecture check) passed for another's
        return f"heads={self.heads}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over the tokens of x (batch, tokens, dim)."""
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block on x (batch, tokens, dim), shape kept."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """Patch embedding + class token + learned position embedding + ``depth`` blocks + linear head.

    Args:
        image_size: side of the (square) input images.
        patch_size: side of a patch; must divide ``image_size``.
        in_channels: channels of the input images.
        num_classes: number of output logits.
        dim: token width; must be divisible by ``heads``.
        depth: number of transformer blocks.
        heads: attention heads.
        mlp_ratio: hidden width of the block MLP, as a multiple of ``dim``.
    """

    def __init__(
        self, image_size: int, patch_size: int, in_channels: int, num_classes: int,
        dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        image_size, patch_size, in_channels, num_classes, dim, depth, heads, mlp_ratio = (
            check_int(f"SmallViT: {name}", value) for name, value in (
                ("image_size", image_size), ("patch_size", patch_size), ("in_channels", in_channels),
                ("num_classes", num_classes), ("dim", dim), ("depth", depth), ("heads", heads),
                ("mlp_ratio", mlp_ratio)))
        if image_size % patch_size:
            raise ValueError(f"SmallViT: patch_size {patch_size} does not divide image_size {image_size}")
        if dim % heads:
            raise ValueError(f"SmallViT: dim {dim} is not divisible by heads {heads}")
        num_patches = (image_size // patch_size) ** 2
        self.in_channels, self.image_size = in_channels, image_size  # what forward takes (see there)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the parameters this module owns directly (its children reset their own)."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of images ``x`` (N, in_channels, image_size, image_size), read
        from the class token. Other shapes are refused (ValueError): the patch convolution would leave out the
        rows and columns beyond the grid (an 11 x 11 image read as its top-left 8 x 8) or read another grid."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"SmallViT: inputs must be (N, {', '.join(map(str, expected))}) images, the size it was "
                             f"built for (its position embedding has one entry per patch), got {tuple(x.shape)}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])
