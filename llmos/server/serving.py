"""The logic behind the OpenAI routes: a request in, engine runs, a response or a stream of chunks out.

Nothing here knows HTTP beyond status codes: routes.py hands in a parsed request and a
`disconnected()` callable and gets back a pydantic response or an async iterator of
server-sent-event lines.

`response_format` (json_object, json_schema) and a forced `tool_choice` constrain decoding with a
grammar, and offered tools' calls are parsed out of the reply (grammar.py). /v1/embeddings runs
all-MiniLM-L6-v2 (embeddings.py) on its own thread.

A `model` may also name an assistant (store.py): its model runs, with its system prompt first
and its sampling defaults under the request's own values. The chat page's turns (`turn`) plan
like a chat request and save the reply in the store while it streams.

Concurrency: each model has one Scheduler (llmos/batching.py), a thread that decodes all
of that model's running requests together, one row of a shared KV cache each, while the
event loop stays free. Requests join and leave the batch between decode steps: up to
`max_batch` run and the others wait their turn. A request is admitted only while fewer than
`max_pending` are running or waiting, else it gets 503 at once. A Job submits one scheduler
request per choice and cancels them when the client goes away; their rows are freed before
the next step.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ipaddress
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from llmos.batching import Request, Scheduler, SchedulerFull
from llmos.engine import Engine, Piece, SamplingParams, fit_messages
from llmos import loader, registry
from llmos.errors import LlmosError
from llmos.server.config import ServerConfig
from llmos.server import protocol as p
from llmos.server.grammar import Constrained, Vocabulary, json_schema_grammar, parse_tool_calls, tool_call_schema
from llmos.server.store import Store
import torch
from llmos.server.embeddings import MiniLM

# ----------------------------------------------------------------------------
# Settings and errors


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose an unauthenticated server beyond this machine."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key:
        raise LlmosError(
            f"--host {host} would expose the server to other machines without a key; "
            "pass --api-key KEY (clients then send 'Authorization: Bearer KEY') or bind 127.0.0.1"
        )


class APIError(Exception):
    """An error the client gets back in OpenAI's shape, with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return p.ErrorResponse(error=p.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()


def not_supported(param: str, what: str) -> APIError:
    return APIError(400, f"{what} is not supported yet by llmos serve; leave `{param}` out", param=param, code="unsupported_parameter")


# ----------------------------------------------------------------------------
# Served models and the jobs that run on them

Disconnected = Callable[[], Awaitable[bool]]
_DONE = object()


@dataclass
class ServedModel:
    name: str
    engine: Engine
    tokenizer: object  # llmos.tokenizer.Tokenizer
    context: int  # the context limit in tokens: the model's, or less where the scheduler's cache is shorter
    defaults: SamplingParams  # the model's sampling defaults (llmos.loader.generation_defaults)
    scheduler: Scheduler  # the batched decode loop every generation on this model joins
    path: str | None = None  # the parameters file, to match other names of the same model
    _vocab: Vocabulary | None = None

    @property
    def vocab(self) -> Vocabulary:
        """The tokenizer as the grammar matcher sees it, built on the first constrained request."""
        if self._vocab is None:
            self._vocab = Vocabulary(self.tokenizer, self.engine.model.cfg.vocab_size, sorted(self.engine.eos_ids))
        return self._vocab

    @classmethod
    def build(cls, name: str, model, tokenizer, ckpt=None, max_batch: int = 8, max_context: int | None = 4096,
              max_waiting: int = 64, engine: str = "auto") -> "ServedModel":
        if tokenizer is None:
            raise LlmosError(f"model {name!r} has no tokenizer; serve a checkpoint that includes one")
        meta = getattr(ckpt, "meta", None) or {}
        defaults = loader.generation_defaults(meta)  # the model's; a request's own values override them
        kind = loader.backend(engine, "cpu" if next(model.parameters()).device.type == "cpu" else "cuda")
        fast = None if kind == "torch" else loader.decoder_for(model, ckpt, kind, engine)
        engine = Engine(model, tokenizer, eos_ids=meta.get("eos_token_ids"), fast=fast)
        # Never more slots than the model has positions: they would only cost memory.
        max_len = min(max_context or model.cfg.max_seq_len, model.cfg.max_seq_len)
        scheduler = Scheduler(engine, max_batch=max_batch, max_len=max_len, max_waiting=max_waiting).start()
        return cls(name, engine, tokenizer, scheduler.limit, defaults, scheduler, path=meta.get("path"))


