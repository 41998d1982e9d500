"""`llmos data export`: the chat page's corrections and votes as training files.

    llmos data export --sft sft.jsonl --dpo dpo.jsonl      # from $LLMOS_HOME/llmos.db
    llmos data export --sft sft.jsonl --home ~/other-llmos

The talk's loop, "monitor, collect misbehaviours, fix, retrain": people vote on replies in the
page and write better answers; this turns them into the files the training stages read
(llmos/train/chat_data.py: `llmos train sft` and `llmos train dpo`).

    --sft  OpenAI `messages` JSONL, one conversation per line, ending in the assistant reply to
           learn: a correction where a person wrote one, else a thumbs-up reply that finished.
    --dpo  ShareGPT preference JSONL, as LLaMA-Factory's dpo_en_demo.json (one object per line):
           {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...],
            "chosen": {"from": "gpt", "value": correction}, "rejected": {"from": "gpt", "value": reply}}
           for each thumbs-down reply that has a correction.

Every row's context is the conversation as it happened up to that reply (earlier replies as the
model wrote them), after the system prompt the conversation used.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmos.errors import LlmosError
from llmos.server.store import Store, home
from llmos.files import atomic_write


def export(store: Store, sft: str | None = None, dpo: str | None = None) -> dict[str, int]:
    """Writes the files asked for; returns the number of rows of each."""
    counts = {}
    for kind, path, rows in (("sft", sft, store.sft_rows), ("dpo", dpo, store.dpo_rows)):
        if path:
            data = rows()
            atomic_write(path, lambda f: f.writelines((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in data))
            counts[kind] = len(data)
    return counts


def export_from(folder: str | None, sft: str | None, dpo: str | None) -> dict[str, int]:
    """export() from the llmos.db under `folder` (default: $LLMOS_HOME, else ~/.llmos)."""
    if not (sft or dpo):
        raise LlmosError("nothing to export; pass --sft OUT.jsonl, --dpo OUT.jsonl or both")
    db = Path(folder or home()) / "llmos.db"
    if not db.exists():
        raise LlmosError(f"{db}: no llmos database yet; chat in `llmos serve`'s page first, or pass --home DIR")
    store = Store(db)
    try:
        return export(store, sft, dpo)
    finally:
        store.close()
