"""Memory planner: how much RAM or VRAM a model needs, and whether it fits here.

    llmos fit MODEL [--ctx N] [--quant f32|f16|bf16|int8|int4] [--batch B] [--train none|full|lora]
    llmos fit smollm2 --train lora     # what `llmos train sft` will hold, at its default length, batch and rank
    llmos fit 7b --quant int4          # a size instead of a file: 135m, 1.1b, 7b, 13b, 30b, 70b, 175b
    llmos fit --table                  # 7B to 175B at fp32, fp16, int8, int4: weights + KV cache at 4k context

Every number is bytes counted from the config, the way llmos lays the model out in memory:

    weights      float: params x 2 or 4 B. int8/int4: the block's linear layers as llmos.quant stores
                 them (int8 + a bf16 scale per row; int4 + a bf16 scale and zero per group), the
                 embedding, norms and head in bfloat16 (the dtype quantized models compute in)
    KV cache     n_layers x 2 x n_kv_heads x head_dim x ctx x batch x (4 B for f32, else 2 B)
    activations  the prefill of a whole-context prompt: the residual stream and its normed copy, plus
                 the MLP's three [batch, ctx, hidden] tensors or attention's four [batch, ctx, q] ones,
                 whichever is larger, and the last position's logits (only those are computed)
    runtime      python + torch + llmos imported, measured once on this machine (RUNTIME_BYTES), and
                 the tokenizer (about 0.5 KB per vocabulary entry, measured on SmolLM2's 49,152)
    loading      reading a file holds the state dict as read (GGUF and llama2.c: float32, dequantized;
                 Hugging Face: as stored) and the file's pages while it is mapped; for GGUF also the
                 dequantizer's temporaries and the parsed metadata. The peak is the larger of loading
                 and running.

The fast CPU engine (--engine fast, what `llmos run` and `llmos bench` use on a CPU with a C++
compiler; llmos/fast.py) lays memory out differently:

    weights      the packed matrices: GGUF Q8_0 / Q4_0 / Q4_1 / Q4_K codes of a file as stored (34, 18, 20,
                 20 bytes per 32 weights), other k-quants and Q5 as Q8_0, float types as float32; or at int8/int4 every
                 linear layer as Q8_0 / Q4_1 blocks with a Q8_0 head and the embedding in bfloat16;
                 float precisions share the model's own tensors
    KV cache     float32 always, sized to the context
    activations  prefill runs in chunks of 512 tokens (llmos.fast.PREFILL_CHUNK), so they stop growing there
    loading      a GGUF file read as stored: the mapped file, its parsed metadata and the packed copy
                 (llmos.fast.from_gguf_blocks fills each packed array straight from the mapped file, no
                 temporaries; of the tensors of other types, the largest dequantized to float32 while packed);
                 converted to int8/int4: the model read in bfloat16, then packed one matrix at a time

Training (full): weights and gradients in the float dtype, AdamW's two float32 states, and the
activations autograd keeps, about 14 x dim + 4 x kv_dim + 4 x hidden values per layer per token
(norms, q/k/v, rope, attention, MLP) plus the logits three times (logits, log-softmax, gradient).
LoRA: the frozen base at --quant, adapters of the given rank on every linear layer of the blocks
(each parameter with its gradient and AdamW states), and the same activations, plus, with dropout on
the adapters, the dropped-out copy of every adapted layer's input and its mask. `llmos fit --train`
plans the fine-tuning stages' defaults (llmos.train.finetune: float32, their sequence length,
micro-batch and LoRA rank), and every training stage prints this plan before its first step.

Checked against measured peak resident memory (bench/README.md has the numbers and command).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf as gguf_lib
import torch

from llmos import fast, kernels, loader, registry
from llmos.errors import LlmosError
from llmos.formats import gguf, hf, quantized, read_checkpoint
from llmos.model import Config

PRECISIONS = ("f32", "f16", "bf16", "int8", "int4")
FLOAT_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "int8": 2, "int4": 2}  # the compute dtype of each precision
# Measured: resident memory of `python -c "import torch, llmos.registry, llmos.engine, llmos.quant"`
# (torch 2.13 CPU, Linux x86-64): 238 MB; the tokenizer of a 49,152-token vocabulary added 25 MB.
RUNTIME_BYTES = 238_000_000
TOKENIZER_BYTES_PER_ENTRY = 512
# Measured: parsing a GGUF file's metadata (vocabulary and merges as python objects) held 64 MB more
# than the finished tokenizer, for 49,152 entries, while the file was read.
GGUF_FIELDS_BYTES_PER_ENTRY = 1300

# Named sizes: Llama-2 7B/13B/70B, LLaMA-1 30B (33B), a GPT-3-sized Llama, and the bench shapes.
SIZES = {
    "135m": Config(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                   max_seq_len=8192, tie_embeddings=True),
    "1.1b": Config(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                   max_seq_len=2048),
    "7b": Config(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=4096),
    "13b": Config(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, max_seq_len=4096),
    "30b": Config(vocab_size=32000, dim=6656, n_layers=60, n_heads=52, hidden_dim=17920, max_seq_len=2048),
    "70b": Config(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
                  max_seq_len=4096),
    "175b": Config(vocab_size=50257, dim=12288, n_layers=96, n_heads=96, hidden_dim=32768, max_seq_len=2048),
}
ALIASES = {"smollm2-135m": "135m", "tinyllama-1.1b": "1.1b"}
TABLE_SIZES = ("7b", "13b", "30b", "70b", "175b")
TABLE_PRECISIONS = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}  # bytes per parameter in the table
GPUS = (8, 12, 16, 24, 40, 48, 80)  # common VRAM sizes, GB

# ----------------------------------------------------------------------------
# Bytes of each part


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise LlmosError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def linear_shapes(cfg: Config) -> list[tuple[int, int, bool]]:
    """(out, in, has_bias) of every linear layer of the blocks (what llmos.quant quantizes)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    b = cfg.qkv_bias
    layer = [(q, cfg.dim, b), (kv, cfg.dim, b), (kv, cfg.dim, b), (cfg.dim, q, False),
             (cfg.hidden_dim, cfg.dim, False), (cfg.hidden_dim, cfg.dim, False), (cfg.dim, cfg.hidden_dim, False)]
    return layer * cfg.n_layers


