"""Weight-only int8 and int4 quantization, applied from outside the model as module swaps.

    llmos quantize MODEL --to int4 OUT [--group-size 32]     # write a quantized HF-style directory
    llmos run OUT                                            # loads straight into the int kernels

After a model is built, `quantize_model(model, "int8" | "int4")` replaces every nn.Linear of the
blocks with an Int8Linear or Int4Linear; model.py never changes (gpt-fast's quantize.py does the
same). Activations stay floating point; only the weights shrink:

    int8   per output channel, symmetric:   w ≈ q * scale            q in [-127, 127]
    int4   per group of G inputs (32, 64 or 128), asymmetric, in the form torch's int4 kernels use:
                                           w ≈ (q - 8) * scale + zero   q in [0, 15]

The embedding and the output head stay in the float compute dtype: model.forward multiplies by
`head.weight` (or the tied embedding) itself, so there is no module to swap. Scales and zeros are
bfloat16, the type the kernels take, and the rounding is chosen against the rounded scales.

Kernels: on CPU torch._weight_int8pack_mm and torch._weight_int4pack_mm_for_cpu; on CUDA
torch._weight_int4pack_mm for int4. They are fast with bfloat16 activations (float32 activations
make the CPU int kernels several times slower than plain float32), so quantized models compute in
bfloat16 unless told otherwise. Where no kernel fits (another device, an odd width) the module
multiplies by the dequantized weight instead: slower, same numbers.

On disk (a Hugging Face–style directory, `quantization_config.quant_method == "llmos"` in config.json):

    <linear>.qweight   int8 [out, in]              int4: uint8 [out, in/2], column 2j in the high nibble
    <linear>.scales    bfloat16 [out]              int4: bfloat16 [out, in/G]
    <linear>.zeros     -                           int4: bfloat16 [out, in/G]

The kernels' packed layouts are made at load time for the device that runs the model, since they
differ between CPU and CUDA. `load_precision(name, "int4")` loads any model and quantizes it in
memory; a directory written here loads with `load_quantized`. Quantizing a directory written here
is refused (there is no float original left); a GGUF file's Q4/Q8 blocks are dequantized to float32
on reading and can be requantized, with a note that the errors add up.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmos.errors import LlmosError

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
SKIP = ("head",)  # model.forward reads head.weight directly: it stays a float nn.Linear
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
# Modules: drop-in replacements for nn.Linear


HAS_INT8_CPU = hasattr(torch.ops.aten, "_weight_int8pack_mm")
HAS_INT4_CPU = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
HAS_INT4_CUDA = hasattr(torch.ops.aten, "_weight_int4pack_mm")


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias. Buffers: qweight int8 [out, in], scales [out] (compute dtype)."""

    def __init__(self, t: dict[str, torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = t["qweight"].shape
        self.register_buffer("qweight", t["qweight"])
        self.register_buffer("scales", t["scales"])
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # The CPU kernel reads rows in blocks of 8 and returns garbage (or crashes) otherwise.
        self.kernel = HAS_INT8_CPU and self.in_features % 8 == 0

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, self.in_features)  # the kernels take 2-D inputs only
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        if self.kernel and x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x, self.qweight, scales)
        else:
            y = F.linear(x, self.qweight.to(x.dtype)) * scales
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(nn.Module):
    """y = x @ dequant(q)^T + bias, groups of `group_size` inputs. The packed weight is in the layout
    of the device it was made on ("cpu", "cuda" kernels, or "ref": our own packing, dequantized per call)."""

    def __init__(self, t: dict[str, torch.Tensor], group_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        q, device = t["qweight"], t["qweight"].device
        self.out_features, self.in_features, self.group_size = q.shape[0], q.shape[1] * 2, group_size
        # [in/G, out, 2]: scale and zero of every group, the kernels' qScaleAndZeros
        sz = torch.stack([t["scales"], t["zeros"]], dim=-1).transpose(0, 1).contiguous()
        self.layout = "ref"
        if device.type == "cpu" and HAS_INT4_CPU and self.out_features % 16 == 0:
            self.layout = "cpu"
            q = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(q).to(torch.int32), 2)
        elif device.type == "cuda" and HAS_INT4_CUDA and self.out_features % 8 == 0:
            tiles = next((k for k in (8, 4, 2) if self.in_features % (k * 16) == 0), None)
            if tiles:
                self.layout = "cuda"
                q = torch._convert_weight_to_int4pack(q.contiguous(), tiles)
        self.register_buffer("qweight", q)
        self.register_buffer("scales_and_zeros", sz)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, self.in_features)
        sz = self.scales_and_zeros if self.scales_and_zeros.dtype == x.dtype else self.scales_and_zeros.to(x.dtype)
        if self.layout != "ref" and x.device.type != self.layout:
            raise LlmosError(f"this int4 model was quantized for {self.layout} and cannot run on {x.device}; "
                             f"quantize it on the device that runs it")
        if self.layout == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, sz)
        elif self.layout == "cuda" and x.dtype == torch.bfloat16:
            y = torch._weight_int4pack_mm(x, self.qweight, self.group_size, sz)
        elif self.layout == "cuda":  # the CUDA kernel takes bfloat16 only
            y = torch._weight_int4pack_mm(x.to(torch.bfloat16), self.qweight, self.group_size,
                                          sz.to(torch.bfloat16)).to(x.dtype)
        else:
            t = {"qweight": self.qweight, "scales": sz[..., 0].t(), "zeros": sz[..., 1].t()}
            y = F.linear(x, dequantize_weight(t, "int4", self.group_size).to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 groups of {self.group_size}, {self.layout} layout")


def make_linear(t: dict[str, torch.Tensor], scheme: str, group_size: int, bias=None) -> nn.Module:
    return Int8Linear(t, bias) if scheme == "int8" else Int4Linear(t, group_size, bias)


# ----------------------------------------------------------------------------
# Whole models


def quantization_of(model: nn.Module) -> dict | None:
    """{"scheme", "group_size"} of a quantized model, else None."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            return {"scheme": "int8", "group_size": None}
        if isinstance(m, Int4Linear):
            return {"scheme": "int4", "group_size": m.group_size}
    return None


def check_scheme(scheme: str, group_size: int | None) -> int | None:
    if scheme not in SCHEMES:
        raise LlmosError(f"unknown quantization {scheme!r}; use int8 or int4")
    if scheme == "int8":
        return None
    group_size = 32 if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise LlmosError(f"group size {group_size} is not supported; use 32, 64 or 128")
    return group_size


def targets(shapes: dict[str, tuple], scheme: str, group_size: int | None, skip=SKIP) -> list[str]:
    """Names of the linear layers to quantize, given {name: (out, in)} of every nn.Linear; refuses a
    group size that does not divide a layer's input width, naming the layer and the sizes that would."""
    names = [n for n in shapes if n not in skip]
    if scheme == "int4":
        for n in names:
            width = shapes[n][1]
            if width % group_size:
                fits = [g for g in GROUP_SIZES if all(shapes[m][1] % g == 0 for m in names)]
                hint = f"use --group-size {' or '.join(map(str, fits))}" if fits else "this model cannot use int4"
                raise LlmosError(f"{n}: input width {width} is not a multiple of group size {group_size}; {hint}")
    return names


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None, dtype=torch.bfloat16,
                   skip=SKIP) -> nn.Module:
    """Swap the model's nn.Linear layers for Int8Linear / Int4Linear in place (each float weight is
    freed as its layer is replaced) and cast what stays float to `dtype`. Returns the model."""
    group_size = check_scheme(scheme, group_size)
    if (done := quantization_of(model)) is not None:
        raise LlmosError(f"the model is already quantized to {done['scheme']}; quantize the float model instead")
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    names = targets({n: tuple(m.weight.shape) for n, m in linears.items()}, scheme, group_size, skip)
    for i, name in enumerate(names, 1):
        m = linears.pop(name)
        new = make_linear(quantize_weight(m.weight, scheme, group_size), scheme, group_size, m.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, new)
        m.weight = m.bias = None  # let go now, not when the loop ends: the peak stays one layer above the result
        if i % TRIM_EVERY == 0:
            release_memory(collect=False)
    model.to(dtype)  # the embedding, norms, head, biases and scales; int weights are left alone
    return model


