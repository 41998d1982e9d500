"""A model's weights gathered into kernel formats: from a loaded Transformer (float or swapped by llmos.quant),
from a GGUF file's blocks as stored, or from a directory `llmos quantize` wrote."""

from __future__ import annotations

from pathlib import Path

import torch

from llmos import quant as qmod
from llmos.errors import LlmosError
from llmos.fast.blocks import (BLOCK_TYPES, Q8, QUANTIZERS, REQUANTIZED, Weight, float_weight, from_gguf_blocks,
                               natural_to_pi, q4_from_ints, quantize_rows, unpack_torch_int4_cpu)
from llmos.formats import gguf as g
from llmos.formats import quantized as stored
from llmos.model import Config, Transformer
from llmos.tokenizer import Tokenizer

QUANTS = (None, "f32", "bf16", "int8", "q8_0", "int4", "q4_0", "q4_1")
LINEARS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w3", "mlp.w2")  # the kernel's order


def from_quant_module(mod) -> Weight:
    """An llmos.quant Int8Linear / Int4Linear → the kernel format, from its stored integers and scales."""
    N, K = mod.out_features, mod.in_features
    if isinstance(mod, qmod.Int8Linear):
        if K % 32:
            raise LlmosError(f"int8 layer of width {K} is not a multiple of 32; the fast kernels cannot run it")
        d = mod.scales.detach().to(torch.bfloat16)[:, None].expand(N, K // 32).contiguous()
        return Weight(Q8, natural_to_pi(mod.qweight), N, K, d=d)
    sz = mod.scales_and_zeros
    if mod.layout == "ref":
        q = stored.unpack_int4(mod.qweight)
    elif mod.layout == "cpu":
        q = unpack_torch_int4_cpu(mod.qweight, N, K)
    else:
        raise LlmosError("this int4 model was packed for CUDA; the fast CPU decoder needs it loaded on the CPU")
    return q4_from_ints(q, sz[..., 0].t(), sz[..., 1].t(), mod.group_size)


def from_quant_tensors(t: dict, scheme: str, group_size: int | None) -> Weight:
    """The stored tensors of one llmos.quant layer ({qweight, scales[, zeros]}) → the kernel format."""
    if scheme == "int8":
        q = t["qweight"]
        N, K = q.shape
        d = t["scales"].to(torch.bfloat16)[:, None].expand(N, K // 32).contiguous()
        return Weight(Q8, natural_to_pi(q), N, K, d=d)
    return q4_from_ints(stored.unpack_int4(t["qweight"]), t["scales"], t["zeros"], group_size)


# ----------------------------------------------------------------------------
# Gathering a model's weights


def pack_model(model: Transformer, quant: str | None = None, head: str | None = None) -> dict:
    """{llmos name: Weight (matrices) or float32 tensor (norms, biases)} for Decoder.

    quant: None keeps each float weight's dtype (bf16 stays bf16, f16/f32 run as f32); "f32"/"bf16"
    cast; "int8"/"q8_0", "int4"/"q4_1", "q4_0" quantize every linear layer. head: the output head's
    format, by default q8_0 when the layers are quantized, else as the layers."""
    if quant not in QUANTS:
        raise LlmosError(f"unknown quantization {quant!r}; use one of {', '.join(q for q in QUANTS if q)}")
    done = qmod.quantization_of(model)
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
            if isinstance(mod, (qmod.Int8Linear, qmod.Int4Linear)):
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
            w = from_gguf_blocks(t.data, qtype, *shape, heads=heads)  # q/k rows un-permuted while copied
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
    tok_fields = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    tok = Tokenizer.from_gguf_fields(tok_fields) if tokenizer and "tokenizer.ggml.tokens" in tok_fields else None
    return cfg, out, tok


def file_quant(meta: dict) -> str | None:
    """The most common of a GGUF file's block types that the kernels take as stored (Checkpoint.meta's
    tensor_types), lower-case: q8_0, q4_0, q4_1 or q4_k; None for float files and other types. (For the
    first three, requantizing ggml's values gives back the stored blocks bit for bit: checked on the
    bundled SmolLM2, 211 of 211 tensors.)"""
    counts = {t: n for t, n in (meta.get("tensor_types") or {}).items() if t in BLOCK_TYPES}
    return max(counts, key=counts.get).lower() if counts else None




def pack_quantized(path) -> tuple[Config, dict, Tokenizer | None]:
    """(config, weights, Tokenizer or None) of a directory written by `llmos quantize`, from its stored integers."""
    ckpt, named, q = stored.read_quantized(path)
    layers, floats = stored.split_quantized(named, q, ckpt.config, path)
    weights = {k: v.float().contiguous() for k, v in floats.items() if v.dim() == 1}
    weights |= {k: float_weight(v) for k, v in floats.items() if v.dim() == 2}
    for stem, t in layers.items():
        weights[f"{stem}.weight"] = from_quant_tensors(t, q["scheme"], q.get("group_size"))
    head = weights.get("head.weight", weights["embed.weight"])
    weights["head.weight"] = quantize_rows("q8_0", head.w)
    return ckpt.config, weights, ckpt.tokenizer
