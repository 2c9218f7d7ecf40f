"""Tiny Transformers for the tests (random weights), and a planted permutation that respects heads."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

import otfuse
from otfuse.alignment import align_state
from otfuse.baselines import build_model
from otfuse.capture import rebind
from otfuse.heads import random_plans
from otfuse.plans import transport_member


class PackedAttention(nn.Module):
    """One qkv Linear split into q, k, v, heads by view + transpose, causal SDPA; with
    ``qk_norm`` an RMSNorm over the dims of each q and k head (one weight per dim, as Qwen3's)."""

    def __init__(
        self, width: int, heads: int, qk_norm: bool = False, packing: str = "split"
    ) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads, self.packing = (
            nn.Linear(width, 3 * width),
            nn.Linear(width, width),
            heads,
            packing,
        )
        self.q_norm = RMSNorm(width // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(width // heads) if qk_norm else nn.Identity()

    def forward(self, x):
        B, T, C = x.shape
        if self.packing == "heads":  # GPT-NeoX's layout: q, k and v of head 0, then of head 1, ...
            qkv = self.qkv(x).view(B, T, self.heads, 3 * (C // self.heads))
            q, k, v = (t.transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        else:
            qkv = self.qkv(x)
            if self.packing == "slices":  # Phi-3's: sliced by position
                q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
            else:
                q, k, v = qkv.split(C, dim=2)
            q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class ExplicitAttention(nn.Module):
    """Separate q, k, v Linears, q @ k^T with a causal mask buffer, softmax, @ v."""

    def __init__(self, width: int, heads: int, context: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.proj, self.heads = nn.Linear(width, width), heads
        self.register_buffer(
            "mask", torch.tril(torch.ones(context, context)).view(1, 1, context, context)
        )

    def forward(self, x):
        B, T, C = x.shape
        d = C // self.heads
        q, k, v = (f(x).view(B, T, self.heads, d).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class RelativeBiasAttention(nn.Module):
    """Swin/T5-style: a learned bias per head and relative position, read from a table by index
    and given to SDPA as the mask; the output projection applied as ``x @ weight.T`` (Falcon)."""

    def __init__(self, width: int, heads: int, context: int = 16) -> None:
        super().__init__()
        self.qkv, self.heads = nn.Linear(width, 3 * width), heads
        self.proj = nn.Parameter(torch.randn(width, width) / math.sqrt(width))
        self.table = nn.Parameter(torch.randn(2 * context - 1, heads))
        pos = torch.arange(context)
        self.register_buffer("index", pos[:, None] - pos[None, :] + context - 1, persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        bias = self.table[self.index[:T, :T]].permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return y.transpose(1, 2).reshape(B, T, C) @ self.proj.T


class Block(nn.Module):
    def __init__(self, width: int, heads: int, explicit: bool, **packed) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        if explicit:
            self.attn = ExplicitAttention(width, heads)
        elif packed.pop("relative_bias", False):
            self.attn = RelativeBiasAttention(width, heads)
        else:
            self.attn = PackedAttention(width, heads, **packed)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """nanoGPT-style: token embedding + a learned position table sliced by the input's length,
    pre-LayerNorm blocks, a final LayerNorm and a head tied to the token embedding."""

    def __init__(
        self, vocab: int = 11, width: int = 16, heads: int = 4, layers: int = 2,
        context: int = 16, explicit: bool = False, **packed,
    ) -> None:  # fmt: skip
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Parameter(torch.randn(1, context, width) * 0.1)
        self.blocks = nn.ModuleList(Block(width, heads, explicit, **packed) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe[:, : idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaBlock(nn.Module):
    """RMSNorm, rotary q/k, grouped-query attention (KV heads repeated), SwiGLU MLP."""

    def __init__(self, width: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, width // heads
        self.norm1, self.norm2 = RMSNorm(width), RMSNorm(width)
        self.q = nn.Linear(width, heads * self.d, bias=False)
        self.k = nn.Linear(width, kv_heads * self.d, bias=False)
        self.v = nn.Linear(width, kv_heads * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, width, bias=False)
        self.gate, self.up = (
            nn.Linear(width, hidden, bias=False),
            nn.Linear(width, hidden, bias=False),
        )
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(B, T, self.heads, self.d).transpose(1, 2)
        k = self.k(h).view(B, T, self.kv_heads, self.d).transpose(1, 2)
        v = self.v(h).view(B, T, self.kv_heads, self.d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k = k[:, :, None].expand(B, self.kv_heads, rep, T, self.d).reshape(B, self.heads, T, self.d)
        v = v[:, :, None].expand(B, self.kv_heads, rep, T, self.d).reshape(B, self.heads, T, self.d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(
        self, vocab: int = 13, width: int = 16, heads: int = 4, kv_heads: int = 2, layers: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(LlamaBlock(width, heads, kv_heads, 24) for _ in range(layers))
        self.norm = RMSNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        d = width // heads
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))

    def forward(self, idx):
        t = torch.arange(idx.shape[1], dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))


class MHAModel(nn.Module):
    """Token Linear, nn.MultiheadAttention (packed in_proj_weight) with a residual, LayerNorm, head."""

    def __init__(self, features: int = 5, width: int = 16, heads: int = 4, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.embed(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.mean(dim=1))


class CrossAttentionModel(nn.Module):
    """Two token streams (``x`` and a second view of it) and nn.MultiheadAttention from the first
    to the second: its packed ``in_proj_weight`` is split into the query's rows and the keys' and
    values' rows (``kv="packed"``), or keys and values of other widths (``kv="kdim"``: q, k and v
    weights of their own, the bias chunked in three) from two streams of their own."""

    def __init__(self, kv: str = "packed", features: int = 5, width: int = 16, heads: int = 4):
        super().__init__()
        kdim = 12 if kv == "kdim" else None
        self.query, self.memory = nn.Linear(features, width), nn.Linear(features, kdim or width)
        self.value = nn.Linear(features, 10) if kv == "kdim" else None
        self.attn = nn.MultiheadAttention(width, heads, kdim=kdim, vdim=10 if kdim else None,
                                          batch_first=True)  # fmt: skip
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        q, k = self.query(x), torch.relu(self.memory(x.flip(1)))
        v = torch.tanh(self.value(x)) if self.value is not None else k
        h = self.norm(q + self.attn(q, k, v, need_weights=False)[0])
        return self.head(h.mean(dim=1))


class Seq2Seq(nn.Module):
    """``nn.Transformer``: an encoder and a decoder layer, the decoder attending to the encoder's
    output (cross-attention through nn.MultiheadAttention), source and target from the input."""

    def __init__(self, features: int = 5, width: int = 16, heads: int = 4):
        super().__init__()
        self.src, self.tgt = nn.Linear(features, width), nn.Linear(features, width)
        self.transformer = nn.Transformer(
            width, heads, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=24,
            dropout=0.0, batch_first=True,
        )  # fmt: skip
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.transformer(self.src(x), self.tgt(x[:, :4])).mean(dim=1))


def randomize_norms(model: nn.Module) -> nn.Module:
    """Norm weights away from 1 and 0, so a missed member would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def plant(model: nn.Module, graph: otfuse.SpaceGraph, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with a random head-respecting permutation in every space of ``graph``."""
    state, sizes = dict(model.state_dict()), graph.sizes
    for index, plan in random_plans(graph, seed).items():
        for member in graph.spaces[index].members:
            state[member.param] = transport_member(state[member.param], member, index, plan, sizes)
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out


def align_on(graph: otfuse.SpaceGraph, model: nn.Module, anchor: nn.Module, **options) -> nn.Module:
    """``otfuse.align(model, anchor)`` on an already captured graph (no second capture)."""
    config = otfuse.FusionConfig().replace(**options)
    state, _ = align_state(
        model.state_dict(), rebind(graph, model), anchor.state_dict(), rebind(graph, anchor), config
    )
    return build_model(anchor, state)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].numel())
