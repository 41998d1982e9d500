"""Sampling parameters: what a generation may vary, with llmos's defaults and their valid ranges.

The defaults here are the engine's; a model's generation_config.json overrides them and a user's flags or
request fields override that, in one place: llmos.loader.generation_defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from llmos.errors import LlmosError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy: argmax after penalties, top-k/top-p/min-p unused
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # CTRL: over prompt and generated tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI: over generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # None = off; N = the chosen token's logprob and the N most likely
    # (generated ids per row, logits [B, V]) -> logits: applied before penalties and sampling, e.g. a
    # grammar's mask (llmos/server/grammar.py); logprobs stay the model's own. Hold no state across
    # requests: give each generation its own.
    logits_processor: Callable[[list[list[int]], torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):  # the OpenAI API accepts one string or a list
            self.stop = [self.stop]

    def validate(self) -> None:
        """LlmosError naming the first parameter out of range, the range and the value."""
        num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        whole = lambda x: isinstance(x, int) and not isinstance(x, bool)
        list_of = lambda x, ok: isinstance(x, (list, tuple)) and all(map(ok, x))
        rules = [
            ("max_new_tokens", "an integer >= 1", lambda x: whole(x) and x >= 1),
            ("temperature", ">= 0 (0 means greedy)", lambda x: num(x) and x >= 0),
            ("top_k", "an integer >= 0 (0 means off)", lambda x: whole(x) and x >= 0),
            ("top_p", "in (0, 1]", lambda x: num(x) and 0 < x <= 1),
            ("min_p", "in [0, 1]", lambda x: num(x) and 0 <= x <= 1),
            ("repetition_penalty", "> 0 (1 means off)", lambda x: num(x) and x > 0),
            ("presence_penalty", "in [-2, 2]", lambda x: num(x) and -2 <= x <= 2),
            ("frequency_penalty", "in [-2, 2]", lambda x: num(x) and -2 <= x <= 2),
            ("seed", "an integer or None", lambda x: x is None or whole(x)),
            ("stop", "a list of non-empty strings", lambda x: list_of(x, lambda s: isinstance(s, str) and s)),
            ("stop_token_ids", "a list of token ids >= 0", lambda x: list_of(x, lambda t: whole(t) and t >= 0)),
            ("logprobs", "an integer in [0, 20] or None", lambda x: x is None or (whole(x) and 0 <= x <= 20)),
            ("logits_processor", "a callable or None", lambda x: x is None or callable(x)),
        ]
        for name, allowed, ok in rules:
            if not ok(getattr(self, name)):
                raise LlmosError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
