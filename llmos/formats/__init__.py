"""Parameters files in and out: Hugging Face directories, GGUF files, llama2.c checkpoints.

Every format reads into one `Checkpoint` (config + state dict in llmos's names +
tokenizer + facts about the file) and the model in llmos/model.py loads any of them.
"""

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


def read_checkpoint(path, weights: bool = True) -> Checkpoint:
    """The checkpoint at `path`. weights=False reads config, tokenizer and meta only (state_dict empty):
    what `llmos show` and `llmos tokenize` need, without loading or dequantizing a tensor."""
    kind = detect_format(path)
    if kind == "hf":
        from llmos.formats import hf as module
    elif kind == "gguf":
        from llmos.formats import gguf as module
    else:
        from llmos.formats import llama2c as module
    return module.read(path, weights=weights)


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


WRITE_DTYPES = {"hf": ("f32", "f16", "bf16"), "gguf": ("f32", "f16", "bf16", "q8_0")}


def check_write(out, to: str, dtype: str | None) -> None:
    """The one-line errors write_checkpoint would give, for callers to check before reading a model."""
    if to not in WRITE_DTYPES:
        raise LlmosError(f"cannot write format {to!r}; use hf or gguf")
    if dtype is not None and dtype not in WRITE_DTYPES[to]:
        raise LlmosError(f"{to} files cannot hold dtype {dtype!r}; use one of {', '.join(WRITE_DTYPES[to])}")
    if not Path(out).parent.is_dir():
        raise LlmosError(f"{out}: folder {Path(out).parent} does not exist; create it first or choose another output path")


def write_checkpoint(ckpt: Checkpoint, out, to: str, dtype: str = "f32") -> None:
    """Write `ckpt` as a Hugging Face directory (to="hf") or one GGUF file (to="gguf")."""
    check_write(out, to, dtype)
    if to == "hf":
        from llmos.formats import hf as module
    else:
        from llmos.formats import gguf as module
    module.write(ckpt, out, dtype)
