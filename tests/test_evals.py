"""Evals: the Task shape, perplexity and bits per byte, multiple choice by log-likelihood, GSM8K answers.

A tiny model and tokenizer made here; hand computations and rigged models as references.
Run with OMP_NUM_THREADS=1.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmos.errors import LlmosError
from llmos.evals import ARC, GSM8K, Contains, Perplexity, extract_answer, get_task
from llmos.evals import run as E
from llmos.formats import Checkpoint, hf
from llmos.model import Config, Transformer
from llmos.tokenizer import Tokenizer
from llmos.train.tokenizer_train import save, train_bpe
from llmos import cli

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TEXT = "The quick brown fox jumps over the lazy dog. Déjà vu — 😀 twice!\nA second line of text here.\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("evals")


@pytest.fixture(scope="module")
def tiny(root):
    save(train_bpe([TEXT * 20, "Question: Answer: red blue green sky grass"], 300), root / "tok")
    tok = Tokenizer.from_hf_dir(root / "tok")
    cfg = Config(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                 max_seq_len=64, tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.embed.weight.mul_(0.1)
    hf.write(Checkpoint(cfg, model.state_dict(), tok, {"format": "hf"}), root / "model", "f32")
    return model, tok, root / "model"


# ----------------------------------------------------------------------------
# Perplexity


def brute_force_nats(model, ids, context, stride) -> float:
    """Each token t >= 1 predicted from ids[begin:t], for the first begin = k * stride with t - begin <= context."""
    total, done = 0.0, 1
    for begin in range(0, len(ids), stride):
        end = min(begin + context + 1, len(ids))
        for t in range(done, end):
            with torch.no_grad():
                logits = model(torch.tensor([ids[begin:t]]))[0, -1]
            total -= F.log_softmax(logits.float(), -1)[ids[t]].item()
        done = max(done, end)
        if end == len(ids):
            break
    return total


@pytest.mark.parametrize("context, stride", [(64, 32), (16, 8), (16, 16), (10, 3), (5, 1)])
def test_perplexity_equals_manual_computation(tiny, tmp_path, context, stride):
    model, tok, _ = tiny
    text = TEXT[:60]
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    report = E.evaluate(Perplexity(tmp_path / "t.txt"), model, tok, context=context, stride=stride)
    ids = [tok.bos_id] + tok.encode(text, add_bos=False)
    assert len(ids) > 20 and report["tokens"] == len(ids) - 1  # every text token scored once
    nats = brute_force_nats(model, ids, context, stride)
    assert report["nats_per_token"] * report["tokens"] == pytest.approx(nats, rel=1e-5)
    assert report["bytes"] == len(text.encode()) and report["bytes"] > len(text)  # é, —, 😀 are several bytes
    assert report["bits_per_byte"] == pytest.approx(nats / len(text.encode()) / math.log(2), rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-5)


def test_whole_text_in_one_window_is_one_forward(tiny):
    model, tok, _ = tiny
    ids = [tok.bos_id] + tok.encode(TEXT[:40], add_bos=False)
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
    want = -lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
    nats, n = E.text_nll(model, ids, context=64, stride=32)
    assert n == len(ids) - 1 and nats == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------
# Multiple choice


class Rigged(nn.Module):
    """Logits that ignore the context: log p(token) = log_softmax(bias)[token] at every position."""

    def __init__(self, bias):
        super().__init__()
        self.bias = nn.Parameter(bias)
        self.cfg = Config(vocab_size=len(bias), dim=8, n_layers=1, n_heads=1, hidden_dim=8, max_seq_len=64)

    def forward(self, x):
        return self.bias.expand(*x.shape, -1)


def arc_file(path: Path, rows) -> Path:
    lines = [{"id": f"q{i}", "question": {"stem": stem, "choices": [{"text": t, "label": l} for t, l in zip(texts, "ABCD")]},
              "answerKey": key} for i, (stem, texts, key) in enumerate(rows)]
    path.write_text("\n".join(map(json.dumps, lines)))
    return path


def test_arc_scorer_picks_the_choice_the_model_prefers(tiny, tmp_path):
    _, tok, _ = tiny
    bias = torch.full((tok.vocab_size,), -5.0)
    favourite = tok.encode(" blue", add_bos=False)
    bias[favourite] = 5.0
    model = Rigged(bias)
    f = arc_file(tmp_path / "arc.jsonl", [("What colour is the sky?", ["red", "blue", "green"], "B"),
                                          ("What colour is grass?", ["red", "blue", "green"], "C")])
    report = E.evaluate(ARC(f), model, tok)
    assert [r["score"] for r in report["results"]] == [1.0, 0.0] and report["accuracy"] == 0.5
    # log-probabilities are the hand sums of the rigged per-token log-probs
    lp = F.log_softmax(bias, -1)
    for choice, got in zip(["red", "blue", "green"], report["results"][0]["logprobs"]):
        assert got == pytest.approx(sum(lp[t].item() for t in tok.encode(" " + choice, add_bos=False)), rel=1e-6)
    assert ARC(f).score({"answer": 2}, [-3.0, -2.0, -1.0]) == 1.0


def test_length_normalization_can_change_the_pick(tiny, tmp_path):
    _, tok, _ = tiny
    short, long = " red", " The quick brown fox jumps over the lazy dog"
    n_short, n_long = len(tok.encode(short, add_bos=False)), len(tok.encode(long, add_bos=False))
    assert n_long > n_short and n_long / len(long) < n_short / len(short)  # fewer tokens per character
    model = Rigged(torch.zeros(tok.vocab_size))  # uniform: every token costs log V
    f = arc_file(tmp_path / "arc.jsonl", [("Pick", [short[1:], long[1:]], "B")])
    report = E.evaluate(ARC(f), model, tok)
    assert report["results"][0]["logprobs"] == pytest.approx([-n * math.log(tok.vocab_size) for n in (n_short, n_long)])
    assert report["accuracy"] == 0.0  # the short choice has the higher total log-probability
    assert report["accuracy_norm"] == 1.0  # the long one the higher log-probability per character


def test_bad_arc_row(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": {"stem": "x", "choices": []}, "answerKey": "A"}))
    with pytest.raises(LlmosError, match="line 1 is not an ARC question"):
        list(ARC(tmp_path / "bad.jsonl").examples())


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_real_arc_and_gsm8k_files():
    arc = list(ARC(DATA / "eval/arc_easy_test.jsonl").examples())
    assert len(arc) == 2376 and all(0 <= e["answer"] < len(e["choices"]) for e in arc)
    assert arc[0]["context"].startswith("Question: Which statement best explains") and arc[0]["answer"] == 0
    gsm = list(GSM8K(DATA / "math/gsm8k_test.jsonl").examples())
    assert len(gsm) == 1319 and gsm[0]["answer"] == "18" and all(e["answer"] is not None for e in gsm)


# ----------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize("text, number", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("The answer is $1,234.", "1234"),
    ("So it costs 3.50 dollars, and 2 more... total -3.0", "-3"),
    ("x = 0.5", "0.5"),
    ("#### 42 apples. Earlier I said 7.", "42"),
    ("first 12 then 15.", "15"),
    ("I do not know.", None),
    ("#### $5.00 in all", "5"),
    ("It is 6. ####", "6"),  # nothing after the marker: the last number
])
def test_extract_answer(text, number):
    assert extract_answer(text) == number


def test_gsm8k_scores_exact_number(tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}) + "\n")
    task = GSM8K(f)
    (ex,) = task.examples()
    assert ex["answer"] == "4" and ex["messages"][0]["content"].startswith("2 + 2?")
    assert task.score(ex, "It is 4.0") == 1.0 and task.score(ex, "It is 40") == 0.0
    assert task.score(ex, "2 + 2 = 4, so #### 4") == 1.0 and task.score(ex, "") == 0.0
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "no marker"}))
    with pytest.raises(LlmosError, match="line 1 is not a GSM8K problem"):
        list(GSM8K(tmp_path / "bad.jsonl").examples())


# ----------------------------------------------------------------------------
# Generation tasks and the command


def test_generate_task_runs_greedy_batches(tiny, tmp_path):
    model, tok, _ = tiny
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q}]}) for q in ["sky?", "grass?", "fox?"]))
    report = E.evaluate(Contains(f, "e"), model, tok, batch_size=2, max_new_tokens=6)
    from llmos.engine import Engine, SamplingParams

    engine = Engine(model, tok)
    for r, q in zip(report["results"], ["sky?", "grass?", "fox?"]):
        alone = engine.generate(tok.encode_chat([{"role": "user", "content": q}]), SamplingParams(temperature=0, max_new_tokens=6))
        assert r["output"] == alone.text and r["score"] == float("e" in alone.text.lower())
    assert report["accuracy"] == sum(r["score"] for r in report["results"]) / 3


def test_eval_command(tiny, tmp_path, capsys):
    _, _, model_dir = tiny
    (tmp_path / "t.txt").write_text(TEXT)
    out = tmp_path / "r.json"
    assert cli.main(["eval", str(model_dir), "--task", "ppl", "--data", str(tmp_path / "t.txt"), "--out", str(out),
                   "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["task"] == "ppl" and f"bits_per_byte   {report['bits_per_byte']:.4f}" in printed
    assert cli.main(["eval", str(model_dir), "--task", "mmlu", "--data", "x"]) == 2
    assert "unknown task 'mmlu'" in capsys.readouterr().err
    # flags may come before the model too
    assert cli.main(["eval", "--task", "ppl", "--model", str(model_dir), "--data", str(tmp_path / "t.txt"), "--no-progress"]) == 0
    assert f"bits_per_byte   {report['bits_per_byte']:.4f}" in capsys.readouterr().out
    with pytest.raises(LlmosError, match="task arc needs --data FILE"):
        get_task("arc", "")