def weight_bytes(cfg: Config, precision: str, group_size: int = 32) -> int:
    """Bytes of the parameters in memory (and on disk, for llmos quantize's files)."""
    check_precision(precision)
    params = cfg.num_params()
    if precision in ("f32", "f16", "bf16"):
        return params * FLOAT_BYTES[precision]
    linear_params, qbytes = 0, 0
    for out, width, bias in linear_shapes(cfg):
        linear_params += out * width
        if precision == "int8":
            qbytes += out * width + out * 2  # int8 weights, one bf16 scale per row
        else:
            qbytes += out * width // 2 + out * (width // group_size) * 4  # 4-bit weights, bf16 scale + zero per group
    return qbytes + (params - linear_params) * 2  # the rest (embedding, norms, head, biases) in bfloat16


def bytes_per_token(cfg: Config, precision: str, group_size: int = 32) -> int:
    """Weight bytes a batch-1 decode step reads: every layer and the head; of an untied
    embedding only one row. The bandwidth ceiling is bandwidth / this."""
    total = weight_bytes(cfg, precision, group_size)
    if cfg.tie_embeddings:
        return total  # the embedding is read whole, as the head
    return total - (cfg.vocab_size - 1) * cfg.dim * FLOAT_BYTES[precision]


def kv_bytes(cfg: Config, ctx: int, batch: int = 1, precision: str = "f32") -> int:
    return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * ctx * batch * FLOAT_BYTES[precision]


