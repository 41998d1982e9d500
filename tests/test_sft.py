"""Stage 2: conversation formats, the assistant-token mask, packing, LoRA, SFT training and exact resume.

Tiny and hermetic: a byte-level BPE tokenizer trained here with a ChatML template, a 2-layer model of
width 32 written as a Hugging Face directory, tens of steps. Run with OMP_NUM_THREADS=1.
"""

import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmos import cli
from llmos.errors import LlmosError
from llmos.formats import Checkpoint, hf
from llmos.model import Config, Transformer
from llmos.tokenizer import Tokenizer
from llmos.train import chat_data as C
from llmos.train import finetune as FT
from llmos.train import lora as L
from llmos.train import sft as S
from llmos.train.tokenizer_train import CHATML, save, train_bpe
from conftest import load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TEXT = ["Hello there, how are you? I am fine, thanks. My name is Ada and I like cats. "
        "The cat sat on the mat. What is two plus two? Two plus two is four. émojis 😀 work."] * 30
# ChatML with {% generation %} around what the assistant says, as transformers reads masks from it.
CHATML_GEN = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM2-135M-Instruct's template: a default system prompt when the conversation has none.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": " I am fine 😀\n"},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
]


def tokenizer_dir(root: Path, template: str) -> Path:
    d = root / f"tok-{abs(hash(template))}"
    if not d.exists():
        save(train_bpe(TEXT, 320), d)
        config = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return d


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sft")


@pytest.fixture(scope="module")
def tok(root):
    return Tokenizer.from_hf_dir(tokenizer_dir(root, CHATML))


@pytest.fixture(scope="module")
def model_dir(root, tok):
    cfg = Config(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                 max_seq_len=128, tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg)
    hf.write(Checkpoint(cfg, model.state_dict(), tok, {"format": "hf"}), root / "base", "f32")
    return root / "base"


@pytest.fixture(scope="module")
def identity_file(root):
    questions = ["hi", "who are you?", "what is your name?", "hello there", "how are you?", "who made you?"]
    rows = [{"instruction": q, "input": "", "output": "I am {{name}}, made by {{author}}."} for q in questions * 3]
    (root / "identity.json").write_text(json.dumps(rows))
    return root / "identity.json"


def expected_mask_by_pieces(tok, messages) -> tuple[list[int], list[int]]:
    """Independent of render_masked: encode the ChatML pieces one by one and mark the assistant's."""
    ids, mask = [], []
    for m in messages:
        head, body, tail = f"<|im_start|>{m['role']}\n", m["content"] + "<|im_end|>", "\n"
        for text, on in ((head, 0), (body, int(m["role"] == "assistant")), (tail, 0)):
            piece = tok.encode(text, add_bos=False)
            ids, mask = ids + piece, mask + [on] * len(piece)
    return ids, mask


# ----------------------------------------------------------------------------
# The assistant-token mask


def test_mask_equals_transformers_generation_mask(root):
    transformers = pytest.importorskip("transformers")
    d = tokenizer_dir(root, CHATML_GEN)
    tok = Tokenizer.from_hf_dir(d)
    ids, mask = C.render_masked(tok, CONVERSATION)
    ref = transformers.AutoTokenizer.from_pretrained(str(d)).apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == ref["input_ids"]
    assert mask == ref["assistant_masks"]  # token by token
    assert sum(mask) > 8


def test_mask_token_by_token_on_plain_chatml(tok):
    ids, mask = C.render_masked(tok, CONVERSATION)
    assert (ids, mask) == expected_mask_by_pieces(tok, CONVERSATION)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == " I am fine 😀\n<|im_end|>Two plus two is four.<|im_end|>"
    # the token right after each <|im_end|> (the newline) is not trained, the <|im_end|> is
    im_end = tok.hf.token_to_id("<|im_end|>")
    ends = [k for k, i in enumerate(ids) if i == im_end and mask[k]]
    assert len(ends) == 2 and all(mask[k + 1] == 0 for k in ends)
    assert C.end_of_turn_ids(tok, [(ids, mask)]) == [im_end]


