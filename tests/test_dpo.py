"""Stage 3: preference pairs, the DPO loss, DPO and reward-model training on a tiny model.

A byte-level BPE tokenizer trained here with a ChatML template and a 2-layer model of width 32.
Run with OMP_NUM_THREADS=1.
"""

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmos.errors import LlmosError
from llmos.formats import Checkpoint, hf
from llmos.model import Config, Transformer
from llmos.tokenizer import Tokenizer
from llmos.train import chat_data as C
from llmos.train import dpo as D
from llmos.train import finetune as FT
from llmos.train import reward as R
from llmos.train.tokenizer_train import save, train_bpe
from conftest import load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
QUESTIONS = ["hello", "who are you?", "how are you?", "what is your name?", "hi there", "tell me about cats",
             "is it safe?", "help me please", "good morning", "what do you like?"]
GOOD, BAD = "I am glad to help you.", "No. Go away now."


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("dpo")


@pytest.fixture(scope="module")
def model_dir(root):
    text = [" ".join(QUESTIONS) + " " + GOOD + " " + BAD] * 30
    save(train_bpe(text, 320), root / "tok")
    tok = Tokenizer.from_hf_dir(root / "tok")
    cfg = Config(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                 max_seq_len=128, tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # smaller logits than nn.Embedding's N(0, 1), so log-probabilities are moderate
        model.embed.weight.mul_(0.1)
    hf.write(Checkpoint(cfg, model.state_dict(), tok, {"format": "hf"}), root / "base", "f32")
    return root / "base"


@pytest.fixture(scope="module")
def pairs_file(root):
    rows = [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {GOOD}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {BAD}"}
            for q in QUESTIONS * 2]
    (root / "pairs.jsonl.gz").write_bytes(gzip.compress("\n".join(map(json.dumps, rows)).encode()))
    return root / "pairs.jsonl.gz"


# ----------------------------------------------------------------------------
# Losses against hand computations


def test_dpo_loss_equals_hand_computation():
    pi_c, pi_r = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    ref_c, ref_r = torch.tensor([-11.0, -5.5]), torch.tensor([-11.0, -4.5])
    loss, rc, rr = D.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    # pair 0: rewards 0.1 * 1 = 0.1 and 0.1 * -1 = -0.1 → -log σ(0.2)
    # pair 1: rewards 0.1 * 0.5 = 0.05 and 0.1 * 0.5 = 0.05 → -log σ(0) = log 2
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-0.2)), math.log(2)], abs=1e-7)
    assert rc.tolist() == pytest.approx([0.1, 0.05]) and rr.tolist() == pytest.approx([-0.1, 0.05])
    assert R.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5])).item() == pytest.approx(
        math.log(1 + math.exp(-1.5)), abs=1e-7)


def test_sequence_logps_sum_response_tokens_only(model_dir):
    from llmos import registry

    model, tok, _ = load_model(str(model_dir))
    prompt = [{"role": "user", "content": "hello"}]
    ids, mask = C.render_masked(tok, prompt + [{"role": "assistant", "content": GOOD}], start=1)
    x, y = FT.pad_rows([(ids, mask)], 3)
    got = D.sequence_logps(model, x, y).item()
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ids])).float(), -1)[0]
    want = sum(lp[k - 1, ids[k]].item() for k in range(1, len(ids)) if mask[k])
    assert got == pytest.approx(want, rel=1e-5)
    answer = tok.decode([i for i, m in zip(ids, mask) if m])
    assert answer == GOOD + "<|im_end|>"


# ----------------------------------------------------------------------------
# Pairs


def test_hh_rlhf_prompt_is_the_shared_turns():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: Sure.",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: No.\n\nAssistant: Never."}
    pair = C.preference_pair(row)
    assert pair["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "help?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "Sure."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "No.\n\nNever."}]  # one speaker twice: joined
    # the dialogues differ in an earlier assistant turn: the prompt stops before it
    pair = C.preference_pair({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                              "rejected": "\n\nHuman: a\n\nAssistant: x"})
    assert pair["prompt"] == [{"role": "user", "content": "a"}] and len(pair["chosen"]) == 3


