"""HTTP only: paths, bodies, status codes and server-sent events. The logic is in serving.py.

Every error leaves in OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
FastAPI's own 422 validation answers and HTML-less 404/405s are rewritten here, and an
unexpected exception becomes a 500 in the same shape while the server keeps running.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from llmos.errors import LlmosError
from llmos.server import protocol as p
from llmos.server.serving import APIError, Serving

router = APIRouter(strict_content_type=False)  # a body without Content-Type is read as JSON, as OpenAI does
ERRORS = {code: {"model": p.ErrorResponse} for code in (400, 401, 404, 413, 503)}


def serving(request: Request) -> Serving:
    return request.app.state.serving


def respond(result) -> JSONResponse | StreamingResponse:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    # No caching or proxy buffering: each event must reach the client as soon as it is made.
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/health")
async def health(request: Request) -> dict:
    return serving(request).health()


@router.get("/v1/models", response_model=p.ModelList, responses=ERRORS)
async def list_models(request: Request):
    return respond(serving(request).list_models())


@router.get("/v1/models/{model:path}", response_model=p.ModelCard, responses=ERRORS)
async def get_model(model: str, request: Request):
    served = serving(request).model(model)
    return respond(p.ModelCard(id=served.name, max_model_len=served.context))


@router.post("/v1/chat/completions", response_model=p.ChatCompletion, responses=ERRORS)
async def chat_completions(body: p.ChatCompletionRequest, request: Request):
    return respond(await serving(request).chat(body, request.is_disconnected))


@router.post("/v1/completions", response_model=p.Completion, responses=ERRORS)
async def completions(body: p.CompletionRequest, request: Request):
    return respond(await serving(request).completions(body, request.is_disconnected))


# ----------------------------------------------------------------------------
# Errors in OpenAI's shape


def error(status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type, param, code).body(), status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line for the first problem (pydantic reports every branch of a union), and the param it names."""
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])}); send a JSON object", None
    loc = [str(x) for x in first["loc"] if x != "body"]
    if not loc:  # the body as a whole: absent, or not an object
        return "the request body must be a JSON object, sent with Content-Type: application/json", None
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    more = len({tuple(e["loc"]) for e in errors}) - 1
    return message + (f" (and {more} more problem{'s' * (more > 1)})" if more > 0 else ""), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {404: f"no route {request.url.path}; see /docs for the API", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error(exc.status_code, message.get(exc.status_code, str(exc.detail)), headers=getattr(exc, "headers", None))

    @app.exception_handler(LlmosError)
    async def user_error(request: Request, exc: LlmosError):
        return error(400, str(exc))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        logging.getLogger("llmos.server").exception("internal error on %s", request.url.path)
        return error(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
