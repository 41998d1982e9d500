"""The OpenAI-compatible server, driven over loopback like any client would drive it.

A real uvicorn server runs in a background thread on 127.0.0.1 (a free port) and serves
conftest's tiny random model and byte-level BPE, read from a Hugging Face tokenizer directory
with a ChatML template. The official `openai` client drives the happy paths; httpx sends
the malformed ones. References: the engine run directly (same text, streamed or not),
transformers' apply_chat_template (prompt token counts), a plain forward of the model
(logprobs).
"""

import json
import os
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import openai
import pytest
import torch

from llmos.engine import Engine, SamplingParams
from llmos.errors import LlmosError
from llmos.model import Transformer
from llmos.server.app import create_app, listen, serve, uvicorn_server
from llmos.server.serving import ServerConfig, check_bind
from conftest import tiny_model

torch.set_num_threads(1)

CONTEXT = 256
USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello world"}]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


# ----------------------------------------------------------------------------
# Servers running the tiny model (conftest.py: tiny_model; the fixtures tok, tok_dir, hf_tok, and client)


class SlowTransformer(Transformer):
    """20 ms per forward, so a generation is still running while the test acts on it."""

    def forward(self, *args, **kwargs):
        time.sleep(0.02)
        return super().forward(*args, **kwargs)


class Running:
    """uvicorn serving `app` on a free loopback port, in a daemon thread; as a context manager, stopped at its end."""

    def __init__(self, app):
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn_server(app, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return str(tmp_path_factory.mktemp("home"))  # the server's llmos.db, never the user's


@pytest.fixture(scope="module")
def server(model, tok, home):
    with Running(create_app({"tiny": (model, tok, None)}, ServerConfig(max_tokens=250, max_body_bytes=64 * 1024, home=home))) as running:
        yield running


@pytest.fixture(scope="module")
def guarded(tok, home):
    """A slow model behind an API key, with room for one request at a time."""
    app = create_app({"slow": (tiny_model(cls=SlowTransformer, max_seq_len=CONTEXT), tok, None)}, ServerConfig(api_key="sekret", max_pending=1, home=home, engine="torch"))
    with Running(app) as running:
        yield running


def healthy(url, **kw):
    r = httpx.get(url + "/health", **kw)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    return r.json()


def streamed_text(stream, n=1):
    """(text per choice, finish_reason per choice, the chunks) from a chat stream."""
    chunks = list(stream)
    texts, finish = [""] * n, [None] * n
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    return texts, finish, chunks


# ----------------------------------------------------------------------------
# Models and chat


def test_models(client, server):
    assert [m.id for m in client.models.list()] == ["tiny"]
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.owned_by == "llmos" and card.model_extra["max_model_len"] == CONTEXT
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    healthy(server.url)


def test_chat_greedy_matches_engine_and_stream(client, model, tok, hf_tok):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0)
    prompt = hf_tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=True, return_dict=False)
    direct = Engine(model, tok).generate(prompt, SamplingParams(max_new_tokens=12, temperature=0))
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and choice.message.role == "assistant"
    assert choice.message.content == direct.text and choice.finish_reason == direct.finish_reason
    assert r.usage.prompt_tokens == len(prompt)  # counted by transformers, independently
    assert r.usage.completion_tokens == direct.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0, stream=True)
    (text,), (finish,), chunks = streamed_text(stream)
    assert text == choice.message.content and finish == choice.finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.usage is None and ch.choices for ch in chunks)  # no usage chunk unless asked for


