"""Engine tests on the tiny random model and byte-level BPE of conftest.py (model and engine are its fixtures).

References: a manual full forward with no cache (greedy, logprobs), hand-computed
logits (penalties, top-p, min-p), transformers' logits processors, and a scripted
model that emits a known text so stop strings and UTF-8 boundaries are exact.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from llmos.engine import Engine, SamplingParams, Stream, fit_messages, penalize, sample, warp
from llmos.errors import LlmosError
from llmos.model import KVCache
from conftest import tiny_config, tokenizer

torch.set_num_threads(1)

TOK = tokenizer()
CFG = tiny_config()
TEXT = "Hello wörld 😀 世界 END tail"


def greedy(**kw):
    return SamplingParams(temperature=0.0, **kw)


def reference_greedy(model, prompt, n, stop_ids=tuple(TOK.eos_ids), params=None):
    """Argmax of a full forward over the whole sequence at every step: no cache at all.
    With params, penalties over seen/counted tokens rebuilt from scratch at each step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1:]
            if params is not None:
                seen = torch.zeros_like(logits, dtype=torch.bool)
                seen[0, ids] = True
                counts = torch.bincount(torch.tensor(ids[len(prompt) :], dtype=torch.long), minlength=CFG.vocab_size)
                logits = penalize(logits, params, seen, counts[None].float())
            token = logits[0].argmax().item()
            if token in stop_ids:
                break
            ids.append(token)
    return ids[len(prompt) :]


class Scripted(torch.nn.Module):
    """A stand-in model whose greedy output is a fixed token script, one token per step."""

    def __init__(self, script):
        super().__init__()
        self.cfg, self.script = CFG, script
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # tells the engine the device

    def new_cache(self, batch=1, max_len=None):
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len)

    def forward(self, tokens, cache, last=False):
        if cache.pos == 0:
            self.prompt_len = tokens.shape[1]
        step = cache.pos + tokens.shape[1] - self.prompt_len
        cache.pos += tokens.shape[1]
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.cfg.vocab_size)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits


# ----------------------------------------------------------------------------
# Decoding through the cache


def test_greedy_equals_full_forward_without_cache(model, engine):
    prompt = TOK.encode("the cat sat")
    out = engine.generate(prompt, greedy(max_new_tokens=20))
    assert out.token_ids == reference_greedy(model, prompt, 20)
    assert out.finish_reason == "length" and out.completion_tokens == 20 and out.prompt_tokens == len(prompt)
    assert out.text == TOK.decode(out.token_ids, skip_special=True)


@pytest.mark.parametrize(
    "penalty", [dict(repetition_penalty=1.5), dict(presence_penalty=1.0), dict(frequency_penalty=0.5)]
)
def test_greedy_with_penalties_equals_full_forward_reference(model, engine, penalty):
    plain = TOK.encode("the cat sat on the mat")
    looping = plain + engine.generate(plain, greedy(max_new_tokens=15)).token_ids  # ends in a loop the model repeats
    for prompt in (plain, looping):  # penalties for generated tokens bite on the first, for prompt tokens on the second
        params = greedy(max_new_tokens=20, **penalty)
        out = engine.generate(prompt, params)
        assert out.token_ids == reference_greedy(model, prompt, 20, params=params)
        assert out.token_ids != engine.generate(prompt, greedy(max_new_tokens=20)).token_ids  # the penalty bites


def test_logprobs_are_raw_log_softmax_of_a_manual_forward(model, engine):
    prompt = TOK.encode("hello")
    out = engine.generate(prompt, greedy(max_new_tokens=6, logprobs=3, repetition_penalty=1.3))
    assert len(out.logprobs) == 6
    with torch.no_grad():
        for i, entry in enumerate(out.logprobs):
            lp = torch.log_softmax(model(torch.tensor([prompt + out.token_ids[:i]]))[0, -1], -1)
            assert entry.token_id == out.token_ids[i] and entry.text == TOK.piece(entry.token_id)
            assert entry.logprob == pytest.approx(lp[entry.token_id].item(), abs=1e-5)
            values, ids = lp.topk(3)
            assert [t.token_id for t in entry.top] == ids.tolist()
            assert [t.logprob for t in entry.top] == pytest.approx(values.tolist(), abs=1e-5)


