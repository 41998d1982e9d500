"""The run file: a Llama-family decoder that turns token ids into next-token logits.

A model is two files: a parameters file and this program. Everything here reads
top to bottom in the order the data flows:

    Config → RMSNorm → rotary embeddings → attention (grouped-query, KV cache, packed documents)
           → SwiGLU MLP → Block → Transformer

It covers the Llama family as Hugging Face, GGUF and llama2.c store it: Llama 1-3
(with Llama-3 rope scaling), SmolLM, TinyLlama, Mistral-style grouped-query
attention, and Qwen2's q/k/v biases. Loading files lives in llmos/formats,
sampling and streaming in llmos/engine.py; this file only computes.

Parameter names (the state dict every format is mapped onto):

    embed.weight                              [vocab, dim]
    layers.{i}.attn_norm.weight               [dim]
    layers.{i}.attn.wq.weight (.bias)         [n_heads * head_dim, dim]
    layers.{i}.attn.wk.weight (.bias)         [n_kv_heads * head_dim, dim]
    layers.{i}.attn.wv.weight (.bias)         [n_kv_heads * head_dim, dim]
    layers.{i}.attn.wo.weight                 [dim, n_heads * head_dim]
    layers.{i}.mlp_norm.weight                [dim]
    layers.{i}.mlp.w1.weight  (gate)          [hidden_dim, dim]
    layers.{i}.mlp.w3.weight  (up)            [hidden_dim, dim]
    layers.{i}.mlp.w2.weight  (down)          [dim, hidden_dim]
    norm.weight                               [dim]
    head.weight  (absent when tied)           [vocab, dim]

Rotary embeddings use the "rotate half" layout of Hugging Face checkpoints;
loaders of GGUF and llama2.c files permute q/k rows into it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# Config: every number that shapes the network, saved beside every checkpoint


@dataclass
class Config:
    vocab_size: int = 32000
    dim: int = 4096  # width of the residual stream
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # fewer than n_heads = grouped-query attention
    hidden_dim: int = 11008  # width of the MLP
    head_dim: int | None = None  # defaults to dim // n_heads
    max_seq_len: int = 2048  # the context limit
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    tie_embeddings: bool = False  # output head shares the embedding matrix
    qkv_bias: bool = False  # Qwen2 adds biases to q, k and v

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * self.dim * self.hidden_dim + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * layer + self.dim + head


# ----------------------------------------------------------------------------
# RMSNorm: rescale each vector to unit root-mean-square, then by a learned gain


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In float32 whatever the weights' dtype, as the reference implementations do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ----------------------------------------------------------------------------
# Rotary position embeddings: rotate pairs of q/k channels by position-dependent angles


def rope_frequencies(cfg: Config) -> torch.Tensor:
    """Inverse frequencies, one per channel pair, with Llama-3 or linear scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are stretched by `factor`, short ones kept, the middle band blended.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        middle = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(middle, blended, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r}; llmos supports 'llama3' and 'linear'")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype):
    """cos and sin of shape [B, T, head_dim] for integer positions [B, T]."""
    angles = positions[..., None].float() * inv_freq  # [B, T, head_dim/2], in float32
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: [B, heads, T, head_dim]. Channel i pairs with channel i + head_dim/2."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


# ----------------------------------------------------------------------------
# KV cache: keys and values of every past position, so each new token costs one step


class KVCache:
    """Keys and values for a batch of sequences that share one timeline.

    Rows are left-padded to a common length: row b's first `pad[b]` slots are
    padding that no query attends to, and its positions count from its first real
    token. `pos` is the next slot to write, the same for all rows.
    """

    def __init__(self, cfg: Config, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k, v):
        """Store this step's k, v [B, n_kv, T, hd]; return all keys and values so far."""
        T = k.shape[2]
        self.k[layer, :, :, self.pos : self.pos + T] = k
        self.v[layer, :, :, self.pos : self.pos + T] = v
        return self.k[layer, :, :, : self.pos + T], self.v[layer, :, :, : self.pos + T]


# ----------------------------------------------------------------------------
# Attention: each position looks back at earlier ones; kv heads are shared by groups of q heads


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if mask is None:  # no cache: plain causal attention over this chunk
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


# ----------------------------------------------------------------------------
# MLP: SwiGLU, a gated feed-forward layer applied to each position on its own


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ----------------------------------------------------------------------------
# Block: attention then MLP, each added back onto the residual stream after a norm


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------
# Transformer: token ids → embeddings → blocks → norm → logits over the vocabulary


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Kept out of the state dict and out of .to(dtype): frequencies must stay float32.
        self.inv_freq = rope_frequencies(cfg)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, doc_ids: torch.Tensor | None = None,
                last: bool = False):
        """tokens [B, T] → logits [B, T, vocab]. With a cache, tokens continue from slot cache.pos.
        last=True: logits [B, 1, vocab] of the last position only, all that generating the next token needs.

        doc_ids [B, T] marks documents packed into one row (a new id starts a new document): each
        document attends only to itself and its positions restart at 0, as if it were run alone.
        """
        B, T = tokens.shape
        start = 0 if cache is None else cache.pos
        if start + T > (cache.max_len if cache is not None else self.cfg.max_seq_len):
            raise ValueError(f"{start + T} positions exceed the context limit")
        slots = torch.arange(start, start + T, device=tokens.device)
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids is for training on packed rows, not for decoding with a cache")
            # Each token's document began at the last slot where the id changed; it sees keys from there on.
            new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
            new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            doc_start = torch.where(new_doc, slots, 0).cummax(dim=1).values  # [B, T]
            positions = slots - doc_start
            mask = (slots[None, None, :] <= slots[None, :, None]) & (slots[None, None, :] >= doc_start[:, :, None])
        elif cache is None:
            positions, mask = slots.expand(B, T), None
        else:
            # A query sees keys at or before its own slot and after its row's padding.
            # Padding queries see themselves, so no row of the softmax is empty.
            keys = torch.arange(start + T, device=tokens.device)
            causal = keys[None, :] <= slots[:, None]  # [T, S]
            real = keys[None, None, :] >= cache.pad[:, None, None]  # [B, 1, S]
            mask = (causal[None] & real) | (keys[None, None, :] == slots[None, :, None])
            positions = (slots[None, :] - cache.pad[:, None]).clamp(min=0)
        x = self.embed(tokens)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.pos += T
        x = self.norm(x[:, -1:] if last else x)
        return F.linear(x, self.embed.weight if self.head is None else self.head.weight)

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len, p.device, p.dtype)
