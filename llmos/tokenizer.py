"""Text <-> token ids for every format llmos reads, and chat templates.

Whatever the source -- a Hugging Face directory (tokenizer.json, or a SentencePiece tokenizer.model), GGUF metadata
or a llama2.c tokenizer.bin --
the result is one `Tokenizer` wrapping a Hugging Face `tokenizers.Tokenizer`, so encoding is fast Rust code and
`save_hf` / `to_gguf_fields` can write it back out for transformers, vLLM and llama.cpp.

    tok = Tokenizer.from_hf_dir("path/to/model")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    print(tok.decode(ids))

Two families cover the Llama world, and both follow llama.cpp's behaviour (its test vectors are in the tests):
- byte-level BPE ("gpt2" in GGUF): regex pre-split, then GPT-2's byte alphabet and the file's merges.
- SentencePiece BPE ("llama" in GGUF, llama2.c, tokenizer.model): merge the pair whose result scores best. That is
  exactly a BPE whose merges are every (left, right) split of a token, ranked by the token's score, with byte
  fallback. A tokenizer.model is read into the GGUF fields llama.cpp's convert_hf_to_gguf.py writes for it, and
  those go through the same reader as a GGUF file's.

Chat templates render with Jinja2 the way transformers' apply_chat_template does; a model without a template
gets ChatML (CHATML_TEMPLATE).
"""

import functools
import json
import logging
import re
import struct
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing

from llmos.errors import LlmosError
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, per llama.cpp's `tokenizer.ggml.pre` names (src/llama-vocab.cpp). The strings are the ones
# the models' tokenizer.json files use, so a Hugging Face directory maps back to its name when exported to GGUF.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_SPLITS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt-2": [_GPT2],
    "llama-bpe": [_LLAMA3],
    "qwen2": [_QWEN2],
    "smollm": [r"\p{N}", _GPT2],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
}
_PRE_ALIASES = {
    "": "default", "phi-2": "gpt-2", "mpt": "gpt-2", "olmo": "gpt-2", "jais": "gpt-2", "exaone4": "gpt-2",
    "llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe", "pixtral": "llama-bpe",
    "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2", "megrez": "qwen2", "hunyuan": "qwen2",
    "starcoder": "smollm", "refact": "smollm", "command-r": "smollm", "codeshell": "smollm", "exaone": "smollm",
    "minerva-7b": "smollm",
}
_LLAMA3_FAMILY = {"llama-bpe"}  # llama.cpp: whole words found in the vocab skip the merges, and BOS is on

# Used when a model has no chat template: ChatML, the format most small open chat models were tuned on.
# A vocabulary without <|im_start|> encodes it as plain text, which still works for base models.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Names llama.cpp recognizes as end of turn (src/llama-vocab.cpp, where it looks for the EOT token by text).
END_OF_TURN = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>"}

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, as {char: byte}."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(moved)}


BYTE_DECODER = _byte_alphabet()


# ----------------------------------------------------------------------------- building tokenizers.Tokenizer objects

def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> HFTokenizer:
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    hf = HFTokenizer(BPE(vocab, pairs, ignore_merges=pre in _LLAMA3_FAMILY))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS[pre]]
    hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool,
                       unk: str | None) -> HFTokenizer:
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    # Every way to build a normal token from two vocabulary entries, best-scoring token first.
    ranked = sorted((i for i, ty in enumerate(types) if ty == NORMAL), key=lambda i: -scores[i])
    merges = [(t[:k], t[k:]) for i in ranked for t in [tokens[i]] for k in range(1, len(t))
              if t[:k] in vocab and t[k:] in vocab]
    hf = HFTokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # llama.cpp prefixes a space to every text fragment, also after a special token; a normalizer does the same.
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return hf


