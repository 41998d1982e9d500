"""The SQLite store, `llmos data export` and the assistant file, without a server.

References: the rows are read back with plain sqlite3; the exported files are compared with
rows written out by hand, with the structure of LLaMA-Factory's dpo_en_demo.json (from
../shared/data when present) and read by the training stages' own reader (llmos.train.chat_data);
assistant files are parsed by tomllib on its own.
"""

import json
import sqlite3
import tomllib
from pathlib import Path

import pytest

from llmos.errors import LlmosError
from llmos.server.store import NotFound, Store, assistant_from_toml, assistant_to_toml, check_assistant
from llmos.cli import main

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path)
    yield s
    s.close()


def raw(store, sql, *args):
    """Rows read with a connection of our own, as another process would see them."""
    with sqlite3.connect(store.path) as db:
        return db.execute(sql, args).fetchall()


# ----------------------------------------------------------------------------
# The database file


def test_schema_is_versioned_in_wal_mode(tmp_path):
    s = Store.open(tmp_path)
    s.close()
    assert raw(s, "PRAGMA user_version") == [(1,)] and raw(s, "PRAGMA journal_mode") == [("wal",)]
    assert {r[0] for r in raw(s, "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")} == {
        "conversations", "messages", "feedback", "corrections", "assistants"}
    Store.open(tmp_path).close()  # opening again migrates nothing and keeps the data
    with sqlite3.connect(s.path) as db:
        db.execute("PRAGMA user_version = 7")
    with pytest.raises(LlmosError, match="newer llmos"):
        Store.open(tmp_path)


def test_home_follows_llmos_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "h"))
    s = Store.open()
    s.close()
    assert s.path == tmp_path / "h" / "llmos.db" and s.path.exists()


# ----------------------------------------------------------------------------
# Conversations, messages, feedback, corrections


def test_conversation_crud_and_search(store):
    a = store.create_conversation("Cats", model="tiny", system_prompt="Be brief.")
    b = store.create_conversation("Dogs")
    store.add_message(b["id"], "user", "what is 100% of a dog_house?")
    store.add_message(a["id"], "user", "tell me about cats")
    assert [c["id"] for c in store.conversations()] == [a["id"], b["id"]]  # the latest message first
    assert [c["id"] for c in store.conversations("CAT")] == [a["id"]]  # title, case-insensitive
    assert [c["id"] for c in store.conversations("100%")] == [b["id"]]  # message text; % is literal
    assert store.conversations("1000%") == [] and store.conversations("dogXhouse") == []  # _ is literal too
    renamed = store.update_conversation(a["id"], title="Felines")
    assert renamed["title"] == "Felines" and renamed["system_prompt"] == "Be brief." and renamed["model"] == "tiny"
    with pytest.raises(LlmosError, match="no field"):
        store.update_conversation(a["id"], colour="red")
    store.delete_conversation(a["id"])
    assert [c["id"] for c in store.conversations()] == [b["id"]]
    assert raw(store, "SELECT count(*) FROM messages WHERE conversation_id = ?", a["id"]) == [(0,)]  # cascaded
    for call in (lambda: store.conversation(a["id"]), lambda: store.delete_conversation(a["id"]),
                 lambda: store.messages(a["id"]), lambda: store.add_message(a["id"], "user", "x")):
        with pytest.raises(NotFound):
            call()


def test_partial_reply_is_stored_and_finished(store):
    c = store.create_conversation()
    store.add_message(c["id"], "user", "hi", prompt_tokens=5)
    m = store.add_message(c["id"], "assistant", "", model="tiny", prompt_tokens=5, partial=True)
    assert m["partial"] is True and m["content"] == ""
    store.update_message(m["id"], "Hel", completion_tokens=2, partial=True)
    # Another connection (a process reading after this one was killed) sees the partial text.
    assert raw(store, "SELECT content, partial, completion_tokens, finish_reason FROM messages WHERE id = ?", m["id"]) == [("Hel", 1, 2, None)]
    store.update_message(m["id"], "Hello", completion_tokens=3, partial=False, finish_reason="stop")
    done = store.messages(c["id"])[-1]
    assert (done["content"], done["partial"], done["completion_tokens"], done["finish_reason"]) == ("Hello", False, 3, "stop")
    assert [x["role"] for x in store.messages(c["id"])] == ["user", "assistant"]