@torch.no_grad()
def quantize_state_dict(state_dict: dict, cfg, scheme: str, group_size: int | None = None,
                        dtype=torch.bfloat16, skip=SKIP) -> dict[str, torch.Tensor]:
    """A float state dict (llmos names) → the tensors of a quantized file: `<linear>.qweight/scales/zeros`
    for each quantized layer, everything else cast to `dtype`."""
    group_size = check_scheme(scheme, group_size)
    shapes = linear_shapes(cfg)
    out = {}
    names = targets(shapes, scheme, group_size, skip)
    for key, value in state_dict.items():
        stem, _, kind = key.rpartition(".")
        if stem in names and kind == "weight":
            out.update({f"{stem}.{k}": v for k, v in quantize_weight(value, scheme, group_size).items()})
        else:
            out[key] = value.to(dtype)
    return out


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """{name: (out, in)} of every nn.Linear a Transformer of this config has."""
    from llmos.formats import expected_shapes  # model.py's names and shapes, nothing allocated

    return {n[: -len(".weight")]: s for n, s in expected_shapes(cfg).items()
            if len(s) == 2 and n.endswith(".weight") and n != "embed.weight"}


# ----------------------------------------------------------------------------
# Files: write a quantized directory, load it back


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
    from safetensors.torch import save_file

    from llmos.formats import hf

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
    from llmos.formats import Checkpoint, hf

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
    from llmos.formats import expected_shapes

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


