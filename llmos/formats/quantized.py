"""Directories written by `llmos quantize`: weight-only int8/int4 tensors in a Hugging Face–style folder.

On disk (`quantization_config.quant_method == "llmos"` in config.json):

    <linear>.qweight   int8 [out, in]              int4: uint8 [out, in/2], column 2j in the high nibble
    <linear>.scales    bfloat16 [out]              int4: bfloat16 [out, in/G]
    <linear>.zeros     -                           int4: bfloat16 [out, in/G]

    int8   per output channel, symmetric:   w ≈ q * scale            q in [-127, 127]
    int4   per group of G inputs (32, 64 or 128), asymmetric:  w ≈ (q - 8) * scale + zero   q in [0, 15]

This file holds the layout's reference arithmetic (quantize_weight / dequantize_weight) and reads and
writes such directories; llmos/quant.py swaps a model's layers for modules that run these tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmos.errors import LlmosError
from llmos.formats import hf
from llmos.formats.checkpoint import Checkpoint, expected_shapes

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPE = torch.bfloat16
QUANT_METHOD = "llmos"

# ----------------------------------------------------------------------------
# Quantize and dequantize one weight matrix [out, in] (the reference arithmetic)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, scheme: str, group_size: int = 32) -> dict[str, torch.Tensor]:
    """The stored tensors of one weight: {"qweight", "scales"} (+ "zeros" for int4), on w's device."""
    w = w.detach().float()
    if scheme == "int8":
        # Round the scale first, then the weights against it, so dequantizing with the stored
        # bfloat16 scale is the best the grid allows.
        scales = (w.abs().amax(1) / 127).clamp(min=1e-12).to(SCALE_DTYPE)
        q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scales}
    if scheme == "int4":
        out, width = w.shape
        g = w.reshape(out, width // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        scales = ((hi - lo) / 15).clamp(min=1e-12).to(SCALE_DTYPE)
        zeros = (lo + 8 * scales.float()).to(SCALE_DTYPE)  # the value of q = 8
        start = zeros.float() - 8 * scales.float()  # the value of q = 0
        q = torch.round((g - start[..., None]) / scales.float()[..., None]).clamp_(0, 15).to(torch.uint8)
        return {"qweight": pack_int4(q.reshape(out, width)), "scales": scales, "zeros": zeros}
    raise LlmosError(f"unknown quantization {scheme!r}; use int8 or int4")


def dequantize_weight(t: dict[str, torch.Tensor], scheme: str, group_size: int = 32) -> torch.Tensor:
    """float32 [out, in] from the stored tensors: exactly what the kernels multiply by."""
    if scheme == "int8":
        return t["qweight"].float() * t["scales"].float()[:, None]
    q = unpack_int4(t["qweight"]).float()
    out, width = q.shape
    g = q.reshape(out, width // group_size, group_size)
    return ((g - 8) * t["scales"].float()[..., None] + t["zeros"].float()[..., None]).reshape(out, width)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] of values 0..15 → [out, in/2]: column 2j in the high nibble, 2j+1 in the low
    (the input torch's CUDA packer takes, and torchao's layout)."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p >> 4, p & 15], dim=-1).reshape(p.shape[0], -1)


# ----------------------------------------------------------------------------
# Files


def is_quantized_dir(path) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / "config.json").is_file()):
        return False
    try:
        q = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return q.get("quant_method") == QUANT_METHOD