def test_stream_usage_in_last_chunk(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=7, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    _, _, chunks = streamed_text(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage
    assert all(ch.usage is None for ch in chunks[:-1])


def test_seeded_sampling_repeats_and_n(client):
    kw = dict(model="tiny", messages=USER, max_tokens=10, temperature=1.0, top_p=0.95, seed=7)
    one = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == one
    two = client.chat.completions.create(**kw, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    # Choice j samples with seed + j: the first equals the n=1 answer and the second differs.
    assert two.choices[0].message.content == one
    assert two.choices[1].message.content == client.chat.completions.create(**{**kw, "seed": 8}).choices[0].message.content
    assert two.choices[1].message.content != one
    assert two.usage.completion_tokens == 20  # a random tiny model never says <|im_end|> this early
    texts, finish, _ = streamed_text(client.chat.completions.create(**kw, n=2, stream=True), n=2)
    assert texts == [c.message.content for c in two.choices] and finish == ["length", "length"]


def test_stop(client):
    base = client.chat.completions.create(model="tiny", messages=USER, max_tokens=30, temperature=0).choices[0].message.content
    assert len(base) >= 8
    stop = base[4:7]
    expected = base[: base.find(stop)]
    for form in (stop, [stop, "never appears"]):
        r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=30, temperature=0, stop=form)
        assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    (text,), (finish,), _ = streamed_text(client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=30, temperature=0, stop=stop, stream=True))
    assert text == expected and finish == "stop"


def test_logprobs_match_the_model(client, model, hf_tok):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    prompt = hf_tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt]))[0, -1].float(), -1)
    best = lp.topk(3)
    assert content[0].logprob == pytest.approx(best.values[0].item(), abs=1e-4)  # greedy took the best token
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert content[0].token == hf_tok.decode([best.indices[0].item()])
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert t.bytes is None or bytes(t.bytes).decode() == t.token
    assert "".join(t.token for t in content) == r.choices[0].message.content or "\ufffd" in "".join(t.token for t in content)
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_tools_are_rendered_by_the_template(client, hf_tok):
    with_tools = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=1, temperature=0)
    expected = hf_tok.apply_chat_template(USER, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert with_tools.usage.prompt_tokens == len(expected)
    none = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=1, temperature=0)
    assert none.usage.prompt_tokens < with_tools.usage.prompt_tokens
    # A forced call that runs out of tokens is cut like any reply (test_server_grammar.py covers whole calls).
    cut = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=1).choices[0]
    assert cut.finish_reason == "length" and cut.message.content == "{" and cut.message.tool_calls is None
    # A conversation that called a tool and got its result renders and answers.
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=2).choices[0].finish_reason


# ----------------------------------------------------------------------------
# Completions


def test_completions(client, model, tok, hf_tok):
    r = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=8, temperature=0)
    ids = hf_tok("the cat sat")["input_ids"]
    direct = Engine(model, tok).generate(ids, SamplingParams(max_new_tokens=8, temperature=0))
    assert r.object == "text_completion" and r.choices[0].text == direct.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == direct.completion_tokens
    echoed = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == "the cat sat" + direct.text

    many = client.completions.create(model="tiny", prompt=["the cat sat", "hello world"], max_tokens=4, temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == direct.text[: len(many.choices[0].text)]
    assert many.usage.prompt_tokens == len(ids) + len(hf_tok("hello world")["input_ids"])

    stream = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=8, temperature=0, stream=True, logprobs=2)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == direct.text
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == direct.completion_tokens

    lp = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=3, temperature=0, logprobs=2).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0


# ----------------------------------------------------------------------------
# Bad requests: OpenAI-shaped errors, right status codes, and the server stays up


