"""Speculative decoding (llmos/speculative.py) on conftest's tiny random models, in float64.

References: the engine's plain loop and an argmax over full forwards (greedy must match token for
token), and for sampling the target's exact next-token distributions, enumerated over every
prefix of a vocabulary of 8 and compared with empirical frequencies by a chi-square bound.
"""

import copy
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from llmos.engine import Engine, SamplingParams, warp
from llmos.errors import LlmosError
from llmos.model import Transformer
from llmos.speculative import Draft
from llmos.tokenizer import Tokenizer
from conftest import tiny_model, word_tokenizer

torch.set_num_threads(1)


def tiny(vocab: int, seed: int, layers: int = 2, sharpen: float = 1.0) -> Transformer:
    """float64, so that one forward over k+1 positions and k+1 forwards of one agree to the last bit
    that an argmax can see."""
    model = tiny_model(seed, vocab_size=vocab, n_layers=layers, max_seq_len=128).double()
    with torch.no_grad():
        model.head.weight *= sharpen
    return model


V = 64
TOK = word_tokenizer(V)
TARGET = tiny(V, 0)
OTHER = tiny(V, 1, layers=1)
PROMPTS = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in range(1, 12, 2)]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)


def argmax_reference(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_greedy_is_the_targets_greedy_output(k):
    plain = Engine(TARGET, TOK)
    same, other = Draft(TARGET, TOK, k), Draft(OTHER, TOK, k)
    for prompt in PROMPTS:
        want = plain.generate(prompt, GREEDY).token_ids
        for draft in (same, other):
            got = Engine(TARGET, TOK, draft=draft).generate(prompt, GREEDY)
            assert got.token_ids == want and got.finish_reason == "length"
    assert want == argmax_reference(TARGET, PROMPTS[-1], 16)  # the plain loop itself, against no cache at all
    # The same weights always agree; an unrelated model rarely does.
    assert same.stats.acceptance == 1.0 and same.stats.tokens == 16 * len(PROMPTS)
    # Prefill makes the first token, then each round k + 1: ceil(15 / (k + 1)) rounds.
    assert same.stats.tokens_per_forward == 16 / (1 + -(-15 // (k + 1)))
    assert other.stats.acceptance < 0.3 and 1.0 <= other.stats.tokens_per_forward < 1.5


def test_streaming_matches_and_logprobs_are_the_targets():
    params = SamplingParams(temperature=0.0, max_new_tokens=10, logprobs=2)
    want = Engine(TARGET, TOK).generate(PROMPTS[4], params)
    engine = Engine(TARGET, TOK, draft=Draft(OTHER, TOK, 3))
    got = engine.generate(PROMPTS[4], params)
    assert got.token_ids == want.token_ids and got.text == want.text
    for a, b in zip(got.logprobs, want.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-9) and [t.token_id for t in a.top] == [t.token_id for t in b.top]
    assert "".join(p.text for p in engine.stream(PROMPTS[4], params)) == want.text


def test_eos_and_token_budget_cut_inside_an_accepted_run():
    prompt = PROMPTS[3]
    run = argmax_reference(TARGET, prompt, 12)
    eos = run[5]
    cut = run.index(eos)  # the first time the target says it
    assert cut >= 2
    draft = Draft(TARGET, TOK, 7)  # accepts everything: the stop falls inside a run of 8
    got = Engine(TARGET, TOK, eos_ids=[eos], draft=draft).generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=12))
    assert got.token_ids == run[:cut] and got.finish_reason == "stop"
    got = Engine(TARGET, TOK, draft=draft).generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=5))
    assert got.token_ids == run[:5] and got.finish_reason == "length"
    got = Engine(TARGET, TOK, draft=draft).generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=1))
    assert got.token_ids == run[:1]


def test_penalties_take_the_plain_loop():
    params = SamplingParams(temperature=0.0, max_new_tokens=12, repetition_penalty=1.5)
    draft = Draft(OTHER, TOK, 4)
    got = Engine(TARGET, TOK, draft=draft).generate(PROMPTS[3], params)
    assert got.token_ids == Engine(TARGET, TOK).generate(PROMPTS[3], params).token_ids
    assert draft.stats.target_forwards == 0


