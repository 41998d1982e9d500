"""GPU layer offload: some of a model's layers on the GPU, the rest on the CPU, like llama.cpp's -ngl.

    llmos run MODEL --gpu-layers N|auto        llmos serve MODEL --gpu-layers N|auto
    place(model, 12)                            # in Python, after the model is built on the CPU

Which layers: the LAST N transformer blocks, as llama.cpp does (`i_gpu_start = n_layer - n_gpu_layers`
in llama-model.cpp); the token embedding, final norm and output head stay on the CPU so tokens go in
and logits come out there, and the engine and server need not know. N >= n_layers moves the whole
model (embedding and head too; llama.cpp wants n_layers + 1 for the output layer, llmos does not
make that distinction). The offloaded blocks compute in bfloat16 (float16 on GPUs without it).

Everything is applied from outside; model.py does not change:
  - a forward pre-hook on every block and on the final norm moves its inputs (the residual stream,
    rope cos/sin and the attention mask) to that module's device and dtype; cos/sin/mask are moved
    once per forward, not once per layer;
  - model.new_cache is replaced on the instance by one whose keys and values are one tensor per layer,
    each on its layer's device and in its dtype (LayerStack: indexes like the [layers, ...] tensor of
    KVCache, so batching.py's windows, shifts and row moves work unchanged).

`auto` takes N from free VRAM (torch.cuda.mem_get_info): each layer costs its weights plus its share
of the KV cache for the requested context (llmos.planner.kv_bytes), after CUDA overhead and the
prefill activations (planner.activation_bytes) are set aside. See choose_layers.
"""

from __future__ import annotations

import sys

import torch

from llmos.errors import LlmosError
from llmos import planner
from llmos.model import KVCache

CUDA_OVERHEAD = 500_000_000  # CUDA context, cuBLAS workspace, allocator slack: roughly, as planner.advice assumes


def parse_gpu_layers(value: str) -> int | str:
    """--gpu-layers N|auto."""
    if value == "auto":
        return value
    if not value.isdigit():
        raise LlmosError(f"--gpu-layers must be a number of layers >= 0 or 'auto', got {value!r}")
    return int(value)


def check_cuda() -> None:
    if not torch.cuda.is_available():
        raise LlmosError("--gpu-layers needs a CUDA GPU and none was found; drop --gpu-layers to run on the CPU")


