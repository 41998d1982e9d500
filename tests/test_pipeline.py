"""The end-to-end pipeline (`llmos train all`), shrunk to a few KB of data written here and a 1-layer model
of width 32: every stage runs, the table has a row for each, a paused stage resumes and finished ones are
skipped, and the final model gives transformers' logits and survives the GGUF export bit for bit.
Run with OMP_NUM_THREADS=1.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmos import cli
from llmos.errors import LlmosError
from llmos.train import pipeline as P
from conftest import load_model

ROOT = Path(__file__).resolve().parents[1]


def corpus_text(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    nouns, verbs = ["cat", "dog", "king", "queen", "bird", "fish"], ["sees", "likes", "eats", "follows"]
    return "\n".join(f"the {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}." for _ in range(n)) + "\n"


def write_data(d: Path) -> None:
    """A corpus of two files, alpaca and identity conversations, hh-rlhf pairs and ARC questions."""
    (d / "corpus").mkdir(parents=True)
    (d / "corpus" / "a.txt").write_text(corpus_text(150, 0))
    (d / "corpus" / "b.jsonl").write_text("".join(json.dumps({"text": corpus_text(10, i)}) + "\n" for i in range(1, 6)))
    (d / "sft").mkdir()
    alpaca = [{"instruction": f"What does the {a} see?", "input": "", "output": f"The {a} sees the {b}."}
              for a in ("cat", "dog", "bird") for b in ("king", "fish")]
    identity = [{"instruction": q, "input": "", "output": "I am {{name}}, made by {{author}}."}
                for q in ("Who are you?", "What is your name?", "hi", "Introduce yourself.")]
    (d / "sft" / "alpaca.json").write_text(json.dumps(alpaca))
    (d / "sft" / "identity.json").write_text(json.dumps(identity))
    (d / "pref").mkdir()
    pairs = [{"chosen": f"\n\nHuman: Tell me about the {a}.\n\nAssistant: The {a} is kind.",
              "rejected": f"\n\nHuman: Tell me about the {a}.\n\nAssistant: Go away, {b}."}
             for a in ("cat", "dog", "bird", "fish") for b in ("king", "queen", "fool")]
    (d / "pref" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (d / "eval").mkdir()
    arc = [{"id": f"q{i}", "question": {"stem": f"What does the {a} eat?", "choices": [
        {"text": "fish", "label": "A"}, {"text": "the king", "label": "B"}, {"text": "a rock", "label": "C"}]},
        "answerKey": "A"} for i, a in enumerate(("cat", "dog", "bird"))]
    (d / "eval" / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))


RECIPE = """
data_dir = "../data"          # relative to this file
progress = false

[tokenizer]
vocab_size = 300

[pretrain]
data = ["corpus/a.txt", "corpus/b.jsonl"]
val_fraction = 0.1
depth = 1
aspect_ratio = 32
head_dim = 16
seq_len = 64
batch_size = 4
steps = 6
lr = 1e-2
warmup_steps = 2
eval_every = 0
save_every = 0

[sft]
data = ["sft/alpaca.json", "sft/identity.json"]
fill = "name=Wren,author=Lab"
val_fraction = 0.2
steps = 4
lora = false                  # all weights, as recipes/e2e.toml trains its small model
batch_size = 2
seq_len = 64
lr = 1e-3
warmup_steps = 1
eval_every = 0
save_every = 0
{sft_extra}

[dpo]
data = "pref/pairs.jsonl"
val_fraction = 0.25
steps = 3
lora = false
batch_size = 2
seq_len = 64
lr = 1e-4
warmup_steps = 1
eval_every = 0