def _add_special_tokens(hf: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens become special (skipped by decode(skip_special=True)), user-defined ones plain
    added tokens; both are matched whole in the text, so "<|im_start|>" is one id."""
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (UNKNOWN, CONTROL)]
    added = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    hf.add_special_tokens(special)
    hf.add_tokens(added)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise LlmosError(f"{path}: cannot read JSON ({e}); fix or remove the file") from None


def _spec(component) -> dict | None:
    """The JSON form of a tokenizers normalizer, pre-tokenizer or decoder (None when unset)."""
    return None if component is None else json.loads(component.__getstate__())


def _ids(value) -> list[int]:
    return [value] if isinstance(value, int) else [int(v) for v in value or []]


# ----------------------------------------------------------------------------- SentencePiece tokenizer.model files

SPM_MODEL_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}  # sentencepiece_model.proto TrainerSpec.ModelType


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte, i = data[i], i + 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _protobuf(data: bytes):
    """The (field number, value) pairs of one protobuf message: varints as int, fixed-size and length-delimited
    fields as bytes. Enough of the wire format to read a tokenizer.model without the sentencepiece package."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire in (1, 2, 5):
            size, i = (8, i) if wire == 1 else (4, i) if wire == 5 else _varint(data, i)
            value, i = data[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(data):
            raise ValueError("truncated message")
        yield key >> 3, value


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value  # negative int32s are 10-byte varints


def sentencepiece_fields(path) -> dict:
    """The tokenizer.ggml.* fields llama.cpp's convert_hf_to_gguf.py writes for a SentencePiece tokenizer.model
    (_set_vocab_sentencepiece, as for Llama 2): model "llama", pre "default", every piece with its score and type
    (byte pieces BYTE, <s> and </s> CONTROL, <unk> UNKNOWN), the trainer's unk/bos/eos/pad ids and BOS added; plus
    add_space_prefix, the normalizer's dummy prefix (llama.cpp's default when the key is absent, as there).
    sentencepiece_model.proto: ModelProto {pieces = 1 {piece = 1, score = 2, type = 3}, trainer_spec = 2,
    normalizer_spec = 3}."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise LlmosError(f"{p}: cannot read tokenizer ({e.strerror}); download the model's tokenizer.model again") from None
    tokens, scores, types, trainer, normalizer = [], [], [], {}, {}
    try:
        for field, value in _protobuf(data):
            if field == 1:
                piece = dict(_protobuf(value))
                tokens.append(piece.get(1, b"").decode("utf-8"))
                scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
                types.append(int(piece.get(3, NORMAL)))
            elif field == 2:
                trainer = dict(_protobuf(value))
            elif field == 3:
                normalizer = dict(_protobuf(value))
        kind, ids = trainer.get(3, 1), {}  # proto defaults: unigram; unk 0, bos 1, eos 2, no pad
        for key, field, default in (("unknown", 40, 0), ("bos", 41, 1), ("eos", 42, 2), ("padding", 43, -1)):
            if 0 <= (id := _int32(trainer.get(field, default))) < len(tokens):
                ids[f"tokenizer.ggml.{key}_token_id"] = id
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError, struct.error) as e:
        raise LlmosError(f"{p}: not a SentencePiece model ({e}); download the model's tokenizer.model again") from None
    if not tokens or not all(NORMAL <= t <= BYTE for t in types):
        raise LlmosError(f"{p}: not a SentencePiece model (no pieces, or pieces of unknown types); "
                         "download the model's tokenizer.model again")
    if kind != 2:
        raise LlmosError(f"{p}: a SentencePiece {SPM_MODEL_TYPES.get(kind, kind)} model; llmos reads SentencePiece "
                         "BPE models (Llama, Mistral), so put the model's tokenizer.json beside it instead")
    rules = [what for what, on in [("its normalization rules", normalizer.get(2)),
                                   ("extra-whitespace removal", normalizer.get(4, 1))] if on]
    if rules:  # Llama's models have neither; llama.cpp ignores both
        log.warning("%s: %s not applied, as in llama.cpp; ids can differ from sentencepiece's", p, " and ".join(rules))
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
              "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
              "tokenizer.ggml.add_space_prefix": bool(normalizer.get(3, 1))}
    return fields | ids


def _added_beyond(fields: dict, config: dict, d: Path) -> dict:
    """The tokens a Hugging Face directory adds after its tokenizer.model's pieces (tokenizer_config.json's
    added_tokens_decoder, added_tokens.json), appended as convert_hf_to_gguf.py writes them: CONTROL when special,
    else USER_DEFINED, score -1000. The model's own pieces (<s>, ...) keep their type."""
    tokens, scores, types = (list(fields[f"tokenizer.ggml.{k}"]) for k in ("tokens", "scores", "token_type"))
    added = {int(i): (_token_text(t), isinstance(t, dict) and bool(t.get("special")))
             for i, t in (config.get("added_tokens_decoder") or {}).items()}
    for text, i in _read_json(d / "added_tokens.json").items():
        added.setdefault(int(i), (text, False))
    for i in sorted(i for i in added if i >= len(tokens)):
        while len(tokens) < i:  # a gap: llama.cpp's converter pads with unused [PADn] tokens
            tokens.append(f"[PAD{len(tokens)}]"), scores.append(-10000.0), types.append(UNUSED)
        tokens.append(added[i][0]), scores.append(-1000.0), types.append(CONTROL if added[i][1] else USER_DEFINED)
    return fields | {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}


# ----------------------------------------------------------------------------- the tokenizer

class Tokenizer:
    def __init__(self, hf: HFTokenizer, *, bos_id=None, eos_ids=(), pad_id=None, unk_id=None, add_bos=False,
                 chat_template=None, vocab_size=None, scores=None):
        self.hf = hf
        self.bos_id, self.pad_id, self.unk_id = bos_id, pad_id, unk_id
        self.eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
        self.eos_id = self.eos_ids[0] if self.eos_ids else None
        self.add_bos = bool(add_bos and bos_id is not None)
        self.chat_template = chat_template
        self.vocab_size = vocab_size or max(hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._scores = scores  # SentencePiece scores when the source had them, written back to GGUF as they were
        # "spm": SentencePiece-style BPE (▁ for spaces, <0xXX> byte tokens); "bytes": GPT-2 byte-level BPE
        self.kind = ("spm" if getattr(hf.model, "byte_fallback", False) else
                     "bytes" if "ByteLevel" in json.dumps(_spec(hf.decoder)) else "other")

    # --- text <-> ids
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Incomplete UTF-8 at the end comes out as '\\ufffd', so streaming can hold it back until it completes."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def count(self, text: str) -> int:
        """Tokens in `text`, without BOS."""
        return len(self.hf.encode(text, add_special_tokens=False).ids)

    def piece(self, id: int) -> str:
        """The token as text: byte-level "Ġhello" and SentencePiece "▁hello" show as " hello", a byte token as its
        byte, and bytes that are not whole UTF-8 characters as \\xNN."""
        token = self.hf.id_to_token(id)
        if token is None:
            raise LlmosError(f"token id {id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if id in self.hf.get_added_tokens_decoder():
            return token
        if self.kind == "bytes" and all(c in BYTE_DECODER for c in token):
            return bytes(BYTE_DECODER[c] for c in token).decode("utf-8", "backslashreplace")
        if self.kind == "spm":
            m = _BYTE_TOKEN.fullmatch(token)
            return bytes([int(m[1], 16)]).decode("utf-8", "backslashreplace") if m else token.replace("▁", " ")
        return token

    def _text(self, id: int | None) -> str | None:
        return None if id is None else self.hf.id_to_token(id)

    # --- chat
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools=None, **kw) -> str:
        """Render like transformers' apply_chat_template(tokenize=False); ChatML when the model has no template."""
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id, "pad_token": self.pad_id}
        variables = {k: self._text(i) for k, i in names.items() if i is not None}
        # Like transformers: drop None values (an OpenAI "content": null would otherwise render as "None").
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables |= dict(messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt)
        template = _compile_template(self.chat_template or CHATML_TEMPLATE)
        try:
            return template.render(**(variables | kw))
        except Exception as e:  # raise_exception() in the template, or a template reading a key a message lacks
            raise LlmosError(f"chat template failed: {type(e).__name__}: {e}; check the messages' roles and order")

    def encode_chat(self, messages, add_generation_prompt=True, tools=None) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, tools)
        bos = self._text(self.bos_id)
        return self.encode(text, add_bos=self.add_bos and not (bos and text.startswith(bos)))

    # --- readers
    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        """tokenizer.json; else a SentencePiece tokenizer.model (Llama 2, Mistral repositories); else GPT-2's
        vocab.json + merges.txt. tokenizer_config.json and generation_config.json name the special tokens."""
        d = Path(path)
        if not d.is_dir():
            raise LlmosError(f"{d}: not a directory; pass a Hugging Face model directory with tokenizer.json")
        config = _read_json(d / "tokenizer_config.json")
        spm = None
        try:
            if (d / "tokenizer.json").is_file():
                hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
            elif (d / "tokenizer.model").is_file():  # read as a GGUF vocabulary, by the same code
                spm = cls.from_gguf_fields(_added_beyond(sentencepiece_fields(d / "tokenizer.model"), config, d))
                hf = spm.hf
            elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
                vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
                merges = [m for m in (d / "merges.txt").read_text(encoding="utf-8").splitlines()
                          if m and not m.startswith("#version")]
                tokens = sorted(vocab, key=vocab.get)
                hf = _byte_level_bpe(tokens, merges, "gpt-2")
            else:
                raise LlmosError(f"{d}: no tokenizer.json (or tokenizer.model, or vocab.json + merges.txt); "
                                 "copy the tokenizer files from the model's repository")
        except LlmosError:
            raise
        except Exception as e:
            raise LlmosError(f"{d / 'tokenizer.json'}: cannot load tokenizer ({e}); re-download it") from None
        generation = _read_json(d / "generation_config.json")
        ids = {k: hf.token_to_id(_token_text(config.get(f"{k}_token")) or "") for k in ("bos", "eos", "pad", "unk")}
        bos_id = ids["bos"] if ids["bos"] is not None else generation.get("bos_token_id")
        eos_ids = [ids["eos"], *_ids(generation.get("eos_token_id"))]
        if spm is not None:  # what the configs leave out, the tokenizer.model's trainer spec says
            bos_id = spm.bos_id if bos_id is None else bos_id
            eos_ids = eos_ids if any(i is not None for i in eos_ids) else spm.eos_ids
            ids |= {k: getattr(spm, f"{k}_id") for k in ("pad", "unk") if ids[k] is None}
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        else:
            template = _read_json(d / "chat_template.json").get("chat_template", config.get("chat_template"))
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        add_bos = config.get("add_bos_token")
        if add_bos is None and spm is not None:  # transformers' LlamaTokenizer and llama.cpp add BOS by default
            add_bos = spm.add_bos
        elif add_bos is None:  # no flag: does the tokenizer.json post-processor put BOS first?
            first, plain = hf.encode("a").ids[:1], hf.encode("a", add_special_tokens=False).ids[:1]
            add_bos = bos_id is not None and first == [bos_id] and plain != first
        return cls(hf, bos_id=bos_id, eos_ids=eos_ids, pad_id=ids["pad"], unk_id=ids["unk"], add_bos=add_bos,
                   chat_template=template, vocab_size=spm and spm.vocab_size, scores=spm and spm._scores)

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> "Tokenizer":
        def get(key, default=None):
            return fields.get(f"tokenizer.ggml.{key}", default)

        model, tokens = get("model"), list(get("tokens") or [])
        if not tokens:
            raise LlmosError("GGUF has no tokenizer.ggml.tokens; this file carries no vocabulary")
        types = list(get("token_type") or [NORMAL] * len(tokens))
        ids = {k: get(f"{k}_token_id") for k in ("bos", "eos", "padding", "unknown", "eot", "eom")}
        if model == "gpt2":
            pre = _PRE_ALIASES.get(get("pre", ""), get("pre"))
            if pre not in PRE_SPLITS:
                known = sorted(PRE_SPLITS.keys() | _PRE_ALIASES.keys() - {""})
                raise LlmosError(f"GGUF pre-tokenizer {get('pre')!r} is not supported; llmos knows {', '.join(known)}")
            hf, scores = _byte_level_bpe(tokens, list(get("merges") or []), pre), None
            add_bos = get("add_bos_token", pre in _LLAMA3_FAMILY)
        elif model == "llama":
            scores = [float(s) for s in get("scores") or [0.0] * len(tokens)]
            unk = ids["unknown"] if ids["unknown"] is not None and ids["unknown"] < len(tokens) else None
            hf = _sentencepiece_bpe(tokens, scores, types, bool(get("add_space_prefix", True)),
                                    None if unk is None else tokens[unk])
            add_bos = get("add_bos_token", True)
        else:
            raise LlmosError(f"GGUF tokenizer model {model!r} is not supported; llmos reads 'llama' "
                             "(SentencePiece) and 'gpt2' (byte-level BPE) vocabularies")
        _add_special_tokens(hf, tokens, types)
        return cls(hf, bos_id=ids["bos"], eos_ids=[ids["eos"], ids["eot"], ids["eom"]], pad_id=ids["padding"],
                   unk_id=ids["unknown"], add_bos=add_bos, chat_template=fields.get("tokenizer.chat_template"),
                   vocab_size=len(tokens), scores=scores)

    @classmethod
    def from_sentencepiece(cls, path) -> "Tokenizer":
        """A SentencePiece BPE tokenizer.model alone, read as the GGUF vocabulary llama.cpp's converter makes of it."""
        return cls.from_gguf_fields(sentencepiece_fields(path))

    @classmethod
    def from_llama2c(cls, path, vocab_size=None) -> "Tokenizer":
        """llama2.c tokenizer.bin: int32 max_token_length, then per token float32 score, int32 length, bytes.
        Its export wrote SentencePiece pieces with '▁' as ' ' and BOS/EOS as '\\n<s>\\n' / '\\n</s>\\n'."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise LlmosError(f"{p}: cannot read tokenizer ({e.strerror}); pass the tokenizer.bin of the model") from None
        bad = f"{p}: not a llama2.c tokenizer.bin"
        if len(data) < 4:
            raise LlmosError(f"{bad} (too short); pass the tokenizer.bin exported with the model")
        (max_len,), offset, tokens, scores = struct.unpack_from("<i", data), 4, [], []
        while offset < len(data) and (vocab_size is None or len(tokens) < vocab_size):
            if offset + 8 > len(data):
                raise LlmosError(f"{bad} (truncated at token {len(tokens)}); re-export it")
            score, n = struct.unpack_from("<fi", data, offset)
            if not 0 <= n <= max_len or offset + 8 + n > len(data):
                raise LlmosError(f"{bad} (token {len(tokens)} has length {n}, limit {max_len}); re-export it")
            try:
                tokens.append(data[offset + 8:offset + 8 + n].decode("utf-8"))
            except UnicodeDecodeError:
                raise LlmosError(f"{bad} (token {len(tokens)} is not UTF-8); re-export it") from None
            scores.append(score)
            offset += 8 + n
        if len(tokens) < max(vocab_size or 0, 3):
            raise LlmosError(f"{bad}: {len(tokens)} tokens, the model needs {vocab_size or 3}; pass its own tokenizer")
        tokens = [t.strip() if i in (1, 2) else t.replace(" ", "▁") for i, t in enumerate(tokens)]
        types = [UNKNOWN if i == 0 else CONTROL if i in (1, 2) else BYTE if _BYTE_TOKEN.fullmatch(t) else NORMAL
                 for i, t in enumerate(tokens)]
        hf = _sentencepiece_bpe(tokens, scores, types, True, tokens[0])
        _add_special_tokens(hf, tokens, types)
        return cls(hf, bos_id=1, eos_ids=[2], unk_id=0, add_bos=True, vocab_size=len(tokens), scores=scores)

    # --- writers
    def save_hf(self, out_dir) -> None:
        """tokenizer.json + tokenizer_config.json, loadable by transformers' AutoTokenizer and by tokenizers."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        hf = HFTokenizer.from_str(self.hf.to_str())
        bos = self._text(self.bos_id)
        if self.add_bos:
            hf.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                   special_tokens=[(bos, self.bos_id)])
        hf.save(str(out / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False, "bos_token": bos, "eos_token": self._text(self.eos_id),
                  "pad_token": self._text(self.pad_id), "unk_token": self._text(self.unk_id)}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def to_gguf_fields(self, eos_ids=()) -> dict:
        """The tokenizer.ggml.* keys llama.cpp reads, plus tokenizer.chat_template. `eos_ids`: more ids that end
        generation (a model's generation_config), written with the tokenizer's own as eos, eot and eom."""
        if self.kind == "other":
            raise LlmosError(f"a {type(self.hf.model).__name__} tokenizer cannot be written to GGUF; llmos writes "
                             "byte-level BPE and SentencePiece BPE vocabularies")
        tokens, types = [f"[PAD{i}]" for i in range(self.vocab_size)], [UNUSED] * self.vocab_size
        for token, i in self.hf.get_vocab(with_added_tokens=False).items():
            tokens[i], types[i] = token, BYTE if self.kind == "spm" and _BYTE_TOKEN.fullmatch(token) else NORMAL
        for i, added in self.hf.get_added_tokens_decoder().items():
            tokens[i], types[i] = added.content, CONTROL if added.special else USER_DEFINED
        # Only SentencePiece's own unknown piece is UNKNOWN; an unk that is a special token (SmolLM2's
        # <|endoftext|>) stays CONTROL, as llama.cpp's converter writes it.
        if self.kind == "spm" and self.unk_id is not None and tokens[self.unk_id] == self.hf.model.unk_token:
            types[self.unk_id] = UNKNOWN
        fields = {"tokenizer.ggml.model": "llama" if self.kind == "spm" else "gpt2", "tokenizer.ggml.tokens": tokens,
                  "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_bos_token": self.add_bos,
                  "tokenizer.ggml.add_eos_token": False}
        merges = None if self._scores else [
            m if isinstance(m, str) else " ".join(m) for m in json.loads(self.hf.to_str())["model"]["merges"]]
        if self.kind == "spm":
            pre_tokenizer = _spec(self.hf.pre_tokenizer) or {}
            fields["tokenizer.ggml.pre"] = "default"
            fields["tokenizer.ggml.scores"] = self._scores or _scores_from_merges(tokens, merges)
            fields["tokenizer.ggml.add_space_prefix"] = '"Prepend"' in json.dumps(_spec(self.hf.normalizer)) or (
                pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme") != "never")
        else:
            fields["tokenizer.ggml.pre"] = _pre_name(_spec(self.hf.pre_tokenizer))
            fields["tokenizer.ggml.merges"] = merges
        ends = list(dict.fromkeys([*self.eos_ids, *eos_ids]))
        eot, eom = self._end_of_turn(ends[1:])
        ids = {"bos": self.bos_id, "eos": ends[0] if ends else None, "eot": eot, "eom": eom, "padding": self.pad_id,
               "unknown": self.unk_id}
        for key, id in ids.items():
            if id is not None:
                fields[f"tokenizer.ggml.{key}_token_id"] = id
        if self.chat_template:
            fields["tokenizer.chat_template"] = self.chat_template
        return fields

    def _end_of_turn(self, extra: list[int]) -> tuple[int | None, int | None]:
        """GGUF holds one eos id plus an eot and an eom id, so the other end ids travel as those two: <|eom_id|>
        as eom, and as eot an end-of-turn token by name (<|eot_id|>, <|im_end|>, ...) or else the first other
        one -- what llama.cpp's converters do with a generation_config eos list (conversion/laguna.py)."""
        eom = next((i for i in extra if self._text(i) == "<|eom_id|>"), None)
        extra = [i for i in extra if i != eom]
        eot = next((i for i in extra if self._text(i) in END_OF_TURN), extra[0] if extra else None)
        if len(extra) > 1:
            log.warning("GGUF keeps eos, eot and eom ids only; end tokens %s are not written",
                        [i for i in extra if i != eot])
        return eot, eom


def _scores_from_merges(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that make llama.cpp merge in the same order: minus the rank of a token's first merge."""
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    return [-float(rank.get(t, len(merges) + i)) for i, t in enumerate(tokens)]


def _pre_name(spec: dict | None) -> str:
    """The llama.cpp name of a byte-level pre-tokenizer: its regexes, in order, looked up in PRE_SPLITS."""
    steps = spec.get("pretokenizers", []) if spec and spec["type"] == "Sequence" else [spec] if spec else []
    regexes = []
    for s in steps:
        if s["type"] == "Split":
            regexes.append(s["pattern"].get("Regex") or re.escape(s["pattern"]["String"]))
        elif s["type"] == "Digits":
            regexes.append(r"\p{N}" if s.get("individual_digits") else r"\p{N}+")
        elif s["type"] == "ByteLevel" and s.get("use_regex", True):
            regexes.append(_GPT2)
    for name, splits in PRE_SPLITS.items():
        if splits == regexes:
            return name
    raise LlmosError(f"this tokenizer's pre-tokenizer {regexes} has no llama.cpp name; GGUF export supports "
                     f"{', '.join(PRE_SPLITS)}")


# ----------------------------------------------------------------------------- chat templates (as transformers renders)

@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps it."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LlmosError(f"chat template has a syntax error on line {e.lineno}: {e.message}; fix the template") from None
