"""GGUF files, the single-file format of llama.cpp, Ollama and LM Studio: read and write.

    llmos run model.gguf                            # read(): any llama or qwen2 GGUF
    llmos export MODEL out.gguf --dtype q8_0        # write(): f32, f16, bf16 or q8_0

Reading dequantizes every tensor to float32 with the gguf package's reference
dequantizer, so a Q4_K file runs exactly as llama.cpp's CPU reference computes it.
Three things differ between GGUF and llmos's (Hugging Face) layout:

- names: blk.N.attn_q.weight ↔ layers.N.attn.wq.weight, and so on (TENSOR_NAMES);
- shapes are stored fastest-dimension first (ggml's ne order): reversed from torch;
- for arch "llama", llama.cpp's converter interleaves the rows of q and k for its
  rope kernel (`LlamaModel.permute` in convert_hf_to_gguf.py); we undo it on read and
  redo it on write. Arch "qwen2" uses the NEOX rope, which is already HF's layout.

Llama-3.1+ rope scaling has no metadata keys in GGUF: the converter stores the
per-frequency divisors as a `rope_freqs.weight` tensor. We fit the HF
`rope_scaling` dict back from it and check that it reproduces the tensor, else stop.

We write arch "llama", or "qwen2" when the model has q/k/v biases (llama.cpp and
transformers expect those there). 1-D tensors stay F32, as llama.cpp does. The
tokenizer goes in as Tokenizer.to_gguf_fields writes it (a SentencePiece vocabulary
as convert_hf_to_gguf.py writes Llama 2's); a model without one gets
tokenizer.ggml.model "none", llama.cpp's marker for a vocabulary-less model.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import struct
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import torch

from llmos.errors import LlmosError
from llmos.formats.checkpoint import Checkpoint, expected_shapes
from llmos.model import Config, rope_frequencies
from llmos.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
WRITE_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {Q.F32: 0, Q.F16: 1, Q.Q8_0: 7, Q.BF16: 32}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, ...
ARCHS = ("llama", "qwen2")

# llmos name (after "layers.N.") → GGUF name (after "blk.N.")
TENSOR_NAMES = {
    "embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "head.weight": "output.weight",
    "attn_norm.weight": "attn_norm.weight", "attn.wo.weight": "attn_output.weight",
    "attn.wq.weight": "attn_q.weight", "attn.wk.weight": "attn_k.weight", "attn.wv.weight": "attn_v.weight",
    "attn.wq.bias": "attn_q.bias", "attn.wk.bias": "attn_k.bias", "attn.wv.bias": "attn_v.bias",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.w1.weight": "ffn_gate.weight", "mlp.w3.weight": "ffn_up.weight", "mlp.w2.weight": "ffn_down.weight",
}
IGNORED = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd")  # handled apart / recomputed


def gguf_name(name: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    return f"blk.{m[1]}.{TENSOR_NAMES[m[2]]}" if m else TENSOR_NAMES[name]


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows → llama.cpp's interleaved pairs (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved pairs → HF rotate-half rows: the inverse of permute."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def qk_heads(name: str, cfg: Config) -> int | None:
    """How many heads to (un)permute a q or k tensor over; None for every other tensor."""
    return {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}.get(name.split(".")[-2]) if ".attn." in name else None


# ----------------------------------------------------------------------------
# Reading


def read(path, weights: bool = True, opened=None) -> Checkpoint:
    """weights=False: config, tokenizer and meta only; the state dict stays empty.
    opened: open_gguf(path)'s result, when the caller has parsed the file already."""
    path = Path(path)
    reader, fields = opened or open_gguf(path)
    arch = fields.get("general.architecture")
    if arch not in ARCHS:
        raise LlmosError(f"{path}: GGUF architecture {arch!r} is not supported; llmos runs 'llama' and 'qwen2' files")
    tensors = {t.name: t for t in reader.tensors}
    cfg = read_config(fields, arch, tensors, path)

    # Check names and shapes before any dequantizing, so a bad file fails fast.
    shapes = expected_shapes(cfg)
    wanted = {gguf_name(k): k for k in shapes}
    missing = [g for g in wanted if g not in tensors]
    unknown = [g for g in tensors if g not in wanted and not IGNORED.fullmatch(g)]
    if missing or unknown:
        what = f"missing tensors {missing[:3]}" if missing else f"unexpected tensors {unknown[:3]}"
        raise LlmosError(f"{path}: {what} for a {arch} model of {cfg.n_layers} layers; "
                         f"the file is incomplete or not a {arch} model")
    for g, name in wanted.items():
        shape = tuple(reversed(tensors[g].shape.tolist()))
        if shape != shapes[name]:
            raise LlmosError(f"{path}: tensor {g} has shape {list(shape)}, the metadata implies "
                             f"{list(shapes[name])}; the file is inconsistent")

    state_dict = {}
    for g, name in wanted.items() if weights else ():
        w = dequantize(tensors[g], path)
        heads = qk_heads(name, cfg)
        state_dict[name] = unpermute(w, heads) if heads and arch == "llama" else w

    tok_fields = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    tokenizer = None
    if "tokenizer.ggml.tokens" in tok_fields:
        tokenizer = Tokenizer.from_gguf_fields(tok_fields)
    eos = [fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    meta = {"format": "gguf", "path": str(path), "file_size": path.stat().st_size,
            "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
            "name": fields.get("general.name"), "license": fields.get("general.license"), "architecture": arch,
            "eos_token_ids": [i for i in dict.fromkeys(eos) if i is not None]}
    return Checkpoint(config=cfg, state_dict=state_dict, tokenizer=tokenizer, meta=meta)


class Reader(gguf.GGUFReader):
    """GGUFReader, 15x faster to open (SmolLM2's file: 0.35 s of CPU, not 5.4). GGUFReader
    parses a vocabulary item by item, two numpy views per string; here an array of numbers
    is one view and an array of strings one pass of struct over the mapping. Slicing an
    np.memmap costs far more than slicing a plain ndarray view of the same mapping (still
    mapped, not copied). The garbage collector is paused meanwhile: once torch is imported,
    each collection that the parse's many small objects set off walks millions of objects."""

    def __init__(self, path):
        collecting = gc.isenabled()
        gc.disable()
        try:
            super().__init__(path)
        finally:
            if collecting:
                gc.enable()

    def _get(self, offset, dtype, count=1, override_order=None):
        if "_plain" not in self.__dict__:
            self._plain = self.data.view(np.ndarray)
        dtype, count = np.dtype(dtype), int(count)
        arr = self._plain[offset : offset + dtype.itemsize * count].view(dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(override_order or self.byte_order))

    def _get_field_parts(self, offs, raw_type):
        if raw_type != V.ARRAY:
            return super()._get_field_parts(offs, raw_type)
        itype, count = self._get(offs, np.uint32), self._get(offs + 4, np.uint64)
        sub, n, end = V(itype[0]), int(count[0]), offs + 12
        if n and sub in self.gguf_scalar_to_np:  # one view: contents() flattens the parts `data` points at
            values = self._get(end, self.gguf_scalar_to_np[sub], n)
            if values.size != n:
                raise ValueError(f"array of {n} values runs past the end of the file")
            return 12 + values.nbytes, [itype, count, values], [2], [V.ARRAY, sub]
        if n and sub == V.STRING and self.byte_order == "I" and sys.byteorder == "little":
            buf, parts = memoryview(self._plain), [itype, count]
            for _ in range(n):
                (size,) = struct.unpack_from("<Q", buf, end)
                parts += (buf[end : end + 8], buf[end + 8 : end + 8 + size])  # length, bytes: as contents() reads them
                end += 8 + size
            if end > len(buf):
                raise ValueError(f"array of {n} strings runs past the end of the file")
            return end - offs, parts, list(range(3, len(parts), 2)), [V.ARRAY, V.STRING]
        return super()._get_field_parts(offs, raw_type)  # empty arrays, arrays of arrays, byte-swapped files


def open_gguf(path: Path):
    """The reader and every metadata field as a python value, or a one-line error."""
    if not path.is_file():
        raise LlmosError(f"{path}: no such file; pass a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LlmosError(f"{path}: not a GGUF file (bad magic {magic!r}); "
                         "pass a .gguf file written by llama.cpp or llmos export")
    try:
        reader = Reader(path)
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # a cut-off file fails in the reader as short reads, bad reshapes, bad enum values...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LlmosError(f"{path}: truncated or corrupt GGUF file ({reason}); download or export it again") from None
    return reader, fields


def read_config(f: dict, arch: str, tensors: dict, path: Path) -> Config:
    def get(key, default=None):
        value = f.get(f"{arch}.{key}", default)
        if value is None:
            raise LlmosError(f"{path}: metadata key {arch}.{key} is missing; the file is incomplete")
        return value

    dim, n_heads = get("embedding_length"), get("attention.head_count")
    vocab = f.get(f"{arch}.vocab_size") or len(f.get("tokenizer.ggml.tokens", ()))
    if not vocab and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[1])
    head_dim = f.get(f"{arch}.attention.key_length") or f.get(f"{arch}.rope.dimension_count") or dim // n_heads
    kind = f.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": f32(get("rope.scaling.factor"))}
    elif kind == "none":
        scaling = None
    else:
        raise LlmosError(f"{path}: rope scaling {kind!r} is not supported; llmos supports linear and Llama-3 scaling")
    try:
        cfg = Config(vocab_size=vocab, dim=dim, n_layers=get("block_count"), n_heads=n_heads,
                     n_kv_heads=get("attention.head_count_kv", n_heads), hidden_dim=get("feed_forward_length"),
                     head_dim=head_dim, max_seq_len=get("context_length"),
                     norm_eps=f32(get("attention.layer_norm_rms_epsilon")),
                     rope_theta=f32(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
                     tie_embeddings="output.weight" not in tensors, qkv_bias="blk.0.attn_q.bias" in tensors)
    except (ValueError, TypeError) as e:
        raise LlmosError(f"{path}: metadata describes no valid model ({e}); the file is corrupt") from None
    if "rope_freqs.weight" in tensors:
        if scaling:
            raise LlmosError(f"{path}: both {kind} rope scaling and rope_freqs.weight; the file is inconsistent")
        cfg = replace(cfg, rope_scaling=llama3_scaling(dequantize(tensors["rope_freqs.weight"], path), cfg, path))
    return cfg


def f32(x: float) -> float:
    """A float32 from the file as the decimal it was written from: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(x)))


def llama3_scaling(divisors: torch.Tensor, cfg: Config, path: Path) -> dict | None:
    """The HF Llama-3 rope_scaling dict whose frequencies are base / divisors.

    Frequencies of wavelength beyond original/low are divided by `factor`, those
    below original/high kept, and in between 1/d = (1 - s)/factor + s with
    s = (original/wavelength - low) / (high - low): a line in 1/wavelength. Only the
    ratios low/original and high/original are fixed by the tensor; we take low = 1.
    """
    d = divisors.double()
    if torch.allclose(d, torch.ones_like(d)):
        return None
    factor = d.max().item()
    inv_freq = rope_frequencies(replace(cfg, rope_scaling=None)).double()
    candidates = [(1.0, 4.0, 8192)]  # Meta's values for every Llama 3.x
    middle = (d > 1 + 1e-6) & (d < factor - 1e-6)
    if middle.sum() >= 2:
        s = (1 / d[middle] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit((inv_freq[middle] / (2 * math.pi)).numpy(), s.numpy(), 1)
        high, original = 1 - 1 / intercept, -slope / intercept
        candidates[:0] = [(1.0, float(f"{high:.4g}"), round(original)), (1.0, float(high), float(original))]
    for low, high, original in candidates:
        s = dict(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                 original_max_position_embeddings=original)
        if torch.allclose(inv_freq / rope_frequencies(replace(cfg, rope_scaling=s)).double(), d, rtol=1e-4):
            return s
    raise LlmosError(f"{path}: rope_freqs.weight is not a Llama-3 rope scaling llmos can reproduce; "
                     "this model is not supported")


def dequantize(t, path: Path) -> torch.Tensor:
    """A GGUF tensor as float32 in torch's shape order, by the gguf package's reference dequantizer."""
    shape, quant = tuple(reversed(t.shape.tolist())), getattr(gguf.quants, t.tensor_type.name, None)
    try:
        if t.tensor_type in (Q.F32, Q.F16) or getattr(quant, "qtype", None) != t.tensor_type:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
            return torch.from_numpy(np.array(a, dtype=np.float32).reshape(shape))  # a copy: the mmap'd file stays read-only
        # The reference's block arithmetic over 64k blocks a call, not 16 rows: the same floats, 2-3x sooner.
        quant.init_grid()
        blocks, step = t.data.view(np.uint8).reshape(-1, quant.type_size), 1 << 16
        out = np.empty((len(blocks), quant.block_size), np.float32)
        for i in range(0, len(blocks), step):
            out[i : i + step] = quant.dequantize_blocks(blocks[i : i + step])
        return torch.from_numpy(out.reshape(shape))
    except NotImplementedError:
        raise LlmosError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which llmos cannot read; "
                         "requantize the file to q8_0 or f16 with llama.cpp's llama-quantize") from None


# ----------------------------------------------------------------------------
# Writing


def write(ckpt: Checkpoint, out_path, dtype: str = "f16") -> None:
    if dtype not in WRITE_TYPES:
        raise LlmosError(f"GGUF dtype {dtype!r} is not supported; choose one of {', '.join(WRITE_TYPES)}")
    cfg, qtype = ckpt.config, WRITE_TYPES[dtype]
    arch = "qwen2" if cfg.qkv_bias else "llama"
    out = Path(out_path)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(tmp, arch)
    write_metadata(w, ckpt, qtype)

    # Tensor infos first, then the data one tensor at a time: peak memory is one tensor.
    plan = []
    for name, shape in expected_shapes(cfg).items():
        t = ckpt.state_dict.get(name)
        if t is None or tuple(t.shape) != shape:
            raise LlmosError(f"checkpoint tensor {name} is {'missing' if t is None else list(t.shape)}, "
                             f"its config implies {list(shape)}")
        heads = qk_heads(name, cfg)
        plan.append((gguf_name(name), t, heads if arch == "llama" else None, tensor_type(name, shape, qtype)))
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) == "llama3":
        divisors = rope_frequencies(replace(cfg, rope_scaling=None)) / rope_frequencies(cfg)
        plan.append(("rope_freqs.weight", divisors, None, Q.F32))
    for g, t, _, q in plan:
        block, size = gguf.GGML_QUANT_SIZES[q]
        w.add_tensor_info(g, tuple(t.shape), np.dtype(np.float32), t.numel() // block * size, raw_dtype=q)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for g, t, heads, q in plan:
            t = t.detach().to("cpu", torch.float32)
            w.write_tensor_data(encode(permute(t, heads) if heads else t, q))
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise


def tensor_type(name: str, shape: tuple, qtype) -> "Q":
    if len(shape) == 1:
        return Q.F32  # norms and biases: tiny, and llama.cpp keeps them F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        log.warning("%s: rows of %d are not a multiple of %d; writing it as F16 instead of %s",
                    name, shape[-1], block, qtype.name)
        return Q.F16
    return qtype


def encode(t: torch.Tensor, qtype) -> np.ndarray:
    a = t.numpy()
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)  # BF16 and Q8_0 as uint8 blocks, llama.cpp's rounding


def write_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, qtype) -> None:
    cfg = ckpt.config
    w.add_name(ckpt.meta.get("name") or "llmos model")
    if ckpt.meta.get("license"):
        w.add_license(ckpt.meta["license"])
    w.add_file_type(FILE_TYPES[qtype])
    if qtype == Q.Q8_0:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    hyper = {"vocab_size": cfg.vocab_size, "context_length": cfg.max_seq_len, "embedding_length": cfg.dim,
             "block_count": cfg.n_layers, "feed_forward_length": cfg.hidden_dim, "head_count": cfg.n_heads,
             "head_count_kv": cfg.n_kv_heads, "key_length": cfg.head_dim, "value_length": cfg.head_dim,
             "rope_dimension_count": cfg.head_dim, "rope_freq_base": cfg.rope_theta, "layer_norm_rms_eps": cfg.norm_eps}
    for key, value in hyper.items():  # {arch}.context_length etc., by the writer's add_<key> methods
        getattr(w, f"add_{key}")(value)
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s["factor"])
    elif kind not in (None, "default", "llama3"):  # llama3 travels as the rope_freqs tensor
        raise LlmosError(f"rope scaling {kind!r} cannot be written to GGUF; llmos writes linear and llama3")
    if ckpt.tokenizer is None:  # llama.cpp refuses a file without tokenizer.ggml.model; "none" is its no-vocabulary
        w.add_tokenizer_model("none")  # model (LLAMA_VOCAB_TYPE_NONE). `llmos export` asks for --no-tokenizer first.
        return
    # the model's own end ids too, so llama.cpp and llmos stop where it does
    fields = ckpt.tokenizer.to_gguf_fields(eos_ids=ckpt.meta.get("eos_token_ids") or ())
    if getattr(ckpt.tokenizer, "chat_template", None):
        fields.setdefault("tokenizer.chat_template", ckpt.tokenizer.chat_template)
    for key, value in fields.items():
        add_field(w, key, value)


def add_field(w: gguf.GGUFWriter, key: str, value) -> None:
    """A python value under the GGUF type llama.cpp reads it as: ids u32, token types i32, scores f32."""
    V = gguf.GGUFValueType
    types = {bool: V.BOOL, int: V.UINT32, float: V.FLOAT32, str: V.STRING}
    if isinstance(value, (list, tuple)):
        if value:  # GGUF has no empty arrays
            sub = V.INT32 if type(value[0]) is int else types[type(value[0])]
            w.add_key_value(key, list(value), V.ARRAY, sub_type=sub)
    elif type(value) in types:
        w.add_key_value(key, value, types[type(value)])
    else:
        raise TypeError(f"GGUF field {key}: cannot store a {type(value).__name__}")
