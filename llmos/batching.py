"""Continuous batching: one decode loop that advances many sequences at once.

The engine (llmos/engine.py) decodes a fixed batch from its first token to its last. The
scheduler here keeps one KV cache of `max_batch` rows and lets sequences join and leave
between steps. Each step:

    retire   cancelled requests leave and free their rows
    admit    waiting requests take free rows, first come first served: their prompts are
             prefilled together (left-padded, in groups of similar length), straight into
             their rows of the shared cache, and their first tokens sampled
    decode   one forward of [running, 1] tokens; each row is sampled with its own
             parameters and generator, and its piece handed to its request
    leave    finished rows free their slot: the last row moves into the hole, so the
             running requests always sit in rows 0..n-1 and no step computes an empty row

The timeline. model.KVCache gives every row the same next slot `pos`; a row whose sequence
has L tokens so far fills slots [pos - L, pos), with pad = pos - L, and its rotary positions
are slot - pad. Where a row sits on the timeline therefore changes nothing it computes, so:
a prompt longer than `pos` shifts every row right before it joins; when `pos` reaches the
end of the cache, every row shifts left by the smallest pad (compaction); and each step runs
on a window of the cache that starts at the smallest pad, so attention never reads slots
that no running row uses.

Each request's output equals Engine.generate on it alone, as Engine.generate_batch's does: the
same left-padded prefill, its own logits processor, the engine's sampling functions, a
torch.Generator of its own seeded the same way, and the engine's detokenizer and stop handling.

When full: up to `max_batch` requests run and up to `max_waiting` more wait in order of
arrival; submit() beyond that raises SchedulerFull at once and never blocks (a server
answers 503 and Retry-After).

    scheduler = Scheduler(Engine(model, tokenizer), max_batch=8).start()
    request = scheduler.submit(tokenizer.encode("Once upon a time"), SamplingParams(seed=0))
    for piece in request:
        print(piece.text, end="", flush=True)
    scheduler.close()
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Callable, Iterator

import torch

from llmos.engine import Completion, Engine, Piece, SamplingParams, Sequence, penalize, sample
from llmos.errors import LlmosError
from llmos.model import KVCache


class SchedulerFull(LlmosError):
    """Every row runs and the waiting line is full: retry shortly."""


_END = object()


# ----------------------------------------------------------------------------
# A request: what the caller holds


class Request:
    """A submitted prompt. Iterate it for its Pieces (unless it was submitted with on_piece),
    cancel it, or wait on `done`. Once done, `finish_reason` is "stop" | "length" (as the
    engine says) | "cancelled" | "error", and `error` holds the exception of an error."""

    def __init__(self, scheduler: "Scheduler", prompt: list[int], params: SamplingParams, budget: int,
                 on_piece: Callable[[Piece], None] | None, on_done: Callable[["Request"], None] | None):
        self.prompt, self.params, self.budget = prompt, params, budget
        self.prompt_tokens = len(prompt)
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.cancelled = False
        self._scheduler, self._on_piece, self._on_done = scheduler, on_piece, on_done
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def __iter__(self) -> Iterator[Piece]:
        """Pieces as they are made; ends after the finishing piece or a cancel, raises a failure.
        The pieces are handed out once: iterating again gives only the end (or the failure)."""
        while True:
            item = self._queue.get()
            if item is _END or isinstance(item, BaseException):
                self._queue.put(item)  # for whoever iterates next
                if item is _END:
                    return
                raise item
            yield item

    def cancel(self) -> None:
        self._scheduler.cancel(self)


class _Row:
    """A running request's decoding state; only the loop thread touches it."""

    def __init__(self, request: Request, engine: Engine, pad: int, device):
        params = request.params
        self.request, self.pad = request, pad
        self.last = -1  # the token the next step feeds
        self.seq = Sequence(engine.tokenizer, engine.eos_ids | set(params.stop_token_ids), params.stop, request.budget)
        self.generator = None
        if params.temperature > 0:  # seeded exactly as the engine seeds a row
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        vocab = engine.model.cfg.vocab_size
        self.seen = self.counts = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[request.prompt] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab, device=device)