@pytest.mark.parametrize("penalties", [{}, dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.5)])
def test_batch_equals_each_prompt_alone(engine, penalties):
    prompts = [TOK.encode(s) for s in ["the cat sat on the mat", "hi", "emoji 😀 party", "dog"]]
    stop_id = engine.generate(prompts[0], greedy(max_new_tokens=12, **penalties)).token_ids[4]
    params = greedy(max_new_tokens=12, stop_token_ids=[stop_id], **penalties)
    batch = engine.generate_batch(prompts, params)
    alone = [engine.generate(p, params) for p in prompts]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert [c.finish_reason for c in batch] == [c.finish_reason for c in alone]
    assert [c.text for c in batch] == [c.text for c in alone]
    assert {c.finish_reason for c in batch} == {"stop", "length"}  # rows finish at different steps
    assert engine.generate_batch([], params) == []


def test_batch_equals_alone_when_sampling_with_a_seed(engine):
    prompts = [TOK.encode("the dog"), TOK.encode("naïve café déjà vu")]
    params = SamplingParams(temperature=1.0, seed=7, max_new_tokens=10)
    batch = engine.generate_batch(prompts, params)
    assert [c.token_ids for c in batch] == [engine.generate(p, params).token_ids for p in prompts]


# ----------------------------------------------------------------------------
# Sampling


def test_seed_reproduces_and_different_seeds_differ(engine):
    prompt = TOK.encode("the")
    a, b, c = (engine.generate(prompt, SamplingParams(temperature=1.0, seed=s, max_new_tokens=20)) for s in (1, 1, 2))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_truncation_to_one_token_equals_greedy(engine, kw):
    prompt = TOK.encode("the mat")
    sampled = engine.generate(prompt, SamplingParams(temperature=1.5, seed=3, max_new_tokens=15, **kw))
    assert sampled.token_ids == engine.generate(prompt, greedy(max_new_tokens=15)).token_ids


def test_penalties_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0, 3.0]])
    rep = penalize(logits, SamplingParams(repetition_penalty=2.0), seen, counts)
    assert rep.tolist() == [[1.0, -2.0, 0.5, 3.0, 0.0]]
    pf = penalize(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), seen, counts)
    assert pf.tolist() == [[2.0, -2.0, -0.25, 3.0, -1.25]]
    all3 = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    both = penalize(logits, all3, seen, counts)
    assert both.tolist() == [[1.0, -3.0, -0.25, 3.0, -1.25]]  # repetition first, then presence/frequency


def test_top_p_and_min_p_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()

    def kept(temperature=1.0, **kw):
        return torch.isfinite(warp(logits, SamplingParams(temperature=temperature, **kw)))[0].tolist()

    assert kept(top_p=0.75) == [True, True, False, False]  # 0.5 + 0.3 is the smallest set with mass >= 0.75
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(min_p=0.5) == [True, True, False, False]  # threshold 0.25
    assert kept(min_p=0.2) == [True, True, True, False]  # threshold 0.1
    assert kept(top_k=3) == [True, True, True, False]
    # temperature rescales before truncation: at T=0.5 the probabilities become 0.25:0.09:... → 0.68, 0.24, ...
    assert kept(temperature=0.5, top_p=0.7) == [True, True, False, False]


