"""What must outlive the server: conversations, their messages, votes, corrections and assistants.

One SQLite file, `$LLMOS_HOME/llmos.db` (LLMOS_HOME defaults to ~/.llmos), in WAL mode so
`llmos data export` can read while the server writes. The schema is versioned with
`PRAGMA user_version`: MIGRATIONS[k] takes a database from version k to k + 1, and a file
from a newer llmos is refused rather than guessed at.

    conversations  id, title, model (a model or assistant name), system_prompt, created, updated
    messages       id, conversation_id, role (user|assistant), content, model, prompt_tokens,
                   completion_tokens, partial (1 while streaming, and forever if the stream died),
                   finish_reason, created
    feedback       message_id, vote (+1 up, -1 down), comment
    corrections    message_id, content (the better answer a person wrote)
    assistants     name, description, model, system_prompt, temperature, top_p, max_tokens

Also here, because they only read these tables: the training rows `llmos data export` writes
(`sft_rows`, `dpo_rows`) and the portable assistant file (`assistant_to_toml`, `assistant_from_toml`).
Stdlib only; the server calls it, HTTP knows nothing of it.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

from llmos.errors import LlmosError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class NotFound(LlmosError):
    """A conversation, message or assistant that does not exist (the server answers 404)."""


def home() -> Path:
    return Path(os.environ.get("LLMOS_HOME") or Path.home() / ".llmos").expanduser()


MIGRATIONS = [
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: pages and URLs hold ids
        title TEXT NOT NULL DEFAULT '',
        model TEXT,
        system_prompt TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: pages and URLs hold ids
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        model TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        partial INTEGER NOT NULL DEFAULT 0,
        finish_reason TEXT,
        created REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    CREATE TABLE feedback (
        message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        vote INTEGER CHECK (vote IN (-1, 1)),
        comment TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL
    );
    CREATE TABLE corrections (
        message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        content TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE assistants (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        model TEXT,
        system_prompt TEXT NOT NULL DEFAULT '',
        temperature REAL,
        top_p REAL,
        max_tokens INTEGER,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    """,
]