def post(server, body, path="/v1/chat/completions", **kw):
    content = json.dumps(body) if isinstance(body, (dict, list)) else body  # bytes, or an iterator of chunks
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30, **kw)
    healthy(server.url)
    return r


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body, status, param, words", [
    (b'{"model": "tiny", "messages": [', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"model": "nope", "messages": USER}, 404, "model", "nope"),
    ({"model": "tiny", "messages": USER, "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({"model": "tiny", "messages": USER, "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ({"model": "tiny", "messages": USER, "max_tokens": 251}, 400, "max_tokens", "at most 250"),
    ({"model": "tiny", "messages": USER, "n": 9}, 400, "n", "at most 8"),
    ({"model": "tiny", "messages": USER, "stop": [""]}, 400, None, "stop"),
    ({"model": "tiny", "messages": USER, "temprature": 0.5}, 400, "temprature", "Unrecognized"),
    ({"model": "tiny", "messages": []}, 400, "messages", "at least 1"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "system"),
    ({"model": "tiny", "messages": [{"role": "tool", "tool_call_id": "x", "content": "hi"}]}, 400, "messages", "tool call"),
    ({"model": "tiny", "messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format", "schema"),
    ({"model": "tiny", "messages": USER, "logit_bias": {"5": 10}}, 400, "logit_bias", "not supported yet"),
])
def test_bad_chat_requests(server, body, status, param, words):
    err = error_of(post(server, body), status)
    assert err["param"] == param and words in err["message"]


def test_context_overflow_names_the_counts(server, hf_tok):
    n = len(hf_tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=True, return_dict=False))
    err = error_of(post(server, {"model": "tiny", "messages": USER, "max_tokens": 250}), 400)
    assert err["code"] == "context_length_exceeded"
    assert f"maximum context length is {CONTEXT} tokens" in err["message"]
    assert f"requested {n + 250} tokens ({n} in the messages, 250 in the completion)" in err["message"]
    long = [{"role": "user", "content": "the cat sat on the mat. " * 80}]
    err = error_of(post(server, {"model": "tiny", "messages": long}), 400)
    assert err["code"] == "context_length_exceeded" and "resulted in" in err["message"]
    err = error_of(post(server, {"model": "tiny", "prompt": "hello " * 400}, path="/v1/completions"), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"


def test_oversized_body_is_refused(server):
    huge = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 70_000}]}
    assert error_of(post(server, huge), 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit holds while reading
        for _ in range(70):
            yield b"x" * 1024

    assert error_of(post(server, chunked()), 413)["code"] == "request_too_large"


def test_unknown_route_and_method(server):
    error_of(httpx.get(server.url + "/v2/nothing"), 404)
    error_of(httpx.get(server.url + "/v1/chat/completions"), 405)
    schema = httpx.get(server.url + "/openapi.json").json()  # what schema-driven tests will read
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions"} <= set(schema["paths"])
    healthy(server.url)


def test_bad_completion_requests(server):
    err = error_of(post(server, {"model": "tiny", "prompt": [999999]}, path="/v1/completions"), 400)
    assert "outside" in err["message"]
    err = error_of(post(server, {"model": "tiny", "prompt": "hi", "suffix": "x"}, path="/v1/completions"), 400)
    assert err["param"] == "suffix"


# ----------------------------------------------------------------------------
# API key, a full queue, clients that leave


def test_api_key_guards_every_route(guarded):
    key = {"Authorization": "Bearer sekret"}
    for path in ("/health", "/v1/models"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            err = error_of(httpx.get(guarded.url + path, headers=headers), 401)
            assert err["code"] == "invalid_api_key"
        assert httpx.get(guarded.url + path, headers=key).status_code == 200
    wrong = openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="slow", messages=USER, max_tokens=1)
    right = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sekret", max_retries=0)
    assert right.chat.completions.create(model="slow", messages=USER, max_tokens=2).usage.completion_tokens >= 1


def wait_idle(url, headers, seconds):
    deadline = time.time() + seconds
    while healthy(url, headers=headers)["pending"]:
        assert time.time() < deadline, "the generation did not stop"
        time.sleep(0.02)


def test_full_queue_answers_503_at_once_and_disconnect_stops_generation(guarded):
    key = {"Authorization": "Bearer sekret"}
    body = {"model": "slow", "messages": USER, "max_tokens": 100, "temperature": 0}  # 100 steps of 20 ms: 2 s
    with httpx.Client(timeout=30, headers=key) as c:
        with c.stream("POST", guarded.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: ")
            t0 = time.time()
            busy = c.post(guarded.url + "/v1/chat/completions", json=body)
            assert time.time() - t0 < 1.0
            assert error_of(busy, 503)["code"] == "server_busy" and busy.headers["retry-after"]
        t0 = time.time()  # the stream is closed: its generation must stop well before its 2 s
        wait_idle(guarded.url, key, 1.0)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(guarded.url + "/v1/chat/completions", json=body, headers=key, timeout=0.3)
    wait_idle(guarded.url, key, 1.5)


class CountingTransformer(SlowTransformer):
    """SlowTransformer that records how many rows each decode step (one token per row) computes."""

    def forward(self, tokens, *args, **kwargs):
        if tokens.shape[1] == 1:
            self.decode_rows.append(tokens.shape[0])
        return super().forward(tokens, *args, **kwargs)


def test_concurrent_streams_share_the_decode_loop_and_a_disconnect_frees_the_row(model, tok, hf_tok, home):
    slow = tiny_model(cls=CountingTransformer, max_seq_len=CONTEXT)  # the same weights as `model`: tiny_model seeds them
    slow.decode_rows = []
    app = create_app({"slow": (slow, tok, None)}, ServerConfig(home=home, engine="torch"))
    scheduler = app.state.serving.models["slow"].scheduler
    running = Running(app)
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        first = [{"role": "user", "content": "the cat sat on the mat"}]
        second = [{"role": "user", "content": "hello"}]  # a shorter prompt: it joins at another offset
        a = iter(client.chat.completions.create(model="slow", messages=first, max_tokens=40, temperature=0, stream=True))
        a_chunks = [next(a), next(a)]  # a is decoding now; b joins its batch between two steps
        b_text, _, _ = streamed_text(client.chat.completions.create(model="slow", messages=second, max_tokens=10,
                                                                    temperature=0, stream=True))
        a_chunks += list(a)
        a_text = "".join(c.delta.content or "" for ch in a_chunks for c in ch.choices)
        assert 2 in slow.decode_rows  # the two requests were decoded in the same forward
        for text, messages, max_new in ((a_text, first, 40), (b_text[0], second, 10)):
            prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert text == Engine(model, tok).generate(prompt, SamplingParams(max_new_tokens=max_new, temperature=0)).text

        # A client that leaves mid-stream: its row is freed long before its 200 steps of 20 ms.
        with httpx.stream("POST", running.url + "/v1/chat/completions", timeout=30,
                          json={"model": "slow", "messages": first, "max_tokens": 200, "temperature": 0, "stream": True}) as r:
            data = (line for line in r.iter_lines() if line.startswith("data: "))
            next(data), next(data)  # the role chunk, then the first text: the request has its row
            assert len(scheduler.rows) == 1
        wait_idle(running.url, {}, 1.5)  # pending drops when the scheduler has ended the request
        assert scheduler.rows == []
    finally:
        running.stop()


# ----------------------------------------------------------------------------
# Safe defaults


def test_binding_beyond_loopback_needs_a_key():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    check_bind("0.0.0.0", "key")
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(LlmosError, match="--api-key"):
            check_bind(host, None)
    with pytest.raises(LlmosError, match="--api-key"):  # refused before any model is loaded
        serve(["no-such-model"], ServerConfig(host="0.0.0.0"))


def test_every_name_llmos_run_accepts_is_a_model_name(model, tok, tmp_path):
    """`llmos serve` with the bundled model served it as "default" only: the README's `smollm2` got 404. The
    bundled model's names are aliases of each other, and a path names the model loaded from it."""
    from llmos.formats import Checkpoint

    folder = tmp_path / "weights"
    folder.mkdir()
    ckpt = Checkpoint(model.cfg, {}, tok, {"path": str(folder)})
    running = Running(create_app({"default": (model, tok, None), "mine": (model, tok, ckpt)},
                                 ServerConfig(home=str(tmp_path), engine="torch")))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        listed = {m.id: getattr(m, "parent", None) for m in client.models.list().data}
        assert listed["default"] is None and listed["smollm2"] == "default" and "mine" in listed
        ask = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
        want = client.chat.completions.create(model="default", **ask).choices[0].message.content
        assert client.chat.completions.create(model="smollm2", **ask).choices[0].message.content == want
        assert client.chat.completions.create(model=str(folder), **ask).model == "mine"  # the name it is served as
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", **ask)
    finally:
        running.stop()