@pytest.mark.parametrize("row, message", [
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "same chosen and rejected"),
    ({"chosen": "hi there", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "does not start with"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "a"}}, "same chosen and rejected"),
    ({"prompt": "q", "chosen": "a"}, "expected a preference pair"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
      "chosen": {"from": "gpt", "value": "b"}, "rejected": {"from": "gpt", "value": "c"}}, "does not end with a user turn"),
])
def test_bad_pairs_name_file_and_row(tmp_path, row, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(LlmosError, match=message) as e:
        C.load_pairs(f)
    assert f"{f}: line 2" in str(e.value)


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_real_preference_files():
    hh = C.load_pairs(DATA / "preference/hh_rlhf_harmless_base_test.jsonl.gz")
    assert len(hh) == 2312 and all(p["prompt"][-1]["role"] == "user" for p in hh)
    assert all(p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant" for p in hh)
    demo = C.load_pairs(DATA / "preference/dpo_en_demo.json")
    assert len(demo) == 300 and all(len(p["chosen"]) == 1 for p in demo)


# ----------------------------------------------------------------------------
# Training


def config(cls, model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), out=str(out), steps=8, batch_size=4, micro_batch=2,
                seq_len=64, lora=False, lr=5e-3, warmup_steps=1, eval_every=0, save_every=0, val_fraction=0.2,
                progress=False, device="cpu")
    return cls(**{**base, **kw})


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_raises_the_held_out_margin(model_dir, pairs_file, tmp_path, lora):
    extra = dict(lora=True, lora_rank=4, lr=2e-2) if lora else {}
    summary = D.dpo(config(D.DPOConfig, model_dir, pairs_file, tmp_path / "dpo", **extra))
    before, after = summary["val_before"], summary["val_after"]
    assert before["reward_margin"] == 0 and before["reward_accuracy"] == 0 and before["val_loss"] == pytest.approx(math.log(2))
    assert after["reward_margin"] > 0.5 and after["reward_accuracy"] == 1.0 and after["val_loss"] < 0.5
    assert after["ref_accuracy"] == before["ref_accuracy"] == before["policy_accuracy"]  # the reference is frozen
    assert after["policy_accuracy"] == 1.0
    from llmos import registry

    model, tok, ckpt = load_model(str(tmp_path / "dpo"))
    assert tok.hf.token_to_id("<|im_end|>") in ckpt.meta["eos_token_ids"]


def test_dpo_resume_is_exact(model_dir, pairs_file, tmp_path):
    cfg = lambda out, **kw: config(D.DPOConfig, model_dir, pairs_file, tmp_path / out, steps=4, **kw)
    D.dpo(cfg("a"))
    D.dpo(cfg("b", stop_at=2))
    D.dpo(cfg("b"))
    a, b = (torch.load(tmp_path / n / "trainer_state.pt", weights_only=False) for n in "ab")
    assert a["history"] == b["history"] and len(a["history"]["train_loss"]) == 4


def test_reward_model_learns_and_scores(model_dir, pairs_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    summary = R.reward(config(R.RewardConfig, model_dir, pairs_file, tmp_path / "rm", steps=10, lora=True,
                              lora_rank=4, lr=2e-2))
    assert summary["val_after"]["accuracy"] == 1.0 and summary["val_after"]["margin"] > 1.0
    assert summary["val_after"]["val_loss"] < summary["val_before"]["val_loss"]
    model, tok, head = R.load_reward_model(tmp_path / "rm")
    prompt = [{"role": "user", "content": "good morning"}]
    good = R.score(model, tok, head, prompt + [{"role": "assistant", "content": GOOD}])
    bad = R.score(model, tok, head, prompt + [{"role": "assistant", "content": BAD}])
    assert good > bad
    # The same number from transformers: the written LM's last hidden state through the written head.
    ids, _ = C.render_masked(tok, prompt + [{"role": "assistant", "content": GOOD}])
    ref = transformers.AutoModel.from_pretrained(str(tmp_path / "rm"), dtype=torch.float32)
    with torch.no_grad():
        h = ref(torch.tensor([ids])).last_hidden_state[0, -1]
        assert (head(h)[0].item()) == pytest.approx(good, abs=1e-4)


def test_reward_needs_its_head(model_dir):
    with pytest.raises(LlmosError, match="no reward_head.safetensors"):
        R.load_reward_model(model_dir)
