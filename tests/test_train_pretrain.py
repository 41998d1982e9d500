"""Stage 0-1: tokenizer training, token shards and batches, pretraining, exact resume, DDP.

Tiny and hermetic: a synthetic corpus and a tokenizer trained here, 1-layer models of
width 32, tens of steps. Run with OMP_NUM_THREADS=1.
"""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmos import cli
from llmos.errors import LlmosError
from llmos.model import Config, Transformer
from llmos.train import data as D
from llmos.options import make_config
from llmos.train import pretrain as P
from llmos.train.tokenizer_train import SPECIAL_TOKENS, save, train_bpe

ROOT = Path(__file__).resolve().parents[1]


def synthetic_text(n_sentences=1500, seed=0) -> str:
    rng = np.random.default_rng(seed)
    nouns, verbs, adjs = ["cat", "dog", "king", "queen", "bird", "fish"], ["sees", "likes", "eats", "follows"], ["old", "red", "small", "brave"]
    lines = [f"the {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}." for _ in range(n_sentences)]
    return "\n".join(lines) + "\nune forêt, déjà vue — ünïcödé 123\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "text.txt").write_text(synthetic_text(), encoding="utf-8")
    save(train_bpe([synthetic_text()], 300), d / "tok")
    return d


def config(corpus, out, **kw) -> P.PretrainConfig:
    base = dict(data=str(corpus / "text.txt"), out=str(out), tokenizer=str(corpus / "tok"), depth=1, aspect_ratio=32,
                head_dim=16, seq_len=16, batch_size=4, steps=12, lr=1e-2, warmup_steps=2, eval_every=4,
                save_every=4, progress=False)
    return P.PretrainConfig(**{**base, **kw})


def state(out) -> dict:
    return torch.load(Path(out) / "trainer_state.pt", weights_only=False)


