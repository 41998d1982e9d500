"""The engine: token ids in, token ids and text out, one KV cache per request.

The model only computes logits (llmos/model.py) and the tokenizer only turns text
into ids and back; this file is everything between them at inference time:

    prefill  one forward over the prompt, which fills a fresh KV cache
    decode   one token per step through the cache: penalties → temperature → top-k
             → top-p → min-p → sample (the order of transformers' logits processors)
    stop     end-of-sequence ids, stop strings, the token budget, the context limit
    text     incremental detokenization that never splits a UTF-8 character and
             never lets a stop string (or the start of one) reach the caller
    batch    several prompts left-padded into one cache and decoded together
    chat     render messages with the chat template, dropping the oldest turns to fit

Log-probabilities are those of the model itself: log-softmax of the raw logits,
before penalties, temperature or truncation, as the OpenAI API reports them.

    engine = Engine(model, tokenizer)
    for piece in engine.stream(tokenizer.encode("Once upon a time"), SamplingParams(seed=0)):
        print(piece.text, end="", flush=True)
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from llmos.errors import LlmosError
from llmos.sampling import SamplingParams

# ----------------------------------------------------------------------------
# Requests and results


@dataclass
class TokenLogprob:
    token_id: int
    text: str  # tokenizer.piece(): the token as text, bytes of a partial character as \xNN
    logprob: float
    top: list["TokenLogprob"] = field(default_factory=list)  # the most likely alternatives, best first


@dataclass
class Piece:
    text: str  # new text, possibly "" while a character or a possible stop string is incomplete
    token_id: int | None  # None on the piece that reports an end-of-sequence token
    logprob: float | None = None
    top_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" on the last piece


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated ids, without the end-of-sequence id; through the token that made a stop string
    finish_reason: str  # "stop" (eos id or stop string) | "length" (max_new_tokens or the context is full)
    logprobs: list[TokenLogprob] | None
    prompt_tokens: int
    completion_tokens: int
    notice: str | None = None  # set by chat when old messages were dropped to fit the context
    dropped: int = 0  # how many messages were dropped


class Stream:
    """Pieces as they are made, plus what the caller should know before reading them."""

    def __init__(self, pieces: Iterator[Piece], prompt_tokens: int, notice: str | None = None, dropped: int = 0):
        self._pieces, self.prompt_tokens, self.notice, self.dropped = pieces, prompt_tokens, notice, dropped

    def __iter__(self):
        return self

    def __next__(self) -> Piece:
        return next(self._pieces)

    def close(self) -> None:
        """Stop early; frees what the generation holds (the fast decoder)."""
        self._pieces.close()


# ----------------------------------------------------------------------------
# Logits → next token. Every function works on a batch [B, vocab] in float32.


def penalize(logits, params: SamplingParams, seen=None, counts=None):
    """Repetition penalty over `seen` [B, V] bool (prompt and generated tokens): positive logits are
    divided by it, negative ones multiplied (CTRL, transformers). Then presence and frequency penalties
    over `counts` [B, V] (times each token was generated): logit - frequency * count - presence * (count > 0)."""
    if params.repetition_penalty != 1.0 and seen is not None:
        r = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if (params.presence_penalty or params.frequency_penalty) and counts is not None:
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    return logits


def warp(logits, params: SamplingParams):
    """Temperature, then top-k, top-p and min-p; removed tokens get -inf. Defined as transformers' warpers."""
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        # Drop the least likely tokens whose total mass stays within 1 - top_p; always keep the best.
        ascending, order = logits.sort(dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - params.top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), -math.inf)
    return logits