@dataclass
class ChatPlan:
    served: ServedModel
    name: str  # what the response calls the model: the model's name, or the assistant's
    prompt: list[int]
    params: SamplingParams
    dropped: int = 0  # the oldest messages left out to fit the context
    grammar: str | None = None  # what the output must match (response_format, a forced tool call)
    tools: set[str] | None = None  # names of the tools offered: their calls are parsed from the output


class Job:
    """One request's generation: its runs (one per choice) join the model's scheduler, which
    decodes them together with every other request's, and their pieces come back to the event
    loop as (choice index, Piece). `release` runs once, when the last run has ended."""

    def __init__(self, served: ServedModel, runs: list[tuple[list[int], SamplingParams]], release: Callable[[], None]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.release = release
        self.requests: list[Request] = []
        self.left = len(runs)  # runs not yet ended; counted down on the scheduler's thread (or the fast run's)
        try:
            stream = served.engine.stream_fast(*runs[0]) if len(runs) == 1 else None
            if stream is not None:  # the fast decoder was free: one choice runs there, beside the batch
                self.requests.append(FastRun(stream, partial(self._piece, 0), self._done))
                runs = []
            for index, (ids, params) in enumerate(runs):
                self.requests.append(served.scheduler.submit(ids, params, on_piece=partial(self._piece, index),
                                                             on_done=self._done))
        except BaseException as e:  # the runs already in never all end (left stays > 0): the caller releases
            self.cancel()
            if isinstance(e, SchedulerFull):
                raise APIError(503, f"model `{served.name}` is busy: {e}", type="server_error",
                               code="server_busy", headers={"Retry-After": "1"}) from None
            raise

    def cancel(self) -> None:
        for request in list(self.requests):
            request.cancel()

    # --- called on the scheduler's thread ---

    def _piece(self, index: int, piece: Piece) -> None:
        self._put((index, piece))

    def _done(self, request: Request) -> None:
        if request.error is not None:  # handed to the request, which answers with it
            self._put(request.error)
        self.left -= 1  # only the scheduler's thread calls this
        if self.left == 0:
            self.release()  # before _DONE: a client that saw the end can send its next request at once
            self._put(_DONE)

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            self.cancel()

    async def pieces(self, disconnected: Disconnected) -> AsyncIterator[tuple[int, Piece]]:
        """Pieces until the job ends; stops it when the client disconnects or the consumer stops."""
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:  # (not the builtin before 3.11) still waiting for the worker: is anyone still listening?
                    if await disconnected():
                        return
                    continue
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
                if await disconnected():
                    return
        finally:
            self.cancel()


class FastRun:
    """One run on the engine's fast decoder, on a thread of its own; for Job it looks like a scheduler
    Request (cancel, error), and it calls on_piece and on_done from that thread."""

    def __init__(self, stream, on_piece: Callable[[Piece], None], on_done: Callable[["FastRun"], None]):
        self.error: BaseException | None = None
        self.cancelled = False
        threading.Thread(target=self._run, args=(stream, on_piece, on_done), name="llmos-fast", daemon=True).start()

    def cancel(self) -> None:
        self.cancelled = True  # seen between tokens

    def _run(self, stream, on_piece, on_done) -> None:
        try:
            for piece in stream:
                on_piece(piece)
                if self.cancelled:
                    break
        except Exception as e:
            self.error = e
        finally:
            stream.close()  # hands the decoder back
            on_done(self)


# ----------------------------------------------------------------------------
# Serving: the endpoints' logic


class Serving:
    def __init__(self, models: dict, config: ServerConfig | None = None, store: Store | None = None):
        """models: name → (Transformer, Tokenizer, Checkpoint | None); store: the SQLite file under config.home."""
        if not models:
            raise LlmosError("no models to serve; pass at least one model name")
        self.config = config or ServerConfig()
        c = self.config
        self.models = {name: ServedModel.build(name, *entry, max_batch=c.max_batch, max_context=c.max_context,
                                               max_waiting=c.max_pending * c.max_choices, engine=c.engine)
                       for name, entry in models.items()}
        self.store = store or Store.open(self.config.home)
        self.pending = 0
        self._lock = threading.Lock()
        self._embedder = None  # all-MiniLM-L6-v2, loaded on the first /v1/embeddings request
        self._embed_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmos-embeddings")

    def close(self) -> None:
        for served in self.models.values():
            served.scheduler.close()
        self._embed_worker.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    # --- models, health, admission ---

    def model(self, name: str | None) -> ServedModel:
        return self.resolve(name)[0]

    def resolve(self, name: str | None) -> tuple[ServedModel, dict | None]:
        """A model name, or an assistant's name: its model, and the assistant."""
        if name is None:
            return next(iter(self.models.values())), None
        if name in self.models:
            return self.models[name], None
        if (alias := self.alias(name)) is not None:
            return self.models[alias], None
        assistant = self.store.find_assistant(name)
        if assistant is None:
            names = ", ".join([*self.models, *(a["name"] for a in self.store.assistants())])
            raise APIError(404, f"The model `{name}` does not exist; this server has {names}", param="model", code="model_not_found")
        if assistant["model"] is not None and assistant["model"] not in self.models:
            raise APIError(404, f"assistant `{name}` runs on model `{assistant['model']}`, which this server does not serve; "
                                f"serve it or edit the assistant (models here: {', '.join(self.models)})", param="model", code="model_not_found")
        return self.model(assistant["model"]), assistant

    def aliases(self) -> dict[str, str]:
        """Other names of the served models, as `llmos run` accepts them: the bundled model's names for it."""
        out = {}
        for name in self.models:
            if name.lower() in registry.BUNDLED_NAMES:
                out |= {alias: name for alias in registry.BUNDLED_NAMES if alias and alias != name}
        return out

    def alias(self, name: str) -> str | None:
        """The served model that `name` means: an alias, or any name `llmos run` resolves to the same file."""
        if name in self.aliases():
            return self.aliases()[name]
        try:
            path = registry.resolve(name)
        except LlmosError:
            return None
        return next((n for n, m in self.models.items() if m.path is not None and Path(m.path) == path), None)

    def card(self, name: str) -> p.ModelCard:
        served, assistant = self.resolve(name)
        if assistant is None:
            return p.ModelCard(id=served.name, max_model_len=served.context)
        return p.ModelCard(id=assistant["name"], created=int(assistant["created"]), parent=served.name, max_model_len=served.context)

    def list_models(self) -> p.ModelList:
        cards = [p.ModelCard(id=m.name, max_model_len=m.context) for m in self.models.values()]
        cards += [p.ModelCard(id=alias, parent=name, max_model_len=self.models[name].context) for alias, name in self.aliases().items()]
        for a in self.store.assistants():
            if a["name"] not in self.models:
                try:
                    cards.append(self.card(a["name"]))
                except APIError:  # its model is not served here: not usable, so not listed
                    pass
        return p.ModelList(data=cards)

    def save_assistant(self, fields: dict, name: str | None = None) -> dict:
        if fields.get("name") in self.models:
            raise APIError(400, f"`{fields['name']}` is the name of a model this server serves; give the assistant another name", param="name")
        return self.store.save_assistant(fields, name)

    def health(self) -> dict:
        return {"status": "ok", "models": list(self.models), "pending": self.pending, "max_pending": self.config.max_pending}

    def _admit(self) -> None:
        with self._lock:
            if self.pending >= self.config.max_pending:
                raise APIError(503, f"the server is busy ({self.pending} requests running or queued); retry shortly",
                               type="server_error", code="server_busy", headers={"Retry-After": "1"})
            self.pending += 1

    def _release(self) -> None:
        with self._lock:
            self.pending -= 1

    def _start(self, served: ServedModel, runs: list) -> Job:
        self._admit()
        try:
            return Job(served, runs, self._release)
        except BaseException:
            self._release()
            raise

    # --- request → sampling parameters ---

    def _params(self, req: p.SamplingFields, served: ServedModel, prompt_len: int, max_new: int | None,
                logprobs: int | None, what: str, default_max: int | None = None) -> SamplingParams:
        cap, room = self.config.max_tokens, served.context - prompt_len
        if max_new is not None and max_new > cap:
            raise APIError(400, f"max_tokens is {max_new} but this server allows at most {cap}; ask for fewer "
                                "or start the server with a larger --max-tokens", param="max_tokens")
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {served.context} tokens. However, your {what} "
                                f"resulted in {prompt_len} tokens. Please reduce the length of the {what}.",
                           param=what, code="context_length_exceeded")
        if max_new is not None and prompt_len + max_new > served.context:
            raise APIError(400, f"This model's maximum context length is {served.context} tokens. However, you requested "
                                f"{prompt_len + max_new} tokens ({prompt_len} in the {what}, {max_new} in the completion). "
                                f"Please reduce the length of the {what} or completion.", param=what, code="context_length_exceeded")
        if req.logit_bias:
            raise not_supported("logit_bias", "logit_bias")

        def pick(name):  # the request's value, else the model's default
            value = getattr(req, name)
            return value if value is not None else getattr(served.defaults, name)

        params = SamplingParams(
            max_new_tokens=max_new if max_new is not None else min(cap, room, default_max or cap),
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            top_k=pick("top_k"),
            min_p=pick("min_p"),
            repetition_penalty=pick("repetition_penalty"),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed,
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            logprobs=logprobs,
        )
        try:
            params.validate()
        except LlmosError as e:
            raise APIError(400, str(e)) from None
        return params

    def _runs(self, served: ServedModel, prompts: list[list[int]], params: SamplingParams, n: int,
              grammar: str | None = None) -> list[tuple[list[int], SamplingParams]]:
        """(prompt ids, sampling) per choice. Choice j of a seeded request samples with seed + j, so the
        choices differ from each other and each one repeats exactly. The scheduler checks every run
        here, before any is submitted."""
        runs = []
        for ids in prompts:
            for j in range(n):
                seed = None if params.seed is None else params.seed + j
                try:
                    constrain = Constrained(served.vocab, grammar) if grammar else None  # each run follows its own copy
                    run = (ids, dataclasses.replace(params, seed=seed, logits_processor=constrain))
                    served.scheduler.check(*run)
                except LlmosError as e:
                    raise APIError(400, str(e)) from None
                runs.append(run)
        return runs

    # --- /v1/chat/completions ---

    async def chat(self, req: p.ChatCompletionRequest, disconnected: Disconnected):
        plan = self._plan_chat(req)
        served, prompt, n, top = plan.served, plan.prompt, req.n or 1, plan.params.logprobs
        job = self._start(served, self._runs(served, [prompt], plan.params, n, plan.grammar))
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=plan.name)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._chat_stream(served, job, disconnected, head, n, len(prompt), include_usage, plan.tools)
        choices = await collect(job, disconnected, n)
        return p.ChatCompletion(
            **head,
            choices=[
                p.ChatChoice(index=i, message=p.AssistantMessage(content=content, tool_calls=calls or None), finish_reason=finish,
                             logprobs=self._chat_logprobs(served, c.tokens) if top is not None else None)
                for i, c in enumerate(choices)
                for content, calls, finish in [reply(c, plan.tools)]
            ],
            usage=usage(len(prompt), choices),
        )

    def _plan_chat(self, req: p.ChatCompletionRequest, fit: bool = False) -> ChatPlan:
        """Everything checked before anything runs: the model (or assistant), the prompt's ids, the
        sampling. fit: leave out the oldest turns that do not fit the context (the page's turns)."""
        served, assistant = self.resolve(req.model)
        grammar, tools = self._grammar(req), None
        if req.tools and req.tool_choice != "none":
            tools = {t.function.name for t in req.tools}
        n = req.n or 1
        if n > self.config.max_choices:
            raise APIError(400, f"n is {n} but this server allows at most {self.config.max_choices}", param="n")
        req = with_assistant(req, assistant)
        max_new = req.max_completion_tokens or req.max_tokens
        default_max = assistant["max_tokens"] if assistant else None
        reserve = min(max_new or default_max or served.context // 4, served.context // 2) if fit else None
        prompt, dropped = self._chat_prompt(served, req, reserve)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, served, len(prompt), max_new, top, "messages", default_max)
        return ChatPlan(served, assistant["name"] if assistant else served.name, prompt, params, dropped, grammar, tools)

    def _grammar(self, req: p.ChatCompletionRequest) -> str | None:
        """The grammar the reply must follow: a forced tool call's JSON, or the response_format's."""
        choice, tools = req.tool_choice, [t.model_dump(exclude_none=True) for t in req.tools or []]
        if (choice == "required" or isinstance(choice, p.NamedToolChoice)) and not tools:
            raise APIError(400, "tool_choice forces a tool call but the request offers no tools; add `tools` or drop `tool_choice`",
                           param="tool_choice")
        fmt = req.response_format
        try:
            if choice == "required":
                return json_schema_grammar(tool_call_schema(tools))
            if isinstance(choice, p.NamedToolChoice):
                if choice.function.name not in {t["function"]["name"] for t in tools}:
                    raise APIError(400, f"tool_choice names `{choice.function.name}`, which is not among the request's tools",
                                   param="tool_choice")
                return json_schema_grammar(tool_call_schema(tools, choice.function.name))
            if fmt is None or fmt.type == "text":
                return None
            if fmt.type == "json_object":
                return json_schema_grammar({"type": "object"})
            if fmt.json_schema is None:
                raise APIError(400, "response_format json_schema needs a `json_schema` object: {name, schema}", param="response_format")
            return json_schema_grammar(fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {"type": "object"})
        except LlmosError as e:
            raise APIError(400, str(e), param="tool_choice" if choice not in (None, "auto", "none") else "response_format") from None

    def _chat_prompt(self, served: ServedModel, req: p.ChatCompletionRequest, reserve: int | None = None) -> tuple[list[int], int]:
        """The prompt's token ids, and how many old messages were left out: none, unless `reserve`
        is given, when the oldest turns go until the prompt and `reserve` tokens fit the context."""
        check_order(req.messages)
        messages = []
        for m in req.messages:
            d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name is not None:
                d["name"] = m.name
            if m.tool_calls:
                d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            messages.append(d)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" else None
        dropped = 0
        if reserve is not None and not tools:
            try:
                messages, dropped = fit_messages(served.tokenizer, messages, served.context, reserve)
            except LlmosError:  # too long even with the oldest turns gone: _params answers with the counts
                pass
        try:
            return served.tokenizer.encode_chat(messages, add_generation_prompt=True, tools=tools), dropped
        except LlmosError as e:  # the template's own raise_exception(), e.g. "roles must alternate"
            raise APIError(400, str(e), param="messages") from None

    async def _chat_stream(self, served: ServedModel, job: Job, disconnected: Disconnected, head: dict, n: int,
                           prompt_len: int, include_usage: bool, tools: set[str] | None = None):
        """Chunks as the tokens come; with tools offered, each choice's text is held to its end, where
        it leaves as content or as parsed tool calls (the text alone cannot tell which before then)."""
        def chunk(choices, usage=None) -> str:
            return sse(p.ChatCompletionChunk(**head, choices=choices, usage=usage))

        choices = [Choice() for _ in range(n)]
        for i in range(n):
            yield chunk([p.ChatChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
        try:
            async for i, piece in job.pieces(disconnected):
                c = choices[i]
                c.add(piece)
                logprobs = None
                if piece.logprob is not None:
                    logprobs = self._chat_logprobs(served, [(piece.token_id, piece.logprob, piece.top_logprobs)])
                if (piece.text and not tools) or logprobs:
                    yield chunk([p.ChatChunkChoice(index=i, delta=p.Delta(content=None if tools else piece.text), logprobs=logprobs)])
                if piece.finish_reason:
                    finish = piece.finish_reason
                    if tools:
                        content, calls, finish = reply(c, tools)
                        deltas = [p.DeltaToolCall(index=k, **call) for k, call in enumerate(calls)]
                        if content or deltas:
                            yield chunk([p.ChatChunkChoice(index=i, delta=p.Delta(content=content, tool_calls=deltas or None))])
                    yield chunk([p.ChatChunkChoice(index=i, delta=p.Delta(), finish_reason=finish)])
        except Exception as e:  # the status line is already sent: report in the stream, as OpenAI does
            yield sse(error_body(e))
            return
        if include_usage:
            yield chunk([], usage(prompt_len, choices))
        yield "data: [DONE]\n\n"

    def _chat_logprobs(self, served: ServedModel, tokens: list[tuple]) -> p.ChoiceLogprobs:
        decode = lambda i: served.tokenizer.decode([i])  # noqa: E731  the engine's token text, as in its top list
        return p.ChoiceLogprobs(content=[
            p.TokenLogprob(token=decode(t), logprob=lp, bytes=utf8(decode(t)),
                           top_logprobs=[p.TopLogprob(token=a.text, logprob=a.logprob, bytes=utf8(a.text)) for a in top or []])
            for t, lp, top in tokens
        ])

    # --- the chat page: turns that persist as they stream ---

    async def turn(self, conversation_id: int, body: p.ChatTurn, disconnected: Disconnected):
        """One turn of a stored conversation: the user's message (or, regenerating, none) in, the
        reply streamed out as events and saved as it grows. The reply's row exists from the
        start, marked partial, and is rewritten at most every SAVE_EVERY seconds: a server
        killed mid-reply leaves the text so far, still marked partial."""
        store = self.store
        conv = store.conversation(conversation_id)
        history = store.messages(conversation_id)
        if body.regenerate:
            replaced = history.pop() if history and history[-1]["role"] == "assistant" else None
            if not history:
                raise APIError(400, "nothing to regenerate: the conversation has no message yet", param="regenerate")
        elif not body.content:
            raise APIError(400, "content is required: the user's message (or send regenerate: true)", param="content")
        model = body.model if body.model is not None else conv["model"]
        system = body.system_prompt if body.system_prompt is not None else conv["system_prompt"]
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": m["role"], "content": m["content"]} for m in history]
        if not body.regenerate:
            messages.append({"role": "user", "content": body.content})
        req = p.ChatCompletionRequest(model=model, messages=messages, temperature=body.temperature, top_p=body.top_p,
                                      max_tokens=body.max_tokens)
        plan = self._plan_chat(req, fit=True)  # every check before the first write
        job = self._start(plan.served, self._runs(plan.served, [plan.prompt], plan.params, 1, plan.grammar))
        try:
            user = None
            if body.regenerate:
                if replaced:
                    store.delete_message(replaced["id"])
            else:
                user = store.add_message(conversation_id, "user", body.content, prompt_tokens=len(plan.prompt))
            title = conv["title"] or title_of(history[0]["content"] if history else body.content)
            conv = store.update_conversation(conversation_id, title=title, model=model, system_prompt=system)
            reply = store.add_message(conversation_id, "assistant", "", model=plan.name, prompt_tokens=len(plan.prompt), partial=True)
        except BaseException:
            job.cancel()
            raise
        start = {"type": "start", "conversation": conv, "user": user, "assistant": reply, "dropped": plan.dropped}
        return self._turn_stream(job, disconnected, start)

    async def _turn_stream(self, job: Job, disconnected: Disconnected, start: dict):
        """Events: start (the rows, and how many old messages did not fit the prompt), delta (text),
        error, end (the reply's final row)."""
        reply_id, parts, tokens, finish, saved = start["assistant"]["id"], [], 0, None, time.monotonic()
        yield sse(start)
        try:
            async for _, piece in job.pieces(disconnected):
                parts.append(piece.text)
                tokens += piece.token_id is not None
                finish = piece.finish_reason or finish
                if piece.text:
                    yield sse({"type": "delta", "content": piece.text})
                if time.monotonic() - saved > SAVE_EVERY:
                    self.store.update_message(reply_id, "".join(parts), tokens, partial=True)
                    saved = time.monotonic()
        except Exception as e:
            yield sse({"type": "error", **error_body(e)})
        finally:  # also when the client leaves: the reply so far stays, marked partial
            self.store.update_message(reply_id, "".join(parts), tokens, partial=finish is None, finish_reason=finish)
        yield sse({"type": "end", "message": self.store.message(reply_id)})

    def tokenize(self, req: p.TokenizeRequest) -> dict:
        """How many tokens a chat's prompt takes, against the model's context: the page's counter."""
        served, assistant = self.resolve(req.model)
        chat = with_assistant(p.ChatCompletionRequest(model=req.model, messages=req.messages), assistant)
        return {"model": assistant["name"] if assistant else served.name, "tokens": len(self._chat_prompt(served, chat)[0]),
                "context": served.context}

    # --- /v1/embeddings ---

    async def embeddings(self, req: p.EmbeddingRequest) -> p.EmbeddingList:
        if req.model.removeprefix("sentence-transformers/") != EMBEDDING_MODEL:
            raise APIError(404, f"The model `{req.model}` does not make embeddings; this server embeds with {EMBEDDING_MODEL}",
                           param="model", code="model_not_found")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "input must be a string or a non-empty list of strings (token ids are not supported: "
                                f"{EMBEDDING_MODEL} has its own tokenizer)", param="input")
        if len(texts) > MAX_EMBED_INPUTS:
            raise APIError(400, f"input has {len(texts)} items but at most {MAX_EMBED_INPUTS} are allowed per request", param="input")
        if req.dimensions is not None and req.dimensions != 384:
            raise APIError(400, f"{EMBEDDING_MODEL} makes 384-dimensional embeddings; leave `dimensions` out or send 384",
                           param="dimensions")
        self._admit()
        try:
            vectors, tokens = await asyncio.get_running_loop().run_in_executor(self._embed_worker, self._embed, texts)
        except LlmosError as e:  # the model's package is not installed
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        finally:
            self._release()
        if req.encoding_format == "base64":
            data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
        else:
            data = vectors.tolist()
        return p.EmbeddingList(data=[p.Embedding(index=i, embedding=e) for i, e in enumerate(data)], model=EMBEDDING_MODEL,
                               usage=p.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    def _embed(self, texts: list[str]):
        """(vectors [N, 384], tokens read) on the embeddings thread, 64 texts at a time."""

        if self._embedder is None:
            self._embedder = MiniLM()
        chunks = [texts[i : i + 64] for i in range(0, len(texts), 64)]
        return torch.cat([self._embedder.embed(c) for c in chunks]), sum(map(sum, map(self._embedder.count, chunks)))

    # --- /v1/completions ---

    async def completions(self, req: p.CompletionRequest, disconnected: Disconnected):
        served = self.model(req.model)
        if req.suffix:
            raise not_supported("suffix", "suffix (fill in the middle)")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise not_supported("best_of", "best_of other than n")
        if req.echo and req.logprobs is not None:
            raise not_supported("logprobs", "logprobs together with echo")
        prompts, texts = self._completion_prompts(served, req.prompt)
        n = req.n or 1
        if len(prompts) * n > self.config.max_choices:
            raise APIError(400, f"{len(prompts)} prompts times n={n} is {len(prompts) * n} choices but this server "
                                f"allows at most {self.config.max_choices} per request", param="n")
        longest = max(prompts, key=len)
        max_new = req.max_tokens if req.max_tokens is not None else 16  # the legacy endpoint's default, as OpenAI
        params = self._params(req, served, len(longest), max_new, req.logprobs, "prompt")
        job = self._start(served, self._runs(served, prompts, params, n))
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=served.name)
        echoes = [text if req.echo else "" for text in texts for _ in range(n)]
        prompt_tokens = sum(map(len, prompts))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._completion_stream(served, job, disconnected, head, echoes, prompt_tokens, include_usage, req.logprobs)
        choices = await collect(job, disconnected, len(echoes))
        return p.Completion(
            **head,
            choices=[
                p.CompletionChoice(index=i, text=echoes[i] + c.text, finish_reason=c.finish,
                                   logprobs=completion_logprobs(c.tokens, served, len(echoes[i])) if req.logprobs is not None else None)
                for i, c in enumerate(choices)
            ],
            usage=usage(prompt_tokens, choices),
        )

    def _completion_prompts(self, served: ServedModel, prompt) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of each prompt: one string, strings, one list of ids, or lists of ids."""
        if isinstance(prompt, str) or all(isinstance(x, int) for x in prompt):
            prompt = [prompt]
        ids = [x if isinstance(x, list) else served.tokenizer.encode(x) for x in prompt]
        vocab = served.engine.model.cfg.vocab_size
        if any(not 0 <= t < vocab for x in ids for t in x):  # before decoding them: the tokenizer would overflow
            raise APIError(400, f"prompt has token ids outside 0..{vocab - 1}; encode it with this model's tokenizer", param="prompt")
        return ids, [x if isinstance(x, str) else served.tokenizer.decode(x) for x in prompt]

    async def _completion_stream(self, served: ServedModel, job: Job, disconnected: Disconnected, head: dict, echoes: list[str],
                                 prompt_tokens: int, include_usage: bool, logprobs: int | None):
        def chunk(choices, usage=None) -> str:
            return sse(p.Completion(**head, choices=choices, usage=usage))

        choices = [Choice() for _ in echoes]
        offsets = [len(e) for e in echoes]
        for i, echo in enumerate(echoes):
            if echo:
                yield chunk([p.CompletionChoice(index=i, text=echo)])
        try:
            async for i, piece in job.pieces(disconnected):
                choices[i].add(piece)
                lp = None
                if logprobs is not None and piece.token_id is not None:
                    lp = completion_logprobs([(piece.token_id, piece.logprob, piece.top_logprobs)], served, offsets[i])
                    offsets[i] += len(lp.tokens[0])
                if piece.text or lp or piece.finish_reason:
                    yield chunk([p.CompletionChoice(index=i, text=piece.text, logprobs=lp, finish_reason=piece.finish_reason)])
        except Exception as e:
            yield sse(error_body(e))
            return
        if include_usage:
            yield chunk([], usage(prompt_tokens, choices))
        yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------
# Helpers

SAVE_EVERY = 0.5  # seconds between saves of a streaming reply
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
MAX_EMBED_INPUTS = 2048  # OpenAI's limit per request


def with_assistant(req: p.ChatCompletionRequest, assistant: dict | None) -> p.ChatCompletionRequest:
    """The request with the assistant's system prompt first (unless the request brings its own)
    and its sampling defaults where the request gives none."""
    if assistant is None:
        return req
    update = {k: assistant[k] for k in ("temperature", "top_p") if getattr(req, k) is None and assistant[k] is not None}
    if assistant["system_prompt"] and req.messages[0].role not in ("system", "developer"):
        update["messages"] = [p.ChatMessage(role="system", content=assistant["system_prompt"]), *req.messages]
    return req.model_copy(update=update)


def reply(choice: "Choice", tools: set[str] | None) -> tuple[str | None, list[dict], str]:
    """A chat choice's (content, tool calls, finish reason): calls parsed out when tools were offered."""
    if not tools:
        return choice.text, [], choice.finish
    content, calls = parse_tool_calls(choice.text, tools)
    return content, calls, "tool_calls" if calls and choice.finish == "stop" else choice.finish


def title_of(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 60 else line[:59].rstrip() + "…"


class Choice:
    """One choice's pieces gathered: its text, (token id, logprob, top) per token, why it ended."""

    def __init__(self):
        self.parts: list[str] = []
        self.tokens: list[tuple] = []
        self.finish = None

    def add(self, piece: Piece) -> None:
        self.parts.append(piece.text)
        if piece.token_id is not None:
            self.tokens.append((piece.token_id, piece.logprob, piece.top_logprobs))
        self.finish = piece.finish_reason or self.finish

    @property
    def text(self) -> str:
        return "".join(self.parts)


async def collect(job: Job, disconnected: Disconnected, n: int) -> list[Choice]:
    choices = [Choice() for _ in range(n)]
    async for i, piece in job.pieces(disconnected):
        choices[i].add(piece)
    if any(c.finish is None for c in choices):  # the client left before the end: nobody reads this
        raise APIError(499, "client disconnected", code="client_disconnected")
    return choices


def usage(prompt_tokens: int, choices: list[Choice]) -> p.Usage:
    completion = sum(len(c.tokens) for c in choices)
    return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def completion_logprobs(tokens: list[tuple], served: ServedModel, offset: int) -> p.CompletionLogprobs:
    texts = [served.tokenizer.decode([t]) for t, _, _ in tokens]
    starts = [offset + sum(map(len, texts[:k])) for k in range(len(texts))]
    return p.CompletionLogprobs(
        tokens=texts,
        token_logprobs=[lp for _, lp, _ in tokens],
        top_logprobs=[{a.text: a.logprob for a in top or []} for _, _, top in tokens],
        text_offset=starts,
    )


def check_order(messages: list[p.ChatMessage]) -> None:
    """Tool results must answer the tool calls just before them, and every call must get its result."""
    waiting: set[str] = set()  # ids of the latest assistant turn's tool calls not yet answered
    for k, m in enumerate(messages):
        where = f"messages[{k}]"
        if m.role == "tool":
            if m.tool_call_id not in waiting:
                raise APIError(400, f"{where}: a tool message must answer a tool call of the assistant message before it "
                                    f"(tool_call_id {m.tool_call_id!r} is not one)", param="messages")
            waiting.discard(m.tool_call_id)
            continue
        if waiting:
            raise APIError(400, f"{where}: the assistant's tool calls {sorted(waiting)} need tool messages with their results first",
                           param="messages")
        if m.content is None and not m.tool_calls:
            raise APIError(400, f"{where}: content is required for a {m.role} message", param="messages")
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"{where}: only assistant messages carry tool_calls", param="messages")
        waiting = {c.id for c in m.tool_calls or []}
    if waiting:
        raise APIError(400, f"the assistant's tool calls {sorted(waiting)} need tool messages with their results", param="messages")


def utf8(text: str) -> list[int] | None:
    # A token that ends inside a multi-byte character decodes to U+FFFD: its true bytes are unknown here.
    return None if "\ufffd" in text else list(text.encode())


def sse(model) -> str:
    body = model if isinstance(model, dict) else model.model_dump(mode="json")
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_body(e: Exception) -> dict:
    if isinstance(e, APIError):
        return e.body()
    if isinstance(e, LlmosError):
        return APIError(400, str(e)).body()
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body()