# ----------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_roundtrip_specials_and_transformers(corpus):
    from llmos.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(corpus / "tok")
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.bos_id == tok.eos_id == 0 and tok.pad_id == 3 and not tok.add_bos
    text = "the brave queen — déjà 😀 12345\n\n  x"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level: exact bytes back, even for unseen characters
    assert tok.encode("<|im_start|>user")[0] == 1  # special text is one special token
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.render_chat(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(corpus / "tok"))
    assert ref(text, add_special_tokens=True)["input_ids"] == ids
    assert ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.render_chat(msgs)
    assert (ref.bos_token, ref.eos_token, ref.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")


def test_tokenizer_too_small_vocab():
    with pytest.raises(LlmosError, match="too small"):
        train_bpe(["abc"], 100)


# ----------------------------------------------------------------------------
# Data: bad input, split, shards, batches


def test_empty_and_non_utf8_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(LlmosError, match=r"empty\.txt: empty corpus"):
        D.read_documents(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf".encode() + "é au lait".encode("latin-1"))
    with pytest.raises(LlmosError, match=r"latin1\.txt: not UTF-8 .*0xe9 at byte offset 3"):
        D.read_documents(tmp_path / "latin1.txt")
    (tmp_path / "rows.jsonl").write_bytes(b'{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(LlmosError, match=r"rows\.jsonl: line 2 \(byte offset 15\)"):
        D.read_documents(tmp_path / "rows.jsonl")
    with pytest.raises(LlmosError, match="no such file"):
        D.read_documents(tmp_path / "missing.txt")


def test_split_holds_out_last_lines_with_exact_bytes(tmp_path, corpus):
    from llmos.tokenizer import Tokenizer

    text = "première ligne\n" * 9 + "la dernière ligne, tenue à part\n"
    train, val = D.split_documents([text], 0.1)
    assert "".join(train + val) == text and val == ["la dernière ligne, tenue à part\n"]
    (tmp_path / "c.txt").write_text(text)
    tok = Tokenizer.from_hf_dir(corpus / "tok")
    c = D.prepare(tmp_path / "c.txt", tok, tmp_path / "shards", 0.1)
    assert c.val_bytes == len(val[0].encode()) == 34
    assert c.train.dtype == np.uint16 and list(c.val) == [0] + tok.encode(val[0])  # separator, then the text
    assert D.prepare(tmp_path / "c.txt", tok, tmp_path / "shards", 0.1).meta == c.meta  # cached
    with pytest.raises(LlmosError, match="too small"):
        D.split_documents(["one line"], 0.01)


def test_batches_resume_and_rank_slices():
    tokens = np.arange(1000, dtype=np.uint16)
    a = D.Batches(tokens, 8, 4, seed=3)
    for _ in range(40):  # past the first epoch (124 windows)
        next(a)
    saved = a.state_dict()
    after = [next(a) for _ in range(5)]
    b = D.Batches(tokens, 8, 4, seed=3)
    b.load_state_dict(saved)
    for (x1, y1), (x2, y2) in zip(after, (next(b) for _ in range(5))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(x1[:, 1:], y1[:, :-1])
    one = D.Batches(tokens, 8, 4, seed=3)
    ranks = [D.Batches(tokens, 8, 2, rank=r, world=2, seed=3) for r in (0, 1)]
    for _ in range(3):
        x, _ = next(one)
        assert torch.equal(x, torch.cat([next(r)[0] for r in ranks]))
    first_epoch = D.Batches(tokens, 8, 1, seed=3)
    starts = sorted(int(next(first_epoch)[0][0, 0]) for _ in range(999 // 8))
    assert starts == list(range(0, 992, 8))  # every window of the epoch once


# ----------------------------------------------------------------------------
# Evaluation: bits per byte by hand


class Unigram(torch.nn.Module):
    """Predicts the same distribution at every position, so each target's cost is known by hand."""

    def __init__(self, probs):
        super().__init__()
        self.logp = torch.tensor(probs).log()

    def forward(self, x):
        return self.logp.expand(*x.shape, -1)


def test_bpb_matches_hand_computation():
    tokens = np.array([0, 1, 2, 3, 1, 0, 0, 2, 3, 1, 0])
    # targets 1 2 3 1 0 0 2 3 1 0 cost 2+3+3+2+1+1+3+3+2+1 = 21 bits with p = 1/2, 1/4, 1/8, 1/8
    for seq_len, batch in [(3, 2), (4, 1), (100, 8)]:  # windows 3+3+3+1, 4+4+2, one of 10
        loss, bpb = P.evaluate(Unigram([0.5, 0.25, 0.125, 0.125]), tokens, 7, seq_len, batch)
        assert bpb == pytest.approx(21 / 7) and loss == pytest.approx(21 * math.log(2) / 10)
    torch.manual_seed(0)
    model = Transformer(Config(vocab_size=4, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_seq_len=16))
    loss, _ = P.evaluate(model, tokens, 7, 16, 1)
    x = torch.from_numpy(tokens).long()
    assert loss == pytest.approx(F.cross_entropy(model(x[None, :-1])[0], x[1:]).item(), rel=1e-6)


# ----------------------------------------------------------------------------
# Pretraining


def test_loss_falls_and_outputs_load_back(corpus, tmp_path):
    from llmos.formats import read_checkpoint

    summary = P.pretrain(config(corpus, tmp_path / "run", steps=40, eval_every=20, save_every=0))
    losses = state(tmp_path / "run")["history"]["train_loss"]
    assert np.mean(losses[-5:]) < losses[0] - 1.5  # from about ln(300) = 5.7
    assert summary["val_loss"] < summary["train_loss"] + 0.5 and summary["steps"] == 40
    assert summary["val_bpb"] > 0 and summary["tokens"] == 40 * 4 * 16 and summary["params"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["val_bpb"] == summary["val_bpb"]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = read_checkpoint(tmp_path / "run")
    trained = Transformer(ckpt.config)
    trained.load_state_dict(state(tmp_path / "run")["model"])
    loaded = Transformer(ckpt.config)
    loaded.load_state_dict(ckpt.state_dict)
    ids = torch.tensor([ckpt.tokenizer.encode("the old cat sees the red fish.")])
    assert torch.equal(loaded(ids), trained(ids))
    assert 2 in ckpt.meta["eos_token_ids"]  # <|im_end|> stops generation too


def test_resume_is_exact_after_pause_and_crash(corpus, tmp_path, monkeypatch):
    P.pretrain(config(corpus, tmp_path / "straight"))
    reference = state(tmp_path / "straight")

    P.pretrain(config(corpus, tmp_path / "paused", stop_at=5))
    assert state(tmp_path / "paused")["step"] == 5
    assert P.pretrain(config(corpus, tmp_path / "paused", stop_at=5))["steps"] == 5  # already there: no step taken
    P.pretrain(config(corpus, tmp_path / "paused"))

    real = P.lr_factor

    def crash_at_step_7(step, total, cfg):
        if step == 6:
            raise RuntimeError("simulated crash")
        return real(step, total, cfg)

    monkeypatch.setattr(P, "lr_factor", crash_at_step_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        P.pretrain(config(corpus, tmp_path / "crashed"))
    assert state(tmp_path / "crashed")["step"] == 4  # the last checkpoint before the crash
    monkeypatch.setattr(P, "lr_factor", real)
    P.pretrain(config(corpus, tmp_path / "crashed"))

    for out in ("paused", "crashed"):
        resumed = state(tmp_path / out)
        assert resumed["history"] == reference["history"]  # every step's loss and every validation, bit for bit
        for k, v in reference["model"].items():
            assert torch.equal(resumed["model"][k], v)
    assert P.pretrain(config(corpus, tmp_path / "straight"))["steps"] == 12  # finished: nothing to do


def test_resume_with_another_config_is_refused(corpus, tmp_path):
    P.pretrain(config(corpus, tmp_path / "run", stop_at=2))
    with pytest.raises(LlmosError, match=r"holds a run with depth = 1, not 2"):
        P.pretrain(config(corpus, tmp_path / "run", depth=2))
    with pytest.raises(LlmosError, match=r"lr = 0.01, not 0.02"):
        P.pretrain(config(corpus, tmp_path / "run", lr=0.02))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(LlmosError, match="holds no unfinished pretraining run"):
        P.pretrain(config(corpus, tmp_path / "other"))


def test_gradient_accumulation_matches_one_batch(corpus, tmp_path):
    P.pretrain(config(corpus, tmp_path / "whole", steps=4, eval_every=0))
    P.pretrain(config(corpus, tmp_path / "accum", steps=4, eval_every=0, micro_batch=2))
    a, b = state(tmp_path / "whole")["history"], state(tmp_path / "accum")["history"]
    assert np.allclose(a["train_loss"], b["train_loss"], rtol=0, atol=1e-5)


def test_minutes_budget_fits_the_schedule(corpus, tmp_path):
    summary = P.pretrain(config(corpus, tmp_path / "run", steps=0, minutes=0.04, eval_every=0, save_every=0))
    assert summary["total_steps"] == summary["steps"] >= P.CALIBRATE
    assert summary["wall_s"] < 0.04 * 60 * 1.1 + 1.0


def test_schedules():
    cfg = P.PretrainConfig(warmup_steps=10, min_lr_frac=0.1, decay_frac=0.2)
    assert P.lr_factor(0, 100, cfg) == pytest.approx(0.1) and P.lr_factor(9, 100, cfg) == 1.0
    assert P.lr_factor(55, 100, cfg) == pytest.approx(0.55)  # cosine half way: (1 + 0.1) / 2
    wsd = replace(cfg, schedule="wsd")
    assert P.lr_factor(79, 100, wsd) == 1.0 and P.lr_factor(90, 100, wsd) == pytest.approx(0.55)


def test_recipe_flags_and_bad_keys(tmp_path):
    cfg = make_config(P.PretrainConfig, {"depth": 2}, ROOT / "recipes" / "pretrain_tiny.toml")
    assert cfg.depth == 2 and cfg.minutes == 10.0 and cfg.vocab_size == 2048  # the flag wins, the recipe fills in
    cfg = make_config(P.PretrainConfig, {"steps": 50}, ROOT / "recipes" / "pretrain_tiny.toml")
    assert (cfg.steps, cfg.minutes) == (50, 0.0)  # --steps replaces the recipe's time budget
    (tmp_path / "bad.toml").write_text("depht = 3\n")
    with pytest.raises(LlmosError, match="unknown key 'depht'"):
        make_config(P.PretrainConfig, {}, tmp_path / "bad.toml")
    (tmp_path / "typed.toml").write_text('lr = "fast"\n')
    with pytest.raises(LlmosError, match="lr = 'fast' should be a float"):
        make_config(P.PretrainConfig, {}, tmp_path / "typed.toml")
    assert cli.main(["train", "pretrain", "--data", "x.txt", "--out", str(tmp_path / "o")]) == 2  # neither --steps nor --minutes


def test_defaults_are_the_measured_recipe():
    # bench/results/pretrain_sweep_2min*.json: depth 3 won at 2 and 10 minutes; the recipe keeps only its budget
    cfg = P.PretrainConfig()
    assert (cfg.depth, cfg.vocab_size, cfg.seq_len, cfg.batch_size, cfg.lr, cfg.warmup_steps) == (3, 2048, 256, 16, 3e-3, 50)
    assert P.model_config(cfg, 2048).num_params() == 1_721_664  # the sweep's depth-3 model
    assert make_config(P.PretrainConfig, {}, ROOT / "recipes" / "pretrain_tiny.toml") == P.PretrainConfig(minutes=10.0)


def test_a_run_that_does_not_fit_is_refused_before_any_step(corpus, tmp_path, monkeypatch, capsys):
    from llmos import planner
    from llmos.tokenizer import Tokenizer

    cfg = config(corpus, tmp_path / "run")  # 4 rows per pass
    vocab = Tokenizer.from_hf_dir(corpus / "tok").hf.get_vocab_size(with_added_tokens=True)
    mcfg = P.model_config(cfg, vocab)
    need = {m: planner.plan(mcfg, "f32", 16, m, "full")["peak"] for m in (1, 2, 4)}
    monkeypatch.setattr(planner, "machine", lambda: {"ram_total": 10**10, "ram_available": need[1], "gpus": []})
    with pytest.raises(LlmosError, match=rf"needs {planner.gb(need[4])} .* pass --micro-batch 1 to make it fit"):
        P.pretrain(cfg)
    assert "does not fit in RAM" in capsys.readouterr().err and not (tmp_path / "run" / "trainer_state.pt").exists()
    monkeypatch.setattr(planner, "machine", lambda: {"ram_total": 10**10, "ram_available": 1000, "gpus": []})
    with pytest.raises(LlmosError, match="nothing these flags can change makes it fit"):
        P.pretrain(cfg)
    monkeypatch.undo()
    assert P.pretrain(replace(cfg, micro_batch=1, steps=2, eval_every=0, save_every=0))["steps"] == 2
    assert "fits in RAM" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Distributed: 2 gloo processes = 1 process on the same global batch


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_one(corpus, tmp_path):
    flags = ["--data", str(corpus / "text.txt"), "--tokenizer", str(corpus / "tok"), "--depth", "1",
             "--aspect-ratio", "32", "--head-dim", "16", "--seq-len", "16", "--batch-size", "4", "--steps", "5",
             "--lr", "0.01", "--warmup-steps", "2", "--eval-every", "5", "--no-progress"]
    P.pretrain(config(corpus, tmp_path / "one", steps=5, eval_every=5))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "llmos", "train", "pretrain",
                           *flags, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = state(tmp_path / "one"), state(tmp_path / "two")
    assert two["config"]["micro_batch"] == 0 and "2 x 2 x 1 accumulation" in proc.stderr
    assert np.allclose(one["history"]["train_loss"], two["history"]["train_loss"], rtol=0, atol=1e-5)
    assert np.allclose(one["history"]["val"], two["history"]["val"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_resume_after_kill_9(corpus, tmp_path):
    import signal
    import time

    cfg = config(corpus, tmp_path / "killed", steps=300, eval_every=100, save_every=5)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(cfg).items() if not isinstance(v, bool)] + ["--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "llmos", "train", "pretrain", *flags], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "killed" / "trainer_state.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = state(tmp_path / "killed")["step"]
    assert 0 < killed_at < 300
    P.pretrain(cfg)
    P.pretrain(replace(cfg, out=str(tmp_path / "straight")))
    assert state(tmp_path / "killed")["history"] == state(tmp_path / "straight")["history"]


@pytest.mark.slow
def test_torchrun_fsdp_resumes_a_one_process_run_exactly_and_saves_it_whole(corpus, tmp_path):
    # One process trains 3 steps; 2 gloo processes sharding the model (FSDP2) load that checkpoint into their
    # shards and train 3 more; their checkpoint, gathered whole on rank 0, matches 6 steps in one process.
    from llmos.formats import read_checkpoint

    kw = dict(depth=2, aspect_ratio=16, steps=6, eval_every=3, save_every=3)
    P.pretrain(config(corpus, tmp_path / "one", **kw))
    P.pretrain(config(corpus, tmp_path / "two", **kw, stop_at=3))
    flags = ["--data", str(corpus / "text.txt"), "--tokenizer", str(corpus / "tok"), "--depth", "2",
             "--aspect-ratio", "16", "--head-dim", "16", "--seq-len", "16", "--batch-size", "4", "--steps", "6",
             "--lr", "0.01", "--warmup-steps", "2", "--eval-every", "3", "--save-every", "3", "--no-progress"]
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "llmos", "train", "pretrain",
                           *flags, "--fsdp", "--out", str(tmp_path / "two")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded (FSDP2); resuming at step 3" in proc.stderr
    one, two = state(tmp_path / "one"), state(tmp_path / "two")
    assert two["step"] == 6 and len(two["history"]["val"]) == 2
    assert np.allclose(one["history"]["train_loss"], two["history"]["train_loss"], rtol=0, atol=1e-5)
    assert np.allclose(one["history"]["val"], two["history"]["val"], rtol=0, atol=1e-5)
    ckpt = read_checkpoint(tmp_path / "two")
    for k, v in one["model"].items():  # whole tensors, not one rank's shard
        assert two["model"][k].shape == v.shape and torch.allclose(two["model"][k], v, rtol=0, atol=1e-5)
        assert torch.equal(ckpt.state_dict[k], two["model"][k])
    for k, v in one["optimizer"]["state"].items():
        assert torch.allclose(two["optimizer"]["state"][k]["exp_avg_sq"], v["exp_avg_sq"], rtol=0, atol=1e-6)
