"""Property-based tests against the server's own OpenAPI schema: schemathesis generates requests
for every route, valid and not (wrong types, missing fields, odd strings, huge numbers), sends them
to a real server on loopback, and no answer may be a 5xx. The server runs the tiny model of
test_server with a small token cap (generation stays cheap) and no rate limit (the fuzzer sends
hundreds of requests). Example counts are bounded so the file runs in well under a minute.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from llmos.server.app import create_app  # noqa: E402
from llmos.server.serving import ServerConfig  # noqa: E402
from conftest import tiny_model  # noqa: E402
from test_server import CONTEXT, Running, healthy  # noqa: E402


@pytest.fixture(scope="module")
def server(tok, tmp_path_factory):
    config = ServerConfig(home=str(tmp_path_factory.mktemp("home")), max_tokens=4, rate_limit=0, max_pending=64)
    with Running(create_app({"tiny": (tiny_model(max_seq_len=CONTEXT), tok, None)}, config)) as running:
        yield running


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_gets_a_server_error(server, mode):
    """Every operation, with bodies, paths and queries that fit the schema (positive) and that break it (negative)."""
    api = schemathesis.openapi.from_url(server.url + "/openapi.json")
    ops = [op.ok() for op in api.get_all_operations()]
    assert len(ops) > 20  # every route is in the schema

    @given(data=st.data())
    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def run(data):
        op = data.draw(st.sampled_from(ops))
        case = data.draw(op.as_strategy(generation_mode=GenerationMode(mode)))
        response = case.call(timeout=30)
        assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.status_code} {response.text[:300]}"

    run()
    healthy(server.url)
