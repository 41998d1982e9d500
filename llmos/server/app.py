"""`llmos serve`: the models behind an OpenAI-compatible HTTP API.

    llmos serve                                  # the bundled model at http://127.0.0.1:8000/v1
    llmos serve smollm2 ./my-model --port 1234
    llmos serve --host 0.0.0.0 --api-key KEY     # other machines need a key

Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`.
This module assembles the pieces: serving.py (the logic) and routes.py (HTTP) into one
FastAPI app, a gate in front of it (API key, body size), and uvicorn to run it.
"""

from __future__ import annotations

import hmac
import socket
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.responses import JSONResponse

from llmos.errors import LlmosError
from llmos.server.routes import install_error_handlers, router
from llmos.server.serving import APIError, ServerConfig, Serving, check_bind


def create_app(models: dict, config: ServerConfig | None = None) -> FastAPI:
    """models: name → (Transformer, Tokenizer, Checkpoint | None), already loaded."""
    config = config or ServerConfig()
    serving = Serving(models, config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        serving.close()

    app = FastAPI(title="llmos", summary="An OpenAI-compatible API for local models", lifespan=lifespan)
    app.state.serving = serving
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(Gate, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    return app


class Gate:
    """Checked before any route runs: the Bearer key (when the server has one), then the body size.

    The body is read here, up to the cap, and handed on: a body that is too large is refused
    without reading the rest, whether or not it declared its Content-Length.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                problem = "no API key given" if not given else "incorrect API key"
                return await reply(scope, receive, send, APIError(
                    401, f"{problem}; send the server's key as 'Authorization: Bearer KEY'", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"}))
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


def serve(models, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "cpu", dtype=None, **limits) -> None:
    """Serve `models` (names for llmos.registry.load_model, or name → (model, tokenizer, ckpt))
    until interrupted. `limits` are ServerConfig fields: max_tokens, max_pending, ..."""
    check_bind(host, api_key)  # before loading anything: a refusal should be instant
    sock = listen(host, port)
    if not isinstance(models, dict):
        from llmos.registry import load_model

        models = {name: load_model(name, device, dtype) for name in dict.fromkeys(models or ["default"])}
    config = ServerConfig(host=host, port=sock.getsockname()[1], api_key=api_key, **limits)
    app = create_app(models, config)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {', '.join(models)} at http://{shown}:{config.port}/v1 (OpenAI API); Ctrl-C stops", file=sys.stderr)
    uvicorn_server(app).run(sockets=[sock])
