"""What the commands share: stderr status lines, human-readable numbers, the llmos home, a model's description."""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# ----------------------------------------------------------------------------
# Small helpers: stderr status lines and human-readable numbers


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def status(msg: str, after: float = 1.0):
    """Show `msg...` on stderr when the work takes longer than `after` seconds; stdout stays clean for pipes."""
    shown, t0 = [], time.time()

    def show():
        shown.append(True)
        print(f"{msg}...", end="", file=sys.stderr, flush=True)

    timer = threading.Timer(after, show)
    timer.daemon = True
    timer.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        timer.cancel()
        if shown:
            print(f" {time.time() - t0:.1f}s" if ok else " failed", file=sys.stderr, flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def llmos_home() -> Path:
    return Path(os.environ.get("LLMOS_HOME") or Path.home() / ".llmos").expanduser()


@contextmanager
def gc_paused():
    """Importing torch and reading a checkpoint make a million objects that live until exit: collections
    meanwhile walk them again and again for nothing (0.4 s of CPU in a 5 s start)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()



def model_info(ckpt, name: str) -> list[str]:
    """What `llmos show` (and /show in a chat) prints: the model, its tokenizer, chat template and license."""
    cfg, meta, tok = ckpt.config, ckpt.meta, ckpt.tokenizer
    template = tok.chat_template if tok is not None else None
    types = ", ".join(f"{t} ×{n}" for t, n in sorted(meta.get("tensor_types", {}).items(), key=lambda kv: -kv[1]))
    model_rows = [
        ("name", meta.get("name")),
        ("architecture", meta.get("architecture", "llama")),
        ("parameters", human_count(cfg.num_params())),
        ("context length", cfg.max_seq_len),
        ("embedding length", cfg.dim),
        ("feed forward length", cfg.hidden_dim),
        ("layers", cfg.n_layers),
        ("attention heads", f"{cfg.n_heads} query, {cfg.n_kv_heads} key-value, {cfg.head_dim} wide"),
        ("vocabulary", cfg.vocab_size),
        ("rope theta", f"{cfg.rope_theta:g}" + (f" (scaling {cfg.rope_scaling.get('rope_type', cfg.rope_scaling.get('type'))})" if cfg.rope_scaling else "")),
        ("tied embeddings", "yes" if cfg.tie_embeddings else "no"),
        ("tensor types", types),
        ("format", meta.get("format")),
        ("file", meta.get("path")),
        ("file size", human_bytes(meta["file_size"]) if "file_size" in meta else None),
    ]
    out = ["  Model"] + [f"    {key:<22}{value}" for key, value in model_rows if value is not None]
    if tok is not None:
        stops = [tok.piece(i) for i in (meta.get("eos_token_ids") or tok.eos_ids or [])]
        out += ["", "  Tokenizer", f"    {'stop tokens':<22}{', '.join(json.dumps(s) for s in stops) or 'none'}",
                f"    {'adds BOS':<22}{'yes' if tok.add_bos else 'no'}"]
    out += ["", "  Chat template"]
    if template is None:
        out.append("    none (plain completion)")
    else:
        lines = template.strip().splitlines()
        out += [f"    {lines[0][:100]}{' ...' if len(lines) > 1 or len(lines[0]) > 100 else ''}",
                f"    ({len(template)} characters; `llmos show {name or 'default'} --template` prints it all)"]
    return out + ["", "  License", f"    {meta.get('license') or 'unknown'}"]