def activation_bytes(cfg: Config, tokens: int, batch: int = 1, precision: str = "f32") -> int:
    """Peak activations of a prefill of `tokens` tokens per row (model.forward(last=True): logits of the
    last position only): the residual stream and its normed copy, plus the larger of the MLP's three
    hidden-width tensors and attention's q, repeated k/v and output, plus the last logits in float32."""
    b, n = FLOAT_BYTES[precision], batch * tokens
    q = cfg.n_heads * cfg.head_dim
    widest = max(3 * cfg.hidden_dim, 4 * q)
    return n * b * (2 * cfg.dim + widest) + batch * cfg.vocab_size * (b + 4)  # + the last position in float32


# The fast CPU engine (llmos/fast.py)

# bytes per 32 weights in the fast kernels, for each GGUF type they take as stored (llmos.fast.BLOCK_TYPES)
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q4_K": 20}
FAST_QUANT = {"int8": "Q8_0", "int4": "Q4_1"}  # what the fast engine packs each precision into


def fast_weight_bytes(cfg: Config, precision: str) -> int:
    """Bytes of the fast decoder's weights built from a model at `precision`: float precisions share the
    model's tensors (f16 adds a float32 copy); int8/int4 pack every linear layer into Q8_0/Q4_1 blocks,
    add a Q8_0 head (a tied embedding too) and keep the embedding in bfloat16. Norms and biases float32."""
    check_precision(precision)
    params = cfg.num_params()
    biases = sum(o for o, _, b in linear_shapes(cfg) if b)
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    if precision == "f32":
        return params * 4
    if precision == "bf16":  # the norms and biases as float32 copies
        return params * 2 + (norms + biases) * 4
    if precision == "f16":
        return params * (2 + 4)
    per_block = BLOCK_BYTES[FAST_QUANT[precision]]
    linear = sum(o * i for o, i, _ in linear_shapes(cfg))
    embed = cfg.vocab_size * cfg.dim
    return linear // 32 * per_block + embed * 2 + embed // 32 * BLOCK_BYTES["Q8_0"] + (norms + biases) * 4


def fast_kv_bytes(cfg: Config, ctx: int, batch: int = 1) -> int:
    """The fast decoder's float32 cache for `ctx` slots, with its rotary tables."""
    return kv_bytes(cfg, ctx, batch, "f32") + ctx * cfg.head_dim * 4


def fast_activation_bytes(cfg: Config, tokens: int) -> int:
    """Prefill activations of the fast engine, float32, one chunk of at most PREFILL_CHUNK tokens: the
    residual stream and its normed copy, q/k/v and their rotated copies, the MLP's gate, up, their
    product and its int8 form, and the last logits."""
    n, q, kv = min(tokens, fast.PREFILL_CHUNK), cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return n * 4 * (2 * cfg.dim + 2 * (q + 2 * kv) + 4 * cfg.hidden_dim) + cfg.vocab_size * 4


def runtime_bytes(cfg: Config, tokenizer: bool = True) -> int:
    return RUNTIME_BYTES + cfg.vocab_size * TOKENIZER_BYTES_PER_ENTRY * tokenizer


# ----------------------------------------------------------------------------
# Where a model comes from: its config and what loading it costs


@dataclass
class Source:
    name: str
    config: Config
    format: str  # "gguf" | "hf" | "llama2c" | "llmos-int8" | "llmos-int4" | "size" | "random" (built in memory)
    file_bytes: int = 0  # the largest file mapped at once while reading
    read_bytes: int = 0  # the state dict as the reader returns it
    temporary: int = 0  # bytes the reader holds beside the state dict at its peak
    precision: str | None = None  # what the file stores, when it is one of PRECISIONS
    tokenizer: bool = True  # loaded with the model (random-weight benchmark models have none)
    group_size: int | None = None  # of an int4 file
    blocks: str | None = None  # a GGUF file's quantized block type that the fast engine takes as stored
    stored_fast: int = 0  # bytes of the fast engine's weights taken from that file as stored
    stored_temporary: int = 0  # the largest float32 tensor (and its dequantizer's temporaries) while packing


