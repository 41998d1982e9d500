"""Conversations and preference pairs in the formats people have, and their assistant-token masks.

Files: a JSON array or JSONL (one object per line), optionally gzipped (.gz). Each row is one of

    alpaca      {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
    ShareGPT    {"conversations": [{"from": human|gpt|system|function_call|observation, "value"}], "system"?, "tools"?}
    OpenAI      {"messages": [{"role": system|user|assistant|tool, "content", "tool_calls"?}], "tools"?}

and a preference pair is one of

    hh-rlhf     {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}  (Anthropic's plain dialogues)
    ShareGPT    {"conversations": [...prompt turns], "chosen": {"from": "gpt", "value"}, "rejected": {...}}
    prompt      {"prompt": text | messages, "chosen": text | messages, "rejected": text | messages}  (TRL's shape)

Everything becomes OpenAI-shaped messages: a conversation is {"messages": [...], "tools": [...] | None},
a pair is {"prompt": [...], "chosen": [...], "rejected": [...], "tools": ...}. ShareGPT function_call turns
become assistant messages with `tool_calls` (the arguments parsed from JSON) and observation turns
become "tool" messages; templates that know no tool calls get them as <tool_call> text instead.

Decisions:
- hh-rlhf: the prompt is the turns both dialogues share, cut back to end on a human turn; the responses
  are the rest (usually one assistant turn). Consecutive turns of one speaker (13 of the 4,624 dialogues
  in the harmless test set) are joined with a blank line, since most templates want alternating turns.
- `{{word}}` placeholders (identity.json's {{name}} and {{author}}) are filled from `fill`; one left
  unfilled in SFT data is an error, so a model never learns to say "{{name}}".

The mask: `render_masked` renders the conversation with the model's own template, and for each assistant
turn i renders messages[:i] with the generation prompt and messages[:i+1] without; the characters between
the two (minus trailing whitespace, i.e. the content and the end-of-turn token but not the newline that
follows it) are the assistant's. Tokens whose character offsets overlap those spans get mask 1, which
is what transformers computes from `{% generation %}` blocks (return_assistant_tokens_mask). A template
that renders earlier turns differently once later ones follow is refused rather than guessed at.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from llmos.errors import LlmosError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool",
                  "function": "tool"}
OPENAI_ROLES = {"system", "developer", "user", "assistant", "tool"}
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")

FORMATS = ('alpaca {"instruction", "output"}, ShareGPT {"conversations": [{"from", "value"}]} '
           'or OpenAI {"messages": [{"role", "content"}]}')
PAIR_FORMATS = ('hh-rlhf {"chosen": "\\n\\nHuman: ...", "rejected": ...}, ShareGPT {"conversations", "chosen", '
                '"rejected"} or {"prompt", "chosen", "rejected"}')


class RowError(Exception):
    """A problem with one row; `read` adds the file and the row number."""


# ----------------------------------------------------------------------------
# Reading files: rows with their position


def read_rows(path) -> list[tuple[str, dict]]:
    """[(where, row)] for a JSON array or JSONL file (gzipped or not); where = "item 3" or "line 3"."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LlmosError(f"{path}: no such file; pass a .json or .jsonl file of conversations") from None
    except OSError as e:
        raise LlmosError(f"{path}: cannot read ({e.strerror}); check the path and its permissions") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise LlmosError(f"{path}: broken gzip file ({e}); download or compress it again") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise LlmosError(f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise LlmosError(f"{path}: empty file; pass a JSON array or JSONL file with one conversation per row")
    rows = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise LlmosError(f"{path}: not valid JSON ({e}); fix the file or write one JSON object per line") from None
        rows = [(f"item {i}", r) for i, r in enumerate(data, 1)]
    else:
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append((f"line {i}", json.loads(line)))
                except ValueError as e:
                    raise LlmosError(f"{path}: line {i} is not JSON ({e}); each line must be one JSON object") from None
    for where, r in rows:
        if not isinstance(r, dict):
            raise LlmosError(f"{path}: {where} is a {type(r).__name__}, expected a JSON object: {FORMATS}")
    if not rows:
        raise LlmosError(f"{path}: no rows; pass a JSON array or JSONL file with one conversation per row")
    return rows


def load_conversations(path, fill: dict | None = None) -> list[dict]:
    """Every row of an SFT file as {"messages", "tools"}; LlmosError naming the file and row on bad input."""
    out = []
    for where, row in read_rows(path):
        try:
            if "chosen" in row and "rejected" in row:
                raise RowError("is a preference pair (chosen/rejected); train on it with `llmos train dpo`")
            conv = conversation(row)
            conv["messages"] = fill_placeholders(conv["messages"], fill or {})
            if not any(m["role"] == "assistant" for m in conv["messages"]):
                raise RowError("has no assistant turn, so there is nothing to learn from it; add the answer")
        except RowError as e:
            raise LlmosError(f"{path}: {where} {e}") from None
        out.append(conv)
    return out


def load_pairs(path, fill: dict | None = None) -> list[dict]:
    """Every row of a preference file as {"prompt", "chosen", "rejected", "tools"}."""
    out = []
    for where, row in read_rows(path):
        try:
            pair = preference_pair(row)
            for key in ("prompt", "chosen", "rejected"):
                pair[key] = fill_placeholders(pair[key], fill or {}, strict=False)
            if pair["chosen"] == pair["rejected"]:
                raise RowError("has the same chosen and rejected response, which teaches nothing; fix or remove it")
        except RowError as e:
            raise LlmosError(f"{path}: {where} {e}") from None
        out.append(pair)
    return out


def parse_fill(spec: str) -> dict:
    """'name=Ada,author=Ada Lab' → {"name": "Ada", "author": "Ada Lab"}."""
    values = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        key, eq, value = part.partition("=")
        if not eq or not re.fullmatch(r"\w+", key.strip()):
            raise LlmosError(f"--fill {spec!r}: expected key=value pairs separated by commas, e.g. name=Ada,author=Ada Lab")
        values[key.strip()] = value.strip()
    return values


def fill_placeholders(messages: list[dict], values: dict, strict: bool = True) -> list[dict]:
    def sub(text):
        if not isinstance(text, str):
            return text
        text = PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), text)
        if strict and (m := PLACEHOLDER.search(text)):
            raise RowError(f"has the placeholder {m[0]} with no value; pass --fill {m[1]}=VALUE "
                           f"(several: --fill 'name=Ada,author=Ada Lab')")
        return text

    return [{k: sub(v) for k, v in m.items()} for m in messages]


