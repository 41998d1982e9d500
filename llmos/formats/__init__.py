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
        raise LlmosError(f"{p}: directory has no config.json; pass a Hugging Face model directory")
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


def read_checkpoint(path) -> Checkpoint:
    kind = detect_format(path)
    if kind == "hf":
        from llmos.formats import hf as module
    elif kind == "gguf":
        from llmos.formats import gguf as module
    else:
        from llmos.formats import llama2c as module
    return module.read(path)


WRITE_DTYPES = {"hf": ("f32", "f16", "bf16"), "gguf": ("f32", "f16", "bf16", "q8_0")}


def write_checkpoint(ckpt: Checkpoint, out, to: str, dtype: str = "f32") -> None:
    """Write `ckpt` as a Hugging Face directory (to="hf") or one GGUF file (to="gguf")."""
    if to not in WRITE_DTYPES:
        raise LlmosError(f"cannot write format {to!r}; use hf or gguf")
    if dtype not in WRITE_DTYPES[to]:
        raise LlmosError(f"{to} files cannot hold dtype {dtype!r}; use one of {', '.join(WRITE_DTYPES[to])}")
    if to == "hf":
        from llmos.formats import hf as module
    else:
        from llmos.formats import gguf as module
    module.write(ckpt, out, dtype)