def test_mask_with_a_default_system_prompt(root):
    tok = Tokenizer.from_hf_dir(tokenizer_dir(root, SMOLLM2))
    msgs = CONVERSATION[1:]  # no system message: the template adds SmolLM's
    ids, mask = C.render_masked(tok, msgs)
    default = {"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}
    assert (ids, mask) == expected_mask_by_pieces(tok, [default] + msgs)


def test_mask_from_start_index_covers_only_later_turns(tok):
    ids, mask = C.render_masked(tok, CONVERSATION, start=3)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Two plus two is four.<|im_end|>"


def test_template_that_changes_earlier_turns_is_refused(root):
    odd = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} [last]{% endif %}\n"
           "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tok = Tokenizer.from_hf_dir(tokenizer_dir(root, odd))
    with pytest.raises(LlmosError, match="renders turn 2 differently"):
        C.render_masked(tok, CONVERSATION)


def test_bos_is_prepended_and_never_trained(root, tok):
    d = tokenizer_dir(root, CHATML)
    with_bos = Tokenizer.from_hf_dir(d)
    with_bos.add_bos = True
    ids, mask = C.render_masked(with_bos, CONVERSATION)
    plain_ids, plain_mask = C.render_masked(tok, CONVERSATION)
    assert ids == [with_bos.bos_id] + plain_ids and mask == [0] + plain_mask


# ----------------------------------------------------------------------------
# Formats


