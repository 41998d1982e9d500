"""`llmos serve`: the models behind an OpenAI-compatible HTTP API.

    llmos serve                                  # the bundled model at http://127.0.0.1:8000/v1
    llmos serve smollm2 ./my-model --port 1234
    llmos serve --host 0.0.0.0 --api-key KEY     # other machines need a key

Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`;
the chat page is at http://127.0.0.1:8000/. Conversations, feedback and assistants persist
in $LLMOS_HOME/llmos.db (store.py). This module assembles the pieces: serving.py (the logic)
and routes.py (HTTP) into one FastAPI app, a gate in front of it (API key, rate, body size),
and uvicorn to run it.
"""

from __future__ import annotations

import dataclasses
import hmac
import math
import socket
import sys
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.responses import JSONResponse

from llmos import loader
from llmos.errors import LlmosError
from llmos.offload import place
from llmos.server.routes import UI, install_error_handlers, router
from llmos.server.serving import APIError, ServerConfig, Serving, check_bind
from llmos.server.store import Store


def create_app(models: dict, config: ServerConfig | None = None, store: Store | None = None) -> FastAPI:
    """models: name → (Transformer, Tokenizer, Checkpoint | None), already loaded;
    store: default, llmos.db in config.home."""
    config = config or ServerConfig()
    serving = Serving(models, config, store)

    @asynccontextmanager
    async def lifespan(app):
        yield
        serving.close()

    app = FastAPI(title="llmos", summary="An OpenAI-compatible API for local models", lifespan=lifespan)
    app.state.serving = serving
    app.include_router(router)
    app.mount("/ui", StaticFiles(directory=UI), name="ui")
    install_error_handlers(app)
    rate = TokenBuckets(config.rate_limit / 60, config.rate_burst) if config.rate_limit > 0 else None
    app.add_middleware(Gate, api_key=config.api_key, max_body_bytes=config.max_body_bytes, rate=rate)
    return app


class TokenBuckets:
    """A token bucket per client: `burst` requests at once, then `per_second` on average."""

    def __init__(self, per_second: float, burst: int):
        self.per_second, self.burst = per_second, max(1, burst)
        self.buckets: dict[str, tuple[float, float]] = {}  # client → (tokens, when counted)

    def take(self, client: str) -> float:
        """0 when the request may go on, else the seconds until it may."""
        now = time.monotonic()
        if len(self.buckets) > 10_000:  # forget clients whose buckets have refilled: they are as new
            self.buckets = {c: (t, w) for c, (t, w) in self.buckets.items() if t + (now - w) * self.per_second < self.burst}
        tokens, when = self.buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.per_second)
        if tokens >= 1:
            self.buckets[client] = (tokens - 1, now)
            return 0.0
        self.buckets[client] = (tokens, now)
        return (1 - tokens) / self.per_second


def is_page(path: str) -> bool:
    """The chat page's static files: open without a key (a browser cannot send one when it opens
    a page; the files hold no data, and the page asks for the key its /api calls need)."""
    return path == "/" or path.startswith("/ui/")


class Gate:
    """Checked before any route runs: the Bearer key (when the server has one), the client's
    rate, then the body size.

    The body is read here, up to the cap, and handed on: a body that is too large is refused
    without reading the rest, whether or not it declared its Content-Length.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int, rate: TokenBuckets | None = None):
        self.app, self.api_key, self.max_body_bytes, self.rate = app, api_key, max_body_bytes, rate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if is_page(scope["path"]):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                problem = "no API key given" if not given else "incorrect API key"
                return await reply(scope, receive, send, APIError(
                    401, f"{problem}; send the server's key as 'Authorization: Bearer KEY'", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"}))
        if self.rate is not None and scope["path"] != "/health":
            # Per key when the server has one (every client proved it); else per address, since
            # a key a keyless server does not check could be changed at will.
            client = "key" if self.api_key is not None else "address " + (scope.get("client") or ("?",))[0]
            wait = self.rate.take(client)
            if wait:
                return await reply(scope, receive, send, APIError(
                    429, f"too many requests: this server allows {self.rate.per_second * 60:g} a minute per client; "
                         f"retry in {math.ceil(wait)} s", code="rate_limit_exceeded", headers={"Retry-After": str(math.ceil(wait))}))
        too_large = APIError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} bytes",
                             code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await reply(scope, receive, send, too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await reply(scope, receive, send, too_large)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        await self.app(scope, replay, send)


async def reply(scope, receive, send, e: APIError) -> None:
    await JSONResponse(e.body(), status_code=e.status, headers=e.headers)(scope, receive, send)


# ----------------------------------------------------------------------------
# Running it


def listen(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: any free port), or a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LlmosError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    return sock


def uvicorn_server(app: FastAPI, log_level: str = "info"):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))


def serve(models, config: ServerConfig | None = None, device: str = "cpu", gpu_layers=None) -> None:
    """Serve `models` (names, as `llmos run` takes them, or name → (model, tokenizer, ckpt)) until interrupted.
    gpu_layers: N or "auto", the last N layers of each model on the GPU (llmos/offload.py)."""
    config = config or ServerConfig()
    check_bind(config.host, config.api_key)  # before loading anything: a refusal should be instant
    sock = listen(config.host, config.port)
    if not isinstance(models, dict):  # the PyTorch model for batches; ServedModel adds the fast decoder
        runners = {name: loader.load(name, "torch", device, batch=config.max_batch, tokenizer=False)
                   for name in dict.fromkeys(models or ["default"])}
        models = {name: (r.model, r.tokenizer, r.checkpoint) for name, r in runners.items()}
    if gpu_layers is not None:
        for model, *_ in models.values():
            place(model, gpu_layers, ctx=min(model.cfg.max_seq_len, config.max_context or model.cfg.max_seq_len),
                  batch=config.max_batch)
    config = dataclasses.replace(config, port=sock.getsockname()[1])
    app = create_app(models, config)
    shown = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{shown}:{config.port}"
    print(f"serving {', '.join(models)} at {url}/v1 (OpenAI API), chat page at {url}/; Ctrl-C stops", file=sys.stderr)
    uvicorn_server(app).run(sockets=[sock])
