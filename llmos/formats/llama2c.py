"""llama2.c checkpoints: the .bin files of karpathy/llama2.c, read into llmos (read only).

    llmos run stories260K.bin      # its tokenizer, tok512.bin or tokenizer.bin, sits beside it

Three layouts, as llama2.c's export.py writes them and run.c / runq.c read them:

    legacy (v0)  7 int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
                 a negative vocab_size means an untied classifier), then float32: embedding, per-layer
                 attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, the rope cos/sin
                 tables (seq_len * head_size / 2 each, skipped), and the classifier if untied
    v1           uint32 magic "ak42", int32 version 1, the 7 ints, uint8 shared_classifier, zeros to
                 256 bytes; then float32: attention norms, ffn norms, final norm, embedding, wq, wk,
                 wv, wo, w1, w2, w3, and the classifier if untied
    v2           as v1 plus int32 group_size after the flag; norms in float32, every matrix in Q8_0
                 (its int8 values, then one float32 scale per group), dequantized here to float32

llama2.c trains with Meta's interleaved rotary pairs; wq and wk are permuted into the
rotate-half layout of llmos/model.py, as transformers' convert_llama_weights_to_hf does.
llama2.c fixes norm_eps 1e-5 and rope_theta 10000; its tokenizer has BOS 1 and EOS 2.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from llmos.errors import LlmosError
from llmos.formats.checkpoint import Checkpoint
from llmos.model import Config
from llmos.tokenizer import Tokenizer

MAGIC = 0x616B3432  # "ak42"


def read(path, tokenizer_path=None, weights: bool = True) -> Checkpoint:
    """weights=False: header, sizes and tokenizer only; the state dict stays empty."""
    path = Path(path)
    if not path.is_file():
        raise LlmosError(f"{path}: no such file; pass a llama2.c .bin checkpoint")
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    version, cfg, shared, group_size, offset = read_header(data, path)
    tensors = [(name, shape, math.prod(shape)) for name, shape in layout(cfg, version, shared)]
    quantized = [version == 2 and name is not None and not name.endswith("norm.weight") for name, _, _ in tensors]
    if any(q and n % group_size for q, (_, _, n) in zip(quantized, tensors)):
        raise LlmosError(f"{path}: group size {group_size} does not divide the tensors; not a llama2.c v2 checkpoint")
    sizes = [n + 4 * (n // group_size) if q else 4 * n for q, (_, _, n) in zip(quantized, tensors)]
    if offset + sum(sizes) != data.size:
        raise LlmosError(f"{path}: truncated or not a llama2.c checkpoint: header implies "
                         f"{offset + sum(sizes)} bytes, file has {data.size}")
    state_dict = {}
    for (name, shape, n), size, is_q8 in zip(tensors, sizes, quantized):
        chunk, offset = data[offset : offset + size], offset + size
        if name is None or not weights:  # the legacy rope tables, which model.py recomputes
            continue
        if not is_q8:
            w = torch.from_numpy(chunk.view(np.float32).copy())
        else:  # n int8 values, then a float32 scale for each group
            q, scales = chunk[:n].view(np.int8).astype(np.float32), chunk[n:].copy().view(np.float32)
            w = torch.from_numpy((q.reshape(-1, group_size) * scales[:, None]).reshape(-1))
        if name.endswith(("attn.wq.weight", "attn.wk.weight")):
            w = to_rotate_half(w.view(shape), cfg.n_heads if ".wq." in name else cfg.n_kv_heads)
        state_dict[name] = w.view(shape)
    meta = {
        "format": "llama2c",
        "path": str(path),
        "file_size": data.size,
        "tensor_types": {"f32": sum(name is not None for name, _, _ in tensors) - sum(quantized),
                         **({"q8_0": sum(quantized)} if version == 2 else {})},
        "name": path.stem,
        "architecture": "llama",
        "eos_token_ids": [2],
        "llama2c_version": version,
    }
    return Checkpoint(cfg, state_dict, load_tokenizer(path, tokenizer_path, cfg.vocab_size), meta)


def read_header(data: np.ndarray, path: Path):
    """(version, Config, shared_classifier, group_size, offset of the first weight)."""
    if data.size < 28:
        raise LlmosError(f"{path}: truncated or not a llama2.c checkpoint: {data.size} bytes is less than a header")
    magic, version = struct.unpack_from("<Ii", data, 0)
    if magic == MAGIC:
        if version not in (1, 2):
            raise LlmosError(f"{path}: llama2.c version {version} is not supported; llmos reads v0 (legacy), v1, v2")
        if data.size < 256:
            raise LlmosError(f"{path}: truncated llama2.c checkpoint: {data.size} bytes, less than its 256-byte header")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", data, 8)
        shared, offset = bool(data[36]), 256
        group_size = struct.unpack_from("<i", data, 37)[0] if version == 2 else None
    else:
        version, group_size, offset = 0, None, 28
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", data, 0)
        shared, vocab = vocab > 0, abs(vocab)
    sane = min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) > 0 and max(dim, hidden, vocab) < 1 << 24
    sane = sane and not (dim % n_heads or n_heads % n_kv or dim // n_heads % 2) and (group_size or 1) > 0
    if not sane:
        raise LlmosError(f"{path}: not a llama2.c checkpoint (header dim={dim} hidden_dim={hidden} n_layers={n_layers} "
                         f"n_heads={n_heads} n_kv_heads={n_kv} vocab_size={vocab} seq_len={seq_len})")
    cfg = Config(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=hidden,
                 max_seq_len=seq_len, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=shared)
    return version, cfg, shared, group_size, offset


def layout(cfg: Config, version: int, shared: bool) -> list[tuple[str | None, tuple]]:
    """The tensors of a file in order, as (llmos name, shape); None names the legacy rope tables."""
    d, h, kv, v, L = cfg.dim, cfg.hidden_dim, cfg.n_kv_heads * cfg.head_dim, cfg.vocab_size, cfg.n_layers
    per_layer = lambda kind, *shape: [(f"layers.{i}.{kind}.weight", shape) for i in range(L)]  # noqa: E731
    attn_norms, mlp_norms, norm = per_layer("attn_norm", d), per_layer("mlp_norm", d), [("norm.weight", (d,))]
    attn = per_layer("attn.wq", d, d) + per_layer("attn.wk", kv, d) + per_layer("attn.wv", kv, d)
    attn += per_layer("attn.wo", d, d)
    mlp = per_layer("mlp.w1", h, d) + per_layer("mlp.w2", d, h) + per_layer("mlp.w3", h, d)
    embed, head = [("embed.weight", (v, d))], [] if shared else [("head.weight", (v, d))]
    if version == 0:
        rope = [(None, (cfg.max_seq_len, cfg.head_dim // 2))] * 2
        return embed + attn_norms + attn + mlp_norms + mlp + norm + rope + head
    return attn_norms + mlp_norms + norm + embed + attn + mlp + head


def to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rope rows (x0, y0, x1, y1, ...) → rotate-half rows (x0, x1, ..., y0, y1, ...) per head.

    The `permute` of transformers' convert_llama_weights_to_hf.py (and llama2.c export.py's hf_export).
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def load_tokenizer(path: Path, tokenizer_path, vocab_size: int):
    """The tokenizer passed, else tok{vocab_size}.bin or tokenizer.bin beside the checkpoint."""
    names = [f"tok{vocab_size}.bin", "tokenizer.bin"]
    found = [path.parent / n for n in names if (path.parent / n).is_file()]
    tok_path = Path(tokenizer_path) if tokenizer_path else found[0] if found else None
    if tok_path is None:
        raise LlmosError(f"{path}: no tokenizer beside it (looked for {' and '.join(names)}); put the model's "
                         f"llama2.c tokenizer there under one of those names")
    if not tok_path.is_file():
        raise LlmosError(f"{tok_path}: not found; pass the llama2.c tokenizer .bin that came with the model")
    return Tokenizer.from_llama2c(tok_path, vocab_size)