def test_processing_matches_transformers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(1)
    logits, history = torch.randn(3, 50) * 3, torch.randint(0, 50, (3, 12))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, history, True)
    params = SamplingParams(repetition_penalty=1.7, temperature=0.8, top_k=20, top_p=0.8, min_p=0.1)
    ours = warp(penalize(logits, params, seen), params)
    ref = logits
    for proc in [
        lp.RepetitionPenaltyLogitsProcessor(1.7),
        lp.TemperatureLogitsWarper(0.8),
        lp.TopKLogitsWarper(20),
        lp.TopPLogitsWarper(0.8),
        lp.MinPLogitsWarper(0.1),
    ]:
        ref = proc(history, ref)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert torch.allclose(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


def test_sample_draws_from_the_warped_distribution():
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log().expand(1, 3)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, SamplingParams(temperature=1.0), [g]) for _ in range(3000)])
    freq = torch.bincount(draws.flatten(), minlength=3) / 3000
    assert freq.tolist() == pytest.approx([0.6, 0.3, 0.1], abs=0.03)
    assert sample(logits, SamplingParams(temperature=0.0), None).tolist() == [0]


# ----------------------------------------------------------------------------
# Stopping, streaming text


def test_eos_stops_with_stop(model, engine):
    prompt = TOK.encode("the cat")
    ref = reference_greedy(model, prompt, 20)
    eos = ref[5]
    expected = ref[: ref.index(eos)]
    for eng, params in [
        (Engine(model, TOK, eos_ids=[eos]), greedy(max_new_tokens=20)),
        (engine, greedy(max_new_tokens=20, stop_token_ids=[eos])),
    ]:
        out = eng.generate(prompt, params)
        assert out.token_ids == expected and out.finish_reason == "stop"
    tokenizer_eos = Engine(Scripted(TOK.encode("hi") + [TOK.eos_id, 5]), TOK).generate([1], greedy())
    assert tokenizer_eos.text == "hi" and tokenizer_eos.finish_reason == "stop"


def test_stream_never_splits_a_character():
    script = TOK.encode(TEXT)
    assert any("\ufffd" in TOK.decode([t]) for t in script)  # the test means something only if characters are split
    stream = Engine(Scripted(script), TOK).stream([1], greedy(max_new_tokens=len(script)))
    assert isinstance(stream, Stream) and stream.prompt_tokens == 1
    pieces = list(stream)
    assert len(pieces) == len(script) and [p.token_id for p in pieces] == script
    assert all("\ufffd" not in p.text for p in pieces)
    assert "".join(p.text for p in pieces) == TEXT
    assert [p.finish_reason for p in pieces] == [None] * (len(script) - 1) + ["length"]