def test_the_draft_must_share_the_vocabulary():
    with pytest.raises(LlmosError, match="32-token vocabulary but the target has 64.*same tokenizer"):
        Engine(TARGET, TOK, draft=Draft(tiny(32, 2), word_tokenizer(32)))
    other_words = Tokenizer(HFTokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0")))
    with pytest.raises(LlmosError, match="tokenizer differs"):
        Engine(TARGET, TOK, draft=Draft(OTHER, other_words))
    with pytest.raises(LlmosError, match="--draft-tokens must be an integer >= 1"):
        Draft(OTHER, TOK, 0)


# ----------------------------------------------------------------------------
# Sampling: the output distribution is the target's


def exact_marginals(models, prompt, params):
    """P(token at step s) when models[s] makes it, by enumerating every prefix of a tiny vocabulary."""
    vocab = models[0].cfg.vocab_size
    prefixes, weights, out = [[]], torch.ones(1, dtype=torch.float64), []
    with torch.no_grad():
        for model in models:
            logits = model(torch.tensor([prompt + p for p in prefixes]))[:, -1]
            probs = warp(logits, params).softmax(-1)  # [prefixes, vocab]
            joint = weights[:, None] * probs
            out.append(joint.sum(0))
            prefixes = [p + [t] for p in prefixes for t in range(vocab)]
            weights = joint.reshape(-1)
    return out


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    live = probs > 0
    return float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())


def test_sampling_has_the_targets_distribution():
    vocab, n = 8, 800
    tok = word_tokenizer(vocab)
    target = tiny(vocab, 3, layers=1, sharpen=4.0)
    draft_model = copy.deepcopy(target)  # a cheaper model's guesses: the target's, perturbed
    with torch.no_grad():
        draft_model.head.weight += 0.4 * torch.randn(draft_model.head.weight.shape, generator=torch.Generator().manual_seed(0))
    draft = Draft(draft_model, tok, 2)
    engine = Engine(target, tok, draft=draft)
    prompt = [1, 5, 2]
    params = dict(temperature=1.3, top_k=6, max_new_tokens=4)  # tokens 2-4 come from one round of k=2
    counts = torch.zeros(3, vocab, dtype=torch.float64)
    for seed in range(n):
        ids = engine.generate(prompt, SamplingParams(seed=seed, **params)).token_ids
        for s in range(3):
            counts[s, ids[s + 1]] += 1
    assert 0.2 < draft.stats.acceptance < 0.9, draft.stats  # guesses are both accepted and rejected
    want = exact_marginals([target] * 4, prompt, SamplingParams(**params))[1:]
    # 7 degrees of freedom (fewer where top-k removed tokens): P(chi2 > 24.3) = 0.001.
    for s in range(3):
        assert (counts[s][want[s] == 0] == 0).all()  # tokens top-k removes are never drawn
        assert chi_square(counts[s], want[s]) < 24.3, (s, counts[s], want[s] * n)
    # The test can fail: accepting every guess would draw the second token from the draft, and that is far off.
    wrong = exact_marginals([target, draft_model], prompt, SamplingParams(**params))[1]
    assert chi_square(counts[0], wrong) > 100


def test_cli_draft_flag(tmp_path, capsys):
    from tokenizers import pre_tokenizers

    from llmos.cli import main
    from llmos.formats import Checkpoint, hf

    tok = word_tokenizer(V)
    tok.hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    target, draft = tmp_path / "target", tmp_path / "draft"
    for model, path in ((TARGET, target), (OTHER, draft)):
        hf.write(Checkpoint(model.cfg, {k: v.float() for k, v in model.state_dict().items()}, tok, {}), path, "f32")
    argv = ["run", target, "t1 t2 t3", "--temperature", "0", "--max-tokens", "12", "--engine", "torch"]
    assert main([str(a) for a in argv]) == 0
    plain = capsys.readouterr().out
    assert main([str(a) for a in argv + ["--draft", draft, "--draft-tokens", "3"]]) == 0
    out, err = capsys.readouterr()
    assert out == plain and len(plain.split()) == 12 and "speculative decoding:" in err and "draft tokens accepted" in err