def sample(logits, params: SamplingParams, generators: list[torch.Generator] | None):
    """Next token ids [B]: argmax at temperature 0, else a draw with each row's own generator."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = warp(logits, params).softmax(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


# ----------------------------------------------------------------------------
# One sequence's output: token ids → text that is safe to show


class Sequence:
    """One sequence's generated ids, its text so far and why it finished; the scheduler
    (batching.py) keeps one per running request."""

    def __init__(self, tokenizer, stop_ids: set[int], stops: list[str], budget: int):
        self.tokenizer, self.stop_ids, self.stops, self.budget = tokenizer, stop_ids, stops, budget
        self.ids: list[int] = []
        self.prefix = self.read = 0  # detokenizer offsets into ids, see _detokenize
        self.text = ""  # text decoded so far (cut before a stop string once one appears)
        self.sent = 0  # how much of self.text has been handed out
        self.finish: str | None = None

    def push(self, token: int, logprob=None, top=None) -> Piece:
        if token in self.stop_ids:
            self.finish, token, logprob, top = "stop", None, None, None
        else:
            self.ids.append(token)
            if len(self.ids) >= self.budget:
                self.finish = "length"
        self.text += self._detokenize(final=self.finish is not None)
        text = self._release()
        return Piece(text, token, logprob, top, self.finish)

    def _detokenize(self, final: bool) -> str:
        """Text added by the latest tokens, held back while it ends inside a multi-byte character.

        The "prefix offset / read offset" scheme of text-generation-inference and vLLM: ids[:read]
        are already text; decode ids[prefix:read] and ids[prefix:] and return the difference.
        Starting one step back rather than at `read` keeps decoders that strip a leading space
        (SentencePiece) from eating the new token's space; not starting at 0 keeps each step short.
        """
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def _release(self) -> str:
        """The part of the text now safe to hand out: it never contains a stop string, nor the start
        of one at its end, unless the sequence has finished for another reason."""
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        end = len(self.text)
        if hits:
            end, self.finish = min(hits), "stop"
            self.text = self.text[:end]
        elif self.finish is None:
            held = [k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])]
            end = max(self.sent, end - max(held, default=0))
        out, self.sent = self.text[self.sent : end], end
        return out


# ----------------------------------------------------------------------------
# Engine: prefill, then decode every row together until each has finished


class Engine:
    """fast: a llmos.fast.Decoder of the same model. Single-prompt generation (stream, generate, chat)
    then runs its prefill and decode steps through the decoder's C++ kernels; batches, and a request
    arriving while the decoder's one KV cache is busy, run through the model. Sampling, penalties,
    stop handling and logprobs are the same code on either path."""

    def __init__(self, model, tokenizer, eos_ids: list[int] | None = None, fast=None, draft=None):
        self.model, self.tokenizer, self.fast = model, tokenizer, fast
        self.cfg = (model if model is not None else fast).cfg  # no model: the fast decoder runs alone
        self.draft = draft  # a llmos.speculative.Draft: single-prompt generation decodes speculatively
        if draft is not None:
            draft.check(model, tokenizer)
        self.eos_ids = set(tokenizer.eos_ids or []) | set(eos_ids or [])
        self._fast_lock = threading.Lock()  # the decoder holds one sequence: one user at a time

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Stream:
        """Pieces of text as they are generated. Bad parameters or prompts raise here, not on the first next()."""
        params = params or SamplingParams()
        budgets = self.check([prompt_ids], params)
        return Stream((row[0] for row in self._steps([prompt_ids], params, budgets)), len(prompt_ids))

    def stream_fast(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Stream | None:
        """Like stream(), but only on the fast decoder: None when there is none or it is busy. The
        decoder is held from this call until the stream ends or is closed (for callers such as the
        server, which send a request elsewhere when the decoder is taken)."""
        params = params or SamplingParams()
        budgets = self.check([prompt_ids], params)
        if not self._claim_fast():
            return None
        return Stream((row[0] for row in self._steps([prompt_ids], params, budgets, claimed=True)), len(prompt_ids))

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Completion:
        return self.generate_batch([prompt_ids], params)[0]

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Every prompt as one batch; each result equals generating that prompt alone."""
        params = params or SamplingParams()
        if not prompts:
            return []
        budgets = self.check(prompts, params)
        pieces: list[list[Piece]] = [[] for _ in prompts]
        for row_pieces in self._steps(prompts, params, budgets):
            for mine, piece in zip(pieces, row_pieces):
                if piece is not None:
                    mine.append(piece)
        return [self.complete(p, len(prompt), params) for p, prompt in zip(pieces, prompts)]

    def chat(self, messages: list[dict], params: SamplingParams | None = None, stream: bool = False):
        """Reply to a conversation: a Completion, or a Stream when stream=True. Either has `notice`
        set when the oldest turns had to be dropped to fit the context."""
        params = params or SamplingParams()
        params.validate()
        limit = self.cfg.max_seq_len
        # Reserve room for the reply, but never more than half the context for a huge max_new_tokens.
        kept, dropped = fit_messages(self.tokenizer, messages, limit, min(params.max_new_tokens, limit // 2))
        notice = None
        if dropped:
            notice = f"dropped {dropped} oldest message{'s' * (dropped > 1)} to fit the {limit}-token context"
        prompt = self.tokenizer.encode_chat(kept)
        result = self.stream(prompt, params) if stream else self.generate(prompt, params)
        result.notice, result.dropped = notice, dropped
        return result

    # --- the loop, and the checks and results it shares with the scheduler (batching.py) ---

    def check(self, prompts: list[list[int]], params: SamplingParams) -> list[int]:
        """Validate; return each prompt's token budget (max_new_tokens, clamped to the context)."""
        params.validate()
        limit, vocab = self.cfg.max_seq_len, self.cfg.vocab_size
        budgets = []
        for i, prompt in enumerate(prompts):
            name = "prompt" if len(prompts) == 1 else f"prompt {i}"
            if not prompt:
                raise LlmosError(f"{name} is empty; pass at least one token id (e.g. the BOS token)")
            if len(prompt) >= limit:
                raise LlmosError(
                    f"{name} is {len(prompt)} tokens but the context limit is {limit}; "
                    "shorten it or use a model with a longer context"
                )
            if not 0 <= min(prompt) <= max(prompt) < vocab:
                raise LlmosError(f"{name} has token ids outside 0..{vocab - 1}; encode it with this model's tokenizer")
            budgets.append(min(params.max_new_tokens, limit - len(prompt)))
        return budgets

    def _claim_fast(self) -> bool:
        return self.fast is not None and self._fast_lock.acquire(blocking=False)

    def _model_logits(self, prompts, budgets):
        """Logits [B, V] after the left-padded prompts, and step(chosen [B]) -> logits after them; the model path."""
        if self.model is None:
            raise LlmosError("this model runs on the fast decoder alone, one sequence at a time; "
                             "load it with batch > 1 (or --engine torch) for batches")
        device = next(self.model.parameters()).device
        longest = max(map(len, prompts))
        pads = [longest - len(p) for p in prompts]
        tokens = torch.tensor([[0] * pad + p for pad, p in zip(pads, prompts)], device=device)
        # Rows share one timeline of cache slots; each row's positions start at its first real
        # token, so the cache may need more slots than the context limit has positions.
        cache = self.model.new_cache(len(prompts), longest + max(budgets))
        cache.pad = torch.tensor(pads, device=device)
        step = lambda chosen: self.model(chosen[:, None], cache)[:, -1].float()
        return self.model(tokens, cache, last=True)[:, -1].float(), step

    def _fast_logits(self, prompt, budget: int):
        """The same for one prompt on the fast decoder (which the caller has claimed)."""
        dec = self.fast
        dec.reset()
        dec.reserve(len(prompt) + budget)  # the cache at its final size at once, not doubled on the way
        return dec.prefill(prompt)[None], lambda chosen: dec.decode(int(chosen[0]))[None]

    @torch.inference_mode()
    def _steps(self, prompts, params: SamplingParams, budgets: list[int], claimed: bool = False) -> Iterator[list[Piece | None]]:
        """Yield, per decode step, one Piece per row (None for rows already finished). One prompt runs on
        the fast decoder when there is one and it is free (claimed: the caller already holds it)."""
        if self.draft is not None and len(prompts) == 1 and not claimed:
            if self.draft.supports(params):
                yield from self.draft.steps(self, prompts[0], params, budgets[0])
                return
        fast = claimed or (len(prompts) == 1 and self._claim_fast())
        try:
            yield from self._loop(prompts, params, budgets, fast)
        finally:
            if fast:
                self._fast_lock.release()

    def _loop(self, prompts, params: SamplingParams, budgets: list[int], fast: bool) -> Iterator[list[Piece | None]]:
        logits, step = self._fast_logits(prompts[0], budgets[0]) if fast else self._model_logits(prompts, budgets)  # prefill
        device = logits.device
        stop_ids = self.eos_ids | set(params.stop_token_ids)
        rows = [Sequence(self.tokenizer, stop_ids, params.stop, budget) for budget in budgets]
        generators = None
        if params.temperature > 0:
            generators = [torch.Generator(device=device) for _ in prompts]
            for g in generators:  # one per row: a request's draws never depend on its neighbours
                if params.seed is None:
                    g.seed()
                else:
                    g.manual_seed(params.seed)
        every = torch.arange(len(prompts), device=device)
        seen = counts = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
            for b, prompt in enumerate(prompts):
                seen[b, prompt] = True
        if params.presence_penalty or params.frequency_penalty:
            counts = torch.zeros_like(logits)
        while True:
            scores = logits if params.logits_processor is None else params.logits_processor([r.ids for r in rows], logits)
            chosen = sample(penalize(scores, params, seen, counts), params, generators)
            logprobs = self.logprobs(logits, chosen, params.logprobs, [r.finish is None for r in rows])
            yield [
                None if row.finish else row.push(token, *lp)
                for row, token, lp in zip(rows, chosen.tolist(), logprobs)
            ]
            if all(row.finish for row in rows):
                return
            if seen is not None:
                seen[every, chosen] = True
            if counts is not None:
                counts[every, chosen] += 1
            logits = step(chosen)  # decode one step

    def logprobs(self, logits, chosen, n: int | None, active: list[bool]) -> list[tuple]:
        """(logprob of the chosen token, its n best alternatives) per row, from the raw logits."""
        if n is None:
            return [(None, None)] * len(active)
        lp = F.log_softmax(logits, dim=-1)
        picked = lp.gather(-1, chosen[:, None])[:, 0].tolist()
        values, ids = (x.tolist() for x in lp.topk(n, dim=-1))
        return [
            (p, [TokenLogprob(i, self.tokenizer.piece(i), v) for i, v in zip(row_ids, row_values)] if a else None)
            for p, row_ids, row_values, a in zip(picked, ids, values, active)
        ]

    def complete(self, pieces: list[Piece], prompt_tokens: int, params: SamplingParams) -> Completion:
        ids = [p.token_id for p in pieces if p.token_id is not None]
        logprobs = None
        if params.logprobs is not None:
            logprobs = [
                TokenLogprob(p.token_id, self.tokenizer.piece(p.token_id), p.logprob, p.top_logprobs)
                for p in pieces
                if p.token_id is not None
            ]
        text = "".join(p.text for p in pieces)
        return Completion(text, ids, pieces[-1].finish_reason, logprobs, prompt_tokens, len(ids))


# ----------------------------------------------------------------------------
# Chat history that fits the context


def fit_messages(tokenizer, messages: list[dict], limit: int, reserve: int) -> tuple[list[dict], int]:
    """Drop the oldest turns until the rendered conversation plus `reserve` tokens fits in `limit`.

    Policy: system messages and everything from the last user message on are always kept. The
    other messages form turns (a user message with the replies and tool results that follow it)
    and the oldest turns go first, whole, so the conversation keeps alternating. Returns the kept
    messages and how many were dropped; LlmosError when even the kept part does not fit.
    """
    if not messages:
        raise LlmosError("no messages to reply to; pass at least one user message")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    turns: list[list[int]] = []
    for i, m in enumerate(messages[:last_user]):
        if m["role"] == "system":
            continue
        if m["role"] == "user" or not turns:
            turns.append([i])
        else:
            turns[-1].append(i)
    dropped: set[int] = set()
    while True:
        kept = [m for i, m in enumerate(messages) if i not in dropped]
        n = len(tokenizer.encode_chat(kept))
        if n + reserve <= limit:
            return kept, len(dropped)
        if not turns:
            raise LlmosError(
                f"the system prompt and last message take {n} tokens and {reserve} are reserved for the reply, "
                f"but the context limit is {limit}; shorten them or lower max_new_tokens"
            )
        dropped.update(turns.pop(0))
