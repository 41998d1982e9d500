"""The chat page in a real browser: Debian's Chromium driven by the PyPI `playwright` package.

A real server on 127.0.0.1 serves three tiny models: `slow` (random weights, 25 ms a token, so a
reply visibly streams), `tiny` (the same, at full speed) and `scripted` (says one fixed reply
full of markdown and HTML, then stops). References: the SQLite file read with sqlite3, and
`llmos data export` run on it. Screenshots land in tests/artifacts/ (or $LLMOS_TEST_ARTIFACTS).

Needs: `apt-get install -y chromium` and `pip install playwright` (no `playwright install`:
the system Chromium is launched). Skips cleanly without either.
"""

import json
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

# Skip before the heavy imports when the browser cannot run.
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
expect = sync_api.expect
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no system Chromium; apt-get install -y chromium", allow_module_level=True)

import httpx  # noqa: E402
import torch  # noqa: E402

from llmos.cli import main  # noqa: E402
from llmos.model import Transformer  # noqa: E402
from llmos.server.app import create_app  # noqa: E402
from llmos.server.serving import ServerConfig  # noqa: E402
from conftest import tiny_config, tiny_model  # noqa: E402
from test_server import CONTEXT, Running  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("LLMOS_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")

SCRIPT = (
    "Here is **bold**, *italic* and `inline code`.\n\n"
    "<script>window.pwned = 1</script> <img src=x onerror=\"window.pwned = 2\">\n\n"
    "- a [safe link](https://example.com/a?b=1&c=2)\n"
    "- a [bad link](javascript:window.pwned=3)\n\n"
    "```html\n<b onclick=\"window.pwned = 4\">not bold</b>\n```\n"
)


class Scripted(Transformer):
    """Answers every prompt with `reply` (token ids) and then its end-of-turn token."""

    def __init__(self, cfg, reply: list[int], end: int):
        super().__init__(cfg)
        self.reply, self.end, self.step = reply, end, 0

    def forward(self, tokens, cache=None, last=False):
        if tokens.shape[1] > 1:  # a prefill: a new answer begins
            self.step = 0
        time.sleep(0.005)
        target = self.reply[self.step] if self.step < len(self.reply) else self.end
        self.step += 1
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.cfg.vocab_size)
        logits[:, -1, target] = 30.0
        return logits


class Slow(Transformer):
    def forward(self, *args, **kwargs):
        time.sleep(0.025)
        return super().forward(*args, **kwargs)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def server(tok, home):
    models = {"slow": (tiny_model(cls=Slow, max_seq_len=CONTEXT), tok, None), "tiny": (tiny_model(max_seq_len=CONTEXT), tok, None),
              "scripted": (Scripted(tiny_config(max_seq_len=1024), tok.encode(SCRIPT), tok.eos_id).eval(), tok, None)}
    # engine torch: the scripted and slow models' own forward is the point, so no fast decoder may stand in for it
    with Running(create_app(models, ServerConfig(home=str(home), engine="torch"))) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server, request):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)  # CSP violations land here
    page.on("dialog", lambda d: d.accept())
    page.goto(server.url + "/")
    ready(page)
    yield page
    shoot(page, request.node.name)
    context.close()
    assert errors == [], f"the page threw: {errors}"


def ready(page):
    expect(page.locator("body[data-ready='1']")).to_have_count(1)


def shoot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def say(page, text, model=None, **settings):
    """Send `text` with a model and sampling settings (max_tokens=..., temperature=...); returns
    the count of turns before it, for finished()."""
    turns = int(page.evaluate("document.body.dataset.turns || 0"))
    if model:
        page.select_option("#model", model)
    if settings:
        closed = page.locator("#settings").is_hidden()
        if closed:
            page.click("#settings-toggle")
        for key, value in settings.items():
            page.fill(f"#{key}", str(value))
        if closed:
            page.click("#settings-toggle")
    page.fill("#input", text)
    page.press("#input", "Enter")
    return turns