def source(name: str) -> Source:
    """Config and loading facts of a model name, a path, or a size like "7b"; reads headers only."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key in SIZES:
        return Source(key, SIZES[key], "size")
    try:
        path = registry.resolve(name)
    except LlmosError as e:
        if re.fullmatch(r"[\d.]+[mb]", key):
            raise LlmosError(f"unknown size {name!r}; name a model file or one of {', '.join(SIZES)}") from None
        raise e
    if path.is_dir() and quantized.is_quantized_dir(path):
        config = hf.read_json(path / "config.json")
        q = config.pop("quantization_config")
        cfg, _ = hf.config_from_hf(config, path / "config.json")
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return Source(path.name, cfg, f"llmos-{q['scheme']}", size, size, 0, q["scheme"], group_size=q.get("group_size"))
    if path.is_dir():
        return hf_source(path)
    if path.suffix != ".bin":
        reader, fields = gguf.open_gguf(path)
        arch = fields.get("general.architecture")
        tensors = {t.name: t for t in reader.tensors}
        if arch not in gguf.ARCHS:
            raise LlmosError(f"{path}: GGUF architecture {arch!r} is not supported; llmos runs 'llama' and 'qwen2' files")
        cfg = gguf.read_config(fields, arch, tensors, path)
        kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
        stored = {"F32": "f32", "F16": "f16", "BF16": "bf16"}.get(kinds.pop()) if len(kinds) == 1 else None
        temporary = max(gguf_temporary(t) for t in reader.tensors) + cfg.vocab_size * GGUF_FIELDS_BYTES_PER_ENTRY
        counts = Counter(t.tensor_type.name for t in reader.tensors if t.tensor_type.name in BLOCK_BYTES)
        blocks = max(counts, key=counts.get) if counts else None  # as llmos.fast.file_quant picks
        # the fast engine's weights as stored: block types as they are, 2-D tensors of other types as float32
        # (a tied embedding serves as the head), norms float32
        def fast_bytes(t) -> int:
            kind, n = t.tensor_type.name, int(t.n_elements)
            if kind in BLOCK_BYTES:  # Q4_K's super-blocks become blocks of 32 with float16 scale and offset
                return n // 32 * BLOCK_BYTES[kind]
            return n // 32 * BLOCK_BYTES["Q8_0"] if kind in fast.REQUANTIZED and len(t.shape) == 2 else n * 4

        stored_fast = sum(fast_bytes(t) for t in reader.tensors)
        # tensors not taken as stored are dequantized to float32 one at a time (with the dequantizer's
        # temporaries) and packed from there: the largest such tensor adds to the loading peak
        converted = max((int(t.n_elements) * 4 + gguf_temporary(t) for t in reader.tensors
                         if t.tensor_type.name not in BLOCK_BYTES and len(t.shape) == 2), default=0)
        return Source(path.name, cfg, "gguf", path.stat().st_size, cfg.num_params() * 4, temporary, stored,
                      blocks=blocks, stored_fast=stored_fast, stored_temporary=converted)
    ckpt = read_checkpoint(path, weights=False)
    return Source(path.name, ckpt.config, "llama2c", path.stat().st_size, cfg_bytes(ckpt.config, 4), 0, "f32")


def hf_source(path: Path) -> Source:
    cfg, _ = hf.config_from_hf(hf.read_json(path / "config.json"), path / "config.json")
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    dtypes, read = set(), 0
    for f in files:
        if f.suffix == ".safetensors":  # the header says every tensor's dtype and byte range
            for k, v in quantized.safetensors_header(f).items():
                if k != "__metadata__":
                    read += v["data_offsets"][1] - v["data_offsets"][0]
                    dtypes.add(v["dtype"])
        else:
            read += f.stat().st_size
    stored = {"F32": "f32", "F16": "f16", "BF16": "bf16"}.get(dtypes.pop()) if len(dtypes) == 1 else None
    biggest = max((f.stat().st_size for f in files), default=0)
    return Source(path.name, cfg, "hf", biggest, read or cfg_bytes(cfg, 2), 0, stored)


def gguf_temporary(t) -> int:
    """Bytes llmos.formats.gguf holds beside a tensor's float32 result while dequantizing it: nothing
    for F32 (copied from the mapped file), a whole float32 array for F16/BF16, and for block types
    a few float32 arrays of 64k blocks (it dequantizes 64k blocks at a time)."""
    n, kind = int(t.n_elements), t.tensor_type.name
    if kind == "F32":
        return 0
    if kind in ("F16", "BF16"):
        return n * 4
    block = gguf_lib.GGML_QUANT_SIZES[t.tensor_type][0]
    return min(n, (1 << 16) * block) * 4 * 3


def cfg_bytes(cfg: Config, per_param: float) -> int:
    return int(cfg.num_params() * per_param)


def loading_bytes(src: Source, precision: str, group_size: int = 32) -> int:
    """Peak bytes above the runtime while llmos.quant.load_precision reads and converts the model:
    the state dict as read, the mapped file, the reader's temporary; quantizing then works one layer
    at a time (float32 temporaries and an int32 unpacking of the largest layer)."""
    if src.format == "size":
        return 0  # no file to read: the plan covers running only
    peak = src.read_bytes + src.file_bytes + src.temporary
    if precision in ("int8", "int4") and not src.format.startswith("llmos"):
        peak += max(o * i for o, i, _ in linear_shapes(src.config)) * 12
    return peak


# ----------------------------------------------------------------------------
# Plans


BLOCK_PRECISION = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4"}


def plan(cfg_or_source, precision: str = "f32", ctx: int | None = None, batch: int = 1, train: str = "none",
         prompt: int | None = None, group_size: int = 32, engine: str = "torch", lora_rank: int = 0,
         lora_dropout: float = 0.0) -> dict:
    """Bytes of every part and the peak, for inference (train="none") or training ("full", "lora" with adapters
    of lora_rank, whose dropout keeps a copy of each input). prompt: tokens of the prefill (default: the whole context, the worst case). engine: "torch"
    (the model; batches; training) or "fast" (the C++ decoder, one sequence at a time)."""
    src = cfg_or_source if isinstance(cfg_or_source, Source) else Source("model", cfg_or_source, "size")
    cfg = src.config
    check_precision(precision)
    if train not in ("none", "full", "lora"):
        raise LlmosError(f"unknown training mode {train!r}; use none, full or lora")
    ctx = min(cfg.max_seq_len, 4096) if ctx is None else ctx
    if ctx < 1 or batch < 1:
        raise LlmosError(f"context and batch must be at least 1, got --ctx {ctx} --batch {batch}")
    if ctx > cfg.max_seq_len:
        raise LlmosError(f"--ctx {ctx} exceeds {src.name}'s context limit of {cfg.max_seq_len} tokens; pass --ctx {cfg.max_seq_len} or less")
    if train == "lora" and lora_rank < 1:
        raise LlmosError(f"LoRA rank {lora_rank} must be at least 1")
    if train == "full" and precision in ("int8", "int4"):
        raise LlmosError("full training needs float weights; use --quant f32|bf16, or --train lora on a quantized base")
    parts = {"weights": weight_bytes(cfg, precision, group_size), "kv_cache": 0, "activations": 0,
             "gradients": 0, "optimizer": 0, "runtime": runtime_bytes(cfg, src.tokenizer)}
    b = FLOAT_BYTES[precision]
    if train == "none":
        parts["kv_cache"] = kv_bytes(cfg, ctx, batch, precision)
        parts["activations"] = activation_bytes(cfg, min(prompt or ctx, ctx), batch, precision)
    else:
        trained = cfg.num_params() if train == "full" else sum(lora_rank * (o + i) for o, i, _ in linear_shapes(cfg))
        tb = b if train == "full" else 4  # LoRA adapters are float32 (llmos.train.lora: the base's dtype, f32 on CPU)
        parts["weights"] += 0 if train == "full" else trained * tb
        parts["gradients"] = trained * tb
        parts["optimizer"] = trained * 8  # AdamW: exp_avg and exp_avg_sq in float32
        per_token = cfg.n_layers * (14 * cfg.dim + 4 * cfg.n_kv_heads * cfg.head_dim + 4 * cfg.hidden_dim) * b
        if train == "lora" and lora_dropout > 0:  # each adapter keeps its dropped-out input and the mask (1 B)
            per_token += sum(i for _, i, _ in linear_shapes(cfg)) * (b + 1)
        parts["activations"] = batch * ctx * (per_token + cfg.vocab_size * (b + 8))
    stored = False
    if engine == "fast":
        if train != "none" or batch != 1:
            raise LlmosError("the fast engine runs one sequence and no training; plan batches and training with --engine torch")
        stored = src.blocks is not None and BLOCK_PRECISION[src.blocks] == precision
        parts["weights"] = src.stored_fast if stored else fast_weight_bytes(cfg, precision)
        parts["kv_cache"] = fast_kv_bytes(cfg, ctx)
        parts["activations"] = fast_activation_bytes(cfg, min(prompt or ctx, ctx))
        group_size = 32
    elif engine != "torch":
        raise LlmosError(f"unknown engine {engine!r}; use fast or torch")
    running = sum(parts.values())
    if stored:  # the mapped file, its parsed metadata and the packed copy at once
        loading = (parts["runtime"] + src.file_bytes + cfg.vocab_size * GGUF_FIELDS_BYTES_PER_ENTRY + parts["weights"]
                   + src.stored_temporary)
    elif engine == "fast" and precision in FAST_QUANT and src.format != "size":  # read in bf16, then packed
        biggest = max(o * i for o, i, _ in linear_shapes(cfg)) * 4 * 3
        loading = parts["runtime"] + max(loading_bytes(src, "bf16"), weight_bytes(cfg, "bf16") + parts["weights"] + biggest)
    else:
        loading = parts["runtime"] + loading_bytes(src, precision, group_size)
    return {"model": src.name, "params": cfg.num_params(), "precision": precision, "group_size": group_size
            if precision == "int4" else None, "ctx": ctx, "batch": batch, "train": train, "prompt": prompt or ctx,
            "source": src.format, "engine": engine, "stored_blocks": src.blocks if stored else None,
            "lora_rank": lora_rank, "lora_dropout": lora_dropout, **parts,
            "running": running, "loading": loading, "peak": max(running, loading)}


# ----------------------------------------------------------------------------
# This machine


def machine() -> dict:
    """RAM total and available, and each CUDA GPU's total and free memory, in bytes."""
    ram_total = ram_free = 0
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        ram_total = int(info["MemTotal"].split()[0]) * 1024
        ram_free = int(info.get("MemAvailable", info["MemFree"]).split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            ram_total = ram_free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"name": torch.cuda.get_device_name(i), "total": total, "free": free})
    return {"ram_total": ram_total, "ram_available": ram_free, "gpus": gpus}