def load_quantized(path, device: str = "cpu", dtype=None):
    """(Transformer with Int8/Int4Linear layers, Tokenizer | None, Checkpoint) from a quantized
    directory; the packed kernels are made for `device`. dtype: compute dtype (default bfloat16)."""
    from llmos import registry
    from llmos.model import Transformer

    device = registry.check_device(device)
    dtype = registry.parse_dtype(dtype or "bf16", device)
    ckpt, named, q = read_quantized(path)
    quantized, floats = split_quantized(named, q, ckpt.config, path)
    with registry.no_init():  # the float weights of swapped layers are never touched, so cost no memory
        model = Transformer(ckpt.config)
    for i, stem in enumerate(list(quantized), 1):  # popped: each stored copy is freed once its kernel layout exists
        bias = floats.pop(f"{stem}.bias", None)
        # copies: safetensors hands out views of the mapped file, which would keep every page
        # read (the stored int4 weights too) resident for as long as one view lives
        t = {k: v.to(device, copy=True) for k, v in quantized.pop(stem).items()}
        parent, _, leaf = stem.rpartition(".")
        setattr(model.get_submodule(parent), leaf,
                make_linear(t, q["scheme"], q.get("group_size"), None if bias is None else bias.to(device, dtype)))
        if i % TRIM_EVERY == 0:
            release_memory(collect=False)
    floats = {k: v.to(device, dtype, copy=True) for k, v in floats.items()}
    missing, unexpected = model.load_state_dict(floats, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith((".qweight", ".scales", ".scales_and_zeros", ".bias"))]
    assert not missing and not unexpected, (missing, unexpected)  # split_quantized checked the names
    model = model.to(device=device, dtype=dtype).eval()
    del quantized, floats, named
    release_memory()
    return model, ckpt.tokenizer, ckpt


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


PRECISIONS = ("f32", "f16", "bf16", "int8", "int4")


def load_precision(name, precision: str | None = None, device: str = "cpu", group_size: int | None = None):
    """(model, tokenizer, checkpoint) at a precision: f32 | f16 | bf16, or int8 | int4 quantized after
    loading, or a quantized directory as stored. Converts and quantizes one tensor at a time and
    drops the float state dict, so the peak is the file as read (llmos.planner counts it so)."""
    from llmos import registry
    from llmos.formats import read_checkpoint

    if precision is not None and precision not in PRECISIONS:
        raise LlmosError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    path = registry.resolve(name)
    if is_quantized_dir(path):
        stored = json.loads((path / "config.json").read_text())["quantization_config"].get("scheme")
        if precision not in (None, stored):
            raise LlmosError(f"{path}: quantized to {stored}; it runs as {stored} only (quantize the float model to get {precision})")
        return load_quantized(path, device)
    ckpt = read_checkpoint(path)
    scheme = precision if precision in SCHEMES else None
    if scheme:
        check_scheme(scheme, group_size)
    dtype = registry.parse_dtype("f32" if scheme or precision is None else precision, device)
    sd = ckpt.state_dict
    for k in list(sd):  # one at a time, so the old copy is freed before the next is made
        sd[k] = sd[k].to(dtype)
    model = registry.build_model(ckpt, device, dtype)
    ckpt.state_dict = {}  # the model now holds the only reference: quantizing frees each float weight
    del sd
    if scheme:
        quantize_model(model, scheme, group_size)
    release_memory()
    return model, ckpt.tokenizer, ckpt


def release_memory(collect: bool = True) -> None:
    """Give freed heap memory back to the system. glibc keeps it otherwise: after loading, the
    resident size would stay at the loading peak, and while swapping layers the float32 and int32
    temporaries of each layer pile up in the heap instead of being reused."""
    if collect:
        import gc

        gc.collect()  # a third of a second with torch imported: only once, at the end
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


TRIM_EVERY = 16  # layers swapped between two malloc_trim calls (each costs milliseconds)


# ----------------------------------------------------------------------------
# llmos quantize MODEL --to int8|int4 OUT [--group-size G]


def cmd_quantize(args) -> int:
    from llmos import registry
    from llmos.formats import read_checkpoint

    path = registry.resolve(args.model)
    if is_quantized_dir(path):
        raise LlmosError(f"{path}: already quantized by llmos; quantize the float model it came from")
    if args.to == "int8" and getattr(args, "group_size", None):
        raise LlmosError("--group-size applies to int4 only; int8 has one scale per output row")
    group_size = check_scheme(args.to, getattr(args, "group_size", None))
    ckpt = read_checkpoint(path)
    tensors = quantize_state_dict(ckpt.state_dict, ckpt.config, args.to, group_size)
    lossy = sorted(t for t in ckpt.meta.get("tensor_types", {}) if t.upper() not in FLOAT_TYPES)
    if lossy:  # GGUF blocks were dequantized to float32 on reading; requantizing adds their error to ours
        print(f"note: {path.name} stores {', '.join(lossy)} tensors; they were dequantized and requantized, "
              "which adds error (quantize the float original when you have it)", file=sys.stderr)
    quantization = {"scheme": args.to, "bits": 8 if args.to == "int8" else 4, "group_size": group_size,
                    "not_quantized": ["embed"] + (["head"] if not ckpt.config.tie_embeddings else [])}
    write_quantized(ckpt, tensors, args.out, quantization)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {args.out} ({args.to}{f', groups of {group_size}' if group_size else ''}, {size / 1e6:.1f} MB)")
    return 0


FLOAT_TYPES = {"F32", "F16", "BF16", "FLOAT32", "FLOAT16", "BFLOAT16"}
