"""The one shape every parameters file reads into, and the tensor names and shapes a config implies."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmos.errors import LlmosError
from llmos.model import Config


@dataclass
class Checkpoint:
    config: Config
    state_dict: dict[str, torch.Tensor]  # llmos names; quantized GGUF types dequantized to float32
    tokenizer: "object | None"  # llmos.tokenizer.Tokenizer
    meta: dict = field(default_factory=dict)  # format, path, file_size, tensor_types, name, license, eos_token_ids, ...


def detect_format(path) -> str:
    """'hf', 'gguf' or 'llama2c' for a path, or a one-line error."""
    p = Path(path)
    if not p.exists():
        raise LlmosError(f"{p}: no such file or directory; pass a model directory, a .gguf file or a llama2.c .bin file")
    if p.is_dir():
        if (p / "config.json").exists():
            return "hf"
        files = sorted(f.name for f in p.iterdir() if f.suffix in (".gguf", ".bin"))[:3]
        hint = f" or one of its model files ({', '.join(files)})" if files else ""
        raise LlmosError(f"{p}: directory has no config.json; pass a Hugging Face model directory{hint}")
    if p.suffix in (".safetensors", ".json") or p.name.startswith("pytorch_model"):
        raise LlmosError(f"{p}: one file of a Hugging Face model; pass the directory that holds it ({p.parent})")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LlmosError(f"{p}: cannot read ({e.strerror}); check the file's permissions") from None
    if magic == b"GGUF":
        return "gguf"
    if p.suffix == ".gguf":
        raise LlmosError(f"{p}: not a GGUF file (bad magic {magic!r}); the file is corrupt or of another format")
    if p.suffix == ".bin":
        return "llama2c"
    raise LlmosError(f"{p}: unknown model format; pass a Hugging Face directory, a .gguf file or a llama2.c .bin file")


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """llmos name → torch shape, for every tensor a model of this config has (model.py's header).

    Formats check files against it before loading anything; building a Transformer for its
    shapes would cost the memory, or on the meta device an import of torch._dynamo (seconds)."""
    d, q, kv = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layer = {"attn_norm.weight": (d,), "attn.wq.weight": (q, d), "attn.wk.weight": (kv, d), "attn.wv.weight": (kv, d)}
    if cfg.qkv_bias:
        layer |= {"attn.wq.bias": (q,), "attn.wk.bias": (kv,), "attn.wv.bias": (kv,)}
    layer |= {"attn.wo.weight": (d, q), "mlp_norm.weight": (d,), "mlp.w1.weight": (cfg.hidden_dim, d),
              "mlp.w3.weight": (cfg.hidden_dim, d), "mlp.w2.weight": (d, cfg.hidden_dim)}
    shapes = {"embed.weight": (cfg.vocab_size, d)}
    shapes |= {f"layers.{i}.{k}": v for i in range(cfg.n_layers) for k, v in layer.items()}
    shapes["norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["head.weight"] = (cfg.vocab_size, d)
    return shapes
