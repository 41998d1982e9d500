"""Stage 0: train a byte-level BPE tokenizer with the chat special tokens reserved.

    llmos train tokenizer --data corpus.txt --vocab-size 4096 --out DIR
    llmos train tokenizer --data corpus.txt --vocab-size 4096 --out DIR

Byte-level: text becomes UTF-8 bytes before merging, so every string is encodable
and decoding gives back the exact bytes (bits per byte depends on that). Merges
never cross the pieces of a split regex: Llama 3's (GPT-4's) by default, GPT-2's
with --pattern gpt2. Ids 0-3 are special: <|endoftext|> (BOS and EOS; it separates
documents in pretraining), <|im_start|> and <|im_end|> (ChatML turns) and <|pad|>.
DIR gets tokenizer.json and tokenizer_config.json with a ChatML chat template, as
transformers' AutoTokenizer and llmos's Tokenizer.from_hf_dir read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from llmos.errors import LlmosError
from llmos.options import option
from llmos.files import atomic_write
from llmos.tokenizer import Tokenizer
from llmos.train.data import CORPUS_HELP, read_documents

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
PATTERNS = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TokenizerConfig:
    data: str = option("", CORPUS_HELP)
    out: str = option("", "directory to write tokenizer.json and tokenizer_config.json into")
    vocab_size: int = option(4096, "tokens in all, the 4 special tokens and 256 bytes included")
    pattern: str = option("llama3", "split regex: llama3 or gpt2")
    min_frequency: int = option(2, "a pair seen fewer times is never merged (the vocabulary may end smaller)")


def train_bpe(texts, vocab_size: int, pattern: str = "llama3", min_frequency: int = 2) -> HFTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` trained on an iterable of strings."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise LlmosError(f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte tokens and "
                         f"{len(SPECIAL_TOKENS)} special ones; pass at least {len(SPECIAL_TOKENS) + 256}")
    if pattern not in PATTERNS:
        raise LlmosError(f"unknown pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save(tok: HFTokenizer, out_dir, model_max_length: int | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, ChatML template), each written atomically."""
    out = Path(out_dir)
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "unk_token": None,
        "add_bos_token": False,  # documents are separated by <|endoftext|> in the data, not by the tokenizer
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "extra_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHATML,
    }
    if model_max_length:
        config["model_max_length"] = model_max_length
    atomic_write(out / "tokenizer.json", lambda f: f.write(tok.to_str(pretty=True).encode()))
    atomic_write(out / "tokenizer_config.json", lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))


def train_tokenizer(cfg: TokenizerConfig):
    """Train on cfg.data, save to cfg.out, return the llmos Tokenizer read back from there."""
    if not cfg.data or not cfg.out:
        raise LlmosError("pass --data CORPUS and --out DIR")
    tok = train_bpe(read_documents(cfg.data), cfg.vocab_size, cfg.pattern, cfg.min_frequency)
    save(tok, cfg.out)
    return Tokenizer.from_hf_dir(cfg.out)