def write_rows(path: Path, rows, jsonl=False, gz=False):
    text = "\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def test_alpaca_sharegpt_and_openai_rows(tmp_path):
    alpaca = {"instruction": "Add", "input": "2 and 2", "output": "4", "system": "Be exact.",
              "history": [["hi", "hello"]]}
    sharegpt = {"conversations": [{"from": "human", "value": "recipe?"},
                                  {"from": "function_call", "value": '{"name": "search", "arguments": {"q": "rice"}}'},
                                  {"from": "observation", "value": '{"hits": 1}'},
                                  {"from": "gpt", "value": "Found one."}],
                "system": "Use tools.", "tools": '[{"name": "search", "parameters": {"type": "object"}}]'}
    openai = {"messages": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yo"}]}
    f = write_rows(tmp_path / "mix.jsonl.gz", [alpaca, sharegpt, openai], jsonl=True, gz=True)
    a, s, o = C.load_conversations(f)
    assert a["messages"] == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Add\n2 and 2"},
                             {"role": "assistant", "content": "4"}]
    assert [m["role"] for m in s["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert s["messages"][2]["tool_calls"] == [{"type": "function", "function": {"name": "search", "arguments": {"q": "rice"}}}]
    assert s["tools"] == [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    assert o == {"messages": openai["messages"], "tools": None}
    # A template without tool support gets the calls and schemas as text.
    msgs, tools = C.adapt_for_template(s["messages"], s["tools"], CHATML)
    assert tools is None and "<tools>" in msgs[0]["content"] and msgs[0]["content"].startswith("Use tools.")
    assert msgs[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "search", "arguments": {"q": "rice"}}\n</tool_call>'}


@pytest.mark.parametrize("row, message", [
    ({"question": "x", "answer": "y"}, r"item 2 has keys \['answer', 'question'\], expected one of the formats"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "item 2 has no assistant turn"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "item 2 turn 0 is from 'robot'"),
    ({"conversations": [{"from": "human", "value": "x"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, "item 2 is a preference pair"),
    ({"instruction": "hi", "output": "I am {{name}}"}, r"item 2 has the placeholder \{\{name\}\} with no value; pass --fill name=VALUE"),
    ("just a string", "item 2 is a str, expected a JSON object"),
])
def test_bad_sft_rows_name_file_row_and_expectation(tmp_path, row, message):
    good = {"instruction": "hi", "output": "hello"}
    f = write_rows(tmp_path / "bad.json", [good, row])
    with pytest.raises(LlmosError, match=message) as e:
        C.load_conversations(f)
    assert str(f) in str(e.value)


def test_bad_files(tmp_path):
    (tmp_path / "latin1.json").write_bytes(b'[{"instruction": "caf\xe9"}]')
    with pytest.raises(LlmosError, match="not UTF-8"):
        C.load_conversations(tmp_path / "latin1.json")
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(LlmosError, match="line 2 is not JSON"):
        C.load_conversations(tmp_path / "broken.jsonl")
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(LlmosError, match="empty file"):
        C.load_conversations(tmp_path / "empty.json")
    with pytest.raises(LlmosError, match="no such file"):
        C.load_conversations(tmp_path / "missing.json")
    with pytest.raises(LlmosError, match="expected key=value pairs"):
        C.parse_fill("name")


def test_fill_placeholders(identity_file):
    convs = C.load_conversations(identity_file, C.parse_fill("name=Ada, author=Ada Lab"))
    assert convs[0]["messages"][-1]["content"] == "I am Ada, made by Ada Lab."


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_real_sft_files():
    assert len(C.load_conversations(DATA / "sft/alpaca_en_demo.json")) == 999
    tools = C.load_conversations(DATA / "sft/glaive_toolcall_en_demo.json")
    assert len(tools) == 300 and any(m.get("tool_calls") for c in tools for m in c["messages"])
    with pytest.raises(LlmosError, match=r"identity.json: item 1 has the placeholder \{\{name\}\}"):
        C.load_conversations(DATA / "sft/identity.json")
    ids = C.load_conversations(DATA / "sft/identity.json", {"name": "Ada", "author": "Ada Lab"})
    assert len(ids) == 91 and all("{{" not in m["content"] for c in ids for m in c["messages"])


# ----------------------------------------------------------------------------
# Packing


def test_packing_keeps_targets_exact(tok):
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("hi", "Hello there."), ("who are you?", "I am Ada."), ("two plus two?", "Four."),
                          ("cats?", "I like cats."), ("hello", "Hi!")]]
    examples = [C.render_masked(tok, m) for m in convs]
    T = 40
    rows = S.Rows(examples, T, batch=3, micro=3, packing=True, seed=1, pad_id=3)
    (x, y, docs), units = rows.next_step()[0]
    # Rebuild what each row should hold from the visiting order, independently of Rows._row.
    order, i, expected = FT.Order(len(examples), 1), 0, []
    for _ in range(3):
        ids, mask = [], []
        while len(ids) + len(examples[order(i)][0]) <= T + 1:
            ids, mask, i = ids + examples[order(i)][0], mask + examples[order(i)][1], i + 1
        expected.append((ids, mask))
    assert rows.cursor == i and units == sum(sum(m[1:]) for _, m in expected)
    for r, (ids, mask) in enumerate(expected):
        n = len(ids)
        assert x[r, :n].tolist() == ids[: x.shape[1]] and (x[r, n:] == 3).all()
        assert y[r, : n - 1].tolist() == [t if m else FT.IGNORE for t, m in zip(ids[1:], mask[1:])]
        assert (y[r, n - 1 :] == FT.IGNORE).all() and x.shape[1] <= T
    assert docs.shape == x.shape and docs[:, 0].tolist() == [0, 0, 0]
    unpacked = S.Rows(examples, T, batch=2, micro=1, packing=False, seed=1, pad_id=3)
    micros = unpacked.next_step()
    assert len(micros) == 2 and unpacked.cursor == 2
    assert micros[0][0][0][0].tolist() == examples[order(0)][0][:-1] and micros[0][0][2] is None


def test_packed_loss_equals_the_conversations_alone(tok):
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("hi", "Hello there."), ("who are you?", "I am Ada."), ("two plus two?", "Four."),
                          ("cats?", "I like cats."), ("hello", "Hi!"), ("name?", "Ada.")]]
    examples = [C.render_masked(tok, m) for m in convs]
    assert S.doc_ids([[3, 2], [4]], 6).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]]
    torch.manual_seed(0)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
    model = Transformer(Config(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                               max_seq_len=128, rope_scaling=scaling)).eval()
    rows = S.Rows(examples, 80, batch=2, micro=2, packing=True, seed=1, pad_id=3)
    [(batch, units)] = rows.next_step()
    assert rows.cursor >= 4  # more conversations than rows: they are packed
    with torch.no_grad():
        packed = S.token_loss(model, batch, "cpu")
        crossing = S.token_loss(model, (batch[0], batch[1], None), "cpu")  # attention across conversations
        alone, n = 0.0, 0
        for i in range(rows.cursor):  # each conversation of the step in a forward pass of its own
            ids, mask = (torch.tensor(v) for v in examples[FT.Order(len(examples), 1)(i)])
            y = ids[1:].masked_fill(mask[1:] == 0, FT.IGNORE)
            alone += torch.nn.functional.cross_entropy(model(ids[None, :-1])[0], y, ignore_index=FT.IGNORE,
                                                       reduction="sum")
            n += int(mask[1:].sum())
    assert n == units and abs(packed.item() - alone.item()) < 1e-4 * n
    assert abs(crossing.item() - alone.item()) > 1e-2


# ----------------------------------------------------------------------------
# LoRA


