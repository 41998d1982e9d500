"""LoRA: low-rank adapters put on a built model from outside, merged back before saving.

    model = loader.load("smollm2", "torch").model
    adapters = apply_lora(model, targets="wq,wk,wv,wo,w1,w2,w3", rank=8, alpha=16)
    ...train: only the adapters' A and B have requires_grad...
    merge_lora(model)       # plain nn.Linear again, weight = W + (B @ A) * alpha / rank

Each targeted nn.Linear (matched by the last part of its module name) is replaced by a
LoRALinear that keeps the frozen original and adds `dropout(x) @ A.T @ B.T * scale`.
B starts at zero, so the wrapped model computes exactly what the original did. The
model file never changes (llmos/model.py): this is a module swap, like quantization.

`llmos train sft|dpo|reward --lora` use it; `disabled(model)` turns the adapters off
for a moment, which is how DPO gets its frozen reference without a second model copy.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmos.errors import LlmosError

DEFAULT_TARGETS = "wq,wk,wv,wo,w1,w2,w3"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        p = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=p.device, dtype=p.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=p.device, dtype=p.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear and PEFT initialize A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_b @ self.lora_a) * self.scale


def apply_lora(model: nn.Module, targets: str | list[str] = DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear whose name ends in one of `targets`; freeze everything else. Returns the wrapped names."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise LlmosError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got rank {rank}, alpha {alpha}, "
                         f"dropout {dropout}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in names:
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise LlmosError(f"no linear layer is named {', '.join(names)}; LoRA targets are among {', '.join(linears)}")
    return wrapped


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> None:
    """Replace each LoRALinear by a plain nn.Linear holding base + B @ A * scale (in place)."""
    for name, lora in lora_modules(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = lora.base
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(lora.merged_weight())
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        setattr(parent, child, merged)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the plain model's names, with adapters folded in; the model is left as it is."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, lora in lora_modules(model):
        with torch.no_grad():
            sd[f"{name}.weight"] = lora.merged_weight().detach().clone()
        sd.pop(f"{name}.base.weight")
        if lora.base.bias is not None:
            sd[f"{name}.bias"] = sd.pop(f"{name}.base.bias")
    return sd


@contextmanager
def disabled(model: nn.Module):
    """The model without its adapters, for the duration of the block."""
    mods = [m for _, m in lora_modules(model)]
    saved = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, s in zip(mods, saved):
            m.enabled = s