def finished(page, turns):
    expect(page.locator(f"body[data-turns='{turns + 1}']")).to_have_count(1, timeout=20_000)
    expect(page.locator(".message.assistant.streaming")).to_have_count(0)
    expect(page.locator("#send")).to_have_text("Send")


def db(home, sql, *args):
    with sqlite3.connect(home / "llmos.db") as c:
        return c.execute(sql, args).fetchall()


# ----------------------------------------------------------------------------


def test_a_reply_streams_in_and_survives_a_reload(page, home, server):
    turns = say(page, "hello world", model="slow", max_tokens=40, temperature=0)  # greedy: no early end
    reply = page.locator(".message.assistant .body").last
    expect(page.locator(".message.assistant.streaming")).to_have_count(1)
    lengths = set()  # the reply's length, sampled while it streams
    while page.locator(".message.assistant.streaming").count():
        lengths.add(len(reply.inner_text()))
        time.sleep(0.03)
    finished(page, turns)
    assert len([n for n in lengths if n > 0]) >= 2, f"the reply did not arrive in pieces: {sorted(lengths)}"
    [(content, partial, tokens)] = db(home, "SELECT content, partial, completion_tokens FROM messages WHERE role = 'assistant'")
    assert partial == 0 and tokens == 40 and content.strip()
    expect(page.locator(".message.user .body")).to_have_text(["hello world"])
    expect(page.locator("#conversations li .title")).to_have_text(["hello world"])
    expect(page.locator("#tokens")).to_have_text(re.compile(rf"^\d+ / {CONTEXT} tokens$"))
    shoot(page, "streamed")

    page.reload()
    ready(page)
    expect(page.locator(".message.user .body")).to_have_text(["hello world"])
    expect(page.locator(".message.assistant")).to_have_count(1)
    # The counter: the next prompt (the history and an empty draft) against the context.
    history = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": content}, {"role": "user", "content": ""}]
    n = httpx.post(server.url + "/api/tokenize", json={"model": "slow", "messages": history}).json()["tokens"]
    expect(page.locator("#tokens")).to_have_text(f"{n} / {CONTEXT} tokens")
    assert page.locator(".message.assistant .toolbar .meta").inner_text() == f"slow · {tokens} tokens"


def test_stop_keeps_the_partial_reply(page, home):
    say(page, "hello world", model="slow", max_tokens=200, temperature=0)
    reply = page.locator(".message.assistant.streaming .body")
    expect(reply).not_to_have_text("")
    page.click("#send")  # now "Stop"
    expect(page.locator(".message.assistant .toolbar .meta")).to_have_text(re.compile(r"· partial$"))
    message_id = int(page.locator(".message.assistant").get_attribute("data-id"))
    deadline = time.time() + 5
    while not db(home, "SELECT content FROM messages WHERE id = ?", message_id)[0][0] and time.time() < deadline:
        time.sleep(0.05)
    [(content, partial, finish)] = db(home, "SELECT content, partial, finish_reason FROM messages WHERE id = ?", message_id)
    assert partial == 1 and finish is None and content
    page.reload()
    ready(page)
    expect(page.locator(".message.assistant .toolbar .meta")).to_have_text(re.compile(r"· partial$"))