# ----------------------------------------------------------------------------
# Rows → messages


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"has {what} = {json.dumps(value)[:60]}, expected a string")
    return value


def conversation(row: dict) -> dict:
    if "messages" in row:
        return {"messages": openai_messages(row["messages"]), "tools": tools_of(row)}
    if "conversations" in row:
        return {"messages": system_of(row) + sharegpt_turns(row["conversations"]), "tools": tools_of(row)}
    if "instruction" in row and "output" in row:
        return {"messages": alpaca_messages(row), "tools": None}
    raise RowError(f"has keys {sorted(row)[:8]}, expected one of the formats {FORMATS}")


def alpaca_messages(row: dict) -> list[dict]:
    messages = system_of(row)
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise RowError('has a "history" that is not a list of [user, assistant] pairs')
    for user, assistant in history:
        messages += [{"role": "user", "content": _text(user, "a history turn")},
                     {"role": "assistant", "content": _text(assistant, "a history turn")}]
    instruction, extra = _text(row["instruction"], '"instruction"'), _text(row.get("input") or "", '"input"')
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": _text(row["output"], '"output"')})
    return messages


def system_of(row: dict) -> list[dict]:
    system = row.get("system")
    return [{"role": "system", "content": _text(system, '"system"')}] if system else []


def tools_of(row: dict) -> list[dict] | None:
    tools = row.get("tools")
    if not tools:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise RowError('has "tools" that is not valid JSON; expected a JSON list of function schemas') from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError('has "tools" that is not a list of function schemas')
    # transformers' shape: {"type": "function", "function": {"name", "description", "parameters"}}
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def sharegpt_turns(turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise RowError('has "conversations" that is not a non-empty list of {"from", "value"} turns')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f'turn {i} is {json.dumps(turn)[:60]}, expected {{"from": "human", "value": "..."}}')
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise RowError(f'turn {i} is from {turn["from"]!r}; expected one of {", ".join(SHAREGPT_ROLES)}')
        value = _text(turn["value"], f"turn {i}'s value")
        if turn["from"] == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": [tool_call(value, i)]})
        else:
            messages.append({"role": role, "content": value})
    return messages


def tool_call(value: str, i: int) -> dict:
    try:
        call = json.loads(value)
    except ValueError:
        call = None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise RowError(f'turn {i} (function_call) is not JSON {{"name": ..., "arguments": {{...}}}}')
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return {"type": "function", "function": {"name": call["name"], "arguments": args}}