def advice(p: dict, src_or_cfg, here: dict) -> list[str]:
    """Whether the plan fits this machine, and if not, by how much and what would."""
    cfg = src_or_cfg.config if isinstance(src_or_cfg, Source) else src_or_cfg
    need, ram = p["peak"], here["ram_available"]
    lines = []
    gpu = max(here["gpus"], key=lambda g: g["free"], default=None)
    if gpu:
        if p["running"] <= gpu["free"]:
            lines.append(f"fits on the GPU ({gpu['name']}): {gb(p['running'])} of {gb(gpu['free'])} free VRAM")
        else:
            layer = (p["weights"] + p["kv_cache"]) / cfg.n_layers
            fixed = p["activations"] + 500e6  # CUDA context and kernels' workspace, roughly
            n = max(0, min(cfg.n_layers, int((gpu["free"] - fixed) // layer)))
            lines.append(f"does not fit on the GPU: {gb(p['running'])} needed, {gb(gpu['free'])} free VRAM "
                         f"({gb(p['running'] - gpu['free'])} short); about {n} of {cfg.n_layers} layers fit: "
                         f"--gpu-layers {n} keeps the rest in RAM")
    else:
        lines.append("no CUDA GPU: runs on the CPU, in RAM")
    if need <= ram:
        lines.append(f"fits in RAM: {gb(need)} of {gb(ram)} available ({gb(here['ram_total'])} total)")
        return lines
    lines.append(f"does not fit in RAM: needs {gb(need)}, {gb(ram)} available ({gb(need - ram)} short)")
    if p["train"] == "full" and p["lora_rank"]:
        lora = plan(src_or_cfg, p["precision"], p["ctx"], p["batch"], "lora", group_size=p["group_size"] or 32,
                    lora_rank=p["lora_rank"], lora_dropout=p["lora_dropout"])  # torch
        lines.append(f"  --train lora needs {gb(lora['peak'])}" + (" and fits" if lora["peak"] <= ram else ""))
    smallest = None
    for q in ("bf16", "int8", "int4"):
        if p["train"] == "full" and q.startswith("int"):
            continue
        other = plan(src_or_cfg, q, p["ctx"], p["batch"], p["train"], group_size=p["group_size"] or 32, engine=p["engine"],
                     lora_rank=p["lora_rank"], lora_dropout=p["lora_dropout"])
        if other["weights"] >= p["weights"]:
            continue  # not smaller than what was asked
        smallest = other
        fits = other["peak"] <= ram
        lines.append(f"  --quant {q} needs {gb(other['peak'])}" + (" and fits" if fits else f" ({gb(other['peak'] - ram)} short)"))
        if fits:
            return lines
    least = smallest or p  # the smallest precision tried: would a shorter context make it fit?
    scalable = least["kv_cache"] + least["activations"]  # both grow linearly with the context
    if scalable > least["peak"] - ram > 0:
        shorter = int(least["ctx"] * (1 - (least["peak"] - ram) / scalable)) // 256 * 256
        if shorter >= 256:
            fit = plan(src_or_cfg, least["precision"], shorter, p["batch"], p["train"], group_size=p["group_size"] or 32,
                       engine=p["engine"], lora_rank=p["lora_rank"], lora_dropout=p["lora_dropout"])
            if fit["peak"] <= ram:
                lines.append(f"  --quant {least['precision']} --ctx {shorter} needs {gb(fit['peak'])} and fits")
                return lines
    lines.append(f"  nothing smaller fits here: this needs a machine with at least {gb(least['peak'])} of free RAM"
                 + (" or a GPU (--gpu-layers)" if p["train"] == "none" else ""))
    return lines


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.0f} MB"


# ----------------------------------------------------------------------------
# The table: 7B to 175B at fp32, fp16, int8, int4


def table(ctx: int = 4096) -> list[dict]:
    """One row per size and precision: weights = nominal parameters x bytes per parameter, KV cache at
    `ctx` tokens in fp32 for the fp32 row and fp16 otherwise, and the smallest common GPU holding both."""
    rows = []
    for size in TABLE_SIZES:
        cfg, params = SIZES[size], int(float(size[:-1]) * 1e9)
        for name, per in TABLE_PRECISIONS.items():
            w = int(params * per)
            kv = kv_bytes(cfg, ctx, 1, "f32" if name == "fp32" else "f16")
            total = w + kv
            gpu = next((f"{g} GB" for g in GPUS if total <= g * 1e9 * 0.9), None)  # 10% for CUDA and activations
            gpu = gpu or f"{-(-total // int(80e9 * 0.9))} x 80 GB"
            rows.append({"size": size.upper(), "precision": name, "weights": w, "kv_cache": kv, "total": total,
                         "gpu": gpu})
    return rows


# ----------------------------------------------------------------------------
# llmos fit


def describe(p: dict, cfg: Config) -> list[str]:
    """One line per part of the plan: bytes and what they are."""
    is_fast = p["engine"] == "fast"
    f = 4 if is_fast else FLOAT_BYTES[p["precision"]]
    what = {
        "weights": describe_weights(p),
        "kv_cache": f"{cfg.n_layers} layers x 2 x {cfg.n_kv_heads} kv heads x {cfg.head_dim} x {p['ctx']} tokens"
                    f" x {p['batch']} x {f} B",
        "activations": (f"prefill in chunks of {min(p['prompt'], fast.PREFILL_CHUNK)} tokens, float32" if is_fast
                        else f"prefill of {p['prompt']} tokens: the residual stream, MLP or attention, the last logits"
                        if p["train"] == "none" else f"kept for the backward pass, {p['ctx']} tokens x {p['batch']}"),
        "gradients": "one per trained parameter",
        "optimizer": "AdamW: two float32 states per trained parameter",
        "runtime": f"python + torch + llmos {gb(RUNTIME_BYTES)} (measured) and the tokenizer",
    }
    lines = [f"{k:<13} {gb(p[k]):>10}   {what[k]}" for k in what if p[k]]
    lines.append(f"{'running':<13} {gb(p['running']):>10}"
                 + ("   fast engine (one sequence; --engine torch plans the model path)" if is_fast else ""))
    if p["source"] != "size":
        lines.append(f"{'loading':<13} {gb(p['loading']):>10}   reading the {p['source']} file"
                     + (" and packing it" if is_fast else "") + " (freed before running)")
    lines.append(f"{'peak':<13} {gb(p['peak']):>10}")
    return lines


def describe_weights(p: dict) -> str:
    quantized = p["precision"].startswith("int")
    if p["engine"] == "fast":
        if p["stored_blocks"]:
            return f"the file's {p['stored_blocks']} codes as stored; Q5, Q6 and other k-quants as Q8_0; norms float32"
        if quantized:
            return f"{FAST_QUANT[p['precision']]} layers, Q8_0 head, bf16 embedding"
        return p["precision"] + (" model + a float32 copy for the kernels" if p["precision"] == "f16" else ", shared with the model")
    return (p["precision"] + (" layers" if quantized else "") + (f" (groups of {p['group_size']})" if p["group_size"] else "")
            + (", bf16 embedding, norms and head" if quantized else "")
            + (f" + rank-{p['lora_rank']} LoRA adapters" if p["train"] == "lora" else ""))


def pick_engine(engine: str | None, train: str = "none", batch: int = 1) -> str:
    """The engine `llmos run` would use, as the loader decides it (llmos.loader.backend), in the planner's two kinds."""
    with contextlib.redirect_stderr(io.StringIO()):  # a plan is no place for the kernels' build note
        kind = loader.backend(engine or "auto", batch=batch, train=train != "none")
    return "fast" if kind == "fast" else "torch"


def fit(model, quant: str | None = None, ctx: int | None = None, batch: int = 1, train: str = "none",
        group_size: int | None = None, engine: str | None = None, lora_rank: int = 0,
        lora_dropout: float = 0.0) -> tuple[dict, "Source"]:
    """(plan, source) for `llmos fit MODEL` (a name, a path or a Source): unless given, the precision as `llmos run`
    would load the file, or float32 for training, as the training stages load it."""
    src = model if isinstance(model, Source) else source(model)
    engine = pick_engine(engine, train, batch)
    stored = BLOCK_PRECISION.get(src.blocks) if engine == "fast" else None  # llmos run takes the blocks as stored
    trains_f32 = train != "none" and not src.format.startswith("llmos")
    precision = quant or ("f32" if trains_f32 else src.precision or stored or "f32")
    if src.format.startswith("llmos") and precision != src.precision:
        raise LlmosError(f"{model} is quantized to {src.precision}; plan it as --quant {src.precision}")
    p = plan(src, precision, ctx, batch, train, group_size=group_size or src.group_size or 32, engine=engine,
             lora_rank=lora_rank, lora_dropout=lora_dropout)
    return p, src


def report(p: dict, src: "Source", here: dict | None = None) -> list[str]:
    """What `llmos fit` prints: the model, then each part of the plan, then (given `here`) whether it fits here."""
    cfg = src.config
    kind = "inference" if p["train"] == "none" else f"{p['train']} training"
    head = (f"{src.name}: {cfg.num_params() / 1e6:,.1f}M parameters, {cfg.n_layers} layers, width {cfg.dim}; "
            f"{p['precision']}, context {p['ctx']}, batch {p['batch']}, {kind}")
    return [head] + describe(p, cfg) + (advice(p, src, here) if here is not None else [])