[evals]
arc = "eval/arc.jsonl"
arc_limit = 2
expect = "Wren"
questions = ["What should I call you?", "Tell me your name."]
max_new_tokens = 4
"""


@pytest.fixture
def workdir(tmp_path):
    write_data(tmp_path / "data")
    (tmp_path / "recipes").mkdir()
    return tmp_path


def recipe(workdir: Path, text: str) -> str:
    (workdir / "recipes" / "e2e.toml").write_text(text)
    return str(workdir / "recipes" / "e2e.toml")


def summaries(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in [*out.glob("*/summary.json"), out / "evals.json"]
            if p.is_file()}


def test_every_stage_runs_pauses_resumes_skips_and_the_model_loads_in_transformers(workdir, capsys):
    out = workdir / "run"
    argv = ["--recipe", recipe(workdir, RECIPE.format(sft_extra="stop_at = 2")), "--out", str(out)]

    # 1. SFT pauses at step 2 (its own --stop-at): the pipeline stops there, and says so in the table
    assert cli.main(["train", "all", *argv]) == 0
    captured = capsys.readouterr()
    assert "sft paused before its end" in captured.err
    assert json.loads((out / "sft" / "summary.json").read_text())["steps"] == 2
    assert not (out / "dpo").exists() and not (out / "evals.json").exists()
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == ["tokenizer", "pretrain", "sft"]
    assert [r["finished"] for r in rows] == [True, True, False]
    assert "UNFINISHED" in captured.out
    before = summaries(out)

    # 2. The same command without the pause: tokenizer and pretraining are skipped, SFT resumes at step 2
    argv[1] = recipe(workdir, RECIPE.format(sft_extra=""))
    assert cli.main(["train", "all", *argv]) == 0
    captured = capsys.readouterr()
    assert "[1/6] tokenizer: finished before, skipped" in captured.err
    assert "[2/6] pretrain: finished before, skipped" in captured.err
    assert "resuming at step 2" in captured.err
    for name in ("tokenizer/summary.json", "base/summary.json"):
        assert summaries(out)[name] == before[name]
    report = json.loads((out / "report.json").read_text())
    rows = {r["stage"]: r for r in report["rows"]}
    assert list(rows) == ["tokenizer", "pretrain", "sft", "dpo", "evals", "export"]
    assert all(r["finished"] for r in rows.values())
    assert rows["pretrain"]["steps"] == 6 and rows["pretrain"]["tokens"] == 6 * 4 * 64
    assert rows["sft"]["steps"] == 4 and rows["sft"]["conversations"] >= 8
    assert rows["dpo"]["steps"] == 3 and rows["dpo"]["pairs"] == 6
    for stage in ("pretrain", "sft", "dpo"):
        assert np.isfinite(rows[stage]["train_loss"]) and np.isfinite(rows[stage]["val_loss"])
        assert 0 < rows[stage]["heldout_bpb"] < 20 and rows[stage]["arc_accuracy"] in (0.0, 0.5, 1.0)
        assert rows[stage]["identity"] in (0.0, 0.5, 1.0)
    assert 0 <= rows["dpo"]["pref_accuracy"] <= 1 and rows["dpo"]["margin"] is not None
    assert rows["tokenizer"]["vocab_size"] <= 300 and rows["tokenizer"]["bytes_per_token"] > 1
    assert rows["export"]["gguf_max_logit_diff"] == 0.0
    assert rows["export"]["transformers_max_logit_diff"] < 1e-4

    # one table, printed and written as markdown, with a line per stage and the total
    table = (out / "report.md").read_text()
    assert table.strip() in captured.out
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines] == ["stage", *rows, "total"]

    # evals.json: every model on every task; the held-out text is the pretraining corpus's held-out split
    evals = json.loads((out / "evals.json").read_text())["models"]
    assert list(evals) == ["base", "sft", "dpo"]
    assert all(set(e) == {"heldout", "arc", "identity"} for e in evals.values())
    assert evals["dpo"]["arc"]["examples"] == 2 and len(evals["dpo"]["identity"]["answers"]) == 2
    texts = [(workdir / "data" / "corpus" / "a.txt").read_text()]
    texts += [json.loads(line)["text"] for line in (workdir / "data" / "corpus" / "b.jsonl").open()]
    corpus_lines = {line for text in texts for line in text.splitlines()}
    heldout = [line for line in (out / "data" / "heldout.txt").read_text().splitlines() if line]
    assert heldout and set(heldout) <= corpus_lines
    # the tokenizer learnt from the training split only, so no stage saw the held-out text
    corpus_bytes = sum(len(p.read_bytes()) for p in (workdir / "data" / "corpus").iterdir())
    assert json.loads((out / "tokenizer" / "summary.json").read_text())["train_bytes"] < 0.95 * corpus_bytes
    # the two SFT files became one, in the recipe's order
    rows_in = [json.loads(line) for line in (out / "data" / "sft.jsonl").read_text().splitlines()]
    assert rows_in == [*json.loads((workdir / "data" / "sft" / "alpaca.json").read_text()),
                       *json.loads((workdir / "data" / "sft" / "identity.json").read_text())]

    # 3. Once more: nothing left to do, nothing rewritten, the same table
    done = summaries(out)
    assert cli.main(["train", "all", *argv]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("finished before, skipped") == 6
    assert summaries(out) == done
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]

    # An edited recipe: a finished training stage is never silently reused; the evals simply run again
    text = RECIPE.format(sft_extra="")
    recipe(workdir, text.replace("lr = 1e-4", "lr = 2e-4"))
    assert cli.main(["train", "all", *argv]) == 2
    assert f"{out / 'dpo'}: made with lr = 0.0001, but the recipe now says 0.0002; delete" in capsys.readouterr().err
    recipe(workdir, text.replace("arc_limit = 2", "arc_limit = 1"))
    assert cli.main(["train", "all", *argv]) == 0
    assert "[5/6] evals → " in capsys.readouterr().err
    assert json.loads((out / "evals.json").read_text())["models"]["dpo"]["arc"]["examples"] == 1
    assert {k: v for k, v in summaries(out).items() if k != "evals.json"} == {
        k: v for k, v in done.items() if k != "evals.json"}

    # The final model, read by transformers and from the exported GGUF, independently of the pipeline's check
    from transformers import AutoModelForCausalLM

    from llmos import registry
    from llmos.formats import read_checkpoint

    model, tok, _ = load_model(str(out / "dpo"), dtype="f32")
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "Who are you? The cat sees the king."}])])
    hf = AutoModelForCausalLM.from_pretrained(out / "dpo").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    gguf = read_checkpoint(out / "export" / "model.gguf")
    hf_ckpt = read_checkpoint(out / "dpo")
    assert gguf.config == hf_ckpt.config
    assert all(torch.equal(gguf.state_dict[k], v) for k, v in hf_ckpt.state_dict.items())
    assert gguf.tokenizer.encode("the cat sees the king.") == tok.encode("the cat sees the king.")


# ----------------------------------------------------------------------------
# The plan: paths, scale, and mistakes caught before anything trains


def test_paths_are_relative_to_the_recipe_or_to_the_working_directory(workdir, monkeypatch):
    text = RECIPE.format(sft_extra="")
    plan = P.make_plan(["--recipe", recipe(workdir, text), "--out", str(workdir / "run")])
    data = (workdir / "data").resolve()
    assert plan.configs["dpo"].data == str(data / "pref" / "pairs.jsonl")
    assert plan.configs["evals"].arc == str(data / "eval" / "arc.jsonl")
    # several files: one corpus directory (shared with the tokenizer), one JSONL of conversations
    out = (workdir / "run").resolve()
    assert plan.configs["pretrain"].data == plan.configs["tokenizer"].data == str(out / "data" / "corpus")
    assert plan.configs["sft"].data == str(out / "data" / "sft.jsonl")
    # each stage starts from the one before, and writes into OUT
    assert plan.configs["pretrain"].tokenizer == str(out / "tokenizer")
    assert (plan.configs["sft"].model, plan.configs["dpo"].model) == (str(out / "base"), str(out / "sft"))
    assert [plan.configs[s].out for s in ("tokenizer", "pretrain", "sft", "dpo")] == [
        str(out / d) for d in ("tokenizer", "base", "sft", "dpo")]
    # --data-dir is relative to the working directory
    monkeypatch.chdir(workdir / "recipes")
    plan = P.make_plan(["--recipe", "e2e.toml", "--data-dir", "../data", "--out", "../run"])
    assert plan.configs["dpo"].data == str(data / "pref" / "pairs.jsonl") and plan.out == out


def test_scale_multiplies_time_budgets_steps_and_eval_sizes(workdir):
    text = RECIPE.format(sft_extra="").replace("steps = 6", "minutes = 6.0")
    plan = P.make_plan(["--recipe", recipe(workdir, text), "--out", str(workdir / "run"), "--scale", "0.5"])
    assert plan.configs["pretrain"].minutes == 3.0 and plan.configs["pretrain"].steps == 0
    assert plan.configs["sft"].steps == 2 and plan.configs["dpo"].steps == 2  # 1.5 rounds to 2
    plan = P.make_plan(["--recipe", recipe(workdir, text), "--out", str(workdir / "run"), "--scale", "0.01"])
    assert plan.configs["sft"].steps == 1 and plan.configs["dpo"].steps == 1


@pytest.mark.parametrize("edit, message", [
    (('data = "pref/pairs.jsonl"', 'data = "pref/missing.jsonl"'), "pref/missing.jsonl: no such data file ([dpo] data"),
    (("vocab_size = 300", "vocab_sise = 300"), "[tokenizer]: unknown key 'vocab_sise'"),
    (("steps = 6", 'steps = "6"'), "[pretrain]: steps = '6' should be a int"),
    (("[evals]", "[evals]\nout = 'x'"), "[evals] sets out, but the pipeline places every stage in OUT/"),
    (("[evals]", "[eval]"), "unknown table [eval]"),
    (('questions = ["What should I call you?", "Tell me your name."]', "questions = [1]"), "be a list of strings"),
])
def test_mistakes_in_the_recipe_are_one_line_before_anything_runs(workdir, capsys, edit, message):
    text = RECIPE.format(sft_extra="").replace(*edit)
    assert cli.main(["train", "all", "--recipe", recipe(workdir, text), "--out", str(workdir / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (workdir / "run").exists()


def test_a_missing_data_dir_says_to_pass_data_dir(workdir, capsys):
    path = recipe(workdir, RECIPE.format(sft_extra="").replace('data_dir = "../data"', 'data_dir = "../nowhere"'))
    assert cli.main(["train", "all", "--recipe", path]) == 2
    err = capsys.readouterr().err
    assert "nowhere/corpus/a.txt: no such data file" in err and "pass --data-dir DIR" in err
    with pytest.raises(LlmosError, match="pass --recipe FILE"):
        P.make_plan([])


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data").is_dir(), reason="needs ../shared/data")
def test_the_shipped_recipe_finds_its_data_and_keeps_within_its_time_budget():
    plan = P.make_plan(["--recipe", str(ROOT / "recipes" / "e2e.toml"), "--out", "/nonexistent/e2e"])
    assert list(plan.configs) == ["tokenizer", "pretrain", "sft", "dpo", "evals"]
    training = sum(plan.configs[s].minutes for s in ("pretrain", "sft", "dpo"))
    assert training <= 11, "leave room for tokenizing, validation, evals and export within 15 minutes"
    assert all(Path(f).is_file() for files in plan.sources.values() for f in files)
    assert plan.configs["sft"].fill and plan.configs["evals"].expect in plan.configs["sft"].fill
