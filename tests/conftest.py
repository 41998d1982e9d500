"""What the tests share: the tiny config, tokenizer and model they are built on, and the compiled kernels.

    tiny_config(**overrides)               2 layers, 32 wide, 4 heads on 2 kv heads, MLP 64, context 64
    tiny_model(seed=0, cls=..., **overrides) that config's Transformer, seeded, in eval mode
    tokenizer(ascii_only=False)            a byte-level BPE trained on CORPUS (ChatML template, <|im_end|> ends)
    byte_bpe(texts, vocab_size, special)   the same training on other texts, for tests that need other tokens
    word_tokenizer(vocab)                  token i is the word "t{i}", for tests about ids rather than text
    fixtures: tok, tok_dir, hf_tok         that tokenizer as a Hugging Face directory, llmos and transformers reading it
              model, engine                tiny_model() and an Engine on it, once per module
              client                       the openai client of the module's `server` fixture
              ext                          the C++ decode kernels (skips the test where they cannot be built)

A test that needs another shape passes overrides (tiny_config(dim=64, hidden_dim=128)) rather than writing its
own Config. The helpers are plain functions too (`from conftest import tiny_model`), for module-level constants
and parametrize lists. Shared objects are never changed by a test: fixtures that tests could mutate (the model)
are built once per module, and tiny_model() is cheap enough to call again for a model a test changes.
"""

import functools
import json
import os

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmos import loader
from llmos.engine import Engine
from llmos.model import Config, Transformer
from llmos.tokenizer import Tokenizer

# ----------------------------------------------------------------------------
# The tokenizer: a byte-level BPE trained here

CORPUS = [
    "the cat sat on the mat. the dog ate the food.",
    "hello world, hello there! how are you today?",
    "the quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "stop here END and go on",
    "naïve café déjà vu",
    "日本語のテキスト 世界",
    "emoji 😀🎉 party 🚀",
] * 20
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
EOS = 2  # <|im_end|>: the end of a turn, and of generation
CHATML = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_bpe(texts, vocab_size: int = 320, special=SPECIAL, alphabet: bool = True) -> HFTokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer and decoder) trained on texts, special tokens first. alphabet: all
    256 bytes are tokens, so any text encodes; without it, only the bytes the texts hold."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet else [])
    hf.train_from_iterator(texts, trainer)
    return hf


@functools.cache
def bpe(ascii_only: bool = False) -> HFTokenizer:
    """byte_bpe on CORPUS: 320 tokens, so emoji, CJK and accented letters are split across several. ascii_only:
    trained on the ASCII lines alone and without the byte alphabet, so every token is ASCII text and any sequence
    of ids a random model writes decodes cleanly, for tests that compare whole decoded texts."""
    hf = byte_bpe([t for t in CORPUS if t.isascii() or not ascii_only], alphabet=not ascii_only)
    assert [hf.token_to_id(t) for t in SPECIAL] == [0, 1, 2]
    return hf


def tokenizer(ascii_only: bool = False) -> Tokenizer:
    """The trained BPE as llmos holds it: <|im_end|> ends generation, <|endoftext|> pads, the ChatML template."""
    return Tokenizer(bpe(ascii_only), eos_ids=[EOS], pad_id=0, chat_template=CHATML)


def word_tokenizer(vocab: int, eos: int | None = None) -> Tokenizer:
    """Token i is the word "t{i}": for tests about ids rather than text (random prompts, tiny vocabularies)."""
    hf = HFTokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return Tokenizer(hf, eos_ids=[] if eos is None else [eos])


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """tokenizer() as a Hugging Face directory: tokenizer.json and a tokenizer_config.json written here, by hand."""
    d = tmp_path_factory.mktemp("tok")
    bpe().save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="session")
def tok(tok_dir):
    """The tokenizer as llmos reads it from tok_dir (the same as tokenizer())."""
    return Tokenizer.from_hf_dir(tok_dir)


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    """The reference: transformers' AutoTokenizer on the same files."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


# ----------------------------------------------------------------------------
# The tiny config and model

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


def tiny_config(**overrides) -> Config:
    """TINY with tokenizer()'s vocabulary, and any field changed by overrides."""
    return Config(**({"vocab_size": tokenizer().vocab_size} | TINY | overrides))


def tiny_model(seed: int = 0, cls=Transformer, **overrides) -> Transformer:
    """A random tiny_config(**overrides) model (cls: a Transformer subclass), the weights set by seed alone."""
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, tokenizer())


@pytest.fixture(scope="module")
def client(server):
    """The official `openai` client of the module's `server` fixture (a test_server.Running)."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# ----------------------------------------------------------------------------
# The compiled kernels


@pytest.fixture(autouse=True, scope="session")
def kernels_from_the_real_home():
    """Load the C++ decode kernels (llmos/kernels) once per session from the user's LLMOS_HOME, before
    tests point LLMOS_HOME at temporary folders: `llmos run` uses them by default, and each test with
    a fresh home would otherwise compile them again (a minute). 0.4 s when already built."""
    if os.environ.get("LLMOS_KERNELS", "1") != "0":
        from llmos import kernels

        kernels.load()
    yield


@pytest.fixture(scope="session")
def ext():
    """The compiled kernels' extension module; the test skips where they cannot be built (no compiler)."""
    from llmos import kernels

    e = kernels.load()
    if e is None:
        pytest.skip(f"C++ kernels unavailable: {kernels.why_not()}")
    return e


# ----------------------------------------------------------------------------
# Loading through the loader


def load_model(name, device: str = "cpu", dtype=None):
    """(model, tokenizer, checkpoint) of a name through the loader, on the PyTorch path: what many tests compare."""
    r = loader.load(str(name), "torch", device, precision=dtype, tokenizer=False)
    return r.model, r.tokenizer, r.checkpoint


def load_precision(name, precision=None, device: str = "cpu", group_size=None):
    """load_model at a precision: f32 | f16 | bf16, or int8 | int4 quantized after loading."""
    r = loader.load(str(name), "torch", device, precision=precision, group_size=group_size, tokenizer=False)
    return r.model, r.tokenizer, r.checkpoint
