"""Stage 2: supervised fine-tuning: a model learns to answer like the assistant turns of a conversation file.

    llmos train sft --model MODEL --data conversations.json --out DIR [--lora] [--steps N | --minutes M]
    llmos train sft --recipe recipes/sft.toml --data ../shared/data/sft/identity.json --fill 'name=Ada,author=Ada Lab' --out runs/sft
    python -m llmos.train.sft ...   (the same flags)

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
- --lora wraps the linear layers named by --lora-targets (llmos/train/lora.py); the adapters are merged
  into the weights when the model is written. --lr 0 (the default) means 2e-5 for full fine-tuning and
  2e-4 for LoRA; held-out loss is measured before the first step and every --eval-every steps.
- `{{name}}`-style placeholders in the data are filled from --fill 'name=Ada,author=Ada Lab'.

The training loop here (`finetune`) is shared with `llmos train dpo` and `llmos train reward`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmos import loader
from llmos.errors import LlmosError
from llmos.train.loop import (check_length, end_step, log, progress_bar, refuse_other_run, rng_state, set_rng_state, steps_in_budget, write_report)
from llmos.options import option, run_main
from llmos.files import atomic_write
from llmos.train import chat_data as C
from llmos.train import lora as L
from llmos.train.pretrain import lr_factor
from llmos.formats import Checkpoint, hf

CALIBRATE = 5  # steps timed before a --minutes run fixes its length
RUN_CONTROL = {"out", "eval_every", "save_every", "stop_at", "device", "progress", "micro_batch"}
IGNORE = -100


@dataclass
class FinetuneConfig:
    EXCLUSIVE = [("steps", "minutes")]  # a flag for one replaces a recipe's other
    model: str = option("default", "model to start from: a name or path llmos loads (default: the bundled SmolLM2)")
    data: str = option("", "training data: a JSON or JSONL file")
    out: str = option("", "output directory: the model, trainer_state.pt, summary.json, loss.png")
    val_fraction: float = option(0.05, "fraction of the rows held out for validation (at least one row when > 0)")
    lora: bool = option(False, "train low-rank adapters instead of all weights; merged into the weights on save")
    lora_rank: int = option(8, "rank of the adapters")
    lora_alpha: float = option(16.0, "adapter scale numerator: the update is B @ A * alpha / rank")
    lora_dropout: float = option(0.0, "dropout on the adapters' input")
    lora_targets: str = option(L.DEFAULT_TARGETS, "linear layers to adapt, by name")
    steps: int = option(0, "optimizer steps (or give --minutes)")
    minutes: float = option(0.0, "time budget in minutes instead of --steps")
    batch_size: int = option(8, "rows per optimizer step")
    micro_batch: int = option(0, "rows per forward pass (0 = batch_size); gradients accumulate over the rest")
    seq_len: int = option(1024, "longest sequence in tokens (0 = the model's context); longer ones are cut")
    lr: float = option(0.0, "peak learning rate (0 = the stage's default for full or LoRA training)")
    schedule: str = option("cosine", "cosine, or wsd (warmup-stable-decay)")
    warmup_steps: int = option(10, "linear warmup steps")
    decay_frac: float = option(0.2, "fraction of the run spent decaying, for wsd")
    min_lr_frac: float = option(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = option(0.0, "AdamW weight decay of matrices")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)")
    seed: int = option(0, "seed of the held-out split, the data order and the adapters' initialization")
    dtype: str = option("f32", "dtype of the written weights: f32, f16 or bf16")
    eval_every: int = option(50, "steps between validation passes (0 = only before and after)")
    save_every: int = option(100, "steps between checkpoints (0 = only at the end)")
    stop_at: int = option(0, "pause after this step, checkpointed; run again without it to continue")
    device: str = option("auto", "cpu, cuda or auto")
    progress: bool = option(True, "show a progress bar on stderr")


@dataclass
class SFTConfig(FinetuneConfig):
    packing: bool = option(True, "pack several conversations into each row (each attends only to itself)")
    fill: str = option("", "values for {{key}} placeholders in the data: 'name=Ada,author=Ada Lab'")


# ----------------------------------------------------------------------------
# Data order: example i of the run (across epochs) → an example index, from (seed, epoch) alone


class Order:
    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perm = n, seed, (None, None)

    def __call__(self, i: int) -> int:
        epoch = i // self.n
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][i % self.n])


def split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the last val_fraction held out (at least one item when val_fraction > 0)."""
    if not 0 <= val_fraction < 1:
        raise LlmosError(f"val_fraction {val_fraction} must be at least 0 and below 1, e.g. 0.05")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = max(1, round(val_fraction * len(items))) if val_fraction > 0 else 0
    if n_val >= len(items):
        raise LlmosError(f"{len(items)} rows are too few to hold out {val_fraction:.0%}; add rows or pass --val-fraction 0")
    items = [items[i] for i in order]
    return items[: len(items) - n_val], items[len(items) - n_val :]


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """(x, y) tensors of [B, longest - 1]: y is the next token where it is trained on, IGNORE elsewhere."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (i, m) in enumerate(rows):
        ids[r, : len(i)] = torch.tensor(i)
        mask[r, : len(m)] = torch.tensor(m, dtype=torch.bool)
    y = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE)
    return ids[:, :-1], y


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
# The shared loop: load, (resume), train, validate, checkpoint, write


def pick_device(want: str) -> torch.device:
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        raise LlmosError(f"device {want!r} is not available here; use cpu, cuda (with a GPU) or auto")
    return torch.device(kind)


def check(cfg: FinetuneConfig) -> None:
    """Refuse bad options before anything slow happens."""
    if not cfg.data or not cfg.out:
        raise LlmosError("pass --data FILE and --out DIR")
    check_length(cfg)
    if cfg.dtype not in ("f32", "f16", "bf16"):
        raise LlmosError(f"dtype {cfg.dtype!r} cannot be written; use f32, f16 or bf16")
    micro = cfg.micro_batch or cfg.batch_size
    if cfg.batch_size < 1 or micro < 1 or cfg.batch_size % micro:
        raise LlmosError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch {micro}")
    pick_device(cfg.device)


def load_base(cfg: FinetuneConfig):
    """(model, tokenizer, checkpoint, device): float32 weights on the device."""
    device = pick_device(cfg.device)
    r = loader.load(cfg.model, "torch", device.type, precision="f32", tokenizer=False)
    model, tok, ckpt = r.model, r.tokenizer, r.checkpoint
    if tok is None:
        raise LlmosError(f"{cfg.model}: the model has no tokenizer; fine-tuning needs one (tokenizer.json beside it)")
    return model, tok, ckpt, device


def add_lora(model, cfg: FinetuneConfig) -> None:
    if cfg.lora:
        torch.manual_seed(cfg.seed)
        L.apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    else:
        model.requires_grad_(True)


def load_state(out: Path, cfg, stage: str) -> dict | None:
    file = out / "trainer_state.pt"
    if not file.is_file():
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise LlmosError(f"{out}: exists and holds no unfinished {stage} run; pass a new or empty --out")
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise LlmosError(f"{file}: cannot read the checkpoint ({type(e).__name__}); remove {out} to start over") from None
    if state.get("stage") != stage:
        raise LlmosError(f"{out}: holds a {state.get('stage')} run, not {stage}; pass another --out")
    refuse_other_run(out, state["config"], asdict(cfg), RUN_CONTROL)
    return state


def trainable_state(model, extra: dict) -> dict:
    state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    for name, module in extra.items():
        state |= {f"{name}.{k}": v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    return state


def load_trainable(model, extra: dict, state: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, module in extra.items():
            module.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")})
        for n, v in state.items():
            if n in params:
                params[n].copy_(v)


def write_model(out: Path, model, tok, ckpt, cfg, eos_ids: list[int], extra_files=None) -> None:
    """The model (adapters merged) as a Hugging Face directory in `out`, files replaced one by one."""
    staging = out / ".model"
    shutil.rmtree(staging, ignore_errors=True)
    weights = L.merged_state_dict(model) if cfg.lora else model.state_dict()
    weights = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in weights.items()}
    meta = {"format": "hf", "eos_token_ids": eos_ids, "generation": dict(ckpt.meta.get("generation") or {}),
            "name": out.resolve().name, "path": ckpt.meta.get("path")}
    meta |= {k: ckpt.meta[k] for k in ("license", "base_model") if ckpt.meta.get(k)}  # a derived model keeps them
    try:
        hf.write(Checkpoint(ckpt.config, weights, tok, meta), staging, dtype=cfg.dtype)
        if extra_files:
            extra_files(staging)
        for f in staging.iterdir():
            os.replace(f, out / f.name)
        staging.rmdir()
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise LlmosError(f"{out}: could not write the model ({e.strerror or e}); free disk space and run the same "
                         "command again to resume from the last checkpoint") from None


def finetune(cfg, stage: str, model, tok, ckpt, device, loader, step_loss, validate, lr_defaults, eos_ids,
             extra: dict | None = None, extra_files=None) -> dict:
    """The loop every fine-tuning stage shares.

    loader.next_step() → [(micro-batch, units)] of one optimizer step; step_loss(micro-batch) → (loss summed
    over its units, {metric: sum}); the step's loss is the sum over its micro-batches divided by its units
    (assistant tokens for SFT, pairs for DPO and reward). validate() → {"val_loss": ..., ...}.
    `extra` holds modules trained beside the model (the reward head), saved with it.
    """
    out, extra = Path(cfg.out), extra or {}
    state = load_state(out, cfg, stage)
    if state and state["total_steps"] and state["step"] >= state["total_steps"]:
        log(0, f"{out}: this run is finished ({state['step']} steps); pass another --out to train again")
        return json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    lr = cfg.lr or lr_defaults[bool(cfg.lora)]
    params = [p for p in model.parameters() if p.requires_grad] + [p for m in extra.values() for p in m.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr)
    step, total, elapsed, history = 0, cfg.steps or None, 0.0, {"train_loss": [], "train": [], "val": []}
    random.seed(cfg.seed), np.random.seed(cfg.seed)
    if state:
        load_trainable(model, extra, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        step, total, elapsed, history = state["step"], state["total_steps"], state["elapsed"], state["history"]
        set_rng_state(state["rng"])
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    n_train = sum(p.numel() for p in params)
    log(0, f"{stage}: {n_train:,} trainable parameters of {ckpt.config.num_params():,}"
           f"{' (LoRA rank %d)' % cfg.lora_rank if cfg.lora else ''}, lr {lr:g}, on {device}"
           + (f"; resuming at step {step}" if state else ""))
    bar = None

    def run_validation():
        model.eval()
        with torch.no_grad(), amp():
            metrics = validate()
        model.train()
        if metrics:
            history["val"].append([step, metrics])
            log(0, f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), bar)

    def checkpoint():
        saved = {"stage": stage, "config": asdict(cfg), "trainable": trainable_state(model, extra),
                 "optimizer": optimizer.state_dict(), "loader": loader.state_dict(), "step": step,
                 "total_steps": total, "elapsed": elapsed, "history": history, "rng": rng_state()}
        atomic_write(out / "trainer_state.pt", lambda f: torch.save(saved, f))

    out.mkdir(parents=True, exist_ok=True)
    model.train()
    if not history["val"]:
        run_validation()  # the starting point, to compare the end with
    bar = progress_bar(stage, total, step, cfg.progress)
    start, before, run_steps, units_seen, train_time = time.perf_counter(), elapsed, 0, 0, 0.0
    while total is None or step < total:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, total, cfg)
        micros = loader.next_step()  # [(batch, units)]: units are what the loss is averaged over
        units = sum(n for _, n in micros)
        loss_total, metric_sums = 0.0, {}
        optimizer.zero_grad(set_to_none=True)
        for micro, _ in micros:
            with amp():
                loss_sum, sums = step_loss(micro)
            # The step's loss is the mean over all its units (tokens or pairs), whatever the micro-batching.
            (loss_sum / max(units, 1)).backward()
            loss_total += loss_sum.item()
            for k, v in sums.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step, run_steps, units_seen = step + 1, run_steps + 1, units_seen + units
        history["train_loss"].append(loss_total / max(units, 1))
        history["train"].append({k: v / max(units, 1) for k, v in metric_sums.items()})
        dt = time.perf_counter() - t0
        train_time += dt
        elapsed = before + time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", units_s=f"{units_seen / train_time:,.0f}", refresh=False)
        if cfg.minutes and total is None and run_steps == CALIBRATE:
            total = steps_in_budget(cfg, step, elapsed, (elapsed - before) / run_steps, bar)
        total, stop = end_step(cfg, step, total, elapsed, run_validation, checkpoint)
        if stop:
            break
    bar.close()
    if total is not None and step >= total:
        write_model(out, model, tok, ckpt, cfg, eos_ids, extra_files)
    vals = history["val"]
    summary = {
        "stage": stage, "steps": step, "total_steps": total, "finished": total is not None and step >= total,
        "train_loss": history["train_loss"][-1] if history["train_loss"] else None,
        "val_before": vals[0][1] if vals else None, "val_after": vals[-1][1] if vals else None,
        "trainable_params": n_train, "params": ckpt.config.num_params(), "lr": lr,
        "units_per_s": units_seen / train_time if train_time else None, "wall_s": elapsed, "device": str(device),
        "base_model": ckpt.meta.get("path", cfg.model), "config": asdict(cfg),
    }
    points = [[s, m["val_loss"]] for s, m in vals if "val_loss" in m]
    write_report(out, summary, history["train_loss"], points, f"{stage} ({Path(str(cfg.model)).name})",
                 f"last {points[-1][1]:.3f}" if points else "")
    if summary["finished"]:
        log(0, f"wrote {out}; chat with it: llmos run {out}")
    return summary


# ----------------------------------------------------------------------------
# SFT


def sft(cfg: SFTConfig) -> dict:
    check(cfg)
    conversations = C.load_conversations(cfg.data, C.parse_fill(cfg.fill))
    train, val = split(conversations, cfg.val_fraction, cfg.seed)
    model, tok, ckpt, device = load_base(cfg)
    add_lora(model, cfg)
    T = min(cfg.seq_len or ckpt.config.max_seq_len, ckpt.config.max_seq_len)
    train, dropped = tokenize_conversations(tok, train, T)
    val, _ = tokenize_conversations(tok, val, T)
    if not train:
        raise LlmosError(f"{cfg.data}: no conversation has an assistant token within {T} tokens; raise --seq-len")
    if dropped:
        log(0, f"note: {dropped} conversations have no assistant token within {T} tokens and are skipped")
    micro = cfg.micro_batch or cfg.batch_size
    pad = next(i for i in (tok.pad_id, tok.eos_id, 0) if i is not None)
    loader = Rows(train, T, cfg.batch_size, micro, cfg.packing, cfg.seed, pad)
    eos = list(dict.fromkeys(list(ckpt.meta.get("eos_token_ids") or tok.eos_ids) + C.end_of_turn_ids(tok, train[:50])))
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

    return finetune(cfg, "sft", model, tok, ckpt, device, loader, step_loss, validate, (2e-5, 2e-4), eos)


def main(argv=None) -> int:
    return run_main(sft, SFTConfig, argv, "llmos train sft", __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
