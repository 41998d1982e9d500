"""Fast batch-1 CPU decoding: the model's weights packed for C++ kernels, a static KV cache, one call per token.

    from llmos.fast import decoder
    dec = decoder(model, quant="int4")          # a loaded Transformer; quant: None, "bf16", "int8", "int4", "q4_1"
    logits = dec.prefill(prompt_ids)            # [vocab] float32, for the last prompt token
    logits = dec.decode(next_id)                # one more token; dec.pos counts the cache slots used
    dec.reset()                                 # a new sequence

    dec = decoder_from_gguf("model.Q4_0.gguf")  # GGUF Q8_0 / Q4_0 / Q4_1 blocks go into the kernels as they are

Applied from outside: model.py stays the readable reference and is never changed; this file reads its
weights and computes the same function (tests/test_fast.py checks logits and greedy tokens against it).

How a token is computed. `decode` is one call into llmos/kernels/decode.cpp, which runs every layer
(RMSNorm, q/k/v, rope, attention over the cache, output projection, SwiGLU) inside one OpenMP region,
so a token costs a few dozen thread barriers instead of ~400 PyTorch operations. `prefill` runs here in
PyTorch, one layer at a time over all prompt tokens, with the kernels' batched products for quantized
weights and torch's scaled_dot_product_attention. Without a C++ compiler both run here in PyTorch
(slower, same arithmetic for float weights).

Weight formats (Weight.fmt), the blocks of 32 inputs as llama.cpp defines them:

    f32, bf16   float rows; activations stay float32
    q8          int8 and one scale per block:                   w = d * q            (GGUF Q8_0)
    q4          4-bit and a scale (+ offset) per block:         w = d * (q + koff) + m
                  GGUF Q4_0: koff -8, no m;  GGUF Q4_1: koff 0, m;  llmos int4 (quant.py): koff -8, m = zero

`quant="int8"` makes Q8_0 blocks and `"int4"` Q4_1 blocks (asymmetric, like llmos.quant's int4), bit-identical
to llama.cpp's quantizers; `"q4_0"` the symmetric blocks (11% fewer bytes, and much less accurate: on the
bundled SmolLM2 perplexity rose 23% with Q4_0 and 0.2% with Q4_1, bench/results/quant_ppl_fast.json).
The output head of a quantized model is Q8_0 (like llama.cpp keeps the output at higher precision), the embedding table stays as loaded.
A model already swapped by llmos.quant (Int8Linear / Int4Linear) is packed from its stored integers,
with its bfloat16 scales kept as they are. Activations meeting a quantized weight are quantized to int8
per block of 32 (llama.cpp's Q8 activations): against the reference model with the same (dequantized)
weights the logits differ by 1-3% of their spread on random tiny models and by RMS 6% (KL 0.004 nats)
on SmolLM2-135M, whose activation outliers make the rounding noisier; float formats agree to ~1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmos.errors import LlmosError
from llmos.model import Config, Transformer, rope_frequencies

F32, BF16, Q8, Q4 = 0, 1, 2, 3
QUANTS = (None, "f32", "bf16", "int8", "q8_0", "int4", "q4_0", "q4_1")
PREFILL_CHUNK = 512  # prompt tokens per forward in prefill (llama.cpp's default micro-batch)
BF16_PREFILL_MIN = 64  # rows from which prefill multiplies bfloat16 copies of quantized weights (see bf16_prefill)


def bf16_prefill() -> bool:
    """Whether prefill multiplies quantized weights as bfloat16 through torch (oneDNN): on CPUs with AMX
    or AVX512-BF16 a bfloat16 matrix product runs several times faster than the int8 kernels (measured
    1,047 GFLOP/s against about 150 on a 2-core Xeon with AMX), and dequantizing a matrix per chunk of
    prompt costs little beside it. Elsewhere bfloat16 products are slow and the int8 kernels run.
    LLMOS_PREFILL=int8 or bf16 overrides the choice."""
    import os

    choice = os.environ.get("LLMOS_PREFILL", "auto")
    if choice in ("int8", "bf16"):
        return choice == "bf16"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
LINEARS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w3", "mlp.w2")  # the kernel's order

# ----------------------------------------------------------------------------
# Packed weights


@dataclass
class Weight:
    """One matrix [N, K] in a kernel format (see the module docstring)."""

    fmt: int
    w: torch.Tensor  # f32 / bf16 [N, K]; q8: int8 [N, K] pair-interleaved; q4: uint8 [N, K/2] GGUF nibble order
    N: int
    K: int
    d: torch.Tensor | None = None  # [N, K/32] float16 or bfloat16
    m: torch.Tensor | None = None  # [N, K/32] like d, q4 only
    koff: float = 0.0

    @property
    def bf16_scales(self) -> bool:
        return self.d is not None and self.d.dtype == torch.bfloat16

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.d, self.m) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: exactly the weights the kernels multiply by."""
        if self.fmt in (F32, BF16):
            return self.w.float()
        d = self.d.float().repeat_interleave(32, dim=1)
        if self.fmt == Q8:
            return pi_to_natural(self.w).float() * d
        q = unpack_q4(self.w).float() + self.koff
        return q * d + (0 if self.m is None else self.m.float().repeat_interleave(32, dim=1))


