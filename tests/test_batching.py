"""Continuous batching against the engine alone.

Reference: Engine.generate on each request by itself (test_engine.py checks it against a
forward with no cache at all). Arrivals are scripted by calling step() between submits, so
which requests share a step, who waits and who leaves when is exact.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import threading

import pytest
import torch

from llmos.batching import Scheduler, SchedulerFull
from llmos.engine import Engine, SamplingParams
from llmos.errors import LlmosError
from conftest import tiny_config, tiny_model, tokenizer

torch.set_num_threads(1)

TOK = tokenizer()
CFG = tiny_config()
TEXTS = ["the cat sat on the mat. the dog", "hi", "emoji 😀 party", "naïve café",
         "日本語のテキスト 世界 hello world",
         "dog", "hello there, the food", "the mat"]


def greedy(**kw):
    return SamplingParams(temperature=0.0, **kw)


def outcome(request):
    """(token ids, text, finish reason, logprobs) from a finished request's pieces."""
    pieces = list(request)
    ids = [p.token_id for p in pieces if p.token_id is not None]
    lps = [(p.logprob, [(t.token_id, t.logprob) for t in p.top_logprobs]) for p in pieces if p.logprob is not None]
    return ids, "".join(p.text for p in pieces), pieces[-1].finish_reason, lps


def alone(engine, prompt, params):
    c = engine.generate(prompt, params)
    lps = [(t.logprob, [(a.token_id, a.logprob) for a in t.top]) for t in c.logprobs or []]
    return c.token_ids, c.text, c.finish_reason, lps


def drive(sched, arrivals):
    """arrivals: (step, prompt, params) each; submit each at its step, step until all is done.
    Returns the requests and how many rows ran at each step."""
    requests, running, step = [None] * len(arrivals), [], 0
    while True:
        for j, (at, prompt, params) in enumerate(arrivals):
            if at == step:
                requests[j] = sched.submit(prompt, params)
        busy = sched.step()
        running.append(len(sched.rows))
        step += 1
        if not busy and step > max(a[0] for a in arrivals):
            return requests, running


def spy_shifts(sched, monkeypatch) -> list[int]:
    deltas = []
    real = sched._shift
    monkeypatch.setattr(sched, "_shift", lambda delta: (deltas.append(delta), real(delta)))
    return deltas


def assert_same(got, want, logprobs=False):
    assert got[:3] == want[:3]
    if logprobs:
        assert len(got[3]) == len(want[3]) > 0
        for (lp, top), (lp0, top0) in zip(got[3], want[3]):
            assert lp == pytest.approx(lp0, abs=1e-5)
            assert [t for t, _ in top] == [t for t, _ in top0]
            assert [v for _, v in top] == pytest.approx([v for _, v in top0], abs=1e-5)


# ----------------------------------------------------------------------------
# Each request's output equals the engine's on that request alone


def test_greedy_continuous_batch_equals_each_request_alone(engine, monkeypatch):
    prompts = [TOK.encode(t) for t in TEXTS[:6]]
    # One request leaves on a stop id, one on a stop string, taken from their own output alone.
    ids1 = engine.generate(prompts[1], greedy(max_new_tokens=16)).token_ids
    text2 = engine.generate(prompts[2], greedy(max_new_tokens=16)).text
    assert len(text2) > 9
    params = [greedy(max_new_tokens=20), greedy(max_new_tokens=16, stop_token_ids=[ids1[5]]),
              greedy(max_new_tokens=16, stop=[text2[6:9]]), greedy(max_new_tokens=7), greedy(max_new_tokens=12),
              greedy(max_new_tokens=9, logprobs=3)]
    long_prompt = TOK.encode("hello there, the cat sat on the mat. the dog ate the food. naïve")
    assert len(long_prompt) > len(prompts[0]) + 4  # arrives when the timeline is shorter than it: a shift right
    prompts[4] = long_prompt
    arrivals = [(0, prompts[0], params[0]), (0, prompts[1], params[1]), (0, [7], greedy(max_new_tokens=3)),
                (2, prompts[2], params[2]), (3, prompts[3], params[3]), (4, prompts[4], params[4]),
                (9, prompts[5], params[5])]
    sched = Scheduler(engine, max_batch=3)
    shifts = spy_shifts(sched, monkeypatch)
    groups = []
    real_prefill = sched._prefill
    monkeypatch.setattr(sched, "_prefill", lambda group: (groups.append(sorted(len(r.prompt) for r in group)),
                                                           real_prefill(group)))
    requests, running = drive(sched, arrivals)

    for (_, prompt, p), request in zip(arrivals, requests):
        assert_same(outcome(request), alone(engine, prompt, p), logprobs=p.logprobs is not None)
    assert [r.finish_reason for r in requests[:4]] == ["length", "stop", "length", "stop"]
    assert max(running) == 3 and any(s > 0 for s in shifts)  # a full batch; a longer prompt shifted the rows
    # Prompts admitted together are prefilled together, left-padded, unless padding would be most of it.
    assert groups[0] == [1, 2] and groups[1] == [len(prompts[0])]
    assert sched.rows == [] and sched.cache.pos == 0


