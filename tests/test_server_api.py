"""The chat page's API (/api), assistants as models, rate limits, and replies that survive a
dying server, all driven over loopback against a real running server.

References: the engine run directly (greedy text), transformers' apply_chat_template (prompt
token counts), and the SQLite file read with plain sqlite3, as another process would.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import openai
import pytest

from llmos.engine import Engine, SamplingParams
from llmos.server import app as app_module
from llmos.server.app import create_app
from llmos.server.serving import SAVE_EVERY, ServerConfig
from llmos.cli import main
from conftest import tiny_model
from test_server import CONTEXT, Running, SlowTransformer

SYSTEM = "You are terse."


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def server(model, tok, home):
    slow = tiny_model(cls=SlowTransformer, max_seq_len=CONTEXT)
    with Running(create_app({"tiny": (model, tok, None), "slow": (slow, tok, None)}, ServerConfig(home=str(home), engine="torch"))) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def ok(r):
    assert r.status_code == 200, r.text
    return r.json()


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def events(http, conversation_id, body):
    """The events of one streamed turn."""
    with http.stream("POST", f"/api/conversations/{conversation_id}/chat", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def greedy(model, tok, hf_tok, messages, n):
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return ids, Engine(model, tok).generate(ids, SamplingParams(max_new_tokens=n, temperature=0))


# ----------------------------------------------------------------------------
# The page and the conversation routes


def test_page_and_its_files_are_served(http):
    r = http.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"] and '<script src="/ui/app.js"' in r.text
    for path, kind in (("/ui/app.js", "javascript"), ("/ui/style.css", "text/css")):
        r = http.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"]
    error_of(http.get("/ui/nothing.js"), 404)
    assert "/" not in http.get("/openapi.json").json()["paths"]  # the page is no API


def test_conversation_routes(http):
    a = ok(http.post("/api/conversations", json={"title": "Apples", "model": "tiny", "system_prompt": SYSTEM}))
    b = ok(http.post("/api/conversations", json={}))
    assert a["title"] == "Apples" and a["system_prompt"] == SYSTEM and b["title"] == "" and b["model"] is None
    ids = [c["id"] for c in ok(http.get("/api/conversations"))]
    assert ids.index(b["id"]) < ids.index(a["id"])  # newest first
    assert ok(http.patch(f"/api/conversations/{a['id']}", json={"title": "Pears"}))["title"] == "Pears"
    assert [c["id"] for c in ok(http.get("/api/conversations", params={"q": "pear"}))] == [a["id"]]
    got = ok(http.get(f"/api/conversations/{a['id']}"))
    assert got["title"] == "Pears" and got["messages"] == [] and ok(http.get(f"/api/conversations/{a['id']}/messages")) == []
    assert ok(http.delete(f"/api/conversations/{b['id']}"))["deleted"] is True
    assert error_of(http.get(f"/api/conversations/{b['id']}"), 404)["code"] == "not_found"
    error_of(http.delete(f"/api/conversations/{b['id']}"), 404)
    for bad in ("0", "abc", str(2**64)):
        error_of(http.get(f"/api/conversations/{bad}"), 400)
    error_of(http.patch(f"/api/conversations/{a['id']}", json={"colour": "red"}), 400)


def test_a_turn_streams_and_is_saved(http, model, tok, hf_tok):
    c = ok(http.post("/api/conversations", json={"model": "tiny"}))
    got = events(http, c["id"], {"content": "hello world", "system_prompt": SYSTEM, "temperature": 0, "max_tokens": 8})
    assert [e["type"] for e in got[:1] + got[-1:]] == ["start", "end"] and {e["type"] for e in got[1:-1]} == {"delta"}
    start, end = got[0], got[-1]["message"]
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello world"}]
    ids, direct = greedy(model, tok, hf_tok, history, 8)
    text = "".join(e["content"] for e in got[1:-1])
    assert text == end["content"] == direct.text
    assert start["assistant"]["partial"] is True and end["partial"] is False and end["finish_reason"] == direct.finish_reason
    assert end["prompt_tokens"] == len(ids) and end["completion_tokens"] == direct.completion_tokens and end["model"] == "tiny"
    assert start["user"]["content"] == "hello world" and start["conversation"]["title"] == "hello world"

    # The next turn carries the history, and the conversation kept the system prompt.
    got = events(http, c["id"], {"content": "the cat sat", "temperature": 0, "max_tokens": 4})
    history += [{"role": "assistant", "content": direct.text}, {"role": "user", "content": "the cat sat"}]
    ids, direct2 = greedy(model, tok, hf_tok, history, 4)
    assert got[-1]["message"]["prompt_tokens"] == len(ids) and got[-1]["message"]["content"] == direct2.text

    # Regenerate replaces the last reply, and its vote goes with it.
    last = got[-1]["message"]["id"]
    ok(http.post(f"/api/messages/{last}/feedback", json={"vote": "down"}))
    got = events(http, c["id"], {"regenerate": True, "temperature": 0, "max_tokens": 4})
    assert got[0]["user"] is None and got[-1]["message"]["content"] == direct2.text
    stored = ok(http.get(f"/api/conversations/{c['id']}"))["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert last not in [m["id"] for m in stored] and stored[-1]["vote"] is None


def test_bad_turns(http):
    c = ok(http.post("/api/conversations", json={"model": "tiny"}))
    error_of(http.post(f"/api/conversations/{c['id']}/chat", json={}), 400)  # no content
    error_of(http.post(f"/api/conversations/{c['id']}/chat", json={"regenerate": True}), 400)  # nothing to regenerate
    assert error_of(http.post(f"/api/conversations/{c['id']}/chat", json={"content": "hi", "model": "nope"}), 404)["param"] == "model"
    err = error_of(http.post(f"/api/conversations/{c['id']}/chat", json={"content": "the cat sat on the mat. " * 80}), 400)
    assert err["code"] == "context_length_exceeded"
    assert ok(http.get(f"/api/conversations/{c['id']}"))["messages"] == []  # refused turns write nothing
    error_of(http.post("/api/conversations/999999/chat", json={"content": "hi"}), 404)


def test_a_long_conversation_drops_its_oldest_turns(http, server):
    turns = [m for k in range(12) for m in ({"role": "user", "content": f"question {k}: " + "the cat sat on the mat. " * 3},
                                            {"role": "assistant", "content": f"answer {k}: " + "the dog ate the food. " * 3})]
    [cid] = ok(http.post("/api/import", json={"llmos_conversations": 1, "conversations": [{"model": "tiny", "messages": turns}]}))["imported"]
    got = events(http, cid, {"content": "hello world", "temperature": 0, "max_tokens": 8})
    start, end = got[0], got[-1]["message"]
    assert start["dropped"] > 0 and start["dropped"] % 2 == 0  # whole turns
    assert end["prompt_tokens"] + 8 <= CONTEXT and end["partial"] is False
    # The API keeps OpenAI's behaviour: the same history is an error there, not silently cut.
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="tiny", messages=turns + [{"role": "user", "content": "hello world"}], max_tokens=8)


def test_feedback_correction_and_export(http, home, tmp_path):
    c = ok(http.post("/api/conversations", json={"model": "tiny"}))
    reply = events(http, c["id"], {"content": "2+2?", "max_tokens": 3, "temperature": 0})[-1]["message"]
    assert ok(http.post(f"/api/messages/{reply['id']}/feedback", json={"vote": "down", "comment": "wrong"}))["vote"] == -1
    assert ok(http.post(f"/api/messages/{reply['id']}/correction", json={"content": "4"}))["correction"] == "4"
    error_of(http.post(f"/api/messages/{reply['id']}/feedback", json={"vote": "sideways"}), 400)
    error_of(http.post("/api/messages/999999/correction", json={"content": "x"}), 404)
    out = tmp_path / "dpo.jsonl"
    main(["data", "export", "--dpo", str(out), "--home", str(home)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
            "rejected": {"from": "gpt", "value": reply["content"]}} in rows
    exported = ok(http.get("/api/export"))
    assert exported["llmos_conversations"] == 1 and any(m.get("correction") == "4" for c in exported["conversations"] for m in c["messages"])
    error_of(http.post("/api/import", content=b"{not json"), 400)


def test_tokenize_counts_like_transformers(http, hf_tok):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello world"}]
    expected = len(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert ok(http.post("/api/tokenize", json={"model": "tiny", "messages": messages})) == {"model": "tiny", "tokens": expected, "context": CONTEXT}
    error_of(http.post("/api/tokenize", json={"model": "tiny", "messages": []}), 400)


# ----------------------------------------------------------------------------
# Assistants: stored, usable as model names, one file each


def test_assistants_are_models(http, server, model, tok, hf_tok):
    pirate = {"name": "pirate", "description": "Arr", "model": "tiny", "system_prompt": "You are a pirate.",
              "temperature": 0, "max_tokens": 5}
    assert ok(http.post("/api/assistants", json=pirate))["name"] == "pirate"
    error_of(http.post("/api/assistants", json={**pirate}), 400)  # the name is taken
    assert error_of(http.post("/api/assistants", json={"name": "tiny"}), 400)["param"] == "name"  # a served model's name
    ok(http.post("/api/assistants", json={"name": "orphan", "model": "gone"}))

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    cards = {m.id: m for m in client.models.list()}
    assert cards["pirate"].model_extra["parent"] == "tiny" and cards["tiny"].model_extra["parent"] is None
    assert "orphan" not in cards  # its model is not served here
    assert client.models.retrieve("pirate").model_extra["max_model_len"] == CONTEXT
    with pytest.raises(openai.NotFoundError, match="gone"):
        client.chat.completions.create(model="orphan", messages=[{"role": "user", "content": "hi"}])

    user = [{"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model="pirate", messages=user)  # the assistant's prompt and defaults
    ids, direct = greedy(model, tok, hf_tok, [{"role": "system", "content": "You are a pirate."}] + user, 5)
    assert r.model == "pirate" and r.usage.prompt_tokens == len(ids) and r.choices[0].message.content == direct.text
    assert r.usage.completion_tokens == 5
    assert client.chat.completions.create(model="pirate", messages=user, max_tokens=2).usage.completion_tokens == 2  # request wins
    own = [{"role": "system", "content": SYSTEM}] + user
    r = client.chat.completions.create(model="pirate", messages=own)  # the request's own system message wins
    assert r.usage.prompt_tokens == len(hf_tok.apply_chat_template(own, add_generation_prompt=True, tokenize=True, return_dict=False))
    counted = ok(http.post("/api/tokenize", json={"model": "pirate", "messages": user}))
    assert counted == {"model": "pirate", "tokens": len(ids), "context": CONTEXT}

    # The portable file: export, delete, import, the same assistant.
    before = ok(http.get("/api/assistants/pirate"))
    f = http.get("/api/assistants/pirate/file")
    assert f.status_code == 200 and 'filename="pirate.toml"' in f.headers["content-disposition"] and 'name = "pirate"' in f.text
    ok(http.delete("/api/assistants/pirate"))
    error_of(http.get("/api/assistants/pirate"), 404)
    after = ok(http.post("/api/assistants/import", content=f.content))
    assert {k: after[k] for k in pirate} == {k: before[k] for k in pirate}
    error_of(http.post("/api/assistants/import", content=b'name = "x"\ncolour = 1\n'), 400)
    renamed = ok(http.put("/api/assistants/orphan", json={"name": "found", "model": "tiny"}))
    assert renamed["name"] == "found" and "found" in [m.id for m in client.models.list()]


# ----------------------------------------------------------------------------
# Rate limits, keys, and replies that outlive their connection or their server


def test_rate_limit_answers_429_with_retry_after(tok, home):
    running = Running(create_app({"tiny": (tiny_model(max_seq_len=CONTEXT), tok, None)}, ServerConfig(rate_limit=6, rate_burst=2, home=str(home))))
    try:
        statuses = [httpx.get(running.url + "/v1/models").status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        r = httpx.get(running.url + "/api/conversations")
        assert error_of(r, 429)["code"] == "rate_limit_exceeded" and 8 <= int(r.headers["retry-after"]) <= 10  # 6 a minute
        assert httpx.get(running.url + "/health").status_code == 200  # health checks are never limited
        assert httpx.get(running.url + "/").status_code == 200  # nor the page's files
    finally:
        running.stop()


def test_token_bucket_refills_at_its_rate(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(app_module.time, "monotonic", lambda: now[0])
    buckets = app_module.TokenBuckets(per_second=2, burst=3)
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == pytest.approx(0.5) and buckets.take("b") == 0  # clients have their own buckets
    now[0] += 0.5  # one request's worth
    assert buckets.take("a") == 0 and buckets.take("a") == pytest.approx(0.5)
    now[0] += 60  # a long pause refills only up to the burst
    assert [buckets.take("a") for _ in range(4)][-1] == pytest.approx(0.5)


def test_keyed_server_opens_the_page_but_guards_the_api(tok, home):
    running = Running(create_app({"tiny": (tiny_model(max_seq_len=CONTEXT), tok, None)}, ServerConfig(api_key="sekret", home=str(home))))
    try:
        assert httpx.get(running.url + "/").status_code == 200 and httpx.get(running.url + "/ui/app.js").status_code == 200
        error_of(httpx.get(running.url + "/api/conversations"), 401)
        assert httpx.get(running.url + "/api/conversations", headers={"Authorization": "Bearer sekret"}).status_code == 200
    finally:
        running.stop()


def stored_reply(db_path, conversation_id):
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT content, partial, finish_reason FROM messages WHERE conversation_id = ? AND role = 'assistant' "
                          "ORDER BY id DESC LIMIT 1", (conversation_id,)).fetchone()


def test_a_client_that_leaves_leaves_a_partial_reply(http, home):
    c = ok(http.post("/api/conversations", json={"model": "slow"}))
    seen = ""
    with http.stream("POST", f"/api/conversations/{c['id']}/chat", json={"content": "hi", "max_tokens": 200, "temperature": 0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "delta":
                seen += json.loads(line[6:])["content"]
                if len(seen) >= 3:
                    break
    deadline = time.time() + 5
    while stored_reply(home / "llmos.db", c["id"])[0] == "" and time.time() < deadline:
        time.sleep(0.05)
    content, partial, finish = stored_reply(home / "llmos.db", c["id"])
    assert partial == 1 and finish is None and content.startswith(seen)


SERVE = textwrap.dedent("""
    import sys, torch
    from conftest import tiny_model
    from llmos.server.app import create_app, listen, uvicorn_server
    from llmos.server.serving import ServerConfig
    from llmos.tokenizer import Tokenizer
    from test_server import CONTEXT, SlowTransformer

    torch.set_num_threads(1)
    tok = Tokenizer.from_hf_dir(sys.argv[1])
    model = tiny_model(cls=SlowTransformer, max_seq_len=CONTEXT)  # the tests' tiny model: greedy from "hi" runs 200 tokens
    sock = listen("127.0.0.1", 0)
    app = create_app({"slow": (model, tok, None)}, ServerConfig(home=sys.argv[2], engine="torch"))
    print(sock.getsockname()[1], flush=True)
    uvicorn_server(app, log_level="warning").run(sockets=[sock])
