"""The fine-tuning loop shared by `llmos train sft`, `llmos train dpo` and `llmos train reward` (and RL to come).

A stage loads its data, then calls load_base (the starting model, float32) and add_lora, and hands `finetune`
three things: batches (batches.next_step() → [(micro-batch, units)] of one optimizer step), step_loss
(micro-batch → (loss summed over its units, {metric: sum})) and validate (→ {"val_loss": ..., ...}).
The loop owns the rest: the optimizer and schedule, gradient accumulation, the time budget, validation,
checkpoints and exact resume (llmos/train/loop.py, shared with pretraining), and the written model.

Decisions:
- A step's loss is the sum over its micro-batches divided by its units (assistant tokens for SFT, pairs for
  DPO and the reward model), so micro-batching does not change the weight of a unit.
- Only the trained parameters are checkpointed (all of them, or the adapters and a stage's `extra` modules
  such as the reward head): a LoRA checkpoint is megabytes. The model is written once, at the end, with the
  adapters merged into the weights.
- --lr 0 means the stage's default for full or LoRA training (they differ by about 10x).
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from llmos import loader, planner
from llmos.errors import LlmosError
from llmos.quant import release_memory
from llmos.formats import Checkpoint
from llmos.options import defaults, option
from llmos.train import chat_data as C
from llmos.train import lora as L
from llmos.train.loop import (RUN_CONTROL, TrainConfig, check_run, device_kind, end_step, finished_before, load_state,
                              log, lr_factor, memory_verdict, progress_bar, restore, save_state, steps_in_budget,
                              write_model, write_report)

CALIBRATE = 5  # steps timed before a --minutes run fixes its length
IGNORE = -100  # the target of a token that is not trained on


# The defaults are recipes/sft.toml's values as measured (bench/stages.py: the bundled SmolLM2-135M learned a
# name from identity.json in 40 steps, 19 of 20 unseen paraphrases answered with it): LoRA of rank 16 on every
# linear layer, rows of 512 tokens, 4 per step in micro-batches of 2. `llmos fit MODEL --train lora|full` plans
# these same numbers.
@dataclass
@defaults(val_fraction=0.05, batch_size=4, micro_batch=2, seq_len=512, lr=0.0, warmup_steps=5, weight_decay=0.0,
          eval_every=20, save_every=20, help={
              "val_fraction": "fraction of the rows held out for validation (at least one row when > 0)",
              "micro_batch": "rows per forward pass (0 = batch_size); gradients accumulate over the rest",
              "seq_len": "longest sequence in tokens (0 = the model's context); longer ones are cut",
              "lr": "peak learning rate (0 = the stage's default for full or LoRA training)",
              "eval_every": "steps between validation passes (0 = only before and after)"})
class FinetuneConfig(TrainConfig):
    model: str = option("default", "model to start from: a name or path llmos loads (default: the bundled SmolLM2)")
    lora: bool = option(True, "train low-rank adapters (--no-lora: all weights); merged into the weights on save")
    lora_rank: int = option(16, "rank of the adapters")
    lora_alpha: float = option(32.0, "adapter scale numerator: the update is B @ A * alpha / rank")
    lora_dropout: float = option(0.05, "dropout on the adapters' input")
    lora_targets: str = option(L.DEFAULT_TARGETS, "linear layers to adapt, by name")
    dtype: str = option("f32", "dtype of the written weights: f32, f16 or bf16")


# ----------------------------------------------------------------------------
# Data shared by the stages: the held-out split, the order of examples, rows of tokens


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


class Order:
    """Example i of the run (across epochs) → an example index, from (seed, epoch) alone."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perm = n, seed, (None, None)

    def __call__(self, i: int) -> int:
        epoch = i // self.n
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][i % self.n])


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


def row_tokens(cfg: FinetuneConfig, model_config) -> int:
    """The longest row a run trains on: --seq-len cut to the model's context (0: the whole context)."""
    return min(cfg.seq_len or model_config.max_seq_len, model_config.max_seq_len)


def pad_id(tok) -> int:
    return next(i for i in (tok.pad_id, tok.eos_id, 0) if i is not None)


def eos_ids(tok, ckpt, examples=()) -> list[int]:
    """The model's end-of-sequence ids, and the tokens that close the assistant turns of `examples` ((ids, mask)),
    so that generation stops where the trained answers end."""
    return list(dict.fromkeys(list(ckpt.meta.get("eos_token_ids") or tok.eos_ids) + C.end_of_turn_ids(tok, examples[:50])))


# ----------------------------------------------------------------------------
# The model: checked options, the base, adapters, what a checkpoint holds


def check(cfg: FinetuneConfig) -> None:
    """Refuse bad options before anything slow happens."""
    check_run(cfg)
    if cfg.dtype not in ("f32", "f16", "bf16"):
        raise LlmosError(f"dtype {cfg.dtype!r} cannot be written; use f32, f16 or bf16")
    micro = cfg.micro_batch or cfg.batch_size
    if cfg.batch_size < 1 or micro < 1 or cfg.batch_size % micro:
        raise LlmosError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch {micro}")
    device_kind(cfg.device)