class Store:
    """One connection shared by the server's threads, serialized by a lock: every call is a
    short statement, and WAL lets other processes read meanwhile."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as e:
            raise LlmosError(f"{self.path}: cannot open the llmos database ({e}); set LLMOS_HOME to a writable folder") from None
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a killed process loses nothing committed
        self.db.execute("PRAGMA busy_timeout=5000")
        self.lock = threading.RLock()
        self._migrate()

    @classmethod
    def open(cls, folder=None) -> "Store":
        return cls(Path(folder or home()) / "llmos.db")

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _migrate(self) -> None:
        with self.lock:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise LlmosError(f"{self.path}: written by a newer llmos (schema {version}, this one knows {len(MIGRATIONS)}); upgrade llmos")
            for k in range(version, len(MIGRATIONS)):
                self.db.executescript(f"BEGIN; {MIGRATIONS[k]} PRAGMA user_version = {k + 1}; COMMIT;")

    def _all(self, sql: str, *args) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.db.execute(sql, args)]

    def _one(self, sql: str, *args, missing: str) -> dict:
        rows = self._all(sql, *args)
        if not rows:
            raise NotFound(missing)
        return rows[0]

    def _run(self, sql: str, *args) -> sqlite3.Cursor:
        with self.lock:
            return self.db.execute(sql, args)

    # ------------------------------------------------------------------------
    # Conversations

    def create_conversation(self, title: str = "", model: str | None = None, system_prompt: str = "") -> dict:
        now = time.time()
        cur = self._run("INSERT INTO conversations (title, model, system_prompt, created, updated) VALUES (?, ?, ?, ?, ?)",
                        title, model, system_prompt, now, now)
        return self.conversation(cur.lastrowid)

    def conversation(self, id: int) -> dict:
        return self._one("SELECT * FROM conversations WHERE id = ?", id, missing=f"no conversation {id}; list them with GET /api/conversations")

    def conversations(self, query: str | None = None, limit: int = 500) -> list[dict]:
        """Newest first; `query` matches titles and message text, case-insensitively."""
        if not query:
            return self._all("SELECT * FROM conversations ORDER BY updated DESC, id DESC LIMIT ?", limit)
        like = "%" + re.sub(r"([\\%_])", r"\\\1", query) + "%"
        return self._all(
            "SELECT * FROM conversations c WHERE c.title LIKE ?1 ESCAPE '\\' OR EXISTS "
            "(SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND m.content LIKE ?1 ESCAPE '\\') "
            "ORDER BY updated DESC, id DESC LIMIT ?2", like, limit)

    def update_conversation(self, id: int, **fields) -> dict:
        unknown = set(fields) - {"title", "model", "system_prompt"}
        if unknown:
            raise LlmosError(f"conversations have no field {sorted(unknown)[0]!r}; fields: title, model, system_prompt")
        self.conversation(id)
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._run(f"UPDATE conversations SET {sets}{', ' if sets else ''}updated = ? WHERE id = ?", *fields.values(), time.time(), id)
        return self.conversation(id)

    def delete_conversation(self, id: int) -> None:
        if self._run("DELETE FROM conversations WHERE id = ?", id).rowcount == 0:
            raise NotFound(f"no conversation {id}; list them with GET /api/conversations")

    # ------------------------------------------------------------------------
    # Messages, with their feedback and correction

    def add_message(self, conversation_id: int, role: str, content: str, model: str | None = None,
                    prompt_tokens: int | None = None, completion_tokens: int | None = None, partial: bool = False) -> dict:
        self.conversation(conversation_id)
        now = time.time()
        with self.lock:
            cur = self.db.execute(
                "INSERT INTO messages (conversation_id, role, content, model, prompt_tokens, completion_tokens, partial, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (conversation_id, role, content, model, prompt_tokens, completion_tokens, int(partial), now))
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
        return self.message(cur.lastrowid)

    def update_message(self, id: int, content: str, completion_tokens: int | None = None,
                       partial: bool = True, finish_reason: str | None = None) -> None:
        self._run("UPDATE messages SET content = ?, completion_tokens = ?, partial = ?, finish_reason = ? WHERE id = ?",
                  content, completion_tokens, int(partial), finish_reason, id)

    _MESSAGE = ("SELECT m.*, f.vote, f.comment, c.content AS correction FROM messages m "
                "LEFT JOIN feedback f ON f.message_id = m.id LEFT JOIN corrections c ON c.message_id = m.id ")

    def message(self, id: int) -> dict:
        return _message(self._one(self._MESSAGE + "WHERE m.id = ?", id, missing=f"no message {id}; a conversation's messages are at GET /api/conversations/ID"))

    def messages(self, conversation_id: int) -> list[dict]:
        self.conversation(conversation_id)
        return [_message(r) for r in self._all(self._MESSAGE + "WHERE m.conversation_id = ? ORDER BY m.id", conversation_id)]

    def delete_message(self, id: int) -> None:
        self._run("DELETE FROM messages WHERE id = ?", id)

    def set_feedback(self, message_id: int, vote: int | None, comment: str = "") -> dict:
        """vote +1 or -1; None with no comment takes the feedback back."""
        if vote not in (None, 1, -1):
            raise LlmosError(f"vote must be 1 (up), -1 (down) or null, not {vote!r}")
        self.message(message_id)
        if vote is None and not comment:
            self._run("DELETE FROM feedback WHERE message_id = ?", message_id)
        else:
            self._run("INSERT OR REPLACE INTO feedback (message_id, vote, comment, created) VALUES (?, ?, ?, ?)",
                      message_id, vote, comment, time.time())
        return self.message(message_id)

    def set_correction(self, message_id: int, content: str) -> dict:
        """The better answer to an assistant message; empty text takes it back."""
        if self.message(message_id)["role"] != "assistant":
            raise LlmosError(f"message {message_id} is the user's; only assistant replies take corrections")
        if content.strip():
            self._run("INSERT OR REPLACE INTO corrections (message_id, content, created) VALUES (?, ?, ?)", message_id, content, time.time())
        else:
            self._run("DELETE FROM corrections WHERE message_id = ?", message_id)
        return self.message(message_id)

    # ------------------------------------------------------------------------
    # Assistants

    def assistants(self) -> list[dict]:
        return self._all("SELECT * FROM assistants ORDER BY name")

    def assistant(self, name: str) -> dict:
        return self._one("SELECT * FROM assistants WHERE name = ?", name, missing=f"no assistant {name!r}; list them with GET /api/assistants")

    def find_assistant(self, name: str | None) -> dict | None:
        rows = self._all("SELECT * FROM assistants WHERE name = ?", name) if name else []
        return rows[0] if rows else None

    def save_assistant(self, fields: dict, name: str | None = None) -> dict:
        """Create (name None) or replace the assistant called `name`, which may be renamed."""
        a = check_assistant(fields)
        now = time.time()
        with self.lock:
            if name is None:
                if self.find_assistant(a["name"]):
                    raise LlmosError(f"an assistant called {a['name']!r} exists; pick another name or edit it")
                created = now
            else:
                created = self.assistant(name)["created"]
                if a["name"] != name and self.find_assistant(a["name"]):
                    raise LlmosError(f"an assistant called {a['name']!r} exists; pick another name")
                self.db.execute("DELETE FROM assistants WHERE name = ?", (name,))
            self.db.execute(f"INSERT INTO assistants ({', '.join(ASSISTANT_FIELDS)}, created, updated) VALUES "
                            f"({', '.join('?' * len(ASSISTANT_FIELDS))}, ?, ?)", (*a.values(), created, now))
        return self.assistant(a["name"])

    def delete_assistant(self, name: str) -> None:
        if self._run("DELETE FROM assistants WHERE name = ?", name).rowcount == 0:
            raise NotFound(f"no assistant {name!r}; list them with GET /api/assistants")

    def system_prompt(self, conversation: dict) -> str:
        """The system prompt a conversation's turns used: its own, else its assistant's."""
        if conversation["system_prompt"]:
            return conversation["system_prompt"]
        assistant = self.find_assistant(conversation["model"])
        return assistant["system_prompt"] if assistant else ""

    # ------------------------------------------------------------------------
    # Everything as one JSON document, and back

    def export_conversations(self) -> dict:
        keep = ("role", "content", "model", "prompt_tokens", "completion_tokens", "partial", "finish_reason", "created",
                "vote", "comment", "correction")
        return {"llmos_conversations": 1, "conversations": [
            {**{k: c[k] for k in ("title", "model", "system_prompt", "created", "updated")},
             "messages": [{k: m[k] for k in keep} for m in self.messages(c["id"])]}
            for c in reversed(self.conversations(limit=-1))
        ]}

    def import_conversations(self, data: dict) -> list[int]:
        """Adds the conversations of an export (new ids; nothing is overwritten); returns their ids."""
        if not isinstance(data, dict) or data.get("llmos_conversations") != 1 or not isinstance(data.get("conversations"), list):
            raise LlmosError('not an llmos conversations export; expected {"llmos_conversations": 1, "conversations": [...]}')
        ids = []
        with self.lock:
            self.db.execute("BEGIN")
            try:
                for c in data["conversations"]:
                    cur = self.db.execute(
                        "INSERT INTO conversations (title, model, system_prompt, created, updated) VALUES (?, ?, ?, ?, ?)",
                        (str(c.get("title", "")), c.get("model"), str(c.get("system_prompt", "")),
                         c.get("created", time.time()), c.get("updated", time.time())))
                    ids.append(cur.lastrowid)
                    for m in c.get("messages", []):
                        mid = self.db.execute(
                            "INSERT INTO messages (conversation_id, role, content, model, prompt_tokens, completion_tokens, "
                            "partial, finish_reason, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (ids[-1], m["role"], m["content"], m.get("model"), m.get("prompt_tokens"), m.get("completion_tokens"),
                             int(bool(m.get("partial"))), m.get("finish_reason"), m.get("created", time.time()))).lastrowid
                        if m.get("vote") is not None or m.get("comment"):
                            self.db.execute("INSERT INTO feedback VALUES (?, ?, ?, ?)", (mid, m.get("vote"), m.get("comment") or "", time.time()))
                        if m.get("correction"):
                            self.db.execute("INSERT INTO corrections VALUES (?, ?, ?)", (mid, m["correction"], time.time()))
                self.db.execute("COMMIT")
            except (KeyError, TypeError, AttributeError, ValueError, OverflowError, sqlite3.Error) as e:
                self.db.execute("ROLLBACK")
                raise LlmosError(f"the conversations export is malformed ({type(e).__name__}: {e}); nothing was imported") from None
        return ids

    # ------------------------------------------------------------------------
    # Training rows: the "monitor, collect misbehaviours, fix, retrain" loop

    def _feedback_targets(self, where: str) -> list[tuple[list[dict], dict]]:
        """(the chat up to an assistant message, that message) for each message matching `where`."""
        targets = self._all(self._MESSAGE + f"WHERE m.role = 'assistant' AND ({where}) ORDER BY m.conversation_id, m.id")
        out = []
        for t in targets:
            conv = self.conversation(t["conversation_id"])
            before = self._all("SELECT role, content FROM messages WHERE conversation_id = ? AND id < ? ORDER BY id", conv["id"], t["id"])
            system = self.system_prompt(conv)
            out.append((([{"role": "system", "content": system}] if system else []) + before, _message(t)))
        return out

    def sft_rows(self) -> list[dict]:
        """OpenAI `messages` rows: each corrected reply replaced by its correction, and each
        thumbs-up reply that finished, as it was."""
        rows = []
        for prompt, m in self._feedback_targets("c.content IS NOT NULL OR (f.vote = 1 AND m.partial = 0)"):
            rows.append({"messages": prompt + [{"role": "assistant", "content": m["correction"] or m["content"]}]})
        return rows

    def dpo_rows(self) -> list[dict]:
        """ShareGPT preference rows (as LLaMA-Factory's dpo_en_demo.json): for each thumbs-down
        reply with a correction, chosen = the correction, rejected = the reply."""
        rows = []
        for prompt, m in self._feedback_targets("f.vote = -1 AND c.content IS NOT NULL"):
            if not m["content"].strip() or m["content"] == m["correction"]:
                continue  # nothing to prefer against
            rows.append({"conversations": [{"from": SHAREGPT_ROLE[x["role"]], "value": x["content"]} for x in prompt],
                         "chosen": {"from": "gpt", "value": m["correction"]},
                         "rejected": {"from": "gpt", "value": m["content"]}})
        return rows


SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def _message(row: dict) -> dict:
    row = dict(row)
    row["partial"] = bool(row["partial"])
    row["comment"] = row["comment"] or ""
    return row


# ----------------------------------------------------------------------------
# Assistants: the fields, their checks, and the portable file
#
# One TOML file per assistant, like an Ollama Modelfile: every key optional but `name`,
# unknown keys refused. Example (pirate.toml):
#
#     name = "pirate"
#     description = "Answers like a pirate"
#     model = "smollm2"                # a model the server serves; absent: its first model
#     system_prompt = """
#     You are a pirate. Answer in one sentence."""
#     temperature = 0.8
#     top_p = 0.95
#     max_tokens = 256

ASSISTANT_FIELDS = ("name", "description", "model", "system_prompt", "temperature", "top_p", "max_tokens")
ASSISTANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def check_assistant(fields: dict) -> dict:
    """The assistant's fields in order, with defaults, or a one-line LlmosError."""
    unknown = set(fields) - set(ASSISTANT_FIELDS) - {"created", "updated"}
    if unknown:
        raise LlmosError(f"assistants have no field {sorted(unknown)[0]!r}; fields: {', '.join(ASSISTANT_FIELDS)}")
    a = {k: fields.get(k) for k in ASSISTANT_FIELDS}
    if not isinstance(a["name"], str) or not ASSISTANT_NAME.fullmatch(a["name"]):
        raise LlmosError(f"assistant name {a['name']!r} must be 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit")
    for key in ("description", "system_prompt"):
        a[key] = a[key] or ""
        if not isinstance(a[key], str):
            raise LlmosError(f"assistant {key} must be text")
    a["model"] = a["model"] or None  # absent or "": the server's first model
    if a["model"] is not None and not isinstance(a["model"], str):
        _bad("model", a["model"], "a model name")
    limits = {"temperature": (0, 2, "a number from 0 to 2"), "top_p": (1e-9, 1, "a number above 0, at most 1")}
    for key, (lo, hi, what) in limits.items():
        v = a[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or math.isnan(v)):
            _bad(key, v, what)
        a[key] = None if v is None else float(v)
    v = a["max_tokens"]
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        _bad("max_tokens", v, "a whole number of at least 1")
    return a


def _bad(key, value, what):
    raise LlmosError(f"assistant {key} is {value!r}; it must be {what}")


def assistant_to_toml(a: dict) -> str:
    lines = [f"# llmos assistant: import it in the chat page, or POST it to /api/assistants/import"]
    for key in ASSISTANT_FIELDS:
        value = a.get(key)
        if value is None or value == "" and key != "name":
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def assistant_from_toml(text: str) -> dict:
    try:
        fields = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LlmosError(f"the assistant file is not valid TOML ({e}); see `name = \"...\"` lines in an exported one") from None
    return check_assistant(fields)


def _toml_value(value) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    # A basic string; multi-line when the text has lines, so a system prompt reads as written.
    multiline = "\n" in value
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n" and multiline or ch == "\t":
            out.append(ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    body = "".join(out)
    return f'"""\n{body}"""' if multiline else f'"{body}"'
