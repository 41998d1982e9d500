"""Constrained decoding and tool calls: what the model may write, and what it wrote.

`response_format` json_object / json_schema and a forced `tool_choice` become a grammar;
llguidance (a Rust matcher, the one behind Guidance and llama.cpp's JSON schemas) turns the
grammar into a mask over the vocabulary at every step, so tokens that would leave the grammar
get -inf before sampling. The output then always parses and matches the schema, unless the
token budget runs out first (finish_reason "length", as OpenAI's).

Tool calls come back in the formats chat templates teach: Hermes/Qwen/SmolLM2
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and Llama 3's bare
`{"name": ..., "parameters": {...}}`. A forced tool call is decoded as JSON of that shape.
"""

from __future__ import annotations

import json
import re
import uuid

import torch

from llmos.errors import LlmosError

# ----------------------------------------------------------------------------
# Grammars


def json_schema_grammar(schema: dict) -> str:
    """An llguidance grammar for JSON text matching `schema`. Whitespace is kept to JSON's compact
    form, so a wandering model cannot fill its budget with spaces."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except ValueError as e:
        raise LlmosError(f"the JSON schema cannot be compiled ({e}); send a JSON Schema object") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise LlmosError(f"the JSON schema is not supported for constrained decoding: {problem.splitlines()[0]}")
    return grammar


def tool_call_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON a forced tool call must be: {"name": one of the tools (or `name`), "arguments": its parameters}."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    return {"anyOf": [
        {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
         "required": ["name", "arguments"], "additionalProperties": False}
        for f in chosen
    ]}


class Vocabulary:
    """A model's tokenizer as llguidance sees it; built once per served model (about a second for 50k tokens)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        import llguidance

        self.size = vocab_size
        self.lltok = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size, eos_token=sorted(eos_ids))

    def matcher(self, grammar: str):
        import llguidance

        m = llguidance.LLMatcher(self.lltok, grammar, log_level=0)
        if m.is_error():
            raise LlmosError(f"the JSON schema is not usable for constrained decoding: {m.get_error()}")
        return m


class Constrained:
    """SamplingParams.logits_processor for one generation: each row follows its own copy of the
    grammar; tokens it does not allow get -inf."""

    def __init__(self, vocab: Vocabulary, grammar: str):
        self.vocab, self.grammar = vocab, grammar
        self.matchers: list = []
        self.consumed: list[int] = []
        self.bits = torch.arange(32, dtype=torch.int32)
        vocab.matcher(grammar)  # compile now: a bad schema is the request's error, not the stream's

    def __call__(self, generated: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        if not self.matchers:
            self.matchers = [self.vocab.matcher(self.grammar) for _ in generated]
            self.consumed = [0] * len(generated)
        masks = []
        for b, (m, ids) in enumerate(zip(self.matchers, generated)):
            for t in ids[self.consumed[b]:]:
                m.consume_token(t)
            self.consumed[b] = len(ids)
            if m.is_error():
                raise LlmosError(f"constrained decoding failed: {m.get_error()}")
            words = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32)
            masks.append(((words[:, None] >> self.bits) & 1).flatten()[: logits.shape[-1]].bool())
        allowed = torch.stack(masks).to(logits.device)
        return logits.masked_fill(~allowed, -torch.inf)


# ----------------------------------------------------------------------------
# Tool calls in the model's output

TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(content left over, [{"id", "type", "function": {"name", "arguments"}}]) from a reply.
    Only calls of tools the request offered count; anything else stays text."""
    calls, content = [], text
    if "<tool_call>" in text:
        for body in TAGGED.findall(text):
            calls += _calls_in(body, names)
        if calls:
            content = text[: text.index("<tool_call>")]
    else:
        calls = _calls_in(text.strip(), names)
        if calls:
            content = ""
    content = content.strip() or None if calls else text
    return content, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": c} for c in calls]


def _calls_in(text: str, names: set[str]) -> list[dict]:
    try:
        data = json.loads(text)
    except ValueError:
        return []
    calls = []
    for item in data if isinstance(data, list) else [data]:
        if not isinstance(item, dict) or item.get("name") not in names:
            return []
        args = item.get("arguments", item.get("parameters", {}))
        calls.append({"name": item["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)})
    return calls
