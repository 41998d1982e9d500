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

import ctypes
import gc
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmos.errors import LlmosError
from llmos.formats import expected_shapes
from llmos.formats.quantized import GROUP_SIZES, SCHEMES, dequantize_weight, quantize_weight, unpack_int4

SKIP = ("head",)  # model.forward reads head.weight directly: it stays a float nn.Linear

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
    return {n[: -len(".weight")]: s for n, s in expected_shapes(cfg).items()
            if len(s) == 2 and n.endswith(".weight") and n != "embed.weight"}


def release_memory(collect: bool = True) -> None:
    """Give freed heap memory back to the system. glibc keeps it otherwise: after loading, the
    resident size would stay at the loading peak, and while swapping layers the float32 and int32
    temporaries of each layer pile up in the heap instead of being reused."""
    if collect:
        gc.collect()  # a third of a second with torch imported: only once, at the end
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


TRIM_EVERY = 16  # layers swapped between two malloc_trim calls (each costs milliseconds)


