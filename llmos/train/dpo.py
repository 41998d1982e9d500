"""Stage 3: learn from comparisons with DPO (direct preference optimization) against a frozen reference.

    llmos train dpo --data pairs.jsonl.gz --out DIR (--steps N | --minutes M) [--model MODEL] [--beta 0.1] [--no-lora]
    llmos train dpo --recipe recipes/dpo.toml --model runs/sft --data ../shared/data/preference/hh_rlhf_harmless_base_test.jsonl.gz --out runs/dpo

The defaults are recipes/dpo.toml's measured values (bench/stages.py): LoRA of rank 16, pairs of at most
512 tokens, 8 per step in micro-batches of 2. Like every training stage it prints its memory plan (`llmos
fit MODEL --train lora --batch 4`: a pair is two sequences) before loading the model, and refuses a run
that would not fit here, naming the flag that would.

Pairs are hh-rlhf dialogues, ShareGPT chosen/rejected or {prompt, chosen, rejected} rows (chat_data.py).
For each pair the policy π and the reference (the starting model, frozen) give log p(response | prompt),
summed over the response's assistant tokens only, and the loss is

    -log σ(β [(log π(chosen) - log ref(chosen)) - (log π(rejected) - log ref(rejected))])

(Rafailov et al. 2023, eq. 7; TRL's "sigmoid" loss). The implicit reward of a response is
β (log π - log ref). Held-out pairs are measured before the first step and every --eval-every steps:
    reward_accuracy   pairs whose chosen reward is above the rejected one (0 before training: all ties)
    reward_margin     mean chosen minus rejected reward
    policy_accuracy   pairs where the model gives the chosen response the higher log-probability
    ref_accuracy      the same for the reference model: the baseline policy_accuracy is compared with

Decisions:
- With --lora the reference is the same model with its adapters switched off (no second copy);
  without, a frozen copy of the starting weights.
- Reference log-probabilities are computed one pair at a time and cached, so they are the same
  numbers whatever the batch composition, and a resumed run matches an uninterrupted one.
- Sequences longer than --seq-len keep their beginning; a pair with no response token left is skipped.
- --lr 0 (the default) means 5e-5 for LoRA (measured: recipes/dpo.toml) and 1e-6 for full training.

DIR is a Hugging Face directory `llmos run` chats with, plus trainer_state.pt, summary.json, loss.png.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmos.errors import LlmosError
from llmos.options import defaults, option
from llmos.train import chat_data as C
from llmos.train import lora as L
from llmos.train.finetune import (IGNORE, FinetuneConfig, Order, add_lora, check, eos_ids, finetune, load_base, pad_id,
                                  pad_rows, row_tokens, split)
from llmos.train.loop import log


@dataclass
@defaults(val_fraction=0.1, batch_size=8, warmup_steps=10, lora_dropout=0.0, eval_every=25, save_every=25, help={
    "data": "preference pairs: a JSON or JSONL file (hh-rlhf, ShareGPT chosen/rejected or prompt/chosen/rejected)",
    "val_fraction": "fraction of the pairs held out for validation (at least one when > 0)",
    "batch_size": "pairs per optimizer step",
    "micro_batch": "pairs per forward pass (0 = batch_size); gradients accumulate over the rest",
    "seq_len": "longest prompt + response in tokens (0 = the model's context); longer ones are cut"})
class PairConfig(FinetuneConfig):
    """The options of the stages that learn from preference pairs: DPO and the reward model."""


@dataclass
class DPOConfig(PairConfig):
    beta: float = option(0.1, "DPO temperature: how far the policy may move from the reference")


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO losses and the implicit rewards β(log π - log ref) of the chosen and rejected responses."""
    chosen_reward, rejected_reward = beta * (pi_chosen - ref_chosen), beta * (pi_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()


def sequence_logps(model, x, y) -> torch.Tensor:
    """Per row, the summed log-probability of the target tokens (y != IGNORE)."""
    logits = model(x).float()
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(y.shape).sum(-1)


# ----------------------------------------------------------------------------
# Pairs: tokenized, split, batched


def tokenize_pairs(cfg, tok, T: int, train: list, val: list) -> tuple[list, list]:
    """Train and held-out pairs as (chosen (ids, mask), rejected (ids, mask)), masks on response tokens only."""
    out, dropped = [], 0
    for part in (train, val):
        rows = []
        for p in part:
            both = []
            for key in ("chosen", "rejected"):
                ids, mask = C.render_masked(tok, p["prompt"] + p[key], p["tools"], start=len(p["prompt"]))
                both.append((ids[: T + 1], mask[: T + 1]))
            if all(any(m[1:]) for _, m in both):
                rows.append(tuple(both))
            else:
                dropped += 1
        out.append(rows)
    if dropped:
        log(0, f"note: {dropped} pairs have no response token within {T} tokens and are skipped")
    if not out[0]:
        raise LlmosError(f"{cfg.data}: no usable preference pair within {T} tokens; raise --seq-len")
    return out[0], out[1]


class Pairs:
    """[(pair indices, units)] for one optimizer step, in a seeded order; units = pairs."""

    def __init__(self, n: int, batch: int, micro: int, seed: int):
        self.order, self.batch, self.micro, self.cursor = Order(n, seed), batch, micro, 0

    def next_step(self):
        idx = [self.order(self.cursor + i) for i in range(self.batch)]
        self.cursor += self.batch
        return [(idx[i : i + self.micro], len(idx[i : i + self.micro])) for i in range(0, self.batch, self.micro)]

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, state):
        self.cursor = state["cursor"]