def test_switching_renaming_searching_deleting_conversations(page, home):
    turns = say(page, "the cat sat", model="tiny", max_tokens=5)
    finished(page, turns)
    first = page.locator(".message.assistant").get_attribute("data-id")
    page.get_by_role("button", name="Regenerate the reply").click()  # replaces the reply
    finished(page, turns + 1)
    expect(page.locator(".message.assistant")).to_have_count(1)
    assert page.locator(".message.assistant").get_attribute("data-id") != first
    assert db(home, "SELECT count(*) FROM messages WHERE id = ?", int(first)) == [(0,)]
    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    turns = say(page, "how are you today?", max_tokens=5)
    finished(page, turns)
    titles = page.locator("#conversations li .title")
    expect(titles.first).to_have_text("how are you today?")  # newest first
    page.locator("#conversations li", has_text="the cat sat").click()
    expect(page.locator(".message.user .body")).to_have_text(["the cat sat"])
    page.locator("#conversations li", has_text="how are you").click()
    expect(page.locator(".message.user .body")).to_have_text(["how are you today?"])

    item = page.locator("#conversations li", has_text="the cat sat")
    item.hover()
    item.get_by_role("button", name="Rename").click()
    page.fill("#conversations input.rename", "Cats, renamed")
    page.press("#conversations input.rename", "Enter")
    expect(page.locator("#conversations li", has_text="Cats, renamed")).to_have_count(1)
    assert ("Cats, renamed",) in db(home, "SELECT title FROM conversations")

    page.fill("#search", "renamed")
    expect(titles).to_have_text(["Cats, renamed"])
    page.fill("#search", "")
    expect(page.locator("#conversations li", has_text="how are you")).to_have_count(1)

    item = page.locator("#conversations li", has_text="Cats, renamed")
    item.hover()
    item.get_by_role("button", name="Delete").click()  # the confirm() is accepted
    expect(page.locator("#conversations li", has_text="Cats, renamed")).to_have_count(0)
    assert ("Cats, renamed",) not in db(home, "SELECT title FROM conversations")


def test_thumbs_down_and_a_better_answer_reach_the_training_files(page, home, tmp_path):
    turns = say(page, "what is two plus two?", model="tiny", max_tokens=6, temperature=0)  # greedy: never an empty reply
    finished(page, turns)
    message = page.locator(".message.assistant").last
    message_id = int(message.get_attribute("data-id"))
    message.get_by_role("button", name="Bad reply").click()
    expect(page.locator(".message.assistant").last.get_by_role("button", name="Bad reply")).to_have_attribute("aria-pressed", "true")
    page.locator(".message.assistant").last.get_by_role("button", name="Write a better answer").click()
    page.fill(".editor textarea", "Two plus two is **4**.")
    page.click("text=Save better answer")
    expect(page.locator(".message.assistant .correction strong")).to_have_text("4")

    assert db(home, "SELECT vote FROM feedback WHERE message_id = ?", message_id) == [(-1,)]
    assert db(home, "SELECT content FROM corrections WHERE message_id = ?", message_id) == [("Two plus two is **4**.",)]
    [(reply,)] = db(home, "SELECT content FROM messages WHERE id = ?", message_id)
    sft, dpo = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl"
    main(["data", "export", "--sft", str(sft), "--dpo", str(dpo), "--home", str(home)])
    rows = [json.loads(line) for line in dpo.read_text().splitlines()]
    assert {"conversations": [{"from": "human", "value": "what is two plus two?"}],
            "chosen": {"from": "gpt", "value": "Two plus two is **4**."}, "rejected": {"from": "gpt", "value": reply}} in rows
    assert {"messages": [{"role": "user", "content": "what is two plus two?"},
                         {"role": "assistant", "content": "Two plus two is **4**."}]} in [json.loads(x) for x in sft.read_text().splitlines()]


def test_model_output_is_shown_as_text_never_run(page):
    turns = say(page, '<img src=x onerror="window.pwned = 5"> <b>hi</b>', model="scripted")
    finished(page, turns)
    for _ in range(2):  # as streamed, then as rendered from the stored history
        body = page.locator(".message.assistant .body").last
        assert page.evaluate("window.pwned") is None
        assert page.locator("#messages img, #messages script, #messages b, #messages [onerror], #messages [onclick]").count() == 0
        text = body.inner_text()
        assert '<script>window.pwned = 1</script> <img src=x onerror="window.pwned = 2">' in text
        assert '<b onclick="window.pwned = 4">not bold</b>' in body.locator("pre code").inner_text()
        expect(body.locator("strong")).to_have_text("bold")
        expect(body.locator("em")).to_have_text("italic")
        expect(body.locator("code").first).to_have_text("inline code")
        expect(body.locator("li")).to_have_count(2)
        links = body.locator("a")
        expect(links).to_have_count(1)  # the javascript: link stays text
        assert links.get_attribute("href") == "https://example.com/a?b=1&c=2" and links.get_attribute("rel").startswith("noopener")
        expect(page.locator(".message.user .body").last).to_have_text('<img src=x onerror="window.pwned = 5"> <b>hi</b>')
        page.reload()
        ready(page)