def test_stream_keeps_spaces_of_a_sentencepiece_style_decoder():
    # Metaspace decoders drop the leading space of the first token decoded, so decoding each new
    # token on its own would glue words together; the prefix offset keeps one token of context.
    vocab = {w: i for i, w in enumerate(["<unk>", "▁hello", "▁big", "▁world", "!"])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()

    class SentencePieceLike:
        eos_ids: list = []

        def decode(self, ids, skip_special=False):
            return hf.decode(ids, skip_special_tokens=skip_special)

    script = [1, 2, 3, 4]  # ▁hello ▁big ▁world !
    pieces = list(Engine(Scripted(script), SentencePieceLike()).stream([1], greedy(max_new_tokens=len(script))))
    assert [p.text for p in pieces] == ["hello", " big", " world", "!"]


@pytest.mark.parametrize("stop", ["END", "ö", "😀 世", "wörld 😀", "tail", "l"])
def test_stop_string_cuts_exactly_and_never_leaks(stop):
    script = TOK.encode(TEXT)
    engine = Engine(Scripted(script), TOK)
    params = greedy(max_new_tokens=40, stop=[stop, "never there"])
    pieces = list(engine.stream([1], params))
    streamed = [p.text for p in pieces]
    expected = TEXT[: TEXT.index(stop)]
    assert "".join(streamed) == expected and pieces[-1].finish_reason == "stop"
    assert all(stop not in "".join(streamed[: i + 1]) for i in range(len(streamed)))
    out = engine.generate([1], params)
    assert out.text == expected and out.finish_reason == "stop"
    assert TOK.decode(out.token_ids).startswith(TEXT[: TEXT.index(stop) + len(stop)])  # ids run through the stop


def test_held_back_stop_prefix_is_released_when_it_is_not_a_stop():
    script = TOK.encode(TEXT)
    engine = Engine(Scripted(script), TOK)
    pieces = list(engine.stream([1], greedy(max_new_tokens=len(script), stop=["ENDING", "tails"])))
    assert "".join(p.text for p in pieces) == TEXT
    assert pieces[-1].finish_reason == "length"
    # "END" could start "ENDING": nothing of it is shown at the step that completes it...
    k = next(i for i in range(len(script)) if "END" in TOK.decode(script[: i + 1]))
    assert "".join(p.text for p in pieces[: k + 1]) == TEXT[: TEXT.index("END")]
    # ...and "tail" could start "tails" until the sequence ends and flushes it.
    assert pieces[-1].text == "tail"


def test_max_new_tokens_and_context_limit(engine):
    out = engine.generate(TOK.encode("the"), greedy(max_new_tokens=3))
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    near_full = [TOK.encode("a")[0]] * (CFG.max_seq_len - 4)
    out = engine.generate(near_full, greedy(max_new_tokens=100))
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_overlong_prompt_raises(engine):
    n = CFG.max_seq_len
    with pytest.raises(LlmosError, match=f"prompt is {n} tokens but the context limit is {n}; shorten it or use"):
        engine.generate([5] * CFG.max_seq_len, greedy())
    with pytest.raises(LlmosError, match="prompt 1 is 70 tokens"):
        engine.generate_batch([[5], [5] * 70], greedy())
    with pytest.raises(LlmosError, match="empty"):
        engine.stream([], greedy())  # raised on the call, not on the first next()
    with pytest.raises(LlmosError, match="outside"):
        engine.generate([CFG.vocab_size], greedy())


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("temperature", -1, ">= 0"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_k", -1, ">= 0"),
        ("min_p", 1.1, "[0, 1]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("presence_penalty", 3.0, "[-2, 2]"),
        ("max_new_tokens", 0, ">= 1"),
        ("logprobs", 21, "[0, 20]"),
        ("stop", [""], "non-empty"),
        ("stop", None, "list"),
        ("stop_token_ids", [-1], ">= 0"),
        ("seed", 1.5, "integer"),
    ],
)
def test_validate(field, value, allowed):
    params = SamplingParams(**{field: value})
    with pytest.raises(LlmosError) as err:
        params.validate()
    msg = str(err.value)
    assert msg.startswith(field) and allowed in msg and repr(value) in msg and "\n" not in msg
    SamplingParams().validate()


# ----------------------------------------------------------------------------
# Chat


def conversation():
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "the cat sat on the mat"},
        {"role": "assistant", "content": "the dog ate the food"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "emoji 😀"},
    ]


def test_fit_messages_drops_oldest_turns_and_counts_them():
    msgs = conversation()

    def n(ms):
        return len(TOK.encode_chat(ms))

    assert fit_messages(TOK, msgs, n(msgs) + 10, 10) == (msgs, 0)
    without_first = [msgs[0]] + msgs[3:]
    assert fit_messages(TOK, msgs, n(without_first) + 10, 10) == (without_first, 2)
    assert fit_messages(TOK, msgs, n(without_first) + 9, 10) == ([msgs[0], msgs[5]], 4)
    with pytest.raises(LlmosError, match="context limit is"):
        fit_messages(TOK, msgs, n([msgs[0], msgs[5]]) + 9, 10)


def test_chat_reports_dropped_messages(model):
    engine = Engine(model, TOK)
    out = engine.chat(conversation(), greedy(max_new_tokens=8))
    assert out.dropped == 4 and out.notice == f"dropped 4 oldest messages to fit the {CFG.max_seq_len}-token context"
    assert out.prompt_tokens == len(TOK.encode_chat([conversation()[0], conversation()[5]]))
    short = [{"role": "user", "content": "hi"}]
    stream = engine.chat(short, greedy(max_new_tokens=5), stream=True)
    assert stream.notice is None and stream.dropped == 0
    assert "".join(p.text for p in stream) == engine.chat(short, greedy(max_new_tokens=5)).text
