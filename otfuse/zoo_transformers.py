"""Small Transformers of the model zoo: a Vision Transformer and a character-level GPT.

Both are pre-LayerNorm Transformers written the plain way (one packed ``qkv`` Linear per block,
heads by ``view`` + ``transpose``, :func:`torch.nn.functional.scaled_dot_product_attention`, a GELU
MLP), small enough to train on one CPU thread in minutes, and captured by ``torch.export`` for
fusion (:mod:`otfuse.discovery.export`).

- ``vit``: patches of ``patch`` x ``patch`` pixels embedded by a strided convolution, a class token,
  learned position embeddings, ``depth`` blocks, a final LayerNorm and a Linear head on the class
  token. Input (N, C, H, W), output logits (N, num_classes).
- ``chargpt``: token and learned position embeddings, ``depth`` causal blocks, a final LayerNorm
  and an *untied* Linear head (its own weight, so that refit can re-solve it). Input token ids
  (N, T) with T <= ``context``, output next-token logits (N, T, vocab_size).

>>> model = zoo.create("vit", dim=64, depth=4, heads=4)
>>> gpt = zoo.create("chargpt", vocab_size=96, context=64)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from otfuse.zoo import ModelConfigError, _check_in_shape, register

__all__ = ["CharGPT", "TransformerBlock", "ViT", "chargpt", "vit"]


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``qkv`` (dim -> 3 dim), heads of dim / heads, ``proj``.

    .. math:: \\operatorname{softmax}(Q_h K_h^\\top / \\sqrt{d_h} [+ M]) V_h, \\quad h = 1..H

    with the causal mask M when ``causal``. Input and output (B, T, dim).
    """

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.causal = heads, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``; (B, T, dim)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, causal)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _init(model: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) for Linear and Embedding weights, zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class ViT(nn.Module):
    """Vision Transformer: (N, C, H, W) images -> (N, num_classes) logits."""

    def __init__(
        self, in_shape: tuple[int, int, int], num_classes: int, patch: int, dim: int,
        depth: int, heads: int, mlp_ratio: int,
    ) -> None:  # fmt: skip
        super().__init__()
        channels, height, width = in_shape
        tokens = (height // patch) * (width // patch)
        self.patch = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, causal=False) for _ in range(depth)
        )
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class CharGPT(nn.Module):
    """Causal character-level language model: (N, T) token ids -> (N, T, vocab_size) logits."""

    def __init__(
        self, vocab_size: int, context: int, dim: int, depth: int, heads: int, mlp_ratio: int
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, causal=True) for _ in range(depth)
        )
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab_size, bias=False)
        _init(self)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _check_sizes(dim: int, depth: int, heads: int, mlp_ratio: int) -> None:
    for name, value in (("dim", dim), ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio)):
        if not (isinstance(value, int) and value >= 1):
            raise ModelConfigError(f"{name} must be a positive integer, got {value}")
    if dim % heads:
        raise ModelConfigError(f"dim ({dim}) must be a multiple of heads ({heads})")


@register
def vit(
    *,
    patch: int = 7,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: int = 2,
    in_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
) -> ViT:
    """A small ViT: (H / patch) x (W / patch) patch tokens and a class token of width ``dim``."""
    shape = _check_in_shape(in_shape)
    _check_sizes(dim, depth, heads, mlp_ratio)
    if not (isinstance(patch, int) and 1 <= patch <= min(shape[1:])):
        raise ModelConfigError(f"patch must be between 1 and the image size, got {patch}")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ModelConfigError(f"num_classes must be a positive integer, got {num_classes}")
    return ViT(shape, num_classes, patch, dim, depth, heads, mlp_ratio)


@register
def chargpt(
    *,
    vocab_size: int = 96,
    context: int = 64,
    dim: int = 128,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: int = 4,
) -> CharGPT:
    """A small character-level GPT with an untied head (``otfuse.text.VOCABULARY`` has 96 symbols)."""
    _check_sizes(dim, depth, heads, mlp_ratio)
    for name, value in (("vocab_size", vocab_size), ("context", context)):
        if not (isinstance(value, int) and value >= 1):
            raise ModelConfigError(f"{name} must be a positive integer, got {value}")
    return CharGPT(vocab_size, context, dim, depth, heads, mlp_ratio)