def memory_plan(cfg: FinetuneConfig, src: planner.Source, rows: int = 1) -> tuple[dict, str]:
    """(plan, the `llmos fit` command that prints it) of a fine-tuning run: float32 weights, rows of row_tokens,
    micro_batch x `rows` sequences per forward pass (a preference pair is two), LoRA or all weights trained."""
    T, batch = row_tokens(cfg, src.config), (cfg.micro_batch or cfg.batch_size) * rows
    mode = "lora" if cfg.lora else "full"
    p, _ = planner.fit(src, "f32", T, batch, mode, engine="torch", lora_rank=cfg.lora_rank, lora_dropout=cfg.lora_dropout)
    return p, f"llmos fit {cfg.model} --train {mode} --ctx {T} --batch {batch}"


def check_memory(cfg: FinetuneConfig, rows: int = 1, reference: bool = False) -> None:
    """Print the run's memory plan before anything is loaded, and refuse a run that would not fit here, naming the
    flag that would (--lora, --micro-batch 1, a shorter --seq-len). reference: a frozen float32 copy of the
    starting weights is kept beside the model (DPO without LoRA)."""
    src = planner.source(cfg.model)

    def need(c) -> int:
        return memory_plan(c, src, rows)[0]["peak"] + (planner.weight_bytes(src.config, "f32") if reference and not c.lora else 0)

    p, command = memory_plan(cfg, src, rows)
    micro, T = cfg.micro_batch or cfg.batch_size, row_tokens(cfg, src.config)
    shorter = [T >> k for k in range(1, 8) if T >> k >= 64]
    tries = [(["--lora"], replace(cfg, lora=True))] if not cfg.lora else []
    tries += [(["--micro-batch 1"], replace(cfg, micro_batch=1))] if micro > 1 else []
    tries += [([f"--seq-len {n}"], replace(cfg, seq_len=n)) for n in shorter]
    both = [flags[0] for flags, _ in tries[: len(tries) - len(shorter)]]
    if len(both) == 2 or (both and shorter):  # then together: LoRA, one row at a time, shorter rows
        least = replace(cfg, lora=True, micro_batch=1)
        tries += [(both, least)] + [(both + [f"--seq-len {n}"], replace(least, seq_len=n)) for n in shorter]
    lines = planner.report(p, src)
    if reference and not cfg.lora:
        lines.insert(-1, f"{'reference':<13} {planner.gb(planner.weight_bytes(src.config, 'f32')):>10}   "
                         "a frozen float32 copy of the starting weights (not in llmos fit's plan)")
    why = memory_verdict(f"memory plan, as `{command}` makes it:", lines, need(cfg),
                         torch.device(device_kind(cfg.device)), [(" ".join(f), need(c)) for f, c in tries])
    if why:
        raise LlmosError(why)


def load_base(cfg: FinetuneConfig, rows: int = 1, reference: bool = False):
    """(model, tokenizer, checkpoint, device): float32 weights on the device, once check_memory has printed the
    plan and found that it fits."""
    check_memory(cfg, rows, reference)
    device = torch.device(device_kind(cfg.device))
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


def finished_model(out: Path, model, ckpt, tok, cfg: FinetuneConfig, eos: list[int]) -> Checkpoint:
    """The trained model (adapters merged) as a checkpoint that keeps the base's generation settings and license."""
    weights = L.merged_state_dict(model) if cfg.lora else model.state_dict()
    weights = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in weights.items()}
    meta = {"format": "hf", "eos_token_ids": eos, "generation": dict(ckpt.meta.get("generation") or {}),
            "name": out.resolve().name, "path": ckpt.meta.get("path")}
    meta |= {k: ckpt.meta[k] for k in ("license", "base_model") if ckpt.meta.get(k)}  # a derived model keeps them
    return Checkpoint(ckpt.config, weights, tok, meta)


# ----------------------------------------------------------------------------
# The loop: (resume), train, validate, checkpoint, write


def finetune(cfg, stage: str, model, tok, ckpt, device, batches, step_loss, validate, lr_defaults, eos,
             extra: dict | None = None, extra_files=None) -> dict:
    """Train (or resume) the run in cfg.out; returns its summary. lr_defaults: (full, LoRA) learning rates for
    --lr 0; eos: the written model's end-of-sequence ids; `extra` holds modules trained beside the model (the
    reward head), checkpointed with it; extra_files(folder) adds files to the written model."""
    out, extra = Path(cfg.out), extra or {}
    state = load_state(out, cfg, stage, RUN_CONTROL)
    done = finished_before(out, state, cfg)
    if done is not None:
        return done
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
        step, total, elapsed, history = restore(state, batches)
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
        save_state(out, stage, cfg, optimizer.state_dict(), batches, step, total, elapsed, history,
                   trainable=trainable_state(model, extra))

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
        micros = batches.next_step()  # [(batch, units)]: units are what the loss is averaged over
        units = sum(n for _, n in micros)
        loss_total, metric_sums = 0.0, {}
        optimizer.zero_grad(set_to_none=True)
        for micro, _ in micros:
            with amp():
                loss_sum, sums = step_loss(micro)
            # The step's loss is the mean over all its units (tokens or pairs), whatever the micro-batching.
            (loss_sum / max(units, 1)).backward()
            loss_total += loss_sum.item()
            release_memory(collect=False)
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
        write_model(out, finished_model(out, model, ckpt, tok, cfg, eos), cfg.dtype, extra_files)
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