def openai_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RowError('has "messages" that is not a non-empty list of {"role", "content"} messages')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in OPENAI_ROLES:
            got = m.get("role") if isinstance(m, dict) else m
            raise RowError(f"message {i} has role {got!r}; expected one of {', '.join(sorted(OPENAI_ROLES))}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}] parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise RowError(f"message {i} has non-text content parts; only text can be trained on")
            content = "".join(p.get("text", "") for p in content)
        if content is None and m.get("tool_calls"):
            content = ""
        msg = {**m, "role": "system" if m["role"] == "developer" else m["role"],
               "content": _text(content, f"message {i}'s content")}
        out.append(msg)
    return out


def preference_pair(row: dict) -> dict:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        raise RowError(f"has keys {sorted(row)[:8]}, expected a preference pair: {PAIR_FORMATS}")
    if "conversations" in row:
        prompt = system_of(row) + sharegpt_turns(row["conversations"])
        chosen, rejected = (sharegpt_turns(r if isinstance(r, list) else [r]) for r in (chosen, rejected))
        return check_pair(prompt, chosen, rejected, tools_of(row))
    if "prompt" in row:
        p = row["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else openai_messages(p)
        chosen, rejected = ([{"role": "assistant", "content": r}] if isinstance(r, str) else openai_messages(r)
                            for r in (chosen, rejected))
        return check_pair(prompt, chosen, rejected, tools_of(row))
    if isinstance(chosen, str) and isinstance(rejected, str):
        a, b = hh_dialogue(chosen, "chosen"), hh_dialogue(rejected, "rejected")
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        while n and a[n - 1]["role"] == "assistant":  # the prompt ends on a human turn
            n -= 1
        return check_pair(a[:n], a[n:], b[n:], None)
    raise RowError(f"has chosen/rejected of types {type(chosen).__name__}/{type(rejected).__name__}; "
                   f"expected {PAIR_FORMATS}")


def hh_dialogue(text: str, what: str) -> list[dict]:
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError(f'has a {what} dialogue that does not start with "\\n\\nHuman: "; expected Anthropic\'s '
                       'hh-rlhf format of "\\n\\nHuman: ...\\n\\nAssistant: ..." turns')
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = ("user" if speaker == "Human" else "assistant"), content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def check_pair(prompt, chosen, rejected, tools) -> dict:
    if not prompt or prompt[-1]["role"] == "assistant":
        raise RowError("has a prompt that does not end with a user turn; the responses must answer the user")
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        if not resp or resp[0]["role"] != "assistant":
            raise RowError(f"has a {name} response with no assistant turn after the prompt")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": tools}


# ----------------------------------------------------------------------------
# Messages → token ids and the assistant-token mask


def adapt_for_template(messages: list[dict], tools, template: str | None):
    """Tool calls and tool schemas as text for templates that know neither (the Hermes/Qwen <tool_call> form)."""
    template = template or ""
    out = []
    for m in messages:
        if m.get("tool_calls") and "tool_calls" not in template:
            calls = "\n".join(f"<tool_call>\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>"
                              for c in m["tool_calls"])
            content = m.get("content") or ""
            m = {"role": "assistant", "content": f"{content}\n{calls}" if content else calls}
        out.append(m)
    if tools and "tools" not in template:
        note = ("You can call these functions:\n<tools>\n" + "\n".join(json.dumps(t["function"], ensure_ascii=False)
                for t in tools) + '\n</tools>\nTo call one, answer with <tool_call>\n{"name": ..., "arguments": ...}'
                "\n</tool_call>")
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + note}
        else:
            out.insert(0, {"role": "system", "content": note})
        tools = None
    return out, tools


def assistant_spans(tokenizer, messages: list[dict], tools=None, start: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(first char, end char)] of each assistant turn at index >= start)."""
    def render(msgs, gen):
        return tokenizer.render_chat(msgs, add_generation_prompt=gen, tools=tools)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < start:
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise LlmosError(f"the chat template renders turn {i} differently once later turns follow, so its "
                             "assistant tokens cannot be located; use a model whose template renders each turn "
                             "the same way in any conversation (ChatML, Llama 3, ...)")
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return full, spans


def render_masked(tokenizer, messages: list[dict], tools=None, start: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of the conversation as the model's template renders it, and mask[k] = 1 where token k
    belongs to an assistant turn (at message index >= start): the tokens the model is trained to produce."""
    messages, tools = adapt_for_template(messages, tools, tokenizer.chat_template)
    full, spans = assistant_spans(tokenizer, messages, tools, start)
    enc = tokenizer.hf.encode(full, add_special_tokens=False)
    ids, mask = list(enc.ids), [0] * len(enc.ids)
    for k, (s, e) in enumerate(enc.offsets):
        for a, b in spans:
            if (s < b and e > a) or (s == e and a <= s < b):
                mask[k] = 1
                break
    bos = tokenizer.bos_id
    if tokenizer.add_bos and bos is not None and not full.startswith(tokenizer.hf.id_to_token(bos) or "\0"):
        ids, mask = [bos] + ids, [0] + mask
    return ids, mask


def end_of_turn_ids(tokenizer, samples: list[tuple[list[int], list[int]]]) -> list[int]:
    """Special tokens that close assistant turns (ChatML's <|im_end|>, Llama 3's <|eot_id|>): the model must stop
    on them, so they join the end-of-sequence ids written beside the trained model."""
    specials = set(tokenizer.hf.get_added_tokens_decoder())
    found = []
    for ids, mask in samples:
        for k in range(len(ids)):
            if mask[k] and (k + 1 == len(ids) or not mask[k + 1]) and ids[k] in specials and ids[k] not in found:
                found.append(ids[k])
    return found