def float_weight(w: torch.Tensor) -> Weight:
    w = w.detach()
    if w.dtype != torch.bfloat16:
        w = w.float()  # f16 and f32 both run as f32
    return Weight(BF16 if w.dtype == torch.bfloat16 else F32, w.contiguous(), *w.shape)


def natural_to_pi(q: torch.Tensor) -> torch.Tensor:
    """[N, K] → pair-interleaved order: per pair of blocks [b 0..15 | b+1 0..15 | b 16..31 | b+1 16..31];
    an unpaired last block stays as it is (see decode.cpp)."""
    N, K = q.shape
    nb = K // 32
    even = q[:, : 64 * (nb // 2)].reshape(N, nb // 2, 2, 2, 16).transpose(2, 3).reshape(N, -1)
    return torch.cat([even, q[:, 64 * (nb // 2) :]], dim=1).contiguous()


def pi_to_natural(q: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    nb = K // 32
    even = q[:, : 64 * (nb // 2)].reshape(N, nb // 2, 2, 2, 16).transpose(2, 3).reshape(N, -1)
    return torch.cat([even, q[:, 64 * (nb // 2) :]], dim=1)


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of 0..15 → [N, K/2] in GGUF order: byte j of a block holds elements j (low) and j+16."""
    N, K = q.shape
    b = q.reshape(N, K // 32, 2, 16).to(torch.uint8)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def unpack_q4(p: torch.Tensor) -> torch.Tensor:
    N = p.shape[0]
    b = p.reshape(N, -1, 16)
    return torch.stack([b & 15, b >> 4], dim=2).reshape(N, -1)


def _blocks(w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    if K % 32:
        raise LlmosError(f"a [{N}, {K}] weight cannot be quantized in blocks of 32; use quant=None or bf16")
    return w.detach().float().reshape(N, K // 32, 32)


def _roundf(x):  # C's roundf: halves away from zero (torch.round rounds them to even)
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


@torch.no_grad()
def quantize_q8_0(w: torch.Tensor) -> Weight:
    """GGUF Q8_0, bit-identical to ggml's quantize_row_q8_0_ref."""
    x = _blocks(w)
    d = x.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _roundf(x * inv).to(torch.int8).reshape(w.shape)
    return Weight(Q8, natural_to_pi(q), *w.shape, d=d[..., 0].half().contiguous())


@torch.no_grad()
def quantize_q4_0(w: torch.Tensor) -> Weight:
    """GGUF Q4_0 (d = the signed value of largest magnitude / -8), bit-identical to ggml's reference."""
    x = _blocks(w)
    big = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    d = big / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(x * inv + 8.5).clamp(0, 15).to(torch.uint8).reshape(w.shape)
    return Weight(Q4, pack_q4(q), *w.shape, d=d[..., 0].half().contiguous(), koff=-8.0)


@torch.no_grad()
def quantize_q4_1(w: torch.Tensor) -> Weight:
    """GGUF Q4_1 (d = (max - min) / 15, m = min), bit-identical to ggml's reference."""
    x = _blocks(w)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc((x - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8).reshape(w.shape)
    return Weight(Q4, pack_q4(q), *w.shape, d=d[..., 0].half().contiguous(), m=lo[..., 0].half().contiguous())


QUANTIZERS = {"int8": quantize_q8_0, "q8_0": quantize_q8_0, "int4": quantize_q4_1, "q4_0": quantize_q4_0,
              "q4_1": quantize_q4_1}


def quantize_rows(how: str, w: torch.Tensor, rows: int = 4096) -> Weight:
    """QUANTIZERS[how](w), a slice of rows at a time: the quantizers' float32 temporaries (several copies
    of what they quantize) then stay a few MB even for a 49k-row embedding used as the head. Rows are
    independent, so the result is the same bytes."""
    if w.shape[0] <= rows:
        return QUANTIZERS[how](w)
    parts = [QUANTIZERS[how](w[i : i + rows]) for i in range(0, w.shape[0], rows)]
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)
    return Weight(parts[0].fmt, cat([p.w for p in parts]), w.shape[0], w.shape[1], cat([p.d for p in parts]),
                  cat([p.m for p in parts]), parts[0].koff)


BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K")  # GGUF types whose 4/8-bit codes go into the kernels as stored
REQUANTIZED = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "Q6_K")  # dequantized, then packed as Q8_0 blocks


def q4_k_blocks(raw, N: int, K: int) -> Weight:
    """GGUF Q4_K (super-blocks of 256: fp16 d and dmin, twelve bytes of 6-bit scales and mins for the eight
    sub-blocks of 32, 128 bytes of codes) as Q4 blocks of 32: w = (d sc) q - (dmin m), so each sub-block is
    a Q4_1 block with scale d sc and offset -dmin m. The 4-bit codes are kept as stored; the two products
    are rounded to float16 (relative error at most 2^-11 of a scale), the only change to the weights."""
    import numpy as np

    nsb = K // 256
    b = np.ascontiguousarray(raw).reshape(N, nsb, 144)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc_bytes, qs = b[..., 4:16].astype(np.int32), b[..., 16:]
    # ggml's get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7; 4-7 split over bytes 8-11
    # (low nibble scale, high nibble min) and the top two bits of bytes 0-3 / 4-7
    lo, hi = sc_bytes[..., :4], sc_bytes[..., 4:8]
    scale = np.concatenate([lo & 63, (sc_bytes[..., 8:] & 15) | ((lo >> 6) << 4)], -1)
    mins = np.concatenate([hi & 63, (sc_bytes[..., 8:] >> 4) | ((hi >> 6) << 4)], -1)
    # codes: each 32 bytes hold two sub-blocks, the first in the low nibbles, the second in the high
    pairs = qs.reshape(N, nsb, 4, 32)
    q = np.stack([pairs & 15, pairs >> 4], axis=3).reshape(N, nsb * 8, 32)  # [N, sub-blocks, 32]
    packed = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8).reshape(N, K // 2)  # GGUF Q4 nibble order
    dq = (d[..., None] * scale).astype(np.float16).reshape(N, nsb * 8)
    mq = (-(dmin[..., None] * mins)).astype(np.float16).reshape(N, nsb * 8)
    return Weight(Q4, torch.from_numpy(packed), N, K, d=torch.from_numpy(dq), m=torch.from_numpy(mq))


def from_gguf_blocks(raw, qtype: str, N: int, K: int) -> Weight:
    """A GGUF tensor's raw bytes (numpy uint8, N rows of blocks) → the kernel format, no float round trip."""
    import numpy as np

    nb = K // 32
    if qtype == "Q4_K":
        return q4_k_blocks(raw, N, K)
    blocks = np.ascontiguousarray(raw).reshape(N, nb, -1)
    scales = lambda a, b: torch.from_numpy(np.ascontiguousarray(blocks[..., a:b]).view(np.float16)[..., 0])
    if qtype == "Q8_0":
        q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8)).reshape(N, K)
        return Weight(Q8, natural_to_pi(q), N, K, d=scales(0, 2))
    if qtype == "Q4_0":
        return Weight(Q4, torch.from_numpy(np.ascontiguousarray(blocks[..., 2:])).reshape(N, K // 2), N, K,
                      d=scales(0, 2), koff=-8.0)
    if qtype == "Q4_1":
        return Weight(Q4, torch.from_numpy(np.ascontiguousarray(blocks[..., 4:])).reshape(N, K // 2), N, K,
                      d=scales(0, 2), m=scales(2, 4))
    raise ValueError(qtype)


def from_quant_module(mod) -> Weight:
    """An llmos.quant Int8Linear / Int4Linear → the kernel format, from its stored integers and scales."""
    from llmos import quant

    N, K = mod.out_features, mod.in_features
    if isinstance(mod, quant.Int8Linear):
        if K % 32:
            raise LlmosError(f"int8 layer of width {K} is not a multiple of 32; the fast kernels cannot run it")
        d = mod.scales.detach().to(torch.bfloat16)[:, None].expand(N, K // 32).contiguous()
        return Weight(Q8, natural_to_pi(mod.qweight), N, K, d=d)
    sz = mod.scales_and_zeros
    if mod.layout == "ref":
        q = quant.unpack_int4(mod.qweight)
    elif mod.layout == "cpu":
        q = unpack_torch_int4_cpu(mod.qweight, N, K)
    else:
        raise LlmosError("this int4 model was packed for CUDA; the fast CPU decoder needs it loaded on the CPU")
    return q4_from_ints(q, sz[..., 0].t(), sz[..., 1].t(), mod.group_size)


def unpack_torch_int4_cpu(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The integers 0..15 [N, K] behind torch._convert_weight_to_int4pack_for_cpu. Its layout is blocks of
    BN output rows, K-major, byte j holding rows j (low nibble) and j + BN/2 (high); BN depends on the
    CPU torch runs on, so it is found by packing a probe of the same height and checking the inverse."""
    probe = torch.randint(0, 16, (N, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed_probe = torch._convert_weight_to_int4pack_for_cpu(probe, 2)

    def unpack(p, bn, k):
        b = p.reshape(N // bn, k, bn // 2)
        return torch.cat([b & 15, b >> 4], dim=2).permute(0, 2, 1).reshape(N, k)

    for bn in (32, 64, 16, 128):
        if N % bn == 0 and packed_probe.numel() == N * 32 and torch.equal(unpack(packed_probe, bn, 64), probe.to(torch.uint8)):
            return unpack(packed.reshape(-1), bn, K)
    raise LlmosError("this torch packs int4 weights in a layout llmos does not know; build the fast decoder "
                     "from the quantized directory (llmos.fast.decoder_from_quantized) or from the float model")


def q4_from_ints(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> Weight:
    """llmos int4 integers [N, K] with per-group bf16 scales and zeros → Q4 blocks (koff -8, m = zero)."""
    N, K = q.shape
    reps = group_size // 32
    sc = scales.to(torch.bfloat16).repeat_interleave(reps, dim=1).contiguous()
    ze = zeros.to(torch.bfloat16).repeat_interleave(reps, dim=1).contiguous()
    return Weight(Q4, pack_q4(q), N, K, d=sc, m=ze, koff=-8.0)


def from_quant_tensors(t: dict, scheme: str, group_size: int | None) -> Weight:
    """The stored tensors of one llmos.quant layer ({qweight, scales[, zeros]}) → the kernel format."""
    from llmos import quant

    if scheme == "int8":
        q = t["qweight"]
        N, K = q.shape
        d = t["scales"].to(torch.bfloat16)[:, None].expand(N, K // 32).contiguous()
        return Weight(Q8, natural_to_pi(q), N, K, d=d)
    return q4_from_ints(quant.unpack_int4(t["qweight"]), t["scales"], t["zeros"], group_size)


# ----------------------------------------------------------------------------
# Gathering a model's weights


def pack_model(model: Transformer, quant: str | None = None, head: str | None = None) -> dict:
    """{llmos name: Weight (matrices) or float32 tensor (norms, biases)} for Decoder.

    quant: None keeps each float weight's dtype (bf16 stays bf16, f16/f32 run as f32); "f32"/"bf16"
    cast; "int8"/"q8_0", "int4"/"q4_1", "q4_0" quantize every linear layer. head: the output head's
    format, by default q8_0 when the layers are quantized, else as the layers."""
    from llmos import quant as quant_mod

    if quant not in QUANTS:
        raise LlmosError(f"unknown quantization {quant!r}; use one of {', '.join(q for q in QUANTS if q)}")
    done = quant_mod.quantization_of(model)
    if done is not None and quant not in (None, done["scheme"]):
        raise LlmosError(f"the model is already quantized to {done['scheme']}; pass quant=None to use it as it is")

    def convert(w: torch.Tensor, how: str | None) -> Weight:
        if how in QUANTIZERS:
            return quantize_rows(how, w)
        if how == "f32":
            w = w.float()
        elif how == "bf16":
            w = w.to(torch.bfloat16)
        return float_weight(w)

    cfg, out = model.cfg, {}
    for i, block in enumerate(model.layers):
        for name in LINEARS:
            mod = block.get_submodule(name)
            key = f"layers.{i}.{name}"
            if isinstance(mod, (quant_mod.Int8Linear, quant_mod.Int4Linear)):
                out[f"{key}.weight"] = from_quant_module(mod)
            else:
                out[f"{key}.weight"] = convert(mod.weight, quant)
            if getattr(mod, "bias", None) is not None:
                out[f"{key}.bias"] = mod.bias.detach().float().contiguous()
        out[f"layers.{i}.attn_norm.weight"] = block.attn_norm.weight.detach().float().contiguous()
        out[f"layers.{i}.mlp_norm.weight"] = block.mlp_norm.weight.detach().float().contiguous()
    out["norm.weight"] = model.norm.weight.detach().float().contiguous()
    out["embed.weight"] = float_weight(model.embed.weight)
    quantized = quant in QUANTIZERS or done is not None
    head_w = model.embed.weight if model.head is None else model.head.weight
    how = head if head is not None else ("q8_0" if quantized else quant)
    if how is None and model.head is None:
        out["head.weight"] = out["embed.weight"]  # tied and unchanged: one tensor serves both
    else:
        out["head.weight"] = convert(head_w, how)
    return out


def pack_gguf(path, opened=None, tokenizer: bool = True) -> tuple[Config, dict, object]:
    """(config, weights, Tokenizer or None) of a GGUF file: BLOCK_TYPES (Q8_0/Q4_0/Q4_1/Q4_K) go into the
    kernel formats from their stored codes; REQUANTIZED types are dequantized by llmos.formats.gguf and
    packed as Q8_0; float types stay float. opened: open_gguf's result when the caller has parsed the
    file already (its fields cost ~1.3 KB a vocabulary entry)."""
    from pathlib import Path

    from llmos.formats import gguf as g

    path = Path(path)
    reader, fields = opened or g.open_gguf(path)
    arch = fields.get("general.architecture")
    if arch not in g.ARCHS:
        raise LlmosError(f"{path}: GGUF architecture {arch!r} is not supported; llmos runs 'llama' and 'qwen2' files")
    tensors = {t.name: t for t in reader.tensors}
    cfg = g.read_config(fields, arch, tensors, path)
    shapes = g.expected_shapes(cfg)
    out = {}
    for name, shape in shapes.items():
        gname = g.gguf_name(name)
        if gname not in tensors:
            raise LlmosError(f"{path}: missing tensor {gname}; the file is incomplete")
        t = tensors[gname]
        qtype = t.tensor_type.name
        heads = g.qk_heads(name, cfg) if arch == "llama" else None
        if len(shape) == 2 and qtype in BLOCK_TYPES:
            w = from_gguf_blocks(t.data, qtype, *shape)
            if heads:  # un-permuting q/k rows of quantized blocks is exact: rows move whole
                w = Weight(w.fmt, g.unpermute(w.w, heads).contiguous(), w.N, w.K, g.unpermute(w.d, heads).contiguous(),
                           None if w.m is None else g.unpermute(w.m, heads).contiguous(), w.koff)
        else:
            x = g.dequantize(t, path)
            if heads:
                x = g.unpermute(x, heads)
            if len(shape) == 2 and qtype in REQUANTIZED and shape[1] % 32 == 0:
                w = quantize_rows("q8_0", x)  # 5-6 bit codes fit Q8_0's 8 bits; no kernel reads them as they are
            else:
                w = float_weight(x) if len(shape) == 2 else x.float().contiguous()
        out[name] = w
    if cfg.tie_embeddings:
        out["head.weight"] = out["embed.weight"]
    from llmos.tokenizer import Tokenizer

    tok_fields = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    tok = Tokenizer.from_gguf_fields(tok_fields) if tokenizer and "tokenizer.ggml.tokens" in tok_fields else None
    return cfg, out, tok


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
        from llmos import kernels as K

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


def file_quant(meta: dict) -> str | None:
    """The most common of a GGUF file's block types that the kernels take as stored (Checkpoint.meta's
    tensor_types), lower-case: q8_0, q4_0, q4_1 or q4_k; None for float files and other types. (For the
    first three, requantizing ggml's values gives back the stored blocks bit for bit: checked on the
    bundled SmolLM2, 211 of 211 tensors.)"""
    counts = {t: n for t, n in (meta.get("tensor_types") or {}).items() if t in BLOCK_TYPES}
    return max(counts, key=counts.get).lower() if counts else None


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
    from llmos import quant

    ckpt, named, q = quant.read_quantized(path)
    layers, floats = quant.split_quantized(named, q, ckpt.config, path)
    weights = {k: v.float().contiguous() for k, v in floats.items() if v.dim() == 1}
    weights |= {k: float_weight(v) for k, v in floats.items() if v.dim() == 2}
    for stem, t in layers.items():
        weights[f"{stem}.weight"] = from_quant_tensors(t, q["scheme"], q.get("group_size"))
    head = weights.get("head.weight", weights["embed.weight"])
    weights["head.weight"] = quantize_rows("q8_0", head.w)
    return Decoder(ckpt.config, weights, max_len, threads, kernels), ckpt.tokenizer