def pair_batch(pairs: list, pad_id: int, device):
    """x, y of the chosen rows followed by the rejected rows."""
    rows = [p[0] for p in pairs] + [p[1] for p in pairs]
    return tuple(t.to(device) for t in pad_rows(rows, pad_id))


# ----------------------------------------------------------------------------
# DPO


def dpo(cfg: DPOConfig) -> dict:
    check(cfg)
    if cfg.beta <= 0:
        raise LlmosError(f"beta {cfg.beta} must be above 0, e.g. 0.1")
    train, val = split(C.load_pairs(cfg.data), cfg.val_fraction, cfg.seed)
    model, tok, ckpt, device = load_base(cfg, rows=2, reference=not cfg.lora)
    reference = None if cfg.lora else copy.deepcopy(model).eval().requires_grad_(False)
    add_lora(model, cfg)
    T = row_tokens(cfg, ckpt.config)
    train, val = tokenize_pairs(cfg, tok, T, train, val)
    micro, pad = cfg.micro_batch or cfg.batch_size, pad_id(tok)
    log(0, f"{len(train)} training and {len(val)} held-out pairs from {cfg.data}; beta {cfg.beta}")
    ref_cache = {}  # (split, index) → (log ref(chosen), log ref(rejected))

    def ref_logps(part: str, rows: list, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        for i in indices:
            if (part, i) not in ref_cache:
                x, y = pair_batch([rows[i]], pad, device)
                with torch.no_grad(), (L.disabled(model) if cfg.lora else nullcontext()):
                    lp = sequence_logps(reference or model, x, y)
                ref_cache[part, i] = (lp[0].item(), lp[1].item())
        ref = torch.tensor([ref_cache[part, i] for i in indices], dtype=torch.float32, device=device)
        return ref[:, 0], ref[:, 1]

    def losses(part: str, rows: list, indices: list[int]):
        ref_c, ref_r = ref_logps(part, rows, indices)
        lp = sequence_logps(model, *pair_batch([rows[i] for i in indices], pad, device))
        pi_c, pi_r = lp[: len(indices)], lp[len(indices) :]
        loss, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, cfg.beta)
        return loss, rc, rr, pi_c.detach(), pi_r.detach(), ref_c, ref_r

    def step_loss(indices):
        loss, rc, rr, *_ = losses("train", train, indices)
        return loss.sum(), {"reward_accuracy": (rc > rr).sum().item(), "reward_margin": (rc - rr).sum().item()}

    def validate():
        if not val:
            return {}
        sums = dict.fromkeys(["val_loss", "reward_accuracy", "reward_margin", "policy_accuracy", "ref_accuracy"], 0.0)
        for start in range(0, len(val), micro):
            indices = list(range(start, min(start + micro, len(val))))
            loss, rc, rr, pi_c, pi_r, ref_c, ref_r = losses("val", val, indices)
            for k, v in zip(sums, (loss, rc > rr, rc - rr, pi_c > pi_r, ref_c > ref_r)):
                sums[k] += v.float().sum().item()
        return {k: v / len(val) for k, v in sums.items()}

    return finetune(cfg, "dpo", model, tok, ckpt, device, Pairs(len(train), cfg.batch_size, micro, cfg.seed),
                    step_loss, validate, (1e-6, 5e-5), eos_ids(tok, ckpt, [p[0] for p in train[:50]]))
