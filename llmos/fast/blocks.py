"""The kernels' weight formats: blocks of 32 inputs as llama.cpp defines them (see llmos/fast/__init__.py).

Each matrix becomes a Weight: float rows, Q8 (int8 codes and a scale per block) or Q4 (4-bit codes, a
scale and an optional offset per block). The quantizers here are bit-identical to ggml's reference ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmos.errors import LlmosError
from llmos.formats.gguf import unpermute

F32, BF16, Q8, Q4 = 0, 1, 2, 3

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


def _copy_rows(dst: torch.Tensor, src, heads: int | None = None) -> None:
    """dst[...] = src (numpy, e.g. a strided view of a mapped file), rows un-permuted on the way when heads
    is given (llmos.formats.gguf.unpermute of q/k): one copy straight into dst, no temporaries."""
    if heads:
        half = dst.shape[0] // heads // 2
        dst = dst.view(heads, 2, half, *dst.shape[1:])  # view, not reshape: a copy here would be written in vain
        src = src.reshape(heads, half, 2, *src.shape[1:]).swapaxes(1, 2)
    dst.numpy()[...] = src


def from_gguf_blocks(raw, qtype: str, N: int, K: int, heads: int | None = None) -> Weight:
    """A GGUF tensor's raw bytes (numpy uint8, N rows of blocks) → the kernel format, no float round trip.
    heads: un-permute q/k rows (llama.cpp's interleaving) as well; rows move whole, so this is exact.

    Each array of the result is allocated once and filled straight from `raw` (the mapped file): no
    temporary copies, whose freed memory glibc would keep resident between the packed matrices (for
    TinyLlama-1.1B Q8_0 that was 0.5 GB above the file and its packed copy, unplanned)."""
    nb = K // 32
    if qtype == "Q4_K":
        w = q4_k_blocks(raw, N, K)
        if heads:
            w = Weight(w.fmt, unpermute(w.w, heads).contiguous(), N, K, unpermute(w.d, heads).contiguous(),
                       unpermute(w.m, heads).contiguous())
        return w
    if qtype not in ("Q8_0", "Q4_0", "Q4_1"):
        raise ValueError(qtype)
    blocks = np.asarray(raw).reshape(N, nb, -1)

    def scales(a: int) -> torch.Tensor:  # the float16 at bytes a, a+1 of every block: [N, nb]
        out = torch.empty(N, nb, dtype=torch.float16)
        _copy_rows(out, blocks[..., a : a + 2].view(np.float16)[..., 0], heads)
        return out

    if qtype == "Q8_0":
        # natural_to_pi as the copy's view: per pair of blocks, the first halves of both, then the second halves
        codes, pairs = blocks[..., 2:].view(np.int8), nb // 2
        q = torch.empty(N, K, dtype=torch.int8)
        _copy_rows(q[:, : 64 * pairs].view(N, pairs, 2, 2, 16),
                   codes[:, : 2 * pairs].reshape(N, pairs, 2, 2, 16).transpose(0, 1, 3, 2, 4), heads)
        if nb % 2:  # an unpaired last block stays as it is
            _copy_rows(q[:, 64 * pairs :], codes[:, -1], heads)
        return Weight(Q8, q, N, K, d=scales(0))
    start = 2 if qtype == "Q4_0" else 4
    q = torch.empty(N, nb, 16, dtype=torch.uint8)
    _copy_rows(q, blocks[..., start:], heads)
    if qtype == "Q4_0":
        return Weight(Q4, q.view(N, K // 2), N, K, d=scales(0), koff=-8.0)
    return Weight(Q4, q.view(N, K // 2), N, K, d=scales(0), m=scales(2))


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


