"""Stage 2: supervised fine-tuning: a model learns to answer like the assistant turns of a conversation file.

    llmos train sft --data conversations.json --out DIR (--steps N | --minutes M) [--model MODEL] [--no-lora]
    llmos train sft --data ../shared/data/sft/identity.json --fill 'name=Ada,author=Ada Lab' --steps 40 --out runs/sft

With no other flag it runs the best recipe measured (recipes/sft.toml; llmos/train/finetune.py has the
numbers): LoRA of rank 16 on the bundled SmolLM2-135M, rows of 512 tokens, 4 per step in micro-batches
of 2. Before loading the model it prints the memory plan `llmos fit MODEL --train lora` makes for the
run, and refuses a run that would not fit here, naming the flag that would (--micro-batch 1, --seq-len N).

MODEL is any name llmos loads (the bundled SmolLM2 GGUF by default, an HF directory, a .gguf file, ...).
The data is alpaca, ShareGPT or OpenAI-messages JSON/JSONL (llmos/train/chat_data.py). DIR becomes a
Hugging Face directory with the model's tokenizer and chat template, so `llmos run DIR` chats with it;
beside it trainer_state.pt, summary.json and loss.png. Running the same command on an unfinished DIR
resumes exactly (model or adapters, optimizer, schedule, random states, data position); --stop-at N
pauses after step N.

Decisions:
- Conversations are rendered with the model's own chat template; the loss covers the assistant tokens
  only (their content and end-of-turn token), found exactly by rendering prefix by prefix (chat_data.py).
  The tokens that close assistant turns join the model's end-of-sequence ids, so generation stops there.
- Packing (default on) fills each row of --seq-len tokens with whole conversations in a seeded order.
  The model is given the row's doc_ids, so each conversation attends only to itself and its positions
  start at 0: a packed row's loss is the sum of its conversations' losses run alone (TRL's padding-free
  packing). --no-packing puts one conversation per row, right-padded.
- The loss is the mean over every assistant token of the step (all micro-batches together), so
  micro-batching and packing do not change the weight of a token.
- LoRA (on by default; --no-lora trains every weight) wraps the linear layers named by --lora-targets
  (llmos/train/lora.py); the adapters are merged into the weights when the model is written. --lr 0 (the
  default) means 1e-3 for LoRA (measured: recipes/sft.toml) and 2e-5 for full fine-tuning; held-out loss
  is measured before the first step and every --eval-every steps.
- `{{name}}`-style placeholders in the data are filled from --fill 'name=Ada,author=Ada Lab'.

The loop, checkpoints and resume are llmos/train/finetune.py's, shared with `llmos train dpo` and `reward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmos.errors import LlmosError
from llmos.options import defaults, option
from llmos.train import chat_data as C
from llmos.train.finetune import (IGNORE, FinetuneConfig, Order, add_lora, check, eos_ids, finetune, load_base, pad_id,
                                  pad_rows, row_tokens, split)
from llmos.train.loop import log


@dataclass
@defaults(help={"data": "conversations: a JSON or JSONL file (alpaca, ShareGPT or OpenAI messages)"})
class SFTConfig(FinetuneConfig):
    packing: bool = option(True, "pack several conversations into each row (each attends only to itself)")
    fill: str = option("", "values for {{key}} placeholders in the data: 'name=Ada,author=Ada Lab'")


# ----------------------------------------------------------------------------
# Rows of conversations: packed, masked to the assistant tokens


def doc_ids(lengths: list[list[int]], width: int) -> torch.Tensor:
    """[B, width] document numbers of packed rows: 0 over a row's first conversation, 1 over its second, ...,
    then one more number over the padding after them. lengths[r] are row r's conversation lengths."""
    docs = torch.empty((len(lengths), width), dtype=torch.long)
    for r, ls in enumerate(lengths):
        counts = torch.tensor(ls + [max(0, width - sum(ls))])
        docs[r] = torch.arange(len(counts)).repeat_interleave(counts)[:width]
    return docs


