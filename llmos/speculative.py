"""Speculative decoding: a small draft model guesses, the target model checks several guesses at once.

    llmos run MODEL --draft DRAFT_MODEL [--draft-tokens K]      # K guesses per round (default 4)
    engine = Engine(target, tokenizer, draft=Draft(draft_model, draft_tokenizer, k=4))

One round, as in gpt-fast and Leviathan et al. (2023) / Chen et al. (2023):

    draft    k forwards of one token each propose d1..dk (greedy, or sampled from the draft's q)
    verify   ONE target forward over [last token, d1..dk] gives the target's p at all k+1 positions
    accept   the longest prefix the target agrees with: greedy, d_i == argmax p_i; sampling, each d_i
             with probability min(1, p_i(d_i) / q_i(d_i))
    fix      at the first rejection a token from norm(max(0, p_i - q_i)) (greedy: argmax p_i); when
             all k pass, a bonus token from p_{k+1}
    rewind   both KV caches go back (KVCache.pos) to the accepted length; stale slots are overwritten

Greedy output is the target's greedy output token for token, and sampled output has the target's
distribution (temperature, top-k, top-p and min-p applied to both p and q), though not the same
draws as the plain loop for the same seed. Repetition, presence and frequency penalties and logits
processors depend on every earlier token: requests that use them take the engine's plain loop.
The engine's Sequence does stop ids, stop strings, the token budget and streaming text, so a stop
inside an accepted run cuts it there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmos.engine import Sequence, SamplingParams, sample, warp
from llmos.errors import LlmosError


@dataclass
class Stats:
    proposed: int = 0  # draft tokens offered to the target
    accepted: int = 0  # of those, kept
    tokens: int = 0  # tokens emitted (through the target's own ones)
    target_forwards: int = 0  # prefill included: the plain loop makes 1 token per target forward

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.target_forwards if self.target_forwards else 0.0

    def summary(self) -> str:
        return (f"speculative decoding: {self.acceptance:.0%} of {self.proposed} draft tokens accepted, "
                f"{self.tokens_per_forward:.2f} tokens per target forward")


class Draft:
    """A draft model, how many tokens it proposes per round, and counts summed over requests."""

    def __init__(self, model, tokenizer=None, k: int = 4):
        if not isinstance(k, int) or k < 1:
            raise LlmosError(f"--draft-tokens must be an integer >= 1, got {k!r}")
        self.model, self.tokenizer, self.k = model, tokenizer, k
        self.stats = Stats()

    def check(self, target, tokenizer) -> None:
        """LlmosError unless the draft speaks the target's vocabulary: its ids must mean the same tokens."""
        tv, dv = target.cfg.vocab_size, self.model.cfg.vocab_size
        if tv != dv:
            raise LlmosError(f"the draft model has a {dv}-token vocabulary but the target has {tv}; "
                             "pick a draft from the same model family (same tokenizer)")
        if self.tokenizer is not None and tokenizer is not None and self.tokenizer is not tokenizer:
            if self.tokenizer.hf.get_vocab(with_added_tokens=True) != tokenizer.hf.get_vocab(with_added_tokens=True):
                raise LlmosError("the draft model's tokenizer differs from the target's; "
                                 "pick a draft from the same model family (same tokenizer)")

    def supports(self, params: SamplingParams) -> bool:
        return supports(params)

    def steps(self, engine, prompt: list[int], params: SamplingParams, budget: int):
        """The engine's decode loop for one prompt, speculatively (the engine calls this; see steps below)."""
        return steps(engine, prompt, params, budget)


def supports(params: SamplingParams) -> bool:
    """Whether a request can be decoded speculatively (see the module docstring)."""
    return (params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty
            and params.logits_processor is None)


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: [V] logits → [V] probabilities after temperature and truncation."""
    return warp(logits[None], params).softmax(-1)[0]


@torch.inference_mode()
def steps(engine, prompt: list[int], params: SamplingParams, budget: int):
    """Engine._steps for one prompt, speculatively: yields [Piece] per emitted token."""
    draft, target = engine.draft, engine.model
    stats = draft.stats
    device = next(target.parameters()).device
    draft_device = next(draft.model.parameters()).device
    greedy = params.temperature == 0
    seq = Sequence(engine.tokenizer, engine.eos_ids | set(params.stop_token_ids), params.stop, budget)
    gen = None
    if not greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(params.seed) if params.seed is not None else gen.seed()

    def emit(token: int, logits: torch.Tensor):
        lp = engine.logprobs(logits[None], torch.tensor([token], device=logits.device), params.logprobs, [True])[0]
        stats.tokens += token not in seq.stop_ids
        return [seq.push(token, *lp)]

    # Prefill both; the first token is the target's own.
    tcache = target.new_cache(1, len(prompt) + budget)
    dcache = draft.model.new_cache(1, len(prompt) + budget)
    logits = target(torch.tensor([prompt], device=device), tcache)[0, -1].float()
    draft.model(torch.tensor([prompt], device=draft_device), dcache)
    stats.target_forwards += 1
    token = int(sample(logits[None], params, [gen])[0])
    yield emit(token, logits)
    pending = [token]  # emitted tokens the draft has not read yet; the last is the current token

    while not seq.finish:
        k = min(draft.k, budget - len(seq.ids) - 1)  # never propose past the token budget
        # Draft: k tokens, one forward each (the first also reads what it has not seen).
        proposal, qs, x = [], [], pending
        dstart = dcache.pos
        for _ in range(k):
            dl = draft.model(torch.tensor([x], device=draft_device), dcache)[0, -1].float().to(device)
            if greedy:
                d = int(dl.argmax())
            else:
                q = probs(dl, params)
                d = int(torch.multinomial(q, 1, generator=gen))
                qs.append(q)
            proposal.append(d)
            x = [d]
        # Verify: one target forward over the current token and the k guesses.
        tstart = tcache.pos
        tl = target(torch.tensor([[pending[-1]] + proposal], device=device), tcache)[0].float()  # [k+1, V]
        stats.target_forwards += 1
        stats.proposed += k
        accepted, fix = 0, None
        for i, d in enumerate(proposal):
            if greedy:
                ok = int(tl[i].argmax()) == d
            else:
                p = probs(tl[i], params)
                ok = float(torch.rand(1, generator=gen, device=device)) * float(qs[i][d]) < float(p[d])
                if not ok:  # resample from the part of p that q under-covers
                    residual = (p - qs[i]).clamp(min=0)
                    residual = residual if float(residual.sum()) > 0 else p
                    fix = int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
            if not ok:
                break
            accepted += 1
        if fix is None:  # greedy correction, or the bonus token after a full accept
            fix = int(sample(tl[accepted][None], params, [gen])[0])
        stats.accepted += accepted
        # Rewind: the target keeps the current token and the accepted guesses; the draft keeps what
        # it read of those, and reads the rest (at most the last guess) with the next round's input.
        tcache.pos = tstart + 1 + accepted
        if k:
            read = min(accepted, k - 1)
            dcache.pos = dstart + len(pending) + read
            pending = proposal[read:accepted] + [fix]
        else:
            pending = pending + [fix]
        for i, t in enumerate(proposal[:accepted] + [fix]):
            yield emit(t, tl[i])
            if seq.finish:
                return