def test_an_assistant_made_in_the_page_is_a_model(page, server):
    page.click("#settings-toggle")
    page.select_option("#model", "tiny")
    page.fill("#system", "You are a pirate.")
    page.fill("#temperature", "0")
    page.click("#new-assistant summary")
    page.fill("#assistant-name", "pirate")
    page.fill("#assistant-description", "Talks like a pirate")
    page.click("#save-assistant")
    expect(page.locator("#assistants li .name")).to_have_text(["pirate"])
    expect(page.locator("#model")).to_have_value("pirate")
    page.fill("#system", "")
    expect(page.locator("#system")).to_have_attribute("placeholder", "The assistant's: You are a pirate.")
    cards = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert cards["pirate"]["parent"] == "tiny"
    turns = say(page, "ahoy", max_tokens=4)
    finished(page, turns)
    assert page.locator(".message.assistant .toolbar .meta").last.inner_text().startswith("pirate")


ALLOWED = {"P": set(), "BR": set(), "STRONG": set(), "EM": set(), "CODE": set(), "PRE": set(), "SPAN": {"class"},
           "A": {"href", "target", "rel"}, "UL": set(), "OL": set(), "LI": set(), "BLOCKQUOTE": set(),
           **{f"H{k}": set() for k in range(1, 7)}}
PIECES = ["<", ">", '"', "'", "&", "*", "**", "`", "```", "```js\n", "[", "]", "(", ")", "# ", "- ", "1. ", "&gt; ", "\n", "\n\n",
          " ", "x", "script", "<script>", "</script>", "<img src=x onerror=alert(1)>", "onerror=", "javascript:", "https://a.b/",
          "http://c.d/?e=1&f=2", "[l](", "\u0000", "\u00000\u0000", "<a href='javascript:x'>", "<svg onload=1>", "&amp;", "&lt;"]


def test_the_markdown_renderer_only_makes_its_own_tags(page):
    """Random mixes of markdown and HTML through the page's renderMarkdown: every element it makes is
    on the allowlist, every link is http(s), and the visible text keeps every < and > of the input
    (but the > that marks a quote)."""
    import random

    rnd = random.Random(0)
    inputs = ["".join(rnd.choice(PIECES) for _ in range(rnd.randint(1, 40))) for _ in range(400)]
    inputs += ['[x](https://a.com/"onmouseover="alert(1))', "**<img src=x onerror=alert(1)>**", "```\nunclosed <b>"]
    found = page.evaluate("""inputs => inputs.map(text => {
        const box = document.createElement("div");
        box.innerHTML = renderMarkdown(text);
        return {text: box.textContent,
                elements: [...box.querySelectorAll("*")].map(e => [e.tagName, [...e.attributes].map(a => [a.name, a.value])])};
    })""", inputs)
    for text, out in zip(inputs, found):
        for tag, attributes in out["elements"]:
            assert tag in ALLOWED and {name for name, _ in attributes} <= ALLOWED[tag], (text, tag, attributes)
            if tag == "A":
                assert re.match(r"https?://", dict(attributes)["href"]), (text, attributes)
        clean = text.replace("\u0000", "")
        quotes = sum(tag == "BLOCKQUOTE" for tag, _ in out["elements"])  # a line's leading > is markdown's quote mark
        assert out["text"].count("<") == clean.count("<") and out["text"].count(">") + quotes == clean.count(">"), (text, out["text"])