def token_loss(model, batch, device) -> torch.Tensor:
    """Summed cross-entropy over the trained tokens of a micro-batch (x, y, doc_ids or None)."""
    x, y, docs = batch
    logits = model(x.to(device), doc_ids=None if docs is None else docs.to(device))
    return F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE, reduction="sum")


class Rows:
    """Micro-batches of (x, y, doc_ids) for one optimizer step: rows of conversations, packed or one per row
    (then doc_ids is None)."""

    def __init__(self, examples, seq_len: int, batch: int, micro: int, packing: bool, seed: int, pad_id: int):
        self.examples, self.T, self.batch, self.micro, self.packing = examples, seq_len, batch, micro, packing
        self.order, self.pad_id, self.cursor = Order(len(examples), seed), pad_id, 0

    def _row(self):
        ids, mask, lengths = [], [], []
        while True:
            e_ids, e_mask = self.examples[self.order(self.cursor)]
            e_ids, e_mask = e_ids[: self.T + 1], e_mask[: self.T + 1]
            if ids and len(ids) + len(e_ids) > self.T + 1:
                return ids, mask, lengths
            ids, mask, lengths, self.cursor = ids + e_ids, mask + e_mask, lengths + [len(e_ids)], self.cursor + 1
            if not self.packing:
                return ids, mask, lengths

    def next_step(self) -> list:
        rows = [self._row() for _ in range(self.batch)]
        micros = []
        for i in range(0, self.batch, self.micro):
            x, y = pad_rows([(ids, mask) for ids, mask, _ in rows[i : i + self.micro]], self.pad_id)
            docs = doc_ids([ls for _, _, ls in rows[i : i + self.micro]], x.shape[1]) if self.packing else None
            micros.append(((x, y, docs), int((y != IGNORE).sum())))
        return micros

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = state["cursor"]


def tokenize_conversations(tok, conversations, seq_len: int) -> tuple[list, int]:
    """[(ids, mask)] with at least one trained token within seq_len + 1 tokens; and how many were dropped."""
    out, dropped = [], 0
    for conv in conversations:
        ids, mask = C.render_masked(tok, conv["messages"], conv["tools"])
        if any(mask[1 : seq_len + 1]):
            out.append((ids, mask))
        else:
            dropped += 1
    return out, dropped


# ----------------------------------------------------------------------------
# SFT


def sft(cfg: SFTConfig) -> dict:
    check(cfg)
    conversations = C.load_conversations(cfg.data, C.parse_fill(cfg.fill))
    train, val = split(conversations, cfg.val_fraction, cfg.seed)
    model, tok, ckpt, device = load_base(cfg)
    add_lora(model, cfg)
    T = row_tokens(cfg, ckpt.config)
    train, dropped = tokenize_conversations(tok, train, T)
    val, _ = tokenize_conversations(tok, val, T)
    if not train:
        raise LlmosError(f"{cfg.data}: no conversation has an assistant token within {T} tokens; raise --seq-len")
    if dropped:
        log(0, f"note: {dropped} conversations have no assistant token within {T} tokens and are skipped")
    micro, pad = cfg.micro_batch or cfg.batch_size, pad_id(tok)
    log(0, f"{len(train)} training and {len(val)} held-out conversations from {cfg.data}; "
           f"{sum(sum(m) for _, m in train):,} assistant tokens of {sum(len(i) for i, _ in train):,}")

    def step_loss(batch):
        return token_loss(model, batch, device), {}

    def validate():
        if not val:
            return {}
        nats, n = 0.0, 0
        for i in range(0, len(val), micro):
            x, y = pad_rows([(ids[: T + 1], m[: T + 1]) for ids, m in val[i : i + micro]], pad)
            nats += token_loss(model, (x, y, None), device).item()
            n += int((y != IGNORE).sum())
        return {"val_loss": nats / max(n, 1)}

    batches = Rows(train, T, cfg.batch_size, micro, cfg.packing, cfg.seed, pad)
    return finetune(cfg, "sft", model, tok, ckpt, device, batches, step_loss, validate, (2e-5, 1e-3),
                    eos_ids(tok, ckpt, train))