""")


@pytest.mark.slow  # a fresh Python that imports torch: several seconds
def test_a_killed_server_loses_no_conversation(tok_dir, tmp_path):
    """SIGKILL mid-reply: no handler runs, and the reply saved so far is in the file, marked partial."""
    here = Path(__file__).parent  # conftest and test_server import from here, llmos from the checkout above
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(tok_dir), str(tmp_path)],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        url = f"http://127.0.0.1:{proc.stdout.readline().strip()}"
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(0.1)
        c = httpx.post(url + "/api/conversations", json={}).json()
        seen = ""
        with httpx.stream("POST", f"{url}/api/conversations/{c['id']}/chat", json={"content": "hi", "max_tokens": 200, "temperature": 0}, timeout=30) as r:
            started = time.time()
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["type"] == "delta":
                    seen += json.loads(line[6:])["content"]
                if time.time() - started > 2.5 * SAVE_EVERY:  # past a save or two
                    break
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    with sqlite3.connect(tmp_path / "llmos.db") as db:
        assert db.execute("SELECT role, content FROM messages WHERE role = 'user'").fetchall() == [("user", "hi")]
    content, partial, finish = stored_reply(tmp_path / "llmos.db", c["id"])
    assert partial == 1 and finish is None and content and seen.startswith(content)
