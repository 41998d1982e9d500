"""Parameters files in and out: Hugging Face directories, GGUF files, llama2.c checkpoints.

Every format reads into one `Checkpoint` (config + state dict in llmos's names +
tokenizer + facts about the file) and the model in llmos/model.py loads any of them.
"""

from __future__ import annotations

from pathlib import Path

from llmos.errors import LlmosError
from llmos.formats import gguf, hf, llama2c, quantized
from llmos.formats.checkpoint import Checkpoint, detect_format, expected_shapes

__all__ = ["Checkpoint", "detect_format", "expected_shapes", "read_checkpoint", "write_checkpoint", "check_write",
           "gguf", "hf", "llama2c", "quantized"]


def read_checkpoint(path, weights: bool = True) -> Checkpoint:
    """The checkpoint at `path`. weights=False reads config, tokenizer and meta only (state_dict empty):
    what `llmos show` and `llmos tokenize` need, without loading or dequantizing a tensor."""
    kind = detect_format(path)
    if kind == "hf" and quantized.is_quantized_dir(path):  # `llmos quantize` output: a float view for show and export
        return quantized.read_dequantized(path, weights)
    return {"hf": hf, "gguf": gguf, "llama2c": llama2c}[kind].read(path, weights=weights)


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
    (hf if to == "hf" else gguf).write(ckpt, out, dtype)
