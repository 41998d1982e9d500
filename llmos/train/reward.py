"""Stage 3, the RLHF way: a reward model that scores a response, trained on preference pairs.

    llmos train reward --data pairs.jsonl.gz --out DIR (--steps N | --minutes M) [--model MODEL] [--no-lora]

The reward model is the language model with a scalar head on the final hidden state of the
conversation's last token: r = w · h_last + b. Trained with the Bradley-Terry loss
-log σ(r(chosen) - r(rejected)) (Ouyang et al. 2022), it reports on held-out pairs the accuracy
(chosen scored above rejected) and the mean margin r(chosen) - r(rejected), before the first step
and every --eval-every steps. The data formats and the defaults are those of `llmos train dpo` (LoRA of
rank 16, pairs of 512 tokens, 8 per step in micro-batches of 2), and so is the memory plan printed first.

DIR holds the language model (adapters merged; a Hugging Face directory) and reward_head.safetensors
(weight [1, dim], bias [1]); `load_reward_model(DIR)` and `score(...)` give rewards to RL and the arena.

Decisions: the hidden state is read with a forward hook on the final norm, so llmos/model.py is unchanged
(the vocabulary logits are still computed and thrown away); the head starts as N(0, 1/(dim + 1)) so the
untrained model ranks pairs at chance, not all tied; --lr 0 means 1e-5 for full training, 1e-4 for LoRA,
and the head always learns at that rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


from llmos import loader
from llmos.errors import LlmosError
from llmos.formats import hf
from llmos.train import chat_data as C
from llmos.train.dpo import PairConfig, Pairs, tokenize_pairs
from llmos.train.finetune import add_lora, check, eos_ids, finetune, load_base, pad_id, row_tokens, split
from llmos.train.loop import log

HEAD_FILE = "reward_head.safetensors"


@dataclass
class RewardConfig(PairConfig):
    """DPO's options without beta."""


def new_head(dim: int) -> nn.Linear:
    head = nn.Linear(dim, 1)
    nn.init.normal_(head.weight, std=(dim + 1) ** -0.5)
    nn.init.zeros_(head.bias)
    return head


def rewards(model, head, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Scalar rewards [B] of right-padded token rows `ids` [B, T] whose last real token is at `last` [B]."""
    seen = {}
    hook = model.norm.register_forward_hook(lambda module, args, out: seen.__setitem__("h", out))
    try:
        model(ids)
    finally:
        hook.remove()
    h = seen["h"][torch.arange(len(last), device=ids.device), last]
    return head(h.float()).squeeze(-1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(chosen - rejected)


def rows_tensor(rows: list[list[int]], pad_id: int, device):
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
    return ids.to(device), torch.tensor([len(r) - 1 for r in rows], device=device)


def reward(cfg: RewardConfig) -> dict:
    check(cfg)
    train, val = split(C.load_pairs(cfg.data), cfg.val_fraction, cfg.seed)
    model, tok, ckpt, device = load_base(cfg, rows=2)
    add_lora(model, cfg)
    torch.manual_seed(cfg.seed)
    head = new_head(ckpt.config.dim).to(device)
    T = row_tokens(cfg, ckpt.config)
    train, val = tokenize_pairs(cfg, tok, T, train, val)
    micro, pad = cfg.micro_batch or cfg.batch_size, pad_id(tok)
    log(0, f"{len(train)} training and {len(val)} held-out pairs from {cfg.data}")

    def scores(rows, indices):
        ids, last = rows_tensor([rows[i][0][0] for i in indices] + [rows[i][1][0] for i in indices], pad, device)
        r = rewards(model, head, ids, last)
        return r[: len(indices)], r[len(indices) :]

    def step_loss(indices):
        rc, rr = scores(train, indices)
        return bradley_terry_loss(rc, rr).sum(), {"accuracy": (rc > rr).sum().item(), "margin": (rc - rr).sum().item()}

    def validate():
        if not val:
            return {}
        loss = correct = margin = 0.0
        for start in range(0, len(val), micro):
            rc, rr = scores(val, list(range(start, min(start + micro, len(val)))))
            loss += bradley_terry_loss(rc, rr).sum().item()
            correct += (rc > rr).sum().item()
            margin += (rc - rr).sum().item()
        return {"val_loss": loss / len(val), "accuracy": correct / len(val), "margin": margin / len(val)}

    def write_head(directory: Path):
        hf.write_tensor_file(directory / HEAD_FILE, head.state_dict())

    return finetune(cfg, "reward", model, tok, ckpt, device, Pairs(len(train), cfg.batch_size, micro, cfg.seed),
                    step_loss, validate, (1e-5, 1e-4), eos_ids(tok, ckpt), extra={"head": head}, extra_files=write_head)


# ----------------------------------------------------------------------------
# Using a trained reward model


def load_reward_model(path, device: str = "cpu"):
    """(model, tokenizer, head) of a directory written by `llmos train reward`."""
    file = Path(path) / HEAD_FILE
    if not file.is_file():
        raise LlmosError(f"{path}: no {HEAD_FILE}; pass a directory written by `llmos train reward`")
    r = loader.load(str(path), "torch", device, precision="f32", tokenizer=False)
    model, tok, ckpt = r.model, r.tokenizer, r.checkpoint
    head = new_head(ckpt.config.dim)
    head.load_state_dict(hf.read_tensor_file(file))
    return model, tok, head.to(device).eval()


@torch.no_grad()
def score(model, tok, head, messages: list[dict], tools=None) -> float:
    """The reward of a conversation (usually ending with the assistant response to judge)."""
    ids, _ = C.render_masked(tok, messages, tools)
    ids = ids[-model.cfg.max_seq_len :]  # too long: keep the end, where the response is
    device = head.weight.device
    return rewards(model, head, torch.tensor([ids], device=device), torch.tensor([len(ids) - 1], device=device)).item()