def test_each_request_samples_with_its_own_parameters_and_seed(engine):
    mixed = [SamplingParams(temperature=1.0, seed=7, max_new_tokens=14),
             greedy(max_new_tokens=14),
             SamplingParams(temperature=0.8, top_k=20, seed=3, max_new_tokens=10, logprobs=2),
             SamplingParams(temperature=1.2, top_p=0.9, min_p=0.05, seed=11, max_new_tokens=14),
             greedy(max_new_tokens=14, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.5),
             SamplingParams(temperature=1.0, seed=7, max_new_tokens=12),  # same knobs as the first: one sample() call
             SamplingParams(temperature=0.9, seed=5, repetition_penalty=1.3, frequency_penalty=0.4, max_new_tokens=14)]
    arrivals = [(i // 2, TOK.encode(TEXTS[i]), p) for i, p in enumerate(mixed)]
    sched = Scheduler(engine, max_batch=8)
    requests, running = drive(sched, arrivals)
    got = [outcome(r) for r in requests]
    for (_, prompt, p), mine in zip(arrivals, got):
        assert_same(mine, alone(engine, prompt, p), logprobs=p.logprobs is not None)
    assert max(running) == len(mixed)
    # The seeds matter: the same prompt and knobs with another seed give another output.
    other = alone(engine, arrivals[0][1], SamplingParams(temperature=1.0, seed=8, max_new_tokens=14))
    assert got[0][0] != other[0]
    assert list(requests[0]) == []  # pieces are handed out once


def test_logits_processors_apply_per_request_and_a_failing_one_fails_only_its_own(engine):
    eos = TOK.eos_ids[0]

    def even_only(ids, logits):
        return logits.masked_fill(torch.arange(logits.shape[-1]) % 2 == 1, float("-inf"))

    def end_after_four(ids, logits):
        if len(ids[0]) < 4:  # ids: the generated ids of each row
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced[:, eos] = 0.0
        return forced

    def broken(ids, logits):
        if len(ids[0]) == 2:
            raise ValueError("grammar dead end")
        return logits

    runs = [(TOK.encode(TEXTS[0]), greedy(max_new_tokens=12, logits_processor=even_only, logprobs=2)),
            (TOK.encode(TEXTS[1]), SamplingParams(temperature=1.0, seed=4, max_new_tokens=12,
                                                  logits_processor=end_after_four)),
            (TOK.encode(TEXTS[2]), greedy(max_new_tokens=12)),
            (TOK.encode(TEXTS[3]), greedy(max_new_tokens=12, logits_processor=broken))]
    sched = Scheduler(engine, max_batch=4)
    requests, _ = drive(sched, [(0, prompt, params) for prompt, params in runs])
    got = [outcome(r) for r in requests[:3]]
    for (prompt, params), mine in zip(runs, got):
        assert_same(mine, alone(engine, prompt, params), logprobs=params.logprobs is not None)
    assert all(t % 2 == 0 for t in got[0][0]) and any(t % 2 for lp in got[0][3] for t, _ in lp[1])  # raw logprobs
    assert len(got[1][0]) == 4 and got[1][2] == "stop"
    assert requests[3].finish_reason == "error" and isinstance(requests[3].error, ValueError)
    with pytest.raises(ValueError, match="grammar dead end"):
        list(requests[3])
    with pytest.raises(ValueError, match="grammar dead end"):  # as the engine alone does
        engine.generate(*runs[3])


def test_compaction_at_the_end_of_the_cache_preserves_outputs(model, monkeypatch):
    # Context 24: rows that arrive one after another push the shared timeline past the cache's
    # end many times, and some rows run right up to the context limit.
    small = tiny_model(max_seq_len=24)
    small.load_state_dict(model.state_dict())
    engine = Engine(small, TOK)
    arrivals = [(4 * i, TOK.encode(TEXTS[i])[:12], greedy(max_new_tokens=[100, 12, 9, 100, 15, 11, 100, 10][i]))
                for i in range(8)]
    sched = Scheduler(engine, max_batch=4)
    shifts = spy_shifts(sched, monkeypatch)
    requests, running = drive(sched, arrivals)
    got = [outcome(r) for r in requests]
    for (_, prompt, p), mine in zip(arrivals, got):
        assert_same(mine, alone(engine, prompt, p))
    assert sum(s < 0 for s in shifts) >= 2 and max(running) >= 3
    assert len(got[0][0]) == 24 - len(arrivals[0][1])  # ran to the context limit


def test_max_len_is_each_requests_context(engine):
    sched = Scheduler(engine, max_len=16)
    prompt = TOK.encode("the cat sat on the mat")
    request = sched.submit(prompt, greedy(max_new_tokens=100))
    while sched.step():
        pass
    ids, _, finish, _ = outcome(request)
    assert finish == "length" and ids == alone(engine, prompt, greedy(max_new_tokens=16 - len(prompt)))[0]
    with pytest.raises(LlmosError, match="prompt is 16 tokens but the batch cache holds 16 per sequence; shorten"):
        sched.submit([5] * 16, greedy())


def test_generate_many_with_more_prompts_than_room(engine):
    # The first three (2, 9 and 12 tokens) are also prefilled as one left-padded group.
    prompts = [TOK.encode(t) for t in TEXTS]
    params = greedy(max_new_tokens=10, repetition_penalty=1.3)
    want = [engine.generate(p, params) for p in prompts]
    for threaded in (False, True):
        sched = Scheduler(engine, max_batch=3, max_waiting=2)
        if threaded:
            sched.start()
        got = sched.generate_many(prompts, params)
        sched.close()
        assert [(c.token_ids, c.text, c.finish_reason, c.prompt_tokens) for c in got] == \
               [(c.token_ids, c.text, c.finish_reason, c.prompt_tokens) for c in want]


# ----------------------------------------------------------------------------
# Leaving early, the waiting line, threads, failures


def test_cancel_frees_the_row_for_the_next_request(engine):
    sched = Scheduler(engine, max_batch=1, max_waiting=2)
    a = sched.submit(TOK.encode("the cat"), greedy(max_new_tokens=30))
    b = sched.submit(TOK.encode("hello"), greedy(max_new_tokens=8))
    for _ in range(3):
        sched.step()
    assert [row.request for row in sched.rows] == [a] and not b.done.is_set()
    c = sched.submit(TOK.encode("dog"), greedy(max_new_tokens=8))
    a.cancel()
    c.cancel()  # still waiting: it never runs
    sched.step()
    assert a.finish_reason == "cancelled" and c.finish_reason == "cancelled" and list(c) == []
    assert len(list(a)) == 4  # what it made before the cancel (prefill and 3 decode steps), then the end
    assert [row.request for row in sched.rows] == [b]
    while sched.step():
        pass
    assert_same(outcome(b), alone(engine, TOK.encode("hello"), greedy(max_new_tokens=8)))
    assert sched.rows == [] and sched.cache.pos == 0


def test_full_scheduler_refuses_at_once_and_admits_in_order(engine):
    sched = Scheduler(engine, max_batch=2, max_waiting=1)
    requests = [sched.submit(TOK.encode("the"), greedy(max_new_tokens=n)) for n in (3, 6, 4)]
    with pytest.raises(SchedulerFull, match=r"the scheduler is full \(3 requests: 2 may run and 1 wait\); retry"):
        sched.submit(TOK.encode("the"), greedy())
    finished_at, step, busy = {}, 0, True
    while busy:
        busy = sched.step()
        step += 1
        for i, r in enumerate(requests):
            if r.done.is_set():
                finished_at.setdefault(i, step)
        if len(requests) == 3 and finished_at:  # the first has left: there is a place in line again
            requests.append(sched.submit(TOK.encode("the"), greedy(max_new_tokens=2)))
    # A request admitted at step s makes its first token in prefill and its second in that
    # step's decode, so n tokens end at step s + n - 2. The third waits for the first to leave;
    # the fourth, though shorter, waits behind it for the next free row.
    assert finished_at == {0: 2, 1: 5, 2: 3 + 4 - 2, 3: 6 + 2 - 2}
    assert all(r.finish_reason == "length" for r in requests)


def test_threads_submit_concurrently_with_iterators_and_callbacks(engine):
    prompts = [TOK.encode(t) for t in TEXTS]
    params = [SamplingParams(temperature=1.0, seed=i, max_new_tokens=8 + i) for i in range(len(prompts))]
    results, done_calls, lock = {}, [], threading.Lock()

    def client(i):
        if i % 2:
            pieces = []
            request = sched.submit(prompts[i], params[i], on_piece=pieces.append,
                                   on_done=lambda r: done_calls.append(r))
            request.done.wait()
            got = [p.token_id for p in pieces if p.token_id is not None], "".join(p.text for p in pieces), \
                pieces[-1].finish_reason
        else:
            got = outcome(sched.submit(prompts[i], params[i]))[:3]
        with lock:
            results[i] = got

    with Scheduler(engine, max_batch=4) as sched:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        broken = sched.submit(prompts[0], greedy(max_new_tokens=5), on_piece=lambda p: 1 / 0)
        broken.done.wait(timeout=60)
    assert {i: results[i] for i in range(len(prompts))} == {i: alone(engine, p, q)[:3] for i, (p, q) in
                                                             enumerate(zip(prompts, params))}
    assert len(set(map(id, done_calls))) == len(done_calls) == len(prompts) // 2  # once per request
    assert all(r.finish_reason == results[prompts.index(r.prompt)][2] for r in done_calls)
    assert broken.finish_reason == "error" and isinstance(broken.error, ZeroDivisionError)
    with pytest.raises(LlmosError, match="the scheduler is closed"):
        sched.submit(prompts[0], greedy())


def test_a_failed_step_fails_its_requests_and_the_loop_goes_on(engine, model):
    class Failing(torch.nn.Module):  # the model, except that decode steps raise
        def __init__(self):
            super().__init__()
            self.cfg, self.inner = model.cfg, model

        def forward(self, tokens, cache, last=False):
            if tokens.shape[1] == 1:
                raise RuntimeError("out of memory")
            return self.inner(tokens, cache)

    sched = Scheduler(engine, max_batch=2)
    sched.model = Failing()
    a, b = (sched.submit(TOK.encode(t), greedy(max_new_tokens=5)) for t in ("the", "hello"))
    sched.step()
    assert a.finish_reason == b.finish_reason == "error" and sched.rows == []
    with pytest.raises(RuntimeError, match="out of memory"):
        list(a)
    sched.model = model
    c = sched.submit(TOK.encode("dog"), greedy(max_new_tokens=6))
    while sched.step():
        pass
    assert_same(outcome(c), alone(engine, TOK.encode("dog"), greedy(max_new_tokens=6)))


@pytest.mark.parametrize("prompt, params, message", [
    ([], greedy(), "prompt is empty"),
    ([5], SamplingParams(temperature=-1), "temperature must be >= 0"),
    ([10_000], greedy(), f"token ids outside 0..{CFG.vocab_size - 1}"),
])
def test_bad_requests_raise_at_submit(engine, prompt, params, message):
    sched = Scheduler(engine)
    with pytest.raises(LlmosError, match=message):
        sched.check(prompt, params)
    with pytest.raises(LlmosError, match=message):
        sched.submit(prompt, params)
    assert not sched.step()
