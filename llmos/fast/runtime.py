"""The fast decoder at run time: one sequence over a static KV cache, a C++ call per token (see llmos/fast/__init__.py)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from llmos import kernels as K
from llmos.errors import LlmosError
from llmos.fast.blocks import BF16, F32, Q4, Q8, Weight, float_weight, quantize_rows
from llmos.fast.packing import LINEARS, pack_gguf, pack_model, pack_quantized
from llmos.model import Config, Transformer, rope_frequencies

PREFILL_CHUNK = 512  # prompt tokens per forward in prefill (llama.cpp's default micro-batch)
BF16_PREFILL_MIN = 64  # rows from which prefill multiplies bfloat16 copies of quantized weights (see bf16_prefill)


def bf16_prefill() -> bool:
    """Whether prefill multiplies quantized weights as bfloat16 through torch (oneDNN): on CPUs with AMX
    or AVX512-BF16 a bfloat16 matrix product runs several times faster than the int8 kernels (measured
    1,047 GFLOP/s against about 150 on a 2-core Xeon with AMX), and dequantizing a matrix per chunk of
    prompt costs little beside it. Elsewhere bfloat16 products are slow and the int8 kernels run.
    LLMOS_PREFILL=int8 or bf16 overrides the choice."""
    choice = os.environ.get("LLMOS_PREFILL", "auto")
    if choice in ("int8", "bf16"):
        return choice == "bf16"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# ----------------------------------------------------------------------------
# The decoder


def _rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, cos, sin):
    """x [T, heads, hd]; cos/sin [T, hd/2]: channel i pairs with i + hd/2 (model.apply_rope)."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class Decoder:
    """One sequence at a time over a static KV cache. Not thread-safe: one decoder per concurrent user."""

    def __init__(self, cfg: Config, weights: dict, max_len: int | None = None, threads: int | None = None,
                 kernels: bool = True, reserve: int = 512):
        self.cfg, self.weights = cfg, weights
        self.limit = cfg.max_seq_len if max_len is None else min(max_len, cfg.max_seq_len)
        self.threads = threads or torch.get_num_threads()
        self.inv_freq = rope_frequencies(cfg)
        self.ext = K.load() if kernels else None
        self.backend = "cpp" if self.ext is not None else "torch"
        self.bf16_prefill = bf16_prefill()  # long prompts through bfloat16 matrix units (see bf16_prefill)
        self.pos = 0
        self.capacity = 0
        self._grow(min(self.limit, reserve))  # cache slots to start with; it doubles as needed
        names = [f"layers.{i}.{n}.weight" for i in range(cfg.n_layers) for n in LINEARS] + ["head.weight", "embed.weight"]
        for n in names:
            if not isinstance(weights.get(n), Weight):
                raise LlmosError(f"weight {n} missing from the packed weights")
        self.index = {n: i for i, n in enumerate(names)}
        self._dense: dict[str, torch.Tensor] = {}  # dequantized weights of the PyTorch path, made on first use
        if self.ext is not None:
            norms = [weights[f"layers.{i}.{n}.weight"] for i in range(cfg.n_layers) for n in ("attn_norm", "mlp_norm")]
            c = cfg
            self.model = self.ext.Model(c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim,
                                        c.vocab_size, c.norm_eps, self.cos, self.sin, self.kc, self.vc,
                                        norms + [weights["norm.weight"]], self.threads)
            for n in names:
                w = weights[n]
                bias = weights.get(n[: -len("weight")] + "bias")
                self.model.add(w.fmt, w.N, w.K, w.w, w.d, w.m, w.bf16_scales, w.koff, bias)

    # --- the cache ---

    def _grow(self, need: int):
        """Make room for `need` slots: the cache starts small and doubles, up to the context limit."""
        if need <= self.capacity:
            return
        if need > self.limit:
            raise LlmosError(f"{need} positions exceed the context limit of {self.limit} tokens; "
                             "start a new sequence (reset) or shorten the prompt")
        cap = min(self.limit, max(need, 2 * self.capacity))
        c = self.cfg
        shape = (c.n_layers, c.n_kv_heads, cap, c.head_dim)
        kc, vc = torch.zeros(shape), torch.zeros(shape)
        if self.capacity:
            kc[:, :, : self.pos] = self.kc[:, :, : self.pos]
            vc[:, :, : self.pos] = self.vc[:, :, : self.pos]
        angles = torch.arange(cap, dtype=torch.float32)[:, None] * self.inv_freq  # as model.rope_cos_sin
        self.kc, self.vc, self.cos, self.sin = kc, vc, angles.cos().contiguous(), angles.sin().contiguous()
        self.capacity = cap
        if getattr(self, "model", None) is not None:
            self.model.set_cache(self.kc, self.vc, self.cos, self.sin)

    def reserve(self, slots: int):
        """Room for `slots` positions (at most the context limit) before a sequence starts, so the cache
        is allocated once at its final size instead of doubling (and copying) as the sequence grows."""
        self._grow(min(slots, self.limit))

    def reset(self):
        self.pos = 0

    # --- steps ---

    @torch.inference_mode()
    def prefill(self, ids) -> torch.Tensor:
        """Append tokens (a list or 1-D tensor) to the sequence; logits [vocab] after the last one."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise LlmosError("prefill needs at least one token")
        if int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size:
            raise LlmosError(f"token ids outside 0..{self.cfg.vocab_size - 1}; encode with this model's tokenizer")
        self._grow(self.pos + ids.numel())
        if ids.numel() == 1 and self.ext is not None:
            return self.decode(int(ids[0]))
        for start in range(0, ids.numel(), PREFILL_CHUNK):  # chunks, so activations do not grow with the prompt
            logits = self._forward(ids[start : start + PREFILL_CHUNK])
        return logits

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        """One token → logits [vocab] float32 for the next."""
        self._grow(self.pos + 1)
        if self.ext is None:
            return self._forward(torch.tensor([token]))
        if not 0 <= token < self.cfg.vocab_size:
            raise LlmosError(f"token id {token} outside 0..{self.cfg.vocab_size - 1}")
        logits = self.model.decode(token, self.pos)
        self.pos += 1
        return logits

    def _linear(self, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
        """x @ W^T (+ bias) for each named matrix; those in kernel formats share one int8 form of x."""
        out: dict[str, torch.Tensor] = {}
        if self.ext is not None:
            kern = [n for n in names if self.weights[f"{n}.weight"].fmt in (Q8, Q4)]
            if kern and x.shape[0] >= BF16_PREFILL_MIN and self.bf16_prefill:  # see bf16_prefill()
                xb = x.to(torch.bfloat16)
                for n in kern:
                    y = F.linear(xb, self.model.dequant_bf16(self.index[f"{n}.weight"])).float()
                    bias = self.weights.get(f"{n}.bias")
                    out[n] = y if bias is None else y + bias
                kern = []
            if kern:  # the kernels add the biases themselves
                ys = self.model.linear_many([self.index[f"{n}.weight"] for n in kern], x)
                out.update(zip(kern, ys))
        for n in names:
            if n in out:
                continue
            w, bias = self.weights[f"{n}.weight"], self.weights.get(f"{n}.bias")
            if w.fmt in (F32, BF16):
                # bf16 weights are widened per call: activations stay float32 as in decode, and torch's
                # bf16 GEMM is slow on CPUs without AVX512-BF16 anyway
                y = F.linear(x, w.w.float())
            else:
                if n not in self._dense:
                    self._dense[n] = w.dequantize()
                y = F.linear(x, self._dense[n])
            out[n] = y if bias is None else y + bias
        return [out[n] for n in names]

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokens at slots pos.. through every layer in PyTorch (prefill; every step without kernels)."""
        c, W = self.cfg, self.weights
        T, p, hd = ids.numel(), self.pos, c.head_dim
        if self.ext is not None:
            x = self.model.embed_rows(ids)
        else:
            e = W["embed.weight"]
            x = (e.w[ids] if e.fmt in (F32, BF16) else e.dequantize()[ids]).float()
        cos, sin = self.cos[p : p + T], self.sin[p : p + T]
        mask = None
        if p:  # earlier slots are visible to every new token; among the new ones, causal
            mask = torch.ones(T, p + T, dtype=torch.bool).tril(p)
        for i in range(c.n_layers):
            L = f"layers.{i}"
            h = _rmsnorm(x, W[f"{L}.attn_norm.weight"], c.norm_eps)
            q, k, v = self._linear([f"{L}.attn.wq", f"{L}.attn.wk", f"{L}.attn.wv"], h)
            q = _rope(q.view(T, c.n_heads, hd), cos, sin)
            k = _rope(k.view(T, c.n_kv_heads, hd), cos, sin)
            v = v.view(T, c.n_kv_heads, hd)
            self.kc[i, :, p : p + T] = k.transpose(0, 1)
            self.vc[i, :, p : p + T] = v.transpose(0, 1)
            keys, values = self.kc[i, None, :, : p + T], self.vc[i, None, :, : p + T]
            y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask,
                                               is_causal=mask is None and T > 1, enable_gqa=True)
            x = x + self._linear([f"{L}.attn.wo"], y[0].transpose(0, 1).reshape(T, -1))[0]
            h = _rmsnorm(x, W[f"{L}.mlp_norm.weight"], c.norm_eps)
            gate, up = self._linear([f"{L}.mlp.w1", f"{L}.mlp.w3"], h)
            x = x + self._linear([f"{L}.mlp.w2"], F.silu(gate) * up)[0]
        self.pos += T
        return self._linear(["head"], _rmsnorm(x[-1:], W["norm.weight"], c.norm_eps))[0][0]


def decoder(model: Transformer, quant: str | None = None, head: str | None = None, max_len: int | None = None,
            threads: int | None = None, kernels: bool = True) -> Decoder:
    """A Decoder for a loaded Transformer (float, or swapped by llmos.quant); see the module docstring."""
    if next(model.parameters()).device.type != "cpu":
        raise LlmosError("the fast decoder runs on the CPU; move the model with model.cpu() or use the GPU path")
    return Decoder(model.cfg, pack_model(model, quant, head), max_len, threads, kernels)


def decoder_from_gguf(path, max_len: int | None = None, threads: int | None = None, kernels: bool = True):
    """(Decoder, Tokenizer | None) for a GGUF file, its quantized blocks used as they are stored."""
    cfg, weights, tokenizer = pack_gguf(path)
    return Decoder(cfg, weights, max_len, threads, kernels), tokenizer


def decoder_from_quantized(path, max_len: int | None = None, threads: int | None = None, kernels: bool = True):
    """(Decoder, Tokenizer | None) for a directory written by `llmos quantize`, from its stored integers."""
    cfg, weights, tokenizer = pack_quantized(path)
    return Decoder(cfg, weights, max_len, threads, kernels), tokenizer
