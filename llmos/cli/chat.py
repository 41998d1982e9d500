"""The interactive chat of `llmos run [MODEL]` in a terminal, with Ollama's commands.

    llmos run smollm2
    >>> /set parameter temperature 0.3      (or /set temperature 0.3)
    >>> \"\"\"a message
    ... over several lines\"\"\"
    >>> /show

Sampling parameters take llmos's names (SamplingParams) or Ollama's (num_predict,
repeat_penalty). A message is sent with the history that fits the context; the oldest
turns are dropped first, and a note on stderr says so.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from llmos.cli.common import llmos_home, model_info, say
from llmos.errors import LlmosError

HELP = """Available commands:
  /set parameter NAME VALUE   set a sampling parameter (/set NAME VALUE works too); /show parameters lists them
  /set system TEXT            set the system message (and keep the conversation); /system TEXT is the same
  /show [info|parameters|system|template|license]
                              the model's details (default info) or the chat's settings
  /clear                      forget the conversation (keeps the system message)
  /bye                        exit (Ctrl-D works too)
  /help, /?                   this help
Begin a message with \"\"\" to write it over several lines; end it with \"\"\".
Ctrl-C stops an answer."""

# Name → (SamplingParams field, type). Ollama's names where they differ, and llmos's own.
PARAMETERS = {
    "temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float), "min_p": ("min_p", float),
    "num_predict": ("max_new_tokens", int), "max_new_tokens": ("max_new_tokens", int), "max_tokens": ("max_new_tokens", int),
    "repeat_penalty": ("repetition_penalty", float), "repetition_penalty": ("repetition_penalty", float),
    "presence_penalty": ("presence_penalty", float), "frequency_penalty": ("frequency_penalty", float),
    "seed": ("seed", int),
}


def answer(engine, tok, messages, params) -> str:
    """Stream one reply to stdout; plain completion of the last message when the model has no chat template."""
    if tok.chat_template is None:
        stream = engine.stream(tok.encode(messages[-1]["content"]), params)
    else:
        stream = engine.chat(messages, params, stream=True)
        if stream.notice:
            say(f"note: {stream.notice}")
    out = []
    for piece in stream:
        sys.stdout.write(piece.text)
        sys.stdout.flush()
        out.append(piece.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(out)


def chat(engine, tok, messages: list[dict], params, ckpt, name: str) -> None:
    history = setup_readline()
    say("Chatting; /help for commands, /bye or Ctrl-D to quit.")
    try:
        while True:
            try:
                line = read_message(input(">>> ").strip())
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print("\nUse Ctrl-D or /bye to exit.")
                continue
            if not line:
                continue
            if line.startswith("/"):
                if command(line, messages, params, tok, ckpt, name) == "bye":
                    return
                continue
            messages.append({"role": "user", "content": line})
            try:
                reply = answer(engine, tok, messages, params)
            except KeyboardInterrupt:
                print()
                messages.pop()  # an interrupted answer is forgotten with its question
                continue
            except LlmosError as e:  # a message too long for the context, say: the chat goes on without it
                say(f"error: {e}")
                messages.pop()
                continue
            messages.append({"role": "assistant", "content": reply})
    finally:
        if history:
            save_history(history)


def read_message(line: str) -> str:
    """The line, or for a line opening with \"\"\" every line up to the one that ends with \"\"\"."""
    if not line.startswith('"""'):
        return line
    lines, rest = [], line[3:]
    while not rest.endswith('"""'):
        lines.append(rest)
        rest = input("... ")
    lines.append(rest[:-3])
    return "\n".join(lines).strip()


def command(line: str, messages: list[dict], params, tok, ckpt, name: str) -> str | None:
    """Run one /command; 'bye' to end the chat. Changes `messages` and `params` in place."""
    cmd, _, rest = line.partition(" ")
    args = rest.split()
    if cmd in ("/bye", "/exit", "/quit"):
        return "bye"
    if cmd == "/clear":
        messages[:] = [m for m in messages if m["role"] == "system"]
        print("Cleared the conversation.")
    elif cmd == "/system" or cmd == "/set" and args[:1] == ["system"]:
        text = rest.strip() if cmd == "/system" else rest.strip()[len("system"):].strip()
        messages[:] = [{"role": "system", "content": text}] * bool(text) + [m for m in messages if m["role"] != "system"]
        print("Set the system message." if text else "Removed the system message.")
    elif cmd == "/set":
        set_parameter(args[1:] if args[:1] == ["parameter"] else args, params)
    elif cmd == "/show":
        show(args[0] if args else "info", messages, params, tok, ckpt, name)
    elif cmd in ("/help", "/?"):
        print(HELP)
    else:
        print(f"Unknown command {cmd!r}; /help lists them.")
    return None


def set_parameter(args: list[str], params) -> None:
    if len(args) != 2 or args[0] not in PARAMETERS:
        print(f"Usage: /set parameter NAME VALUE, NAME one of {', '.join(PARAMETERS)}")
        return
    field, kind = PARAMETERS[args[0]]
    try:
        value = None if field == "seed" and args[1].lower() == "none" else kind(args[1])
        replace(params, **{field: value}).validate()  # a bad value leaves the old one in place
    except ValueError:
        print(f"{args[0]} must be {'an integer' if kind is int else 'a number'}, got {args[1]!r}")
        return
    except LlmosError as e:
        print(e)
        return
    setattr(params, field, value)
    print(f"Set parameter '{field}' to '{value}'")


def show(what: str, messages, params, tok, ckpt, name: str) -> None:
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    if what == "info":
        print("\n".join(model_info(ckpt, name)))
    elif what == "parameters":
        for field in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                      "frequency_penalty", "max_new_tokens", "seed"):
            print(f"  {field:<20}{getattr(params, field)}")
    elif what == "system":
        print(system or "No system message was set.")
    elif what == "template":
        print(tok.chat_template or "The model has no chat template (plain completion).")
    elif what == "license":
        print(ckpt.meta.get("license") or "unknown")
    else:
        print("Usage: /show [info|parameters|system|template|license]")


def setup_readline() -> Path | None:
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return None
    path = llmos_home() / "history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    return path


def save_history(path: Path) -> None:
    import readline

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.set_history_length(1000)
        readline.write_history_file(path)
    except OSError:
        pass  # a read-only home should not turn a finished chat into an error