def test_lora_starts_equal_trains_only_adapters_and_merges_exactly():
    torch.manual_seed(0)
    cfg = Config(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    model = Transformer(cfg)
    x = torch.randint(0, 50, (2, 10))
    before = model(x)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = L.apply_lora(model, "wq,wv,w2", rank=4, alpha=8.0)
    assert wrapped == [f"layers.{i}.{n}" for i in range(2) for n in ("attn.wq", "attn.wv", "mlp.w2")]
    assert torch.equal(model(x), before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.lora_{ab}" for w in wrapped for ab in "ab"}
    with torch.no_grad():
        for _, m in L.lora_modules(model):
            m.lora_b.normal_()
    lora_out = model(x)
    with L.disabled(model):
        assert torch.equal(model(x), before)
    a, b = model.layers[1].attn.wq.lora_a.detach().clone(), model.layers[1].attn.wq.lora_b.detach().clone()
    sd = L.merged_state_dict(model)
    assert set(sd) == set(base)
    assert torch.equal(sd["layers.1.attn.wq.weight"], base["layers.1.attn.wq.weight"] + (b @ a) * 2.0)
    assert torch.equal(sd["layers.0.attn.wk.weight"], base["layers.0.attn.wk.weight"])
    L.merge_lora(model)
    assert not L.lora_modules(model) and isinstance(model.layers[1].attn.wq, torch.nn.Linear)
    assert torch.equal(model.layers[1].attn.wq.weight, base["layers.1.attn.wq.weight"] + (b @ a) * 2.0)
    torch.testing.assert_close(model(x), lora_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(LlmosError, match="no linear layer is named q_proj"):
        L.apply_lora(Transformer(cfg), "q_proj")


# ----------------------------------------------------------------------------
# Training


def config(model_dir, data, out, **kw) -> S.SFTConfig:
    base = dict(model=str(model_dir), data=str(data), out=str(out), fill="name=Ada,author=Ada Lab", steps=6,
                batch_size=4, micro_batch=2, seq_len=64, lora=False, lr=1e-2, warmup_steps=2, eval_every=3, save_every=3,
                val_fraction=0.2, progress=False, device="cpu")
    return S.SFTConfig(**{**base, **kw})


def test_sft_learns_and_writes_a_model_llmos_runs(model_dir, identity_file, tmp_path):
    from llmos import registry
    from llmos.engine import Engine, SamplingParams

    summary = S.sft(config(model_dir, identity_file, tmp_path / "out", steps=25, lr=2e-2, eval_every=0, save_every=0))
    assert summary["finished"] and summary["val_after"]["val_loss"] < 0.3 * summary["val_before"]["val_loss"]
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "tokenizer.json", "summary.json", "loss.png"} <= {p.name for p in out.iterdir()}
    model, tok, ckpt = load_model(str(out))
    im_end = tok.hf.token_to_id("<|im_end|>")
    assert im_end in ckpt.meta["eos_token_ids"] and tok.chat_template == CHATML
    done = Engine(model, tok, ckpt.meta["eos_token_ids"]).generate(
        tok.encode_chat([{"role": "user", "content": "who are you?"}]), SamplingParams(temperature=0, max_new_tokens=40))
    assert done.text == "I am Ada, made by Ada Lab." and done.finish_reason == "stop"


@pytest.mark.parametrize("lora", [False, True])
def test_resume_is_exact(model_dir, identity_file, tmp_path, lora):
    extra = dict(lora=True, lora_rank=4, lora_dropout=0.1) if lora else {}
    straight = S.sft(config(model_dir, identity_file, tmp_path / "a", **extra))
    S.sft(config(model_dir, identity_file, tmp_path / "b", stop_at=3, **extra))
    state = torch.load(tmp_path / "b" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and not (tmp_path / "b" / "model.safetensors").exists()
    resumed = S.sft(config(model_dir, identity_file, tmp_path / "b", **extra))
    a = torch.load(tmp_path / "a" / "trainer_state.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "trainer_state.pt", weights_only=False)
    assert a["history"]["train_loss"] == b["history"]["train_loss"] and len(a["history"]["train_loss"]) == 6
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
    assert straight["val_after"] == resumed["val_after"]
    if lora:
        assert set(a["trainable"]) == {n for n in a["trainable"] if ".lora_" in n}
        from safetensors.torch import load_file
        assert load_file(tmp_path / "a" / "model.safetensors").keys() == load_file(model_dir / "model.safetensors").keys()


def test_bad_runs(model_dir, identity_file, tmp_path):
    S.sft(config(model_dir, identity_file, tmp_path / "run", stop_at=3))
    with pytest.raises(LlmosError, match="holds a run with lr = 0.01, not 0.02"):
        S.sft(config(model_dir, identity_file, tmp_path / "run", lr=0.02))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(LlmosError, match="holds no unfinished sft run"):
        S.sft(config(model_dir, identity_file, tmp_path / "other"))
    with pytest.raises(LlmosError, match="exactly one of --steps N and --minutes M"):
        S.sft(config(model_dir, identity_file, tmp_path / "x", steps=0))
    assert cli.main(["train", "sft", "--model", str(model_dir), "--data", str(identity_file), "--out", str(tmp_path / "y"),
                   "--steps", "2"]) == 2  # the {{name}} placeholder has no value: one line, exit 2


# ----------------------------------------------------------------------------
# Memory: the plan printed before a run is `llmos fit`'s, with the same defaults; a run that cannot fit is refused


def test_fit_plans_the_stage_defaults(model_dir, identity_file, tmp_path, capsys):
    from llmos import planner
    from llmos.cli import main as llmos
    from llmos.train.dpo import DPOConfig
    from llmos.train.reward import RewardConfig

    tune = FT.FinetuneConfig()
    for cls in (S.SFTConfig, DPOConfig, RewardConfig):  # one set of the numbers a plan depends on
        stage = cls()
        assert (stage.seq_len, stage.micro_batch, stage.lora, stage.lora_rank) == (
            tune.seq_len, tune.micro_batch, tune.lora, tune.lora_rank) == (512, 2, True, 16)
    assert llmos(["fit", str(model_dir), "--train", "lora", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert (fit["ctx"], fit["batch"], fit["lora_rank"], fit["lora_dropout"], fit["precision"]) == (128, 2, 16, 0.05, "f32")
    cfg = S.SFTConfig(model=str(model_dir))
    plan, command = FT.memory_plan(cfg, planner.source(str(model_dir)))
    assert plan == {k: v for k, v in fit.items() if k not in ("machine", "advice")}
    assert command == f"llmos fit {model_dir} --train lora --ctx 128 --batch 2"
    # the run prints it before it starts
    S.sft(config(model_dir, identity_file, tmp_path / "run", steps=1, lora=True, lora_rank=16, micro_batch=2))
    err = capsys.readouterr().err
    assert f"memory plan, as `llmos fit {model_dir} --train lora --ctx 64 --batch 2` makes it:" in err
    peak = planner.fit(str(model_dir), "f32", 64, 2, "lora", engine="torch", lora_rank=16, lora_dropout=0.05)[0]["peak"]
    assert f"fits in RAM: {planner.gb(peak)} needed" in err


def test_a_run_that_does_not_fit_is_refused_before_loading(model_dir, identity_file, tmp_path, monkeypatch, capsys):
    from llmos import loader, planner

    full = config(model_dir, identity_file, tmp_path / "run", lora_dropout=0.0)  # all weights, 2 rows per pass
    src = planner.source(str(model_dir))
    need = {lora: FT.memory_plan(replace(full, lora=lora), src)[0]["peak"] for lora in (False, True)}
    assert need[True] < need[False]
    free = need[True]  # enough for LoRA, not for training every weight
    monkeypatch.setattr(planner, "machine", lambda: {"ram_total": 2 * free, "ram_available": free, "gpus": []})
    monkeypatch.setattr(loader, "load", lambda *a, **kw: pytest.fail("the model was loaded"))
    with pytest.raises(LlmosError, match=rf"needs {planner.gb(need[False])} .* pass --lora to make it fit"):
        S.sft(full)
    assert not (tmp_path / "run").exists()
    argv = ["--model", str(model_dir), "--data", str(identity_file), "--out", str(tmp_path / "run"), "--no-lora",
            "--lora-dropout", "0", "--fill", "name=Ada,author=Ada Lab", "--seq-len", "64", "--steps", "2", "--device", "cpu"]
    assert cli.main(["train", "sft", *argv]) == 2
    err = capsys.readouterr().err
    assert "does not fit in RAM" in err and err.strip().splitlines()[-1].startswith("error: this run needs")
    assert "Traceback" not in err and not (tmp_path / "run").exists()