def write_quantized(ckpt, tensors: dict[str, torch.Tensor], out_dir, quantization: dict) -> None:
    """A directory like llmos export's, with `tensors` (llmos names, from quantize_state_dict) in
    model.safetensors and `quantization_config` in config.json. Atomic: built beside, then renamed."""
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "llmos_config.json").is_file())):
        raise LlmosError(f"{out}: already exists and was not written by llmos; choose another output path or remove it")
    cfg, tok, meta = ckpt.config, ckpt.tokenizer, ckpt.meta
    tmp, old = out.with_name(f"{out.name}.tmp-{os.getpid()}"), out.with_name(f"{out.name}.old-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        save_file({hf.to_hf(k): v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                  tmp / "model.safetensors", metadata={"format": "pt"})
        eos_ids = list(meta.get("eos_token_ids") or (tok.eos_ids if tok else []))
        bos, pad = (tok.bos_id, tok.pad_id) if tok else (None, None)
        eos = tok.eos_id if tok and tok.eos_id is not None else next(iter(eos_ids), None)
        floats = [v.dtype for k, v in tensors.items() if v.is_floating_point() and not k.endswith((".scales", ".zeros"))]
        config = hf.config_to_hf(cfg, floats[0] if floats else torch.bfloat16, bos, eos, pad)
        config["quantization_config"] = {"quant_method": QUANT_METHOD, **quantization}
        hf.dump(tmp / "config.json", config)
        gen = {"bos_token_id": bos, "eos_token_id": eos_ids or eos, "pad_token_id": pad}
        hf.dump(tmp / "generation_config.json", {**gen, **meta.get("generation", {})})
        hf.dump(tmp / "llmos_config.json", cfg.to_dict())
        if tok is not None:
            tok.save_hf(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def read_quantized(path, weights: bool = True):
    """(Checkpoint with an empty state dict, stored tensors by llmos name, quantization dict) of a
    directory written by write_quantized. weights=False reads no tensor (the dict is empty) and takes
    the tensor types from the safetensors header."""
    path = Path(path)
    config = hf.read_json(path / "config.json")
    q = dict(config.pop("quantization_config"))
    if q.get("quant_method") != QUANT_METHOD or q.get("scheme") not in SCHEMES:
        raise LlmosError(f"{path}: quantization {q} is not one llmos wrote; quantize the float model again")
    cfg, arch = hf.config_from_hf(config, path / "config.json")
    files = [path / "model.safetensors"]
    if weights:
        tensors, files = hf.load_tensors(path)
        dtypes = {k: hf.SHORT_NAMES.get(v.dtype, str(v.dtype)) for k, v in tensors.items()}
    else:
        tensors = {}
        dtypes = {k: v["dtype"].lower() for k, v in safetensors_header(files[0]).items() if k != "__metadata__"}
    for k in dtypes:
        if hf.to_llmos(k) is None:
            raise LlmosError(f"{path}: unexpected tensor {k}; the directory is not a model llmos quantized")
    named = {hf.to_llmos(k): v for k, v in tensors.items()}
    gen = hf.read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    kinds = Counter(q["scheme"] if k.endswith(".qweight") else t for k, t in dtypes.items()
                    if not k.endswith((".scales", ".zeros")))
    meta = {
        "format": "hf", "path": str(path), "file_size": sum(f.stat().st_size for f in files),
        "tensor_types": dict(kinds), "name": path.resolve().name, "architecture": arch, "quantization": q,
        "eos_token_ids": [] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        "generation": {k: gen[k] for k in hf.GENERATION_KEYS if gen.get(k) is not None},
    }
    return Checkpoint(cfg, {}, hf.load_tokenizer(path), meta), named, q


def split_quantized(named: dict, q: dict, cfg, where) -> tuple[dict, dict]:
    """({linear name: its stored tensors}, {float tensor name: tensor}), checked against the config."""
    expected = expected_shapes(cfg)
    parts = ("qweight", "scales") + (("zeros",) if q["scheme"] == "int4" else ())
    stems = {n.rpartition(".")[0] for n in named if n.endswith(".qweight")}
    quantized = {s: {p: named.pop(f"{s}.{p}", None) for p in parts} for s in stems}
    for s, t in quantized.items():
        out, width = expected.get(f"{s}.weight", (None, None))
        shape = (out, width // 2) if q["scheme"] == "int4" else (out, width)
        if out is None or None in t.values() or tuple(t["qweight"].shape) != shape:
            raise LlmosError(f"{where}: {s} does not match the config (missing parts or wrong shape); the directory is incomplete or corrupt")
    floats = {k: v for k, v in named.items()}
    missing = sorted(set(expected) - set(floats) - {f"{s}.weight" for s in stems})
    unexpected = sorted(set(floats) - set(expected))
    if missing or unexpected:
        raise LlmosError(f"{where}: tensors do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]}); the directory is incomplete or corrupt")
    return quantized, floats


def safetensors_header(file) -> dict:
    """name → {"dtype", "shape", "data_offsets"} of a .safetensors file, from its header alone."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise LlmosError(f"{file}: cannot read the safetensors header ({e}); the file is truncated or corrupt") from None


def read_dequantized(path, weights: bool = True):
    """A float32 Checkpoint of a quantized directory (for show and export): the weights the kernels
    multiply by, with meta["quantization"] saying where they came from."""
    ckpt, named, q = read_quantized(path, weights)
    if not weights:
        return ckpt
    quantized, floats = split_quantized(named, q, ckpt.config, path)
    sd = {k: v.float() for k, v in floats.items()}
    for stem, t in quantized.items():
        sd[f"{stem}.weight"] = dequantize_weight(t, q["scheme"], q.get("group_size"))
    ckpt.state_dict = sd
    return ckpt