def _knobs(params: SamplingParams) -> tuple:
    """What penalize and sample read: rows that agree on it are sampled in one call."""
    return (params.temperature, params.top_k, params.top_p, params.min_p,
            params.repetition_penalty, params.presence_penalty, params.frequency_penalty)


# ----------------------------------------------------------------------------
# The scheduler: one cache, one loop


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8, max_len: int | None = None, max_waiting: int = 64):
        """max_len: slots per row of the cache, the context of every request (default the model's);
        memory is max_batch * max_len * (2 * n_layers * n_kv_heads * head_dim) numbers."""
        if max_batch < 1 or max_waiting < 0:
            raise LlmosError(f"max_batch must be >= 1 and max_waiting >= 0, got {max_batch} and {max_waiting}")
        self.engine, self.model = engine, engine.model
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.device = next(self.model.parameters()).device
        with torch.inference_mode():
            self.cache = self.model.new_cache(max_batch, max_len)
        self.limit = min(self.model.cfg.max_seq_len, self.cache.max_len)
        self.rows: list[_Row] = []  # running; rows[i] lives in cache row i
        self._waiting: collections.deque[Request] = collections.deque()
        self._open = 0  # submitted and not yet done: what admission counts
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    # --- the caller's side: any thread ---

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None,
               on_piece: Callable[[Piece], None] | None = None,
               on_done: Callable[[Request], None] | None = None) -> Request:
        """Queue a prompt. Bad parameters or prompts raise LlmosError here, a full scheduler SchedulerFull.
        on_piece(piece), when given, receives the pieces instead of the iterator; on_done(request) is
        called once when the request ends however it ends. Both run on the loop thread: keep them short."""
        params = params or SamplingParams()
        request = Request(self, list(prompt_ids), params, self.check(prompt_ids, params), on_piece, on_done)
        with self._cond:
            if self._closed:
                raise LlmosError("the scheduler is closed; create a new one")
            if self._open >= self.max_batch + self.max_waiting:
                raise SchedulerFull(f"the scheduler is full ({self._open} requests: {self.max_batch} may run and "
                                    f"{self.max_waiting} wait); retry shortly")
            self._open += 1
            self._waiting.append(request)
            self._cond.notify()
        return request

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """LlmosError for what submit() would refuse as bad input; else the request's token budget."""
        budget = self.engine.check([prompt_ids], params)[0]
        if len(prompt_ids) >= self.limit:
            raise LlmosError(f"prompt is {len(prompt_ids)} tokens but the batch cache holds {self.limit} per sequence; "
                             "shorten it or create the Scheduler with a larger max_len")
        return min(budget, self.limit - len(prompt_ids))

    def cancel(self, request: Request) -> None:
        """Stop a request (say its client went away); its row is freed before the next step."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    def generate_many(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Completions of every prompt, in order, submitted as room allows. Drives the loop itself
        unless start() has been called."""
        params = params or SamplingParams()
        for prompt in prompts:  # every check before anything runs
            self.check(prompt, params)
        changed = threading.Event()
        todo, requests = list(prompts), []
        while True:
            changed.clear()
            while todo and self._open < self.max_batch + self.max_waiting:
                requests.append(self.submit(todo.pop(0), params, on_done=lambda r: changed.set()))
            if not todo and all(r.done.is_set() for r in requests):
                break
            if self._thread is None:
                self.step()
            else:
                changed.wait()
        return [self.engine.complete(list(r), r.prompt_tokens, params) for r in requests]

    # --- the loop ---

    def start(self) -> "Scheduler":
        """Run the loop on a background thread."""
        self._thread = threading.Thread(target=self._run, name="llmos-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop; requests still running or waiting end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        left = [row.request for row in self.rows] + list(self._waiting)
        self.rows, self._waiting = [], collections.deque()
        for request in left:
            self._finish(request, "error", LlmosError("the scheduler closed before this request finished"))

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self.rows):
                    self._cond.wait()
                if self._closed:
                    return
            self.step()

    @torch.inference_mode()
    def step(self) -> bool:
        """Retire, admit, decode one token for every running request. Returns whether work is left.
        Called by the background thread once started; call it yourself only without one."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("step() is called by the scheduler's own thread once start() has run")
        self._retire()
        self._admit()
        if self.rows:
            try:
                self._decode()
            except Exception as e:  # the batch is lost, the loop is not: fail its requests and go on
                rows, self.rows = self.rows, []
                for row in rows:
                    self._finish(row.request, "error", e)
        if not self.rows:
            self.cache.pos = 0
        with self._cond:
            return bool(self.rows or self._waiting)

    def _retire(self) -> None:
        for i in reversed(range(len(self.rows))):
            request = self.rows[i].request
            if request.cancelled:
                self._free(i)
                self._finish(request, "cancelled")
        with self._cond:
            gone = [r for r in self._waiting if r.cancelled]
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        for request in gone:
            self._finish(request, "cancelled")

    def _admit(self) -> None:
        """Waiting requests into free rows, first come first served. Those admitted together are
        prefilled together, in groups of similar length so that padding stays under half the work."""
        new: list[Request] = []
        with self._cond:
            while self._waiting and len(self.rows) + len(new) < self.max_batch:
                new.append(self._waiting.popleft())
        groups: list[list[Request]] = []
        for request in sorted(new, key=lambda r: len(r.prompt)):
            # Shortest first, so a newcomer is its group's longest: the group then costs
            # (members) x (its length) positions, of which the prompts are at least half.
            group = groups[-1] if groups else []
            if group and (len(group) + 1) * len(request.prompt) <= 2 * sum(len(r.prompt) for r in [*group, request]):
                group.append(request)
            else:
                groups.append([request])
        for group in groups:
            try:
                self._prefill(group)
            except Exception as e:
                for r in group:
                    self._finish(r, "error", e)

    def _prefill(self, requests: list[Request]) -> None:
        """Prompts left-padded into one forward (as Engine.generate_batch does), written straight
        into the next free rows so that every row ends at the shared `pos`; then first tokens."""
        n, longest = len(self.rows), max(len(r.prompt) for r in requests)
        if not n:
            self.cache.pos = longest
        elif longest > self.cache.pos:
            self._shift(longest - self.cache.pos)
        start = self.cache.pos - longest
        rows = [_Row(r, self.engine, self.cache.pos - len(r.prompt), self.device) for r in requests]
        tokens = torch.tensor([[0] * (longest - len(r.prompt)) + r.prompt for r in requests], device=self.device)
        window = self._window(slice(n, n + len(rows)), start, [row.pad - start for row in rows], 0)
        logits = self.model(tokens, window, last=True)[:, -1].float()
        chosen, failed = self._sample(logits, rows)
        self.rows += rows
        finished = [n + i for i, row in enumerate(rows) if self._emit(row, chosen[i], logits[i], failed.get(i))]
        for i in reversed(finished):
            self._free(i)

    def _decode(self) -> None:
        if self.cache.pos == self.cache.max_len:
            self._shift(-min(row.pad for row in self.rows))
        start = min(row.pad for row in self.rows)
        window = self._window(slice(0, len(self.rows)), start, [row.pad - start for row in self.rows],
                              self.cache.pos - start)
        tokens = torch.tensor([[row.last] for row in self.rows], device=self.device)
        logits = self.model(tokens, window, last=True)[:, -1].float()
        self.cache.pos += 1
        chosen, failed = self._sample(logits, self.rows)
        finished = [i for i, row in enumerate(self.rows) if self._emit(row, chosen[i], logits[i], failed.get(i))]
        for i in reversed(finished):  # highest first, so each hole is filled by a running row
            self._free(i)

    # --- pieces of a step ---

    def _window(self, rows: slice, start: int, pads: list[int], pos: int) -> KVCache:
        """A KVCache over some rows of the shared cache whose slot 0 is the cache's slot `start`:
        the model writes through it into the shared cache."""
        window = KVCache(self.model.cfg, 0, 0, self.device, self.cache.k.dtype)  # storage borrowed below
        window.k = self.cache.k[:, rows, :, start:]
        window.v = self.cache.v[:, rows, :, start:]
        window.pad = torch.tensor(pads, device=self.device)
        window.pos, window.max_len = pos, self.cache.max_len - start
        return window

    def _shift(self, delta: int) -> None:
        """Move every running row `delta` slots along the timeline (right > 0, left < 0)."""
        n, lo, hi = len(self.rows), min(row.pad for row in self.rows), self.cache.pos
        for kv in (self.cache.k, self.cache.v):
            kv[:, :n, :, lo + delta : hi + delta] = kv[:, :n, :, lo:hi].clone()
        for row in self.rows:
            row.pad += delta
        self.cache.pos += delta

    def _free(self, i: int) -> None:
        """Drop row i; the last row moves into its place."""
        last = len(self.rows) - 1
        if i != last:
            moved = self.rows[last]
            used = slice(moved.pad, self.cache.pos)
            for kv in (self.cache.k, self.cache.v):
                kv[:, i, :, used] = kv[:, last, :, used]
            self.rows[i] = moved
        self.rows.pop()

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[list[int], dict[int, Exception]]:
        """One token per row: its own logits processor, then the engine's penalize and sample, one
        call per group of rows that share sampling parameters; each row draws from its own
        generator. Also the rows whose processor raised, with the exception."""
        scores, failed = logits, {}
        for i, row in enumerate(rows):
            processor = row.request.params.logits_processor
            if processor is None:
                continue
            try:
                masked = processor([row.seq.ids], logits[i : i + 1])
            except Exception as e:  # fails its own request, not the batch
                failed[i] = e
                continue
            if scores is logits:
                scores = logits.clone()
            scores[i] = masked[0]
        chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, row in enumerate(rows):
            groups[_knobs(row.request.params)].append(i)
        for idx in groups.values():
            group, params = [rows[i] for i in idx], rows[idx[0]].request.params
            seen = torch.stack([r.seen for r in group]) if group[0].seen is not None else None
            counts = torch.stack([r.counts for r in group]) if group[0].counts is not None else None
            generators = [r.generator for r in group] if params.temperature > 0 else None
            chosen[idx] = sample(penalize(scores[idx], params, seen, counts), params, generators)
        return chosen.tolist(), failed

    def _emit(self, row: _Row, token: int, logits: torch.Tensor, error: Exception | None = None) -> bool:
        """Hand the row's new token to its request; whether the row has finished."""
        request = row.request
        if error is not None:
            self._finish(request, "error", error)
            return True
        logprob = (None, None)
        if request.params.logprobs is not None:
            chosen = torch.tensor([token], device=logits.device)
            logprob = self.engine.logprobs(logits[None], chosen, request.params.logprobs, [True])[0]
        piece = row.seq.push(token, *logprob)
        if row.seen is not None:
            row.seen[token] = True
        if row.counts is not None:
            row.counts[token] += 1
        row.last = token
        if request._on_piece is None:
            request._queue.put(piece)
        else:
            try:
                request._on_piece(piece)
            except Exception as e:  # a broken consumer ends its own request, not the loop
                self._finish(request, "error", e)
                return True
        if row.seq.finish:
            self._finish(request, row.seq.finish)
            return True
        return False

    def _finish(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        if request.done.is_set():
            return
        request.finish_reason, request.error = reason, error
        if error is not None:
            request._queue.put(error)
        request._queue.put(_END)
        with self._cond:
            self._open -= 1
        request.done.set()
        if request._on_done is not None:
            try:
                request._on_done(request)
            except Exception:  # nothing to hand it to; the loop must go on
                pass
