"""HTTP only: paths, bodies, status codes and server-sent events. The logic is in serving.py,
what persists in store.py.

    /v1/...   the OpenAI API
    /api/...  the chat page's own: conversations, messages, feedback, assistants, tokenize
    /         the chat page (static files in ui/)

Every error leaves in OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
FastAPI's own 422 validation answers and HTML-less 404/405s are rewritten here, and an
unexpected exception becomes a 500 in the same shape while the server keeps running.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from llmos.errors import LlmosError
from llmos.server import protocol as p
from llmos.server.serving import APIError, Serving
from llmos.server.store import NotFound, assistant_from_toml, assistant_to_toml

router = APIRouter(strict_content_type=False)  # a body without Content-Type is read as JSON, as OpenAI does
ERRORS = {code: {"model": p.ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}
UI = FilePath(__file__).parent / "ui"
# The page runs only its own script and styles: model output that slipped into the DOM as
# markup could still not run anything or load anything.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                           "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]  # SQLite's rowids


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
    return respond(serving(request).card(model))


@router.post("/v1/chat/completions", response_model=p.ChatCompletion, responses=ERRORS)
async def chat_completions(body: p.ChatCompletionRequest, request: Request):
    return respond(await serving(request).chat(body, request.is_disconnected))


@router.post("/v1/completions", response_model=p.Completion, responses=ERRORS)
async def completions(body: p.CompletionRequest, request: Request):
    return respond(await serving(request).completions(body, request.is_disconnected))


@router.post("/v1/embeddings", response_model=p.EmbeddingList, responses=ERRORS)
async def embeddings(body: p.EmbeddingRequest, request: Request):
    return respond(await serving(request).embeddings(body))


# ----------------------------------------------------------------------------
# The chat page and its API. Plain `def` handlers: FastAPI runs them on its thread pool, so a
# slow disk never stalls the event loop that streams replies.


@router.get("/", include_in_schema=False)
def page():
    return FileResponse(UI / "index.html", headers=PAGE_HEADERS)


@router.get("/api/conversations", responses=ERRORS)
def list_conversations(request: Request, q: str | None = None) -> list[dict]:
    """Newest first; `q` searches titles and messages."""
    return serving(request).store.conversations(q)


@router.post("/api/conversations", responses=ERRORS)
def create_conversation(body: p.ConversationFields, request: Request) -> dict:
    return serving(request).store.create_conversation(**body.model_dump(exclude_none=True))


@router.get("/api/conversations/{id}", responses=ERRORS)
def get_conversation(id: Id, request: Request) -> dict:
    """The conversation with its messages."""
    store = serving(request).store
    return {**store.conversation(id), "messages": store.messages(id)}


@router.patch("/api/conversations/{id}", responses=ERRORS)
def update_conversation(id: Id, body: p.ConversationFields, request: Request) -> dict:
    """Rename, or change its model or system prompt."""
    return serving(request).store.update_conversation(id, **body.model_dump(exclude_none=True))


@router.delete("/api/conversations/{id}", responses=ERRORS)
def delete_conversation(id: Id, request: Request) -> dict:
    serving(request).store.delete_conversation(id)
    return {"id": id, "deleted": True}


@router.get("/api/conversations/{id}/messages", responses=ERRORS)
def list_messages(id: Id, request: Request) -> list[dict]:
    return serving(request).store.messages(id)


@router.post("/api/conversations/{id}/chat", responses=ERRORS)
async def chat_turn(id: Id, body: p.ChatTurn, request: Request):
    """A turn that is saved as it streams: server-sent events start, delta..., end (or error)."""
    return respond(await serving(request).turn(id, body, request.is_disconnected))


@router.post("/api/messages/{id}/feedback", responses=ERRORS)
def feedback(id: Id, body: p.Feedback, request: Request) -> dict:
    vote = {"up": 1, "down": -1, None: None}[body.vote]
    return serving(request).store.set_feedback(id, vote, body.comment)


@router.post("/api/messages/{id}/correction", responses=ERRORS)
def correction(id: Id, body: p.Correction, request: Request) -> dict:
    return serving(request).store.set_correction(id, body.content)


@router.get("/api/assistants", responses=ERRORS)
def list_assistants(request: Request) -> list[dict]:
    return serving(request).store.assistants()


@router.post("/api/assistants", responses=ERRORS)
def create_assistant(body: p.AssistantFields, request: Request) -> dict:
    return serving(request).save_assistant(body.model_dump())


@router.post("/api/assistants/import", responses=ERRORS)
async def import_assistant(request: Request) -> dict:
    """The body is an assistant file (TOML), as GET /api/assistants/{name}/file writes it."""
    try:
        text = (await request.body()).decode()
    except UnicodeDecodeError:
        raise APIError(400, "the assistant file is not UTF-8 text; send the .toml file as exported") from None
    return serving(request).save_assistant(assistant_from_toml(text))


@router.get("/api/assistants/{name}", responses=ERRORS)
def get_assistant(name: str, request: Request) -> dict:
    return serving(request).store.assistant(name)


@router.put("/api/assistants/{name}", responses=ERRORS)
def replace_assistant(name: str, body: p.AssistantFields, request: Request) -> dict:
    return serving(request).save_assistant(body.model_dump(), name)


@router.delete("/api/assistants/{name}", responses=ERRORS)
def delete_assistant(name: str, request: Request) -> dict:
    serving(request).store.delete_assistant(name)
    return {"name": name, "deleted": True}


@router.get("/api/assistants/{name}/file", responses=ERRORS)
def assistant_file(name: str, request: Request):
    """The portable file: import it elsewhere with POST /api/assistants/import."""
    text = assistant_to_toml(serving(request).store.assistant(name))
    return Response(text, media_type="application/toml", headers={"Content-Disposition": f'attachment; filename="{name}.toml"'})


@router.get("/api/export", responses=ERRORS)
def export_conversations(request: Request) -> dict:
    """Every conversation with its messages, votes and corrections, as one JSON document."""
    return serving(request).store.export_conversations()


@router.post("/api/import", responses=ERRORS)
async def import_conversations(request: Request) -> dict:
    """Adds the conversations of a GET /api/export document (as new conversations)."""
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a GET /api/export document") from None
    return {"imported": serving(request).store.import_conversations(data)}


@router.post("/api/tokenize", responses=ERRORS)
def tokenize(body: p.TokenizeRequest, request: Request) -> dict:
    """{model, tokens, context}: how much of the model's context a chat's prompt takes."""
    return serving(request).tokenize(body)


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

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return error(404, str(exc), code="not_found")

    @app.exception_handler(LlmosError)
    async def user_error(request: Request, exc: LlmosError):
        return error(400, str(exc))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        logging.getLogger("llmos.server").exception("internal error on %s", request.url.path)
        return error(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