def test_feedback_and_corrections(store):
    c = store.create_conversation()
    u = store.add_message(c["id"], "user", "2+2?")
    m = store.add_message(c["id"], "assistant", "5")
    assert store.set_feedback(m["id"], -1, "wrong")["vote"] == -1
    assert store.set_feedback(m["id"], 1)["vote"] == 1  # a second vote replaces the first
    assert raw(store, "SELECT vote, comment FROM feedback") == [(1, "")]
    assert store.set_feedback(m["id"], None)["vote"] is None and raw(store, "SELECT * FROM feedback") == []
    with pytest.raises(LlmosError, match="vote"):
        store.set_feedback(m["id"], 2)
    assert store.set_correction(m["id"], "4")["correction"] == "4"
    assert store.set_correction(m["id"], "  ")["correction"] is None  # empty takes it back
    with pytest.raises(LlmosError, match="only assistant"):
        store.set_correction(u["id"], "x")
    with pytest.raises(NotFound):
        store.set_feedback(10**6, 1)
    store.set_correction(m["id"], "4")
    store.set_feedback(m["id"], -1)
    store.delete_message(m["id"])  # feedback and correction go with their message
    assert raw(store, "SELECT count(*) FROM feedback") == raw(store, "SELECT count(*) FROM corrections") == [(0,)]


def test_conversations_export_import_round_trip(store, tmp_path):
    c = store.create_conversation("T", model="tiny", system_prompt="S")
    store.add_message(c["id"], "user", "q")
    m = store.add_message(c["id"], "assistant", "a", partial=True)
    store.set_feedback(m["id"], -1, "meh")
    store.set_correction(m["id"], "better")
    data = json.loads(json.dumps(store.export_conversations()))  # survives JSON
    other = Store.open(tmp_path / "other")
    [new] = other.import_conversations(data)
    assert other.export_conversations() == data
    assert other.messages(new)[-1]["correction"] == "better" and other.messages(new)[-1]["partial"] is True
    with pytest.raises(LlmosError, match="not an llmos"):
        other.import_conversations({"conversations": []})
    with pytest.raises(LlmosError, match="nothing was imported"):
        other.import_conversations({"llmos_conversations": 1, "conversations": [{"messages": [{"role": "wizard", "content": "x"}]}]})
    assert len(other.conversations()) == 1  # the failed import left nothing behind
    other.close()


# ----------------------------------------------------------------------------
# Training files


def chat(store, system="", model=None, turns=()):
    """A conversation of (user, reply) turns; returns it and the reply rows."""
    c = store.create_conversation("t", model=model, system_prompt=system)
    replies = []
    for user, reply in turns:
        store.add_message(c["id"], "user", user)
        replies.append(store.add_message(c["id"], "assistant", reply))
    return c, replies


def check_sft_row(row):
    assert set(row) == {"messages"}
    roles = [m["role"] for m in row["messages"]]
    body = roles[1:] if roles[0] == "system" else roles
    assert body == ["user", "assistant"] * (len(body) // 2) and body[-1] == "assistant"
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in row["messages"])