def gpu_dtype(device: str) -> torch.dtype | None:
    """bfloat16 where the GPU has it, else float16; None (keep) for non-CUDA devices."""
    if not str(device).startswith("cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ----------------------------------------------------------------------------
# How many layers fit


def choose_layers(free: int, layer_bytes: int, kv_layer_bytes: int, output_bytes: int, reserved: int, n_layers: int) -> int:
    """Layers that fit in `free` bytes after `reserved`: each costs its weights and its KV cache;
    all of them also bring the embedding and head (`output_bytes`) along."""
    budget = free - reserved
    per_layer = layer_bytes + kv_layer_bytes
    if budget >= n_layers * per_layer + output_bytes:
        return n_layers
    return max(0, min(n_layers - 1, budget // per_layer))


def auto_layers(model, device: str, dtype, ctx: int, batch: int = 1) -> tuple[int, str]:
    """N for `auto`, and a line saying why."""
    cfg = model.cfg
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    size = torch.finfo(dtype).bits // 8
    layer_bytes = sum(p.numel() for p in model.layers[0].parameters()) * size
    output_bytes = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("layers.")) * size
    precision = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    kv_layer = planner.kv_bytes(cfg, ctx, batch, precision) // cfg.n_layers
    reserved = CUDA_OVERHEAD + planner.activation_bytes(cfg, ctx, batch, precision)
    n = choose_layers(free, layer_bytes, kv_layer, output_bytes, reserved, cfg.n_layers)
    why = (f"--gpu-layers auto: {n} of {cfg.n_layers} layers on {device} ({free / 1e9:.1f} GB free; "
           f"{(layer_bytes + kv_layer) / 1e6:.0f} MB a layer with its KV cache for {ctx} tokens x {batch})")
    return n, why


# ----------------------------------------------------------------------------
# Placement


def place(model, gpu_layers, device: str = "cuda", dtype="auto", ctx: int | None = None, batch: int = 1):
    """Put the last `gpu_layers` blocks (an int, or "auto") on `device`, in `dtype` ("auto": gpu_dtype;
    None: as the model is). Returns the model. device="cpu" exercises the same hooks without a GPU."""
    if str(device).startswith("cuda"):
        check_cuda()
    if dtype == "auto":
        dtype = gpu_dtype(device)
    dtype = dtype or model.embed.weight.dtype
    n_layers = model.cfg.n_layers
    if gpu_layers == "auto":
        gpu_layers, why = auto_layers(model, device, dtype, ctx or model.cfg.max_seq_len, batch)
        print(why, file=sys.stderr, flush=True)
    if not isinstance(gpu_layers, int) or gpu_layers < 0:
        raise LlmosError(f"--gpu-layers must be a number of layers >= 0 or 'auto', got {gpu_layers!r}")
    if gpu_layers >= n_layers:  # everything: no hooks, no split cache
        return model.to(device=device, dtype=dtype)
    for block in list(model.layers)[n_layers - gpu_layers :]:
        block.to(device=device, dtype=dtype)
    mover = Mover()
    for module in [*model.layers, model.norm]:
        module.register_forward_pre_hook(mover.hook)
    home = model.embed.weight

    def new_cache(batch: int = 1, max_len: int | None = None):
        cache = KVCache(model.cfg, batch, 0, home.device, home.dtype)  # empty: storage made per layer below
        cache.max_len = max_len or model.cfg.max_seq_len
        shapes = (batch, model.cfg.n_kv_heads, cache.max_len, model.cfg.head_dim)
        where = [next(block.parameters()) for block in model.layers]
        cache.k = LayerStack([torch.zeros(shapes, device=w.device, dtype=w.dtype) for w in where])
        cache.v = LayerStack([torch.zeros(shapes, device=w.device, dtype=w.dtype) for w in where])
        return cache

    model.new_cache = new_cache  # an instance attribute: shadows Transformer.new_cache for this model only
    return model


class Mover:
    """Forward pre-hook: a module's tensor arguments onto its parameters' device and dtype. A tensor
    passed to many modules (cos, sin, mask) is moved once: the latest copies are remembered."""

    def __init__(self):
        self.moved: dict[tuple, tuple] = {}

    def hook(self, module, args):
        w = next(module.parameters())
        return tuple(self.move(a, w.device, w.dtype) if isinstance(a, torch.Tensor) else a for a in args)

    def move(self, t: torch.Tensor, device, dtype):
        dtype = dtype if t.is_floating_point() else t.dtype  # the mask stays bool
        if t.device == device and t.dtype == dtype:
            return t
        key = (id(t), device, dtype)
        hit = self.moved.get(key)
        if hit is not None and hit[0] is t:  # the entry holds t, so its id cannot have been reused
            return hit[1]
        if len(self.moved) > 16:
            self.moved.clear()
        out = t.to(device=device, dtype=dtype)
        self.moved[key] = (t, out)
        return out


class LayerStack:
    """Per-layer tensors that index like one [n_layers, ...] tensor: stack[i, ...] is layer i's tensor,
    stack[:, ...] another LayerStack of views. What KVCache and batching.py do to cache.k and cache.v."""

    def __init__(self, layers: list[torch.Tensor]):
        self.layers = layers

    def __getitem__(self, index):
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(first, int):
            return self.layers[first][rest]
        return LayerStack([t[rest] for t in self.layers[first]])

    def __setitem__(self, index, value):
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(first, int):
            self.layers[first][rest] = value
            return
        values = value.layers if isinstance(value, LayerStack) else [value] * len(self.layers[first])
        for t, v in zip(self.layers[first], values):
            t[rest] = v.to(t.device) if isinstance(v, torch.Tensor) else v

    def clone(self) -> "LayerStack":
        return LayerStack([t.clone() for t in self.layers])

    @property
    def dtype(self):
        return self.layers[0].dtype

    @property
    def shape(self):
        return (len(self.layers), *self.layers[0].shape)
