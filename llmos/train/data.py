"""Pretraining data: text corpora → memory-mapped token shards → batches of windows.

    corpus: a .txt / .md / .jsonl ({"text": ...} per line) file, or a directory of them
      → documents, checked to be UTF-8 and not empty
      → train / validation split: the last `val_fraction` of the bytes is held out,
        cut at a line start, so the validation text and its byte count are exact
      → OUT/data/train.bin, val.bin: token ids (uint16, or uint32 for vocabularies over
        65,536), each document after a separator token (the tokenizer's BOS, else EOS);
        meta.json, written last, says which corpus and tokenizer made them
      → Batches: [B, T] windows in a seeded random order; one integer (the cursor)
        restores the order exactly on resume, and each rank of a distributed run reads
        its own slice of every global batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmos.errors import LlmosError
from llmos.files import atomic_write

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
JSONL_SUFFIXES = {".jsonl"}
CORPUS_HELP = 'corpus: a .txt, .md or .jsonl ({"text": ...}) file, or a directory of them'  # of --data, wherever read
PIECE_CHARS = 1 << 20  # documents longer than this are tokenized in pieces, cut at line starts

# ----------------------------------------------------------------------------
# Reading: files → documents


def corpus_files(path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise LlmosError(f"{path}: no such file or directory; pass a .txt, .md or .jsonl corpus or a directory of them")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES)
    if not files:
        raise LlmosError(f"{path}: no .txt, .md or .jsonl files in this directory; pass a corpus of text files")
    return files


def read_documents(path) -> list[str]:
    """Every document of the corpus: a text file is one document, a JSONL line's "text" is one."""
    docs, files = [], corpus_files(path)
    for file in files:
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LlmosError(f"{file}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset {e.start}); "
                             "convert it, e.g. iconv -f latin1 -t utf-8") from None
        text = text.removeprefix("\ufeff")
        if file.suffix.lower() in JSONL_SUFFIXES:
            docs += jsonl_texts(file, raw)
        elif text.strip():
            docs.append(text)
    if not any(d.strip() for d in docs):
        size = sum(f.stat().st_size for f in files)
        raise LlmosError(f"{path}: empty corpus (no text in its {size} bytes); pass files that contain text")
    return docs