def check_dpo_row(row, like: dict | None):
    assert set(row) == {"conversations", "chosen", "rejected"}
    froms = [m["from"] for m in row["conversations"]]
    body = froms[1:] if froms[0] == "system" else froms
    assert body == ["human", "gpt"] * (len(body) // 2) + ["human"]
    assert row["chosen"]["from"] == row["rejected"]["from"] == "gpt"
    if like is not None:  # the same keys at every level as LLaMA-Factory's own demo rows
        assert set(row) == set(like) and set(row["chosen"]) == set(like["chosen"]) == {"from", "value"}
        assert set(row["rejected"]) == set(like["rejected"])
        assert all(set(m) == set(like["conversations"][0]) for m in row["conversations"])


def test_data_export_sft_and_dpo(store, tmp_path, capsys):
    c1, (r1, r2) = chat(store, system="Answer with a number.", turns=[("2+2?", "5"), ("and 3+3?", "6")])
    store.set_feedback(r1["id"], -1, "wrong")
    store.set_correction(r1["id"], "4")
    store.set_feedback(r2["id"], 1)  # thumbs up, no correction: an SFT example as it is
    store.save_assistant({"name": "poet", "system_prompt": "Rhyme."})
    _, (r3,) = chat(store, model="poet", turns=[("a cat?", "a dog")])
    store.set_correction(r3["id"], "a cat on a mat")  # corrected without a vote: SFT only
    _, (r4, r5) = chat(store, turns=[("hi", "hello"), ("bye", "bye bye")])
    store.set_feedback(r4["id"], -1)  # thumbs down without a correction: nothing to learn from yet
    partial = store.add_message(c1["id"], "assistant", "half", partial=True)
    store.set_feedback(partial["id"], 1)  # an unfinished reply is no example

    sft, dpo = tmp_path / "out" / "sft.jsonl", tmp_path / "out" / "dpo.jsonl"
    assert main(["data", "export", "--sft", str(sft), "--dpo", str(dpo), "--home", str(tmp_path)]) == 0
    assert "(3 SFT rows)" in capsys.readouterr().out
    sft_rows = [json.loads(line) for line in sft.read_text().splitlines()]
    system = {"role": "system", "content": "Answer with a number."}
    assert sft_rows == [
        {"messages": [system, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [system, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"},
                      {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
        {"messages": [{"role": "system", "content": "Rhyme."}, {"role": "user", "content": "a cat?"},
                      {"role": "assistant", "content": "a cat on a mat"}]},
    ]
    dpo_rows = [json.loads(line) for line in dpo.read_text().splitlines()]
    assert dpo_rows == [{
        "conversations": [{"from": "system", "value": "Answer with a number."}, {"from": "human", "value": "2+2?"}],
        "chosen": {"from": "gpt", "value": "4"},
        "rejected": {"from": "gpt", "value": "5"},
    }]
    demo = json.loads((DATA / "preference" / "dpo_en_demo.json").read_text())[0] if DATA.exists() else None
    for row in sft_rows:
        check_sft_row(row)
    for row in dpo_rows:
        check_dpo_row(row, demo)

    # The training stages' own readers take the files as they are.
    chat_data = pytest.importorskip("llmos.train.chat_data")
    assert [c["messages"] for c in chat_data.load_conversations(sft)] == [r["messages"] for r in sft_rows]
    [pair] = chat_data.load_pairs(dpo)
    assert pair["prompt"] == [system, {"role": "user", "content": "2+2?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "4"}] and pair["rejected"] == [{"role": "assistant", "content": "5"}]


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data is absent")
def test_dpo_checker_accepts_the_reference_file():
    """The checks above hold for every row of LLaMA-Factory's own file: they test the format, not our rows."""
    rows = json.loads((DATA / "preference" / "dpo_en_demo.json").read_text())
    for row in rows:
        check_dpo_row(row, rows[0])


def test_data_export_errors(tmp_path, capsys):
    assert main(["data", "export", "--sft", str(tmp_path / "x.jsonl"), "--home", str(tmp_path / "none")]) == 2
    assert "no llmos database" in capsys.readouterr().err
    assert main(["data", "export", "--home", str(tmp_path)]) == 2
    assert "nothing to export" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Assistants and their portable file


def test_assistant_crud(store):
    a = store.save_assistant({"name": "pirate", "model": "tiny", "system_prompt": "Arr.", "temperature": 0.5, "max_tokens": 9})
    assert (a["name"], a["temperature"], a["top_p"], a["max_tokens"], a["description"]) == ("pirate", 0.5, None, 9, "")
    with pytest.raises(LlmosError, match="exists"):
        store.save_assistant({"name": "pirate"})
    b = store.save_assistant({"name": "captain", "system_prompt": "Aye."}, name="pirate")  # rename and replace
    assert b["created"] == a["created"] and [x["name"] for x in store.assistants()] == ["captain"]
    assert store.find_assistant("pirate") is None and store.assistant("captain")["temperature"] is None
    store.delete_assistant("captain")
    with pytest.raises(NotFound):
        store.assistant("captain")


@pytest.mark.parametrize("fields, words", [
    ({"name": "has space"}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x" * 65}, "name"),
    ({"name": "ok", "temperature": 3}, "temperature"),
    ({"name": "ok", "temperature": True}, "temperature"),
    ({"name": "ok", "top_p": 0}, "top_p"),
    ({"name": "ok", "max_tokens": 0}, "max_tokens"),
    ({"name": "ok", "max_tokens": 1.5}, "max_tokens"),
    ({"name": "ok", "model": 3}, "model"),
    ({"name": "ok", "tools": []}, "no field 'tools'"),
])
def test_bad_assistants_are_refused(fields, words):
    with pytest.raises(LlmosError, match=words):
        check_assistant(fields)


def test_assistant_file_round_trip(store, tmp_path):
    tricky = 'Line one with "quotes", a \\ backslash,\ttab and """ triple quotes;\nline two: naïve 日本語 😀 \x01\x7f\r\nend\n'
    a = store.save_assistant({"name": "tricky.v2", "description": "say \"hi\"", "model": "tiny",
                              "system_prompt": tricky, "temperature": 0.7, "top_p": 0.9, "max_tokens": 128})
    text = assistant_to_toml(a)
    parsed = tomllib.loads(text)  # an independent TOML reader sees the same values
    assert parsed == {k: a[k] for k in ("name", "description", "model", "system_prompt", "temperature", "top_p", "max_tokens")}
    assert "\nline two: naïve 日本語" in text  # a multi-line string: the prompt reads as written
    other = Store.open(tmp_path / "other")
    b = other.save_assistant(assistant_from_toml(text))
    assert {k: b[k] for k in parsed} == parsed
    minimal = assistant_to_toml(other.save_assistant({"name": "plain"}))
    assert tomllib.loads(minimal) == {"name": "plain"}  # unset fields are left out
    other.close()
    with pytest.raises(LlmosError, match="not valid TOML"):
        assistant_from_toml('name = "x')
    with pytest.raises(LlmosError, match="no field 'colour'"):
        assistant_from_toml('name = "x"\ncolour = "red"\n')