def jsonl_texts(file: Path, raw: bytes) -> list[str]:
    texts, offset = [], 0
    for number, line in enumerate(raw.split(b"\n"), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                raise LlmosError(f"{file}: line {number} (byte offset {offset}) is not JSON ({e}); "
                                 'each line must be {"text": "..."}') from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise LlmosError(f"{file}: line {number} (byte offset {offset}) has no string \"text\" field; "
                                 'each line must be {"text": "..."}')
            if row["text"].strip():
                texts.append(row["text"])
        offset += len(line) + 1
    return texts


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out about the last `val_fraction` of the corpus's bytes, from the nearest line start after the cut
    (or before it, in the last line)."""
    if not 0 <= val_fraction < 1:
        raise LlmosError(f"val_fraction {val_fraction} must be at least 0 and below 1, e.g. 0.1")
    if val_fraction == 0:
        return docs, []
    sizes = [len(d.encode()) for d in docs]
    cut = round(sum(sizes) * (1 - val_fraction))  # byte offset into the concatenated corpus
    for i, size in enumerate(sizes):
        if cut < size:
            break
        cut -= size
    else:
        i, cut = len(docs) - 1, sizes[-1]  # nothing left to hold out: refused below
    doc = docs[i]
    at = len(doc.encode()[:cut].decode(errors="ignore"))  # a character index at or before the byte offset
    after, before = doc.find("\n", at), doc.rfind("\n", 0, at)  # the next line start, else the one before
    at = after + 1 if 0 <= after < len(doc) - 1 else before + 1 if before >= 0 else at
    train, val = docs[:i] + [doc[:at]], [doc[at:]] + docs[i + 1 :]
    train, val = [d for d in train if d], [d for d in val if d]
    if not any(d.strip() for d in train) or not any(d.strip() for d in val):
        raise LlmosError(f"the corpus ({sum(sizes)} bytes) is too small to hold out {val_fraction:.0%} for validation; "
                         "add text or pass --val-fraction 0")
    return train, val


# ----------------------------------------------------------------------------
# Tokenizing: documents → token shards on disk


def token_dtype(tokenizer):
    return np.uint16 if tokenizer.hf.get_vocab_size(with_added_tokens=True) <= 1 << 16 else np.uint32


def pieces(text: str, size: int = PIECE_CHARS):
    """Cut a long text after newlines followed by a non-space, where no pre-tokenizer merges across."""
    start = 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and cut + 1 < len(text) and text[cut + 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1 or cut + 1 == len(text):
            break
        yield text[start : cut + 1]
        start = cut + 1
    yield text[start:]


def write_tokens(docs: list[str], tokenizer, path) -> int:
    """Tokenize documents into one flat file of ids, each document after the separator; returns the count."""
    dtype = token_dtype(tokenizer)
    sep = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    chunks = [(j == 0, p) for d in docs for j, p in enumerate(pieces(d))]
    count = 0

    def write(f):
        nonlocal count
        for k in range(0, len(chunks), 64):
            batch = chunks[k : k + 64]
            encodings = tokenizer.hf.encode_batch([p for _, p in batch], add_special_tokens=False)
            for (first, _), enc in zip(batch, encodings):
                ids = ([sep] if first and sep is not None else []) + enc.ids
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                count += len(ids)

    atomic_write(path, write)
    return count


@dataclass
class Corpus:
    train: np.ndarray  # memory-mapped token ids
    val: np.ndarray | None
    val_bytes: int  # UTF-8 bytes of the validation text, for bits per byte
    meta: dict


def prepare(data, tokenizer, out_dir, val_fraction: float = 0.1) -> Corpus:
    """Token shards for `data` in out_dir, reused when corpus, split and tokenizer are unchanged."""
    out_dir = Path(out_dir)
    key = {
        "sources": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in corpus_files(data)],
        "val_fraction": val_fraction,
        "tokenizer": tokenizer_hash(tokenizer),
    }
    meta_file = out_dir / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()).get("key") == key:
        return load(out_dir)
    train, val = split_documents(read_documents(data), val_fraction)
    meta = {
        "key": key,
        "dtype": np.dtype(token_dtype(tokenizer)).name,
        "train_tokens": write_tokens(train, tokenizer, out_dir / "train.bin"),
        "val_tokens": write_tokens(val, tokenizer, out_dir / "val.bin"),
        "train_bytes": sum(len(d.encode()) for d in train),
        "val_bytes": sum(len(d.encode()) for d in val),
    }
    atomic_write(meta_file, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return load(out_dir)


def load(out_dir) -> Corpus:
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "meta.json").read_text())
    train = np.memmap(out_dir / "train.bin", dtype=meta["dtype"], mode="r")
    val = np.memmap(out_dir / "val.bin", dtype=meta["dtype"], mode="r") if meta["val_tokens"] else None
    return Corpus(train, val, meta["val_bytes"], meta)


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Batches: windows of T + 1 tokens in a seeded order, restorable from a cursor


class Batches:
    """Yields (x, y) of [batch, seq_len] for this rank; y is x shifted by one token.

    Each epoch cuts the stream into non-overlapping windows on a grid shifted by a
    random offset (so later epochs see new boundaries) and visits them in a random
    order; both come from (seed, epoch) alone. `cursor` counts windows the whole
    run (all ranks) has consumed: a global batch is batch * world consecutive
    windows and rank r takes its r-th slice, so one process with the same global
    batch sees the same windows.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch: int, rank: int = 0, world: int = 1, seed: int = 0):
        if len(tokens) < seq_len + 1:
            raise LlmosError(f"the training text has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                             "lower --seq-len or add text")
        self.tokens, self.T, self.batch, self.rank, self.world, self.seed = tokens, seq_len, batch, rank, world, seed
        self.cursor = 0
        self._epoch = None  # (epoch, cursor at its start, window starts)

    def _layout(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        shift = int(rng.integers(self.T)) if epoch else 0
        n = (len(self.tokens) - 1 - shift) // self.T
        if n == 0:  # a stream only just longer than one window: keep the unshifted grid
            shift, n = 0, (len(self.tokens) - 1) // self.T
        return rng, shift, n

    def _start(self, i: int) -> int:
        """Token offset of the i-th window of the run."""
        if self._epoch is None or i < self._epoch[1]:
            self._epoch = None
            epoch, first = 0, 0
        else:
            epoch, first, starts = self._epoch
            if i < first + len(starts):
                return int(starts[i - first])
            epoch, first = epoch + 1, first + len(starts)
        while True:
            rng, shift, n = self._layout(epoch)
            if i < first + n:
                self._epoch = (epoch, first, shift + rng.permutation(n) * self.T)
                return int(self._epoch[2][i - first])
            epoch, first = epoch + 1, first + n

    def __iter__(self):
        return self

    def __next__(self):
        first = self.cursor + self.rank * self.batch
        rows = np.stack([self.tokens[s : s + self.T + 1] for s in map(self._start, range(first, first + self.batch))])
        self.cursor += self.batch * self.world
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seed": self.seed, "seq_len": self.T}

    def load_state_dict(self, state: dict) -> None:
        self.cursor, self.seed, self.T = state["cursor"], state["seed"], state["seq_len"]
        self._epoch = None
