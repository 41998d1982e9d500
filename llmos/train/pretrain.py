"""Stage 1: pretrain a model from scratch on a text corpus.

    llmos train pretrain --data corpus.txt --out DIR (--steps 2000 | --minutes 10) [--tokenizer DIR] [--depth 3]
    llmos train pretrain --recipe recipes/pretrain_tiny.toml --data ../shared/data/corpora/tinyshakespeare.txt --out runs/tiny
    torchrun --standalone --nproc_per_node 2 -m llmos train pretrain --data corpus.txt --out DIR --steps 2000 [--fsdp]

With no other flag it runs the best measured recipe (PretrainConfig below): depth 3, a 2,048-token
vocabulary, rows of 256 tokens, 16 per step. Before building the model it prints the memory plan
(llmos/planner.py, as `llmos fit` makes it) and refuses a run that would not fit here, naming the flag
that would (--micro-batch, --seq-len, --depth).

DIR becomes a Hugging Face model directory that `llmos run DIR` chats with, and also
holds trainer_state.pt (model, optimizer, step, random states, data position, config),
data/ (token shards and the tokenizer that made them), summary.json and loss.png.
Running the same command on an unfinished DIR resumes it exactly, after kill -9 too;
--stop-at N pauses after step N. A DIR holding a run of another config is refused.

Decisions:
- One dial: --depth sets n_layers = depth, dim = 64 * depth (--aspect-ratio), heads of 64
  channels, SwiGLU hidden = 8/3 dim rounded up to 32; --seq-len 0 makes the context 128 * depth
  (at most 2048).
- --minutes M: the first CALIBRATE steps, then one validation pass, are timed; that fixes
  the total number of steps (saved, so a resume keeps it) and the cosine or WSD decay ends
  on time. A run still going at 1.1 M minutes stops there.
- Bits per byte = summed validation loss in nats / ln 2 / UTF-8 bytes of the validation
  text: the whole held-out split is evaluated each time, every token predicted once
  (document separators count, as zero bytes).
- Documents are concatenated with a separator token and training windows cross them, attention
  included, as nanochat and llm.c pretrain: no doc_ids (llmos/model.py), so the fast causal kernel runs.
- Distributed: each rank reads its own slice of every global batch; only rank 0 writes. By default
  each rank holds the whole model (DDP). --fsdp shards it instead (FSDP2 fully_shard, per layer then
  the rest; bf16 compute and float32 gradient reduction on CUDA): the model is built and initialized
  in host memory (so on CUDA it starts from other random weights than without --fsdp), and each rank
  keeps only its share of the weights, gradients and optimizer state on its device. Checkpoints hold
  the whole state either way (gathered to rank 0), so a run may resume with or without --fsdp, on
  another number of ranks.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from llmos import planner
from llmos.errors import LlmosError
from llmos.formats import Checkpoint
from llmos.model import Config, Transformer
from llmos.options import defaults, option
from llmos.tokenizer import Tokenizer
from llmos.train import data as D
from llmos.train.loop import (RUN_CONTROL, TrainConfig, check_run, end_step, finished_before, load_state, log,
                              lr_factor, memory_verdict, on_all_ranks, progress_bar, rank0_first, restore, save_state,
                              start_distributed, steps_in_budget, write_model, write_report)
from llmos.train.tokenizer_train import TokenizerConfig, save, train_bpe

CALIBRATE = 10  # steps timed before a --minutes run fixes its length


# The defaults are the best of bench/pretrain_sweep.py on tinyshakespeare at equal wall-clock on a 2-core CPU
# (bench/results/pretrain_sweep_*.json): depth 3 (1.7 M parameters), a 2,048-token vocabulary, rows of 256
# tokens, 16 per step, peak lr 3e-3 after 50 warmup steps, cosine decay: 2.548 held-out bits per byte in
# 2 minutes, 2.120 in 10, against 2.780 and 2.335 at depth 4. The smaller model wins by taking more steps.
@dataclass
@defaults(vocab_size=2048, help={"data": D.CORPUS_HELP,
                "vocab_size": "vocabulary of the tokenizer trained when --tokenizer is not given",
                "seq_len": "context length trained on (0 = 128 * depth, at most 2048)",
                "weight_decay": "AdamW decay of matrices (never of norms or embeddings)"})
class PretrainConfig(TrainConfig, TokenizerConfig):
    """TrainConfig's options, `llmos train tokenizer`'s for the tokenizer trained when none is given, and the model's."""
    tokenizer: str = option("", "tokenizer directory (tokenizer.json); default: train one on the training split")
    # the model: one dial
    depth: int = option(3, "layers; also sets width and heads")
    aspect_ratio: int = option(64, "width = aspect_ratio * depth")
    head_dim: int = option(64, "channels per attention head")
    kv_heads: int = option(0, "key-value heads (0 = one per query head)")
    tie_embeddings: bool = option(True, "the output head shares the embedding matrix")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    # run control: may change on resume
    compile: bool = option(False, "torch.compile the model")
    fsdp: bool = option(False, "under torchrun, shard the model over the ranks (FSDP2) instead of copying it to each")


def model_config(cfg: PretrainConfig, vocab_size: int) -> Config:
    dim = cfg.aspect_ratio * cfg.depth
    heads = max(1, dim // cfg.head_dim)
    if cfg.depth < 1 or dim % heads or heads % (cfg.kv_heads or heads):
        raise LlmosError(f"depth {cfg.depth} with aspect ratio {cfg.aspect_ratio}, head_dim {cfg.head_dim} and "
                         f"{cfg.kv_heads} kv heads gives no valid model; the heads must divide the width evenly")
    return Config(vocab_size=vocab_size, dim=dim, n_layers=cfg.depth, n_heads=heads, n_kv_heads=cfg.kv_heads or heads,
                  hidden_dim=32 * math.ceil(8 * dim / 3 / 32), max_seq_len=cfg.seq_len or min(2048, 128 * cfg.depth),
                  tie_embeddings=cfg.tie_embeddings)


def init_weights(model: Transformer) -> None:
    """GPT-2 style: N(0, 0.02), residual outputs scaled down by depth, norms at one."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p) if name.endswith("norm.weight") else torch.nn.init.zeros_(p)
        else:
            std = 0.02 / math.sqrt(2 * model.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)


def make_optimizer(model, cfg: PretrainConfig, device) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("embed"))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def batches_of(windows: list, batch: int) -> list[list]:
    """Up to `batch` consecutive windows (start, length) of one length each (only the last window is shorter)."""
    groups, i = [], 0
    while i < len(windows):
        groups.append([w for w in windows[i : i + batch] if w[1] == windows[i][1]])
        i += len(groups[-1])
    return groups


@torch.no_grad()
def evaluate(model, tokens, n_bytes: int, seq_len: int, batch: int, device="cpu", rank=0, world=1, amp=nullcontext):
    """(mean loss in nats per token, bits per byte) over every next-token prediction in `tokens`."""
    n = len(tokens) - 1
    windows = [(s, min(seq_len, n - s)) for s in range(0, n, seq_len)]
    groups = [batches_of(windows[r::world], batch) for r in range(world)]
    nats = torch.zeros((), dtype=torch.float64, device=device)
    # Every rank makes as many forward passes (under FSDP each gathers weights from all ranks); spares count nothing.
    for i in range(max(map(len, groups))):
        group = groups[rank][i] if i < len(groups[rank]) else groups[0][0]
        rows = torch.from_numpy(np.stack([tokens[s : s + L + 1] for s, L in group]).astype(np.int64)).to(device)
        with amp():
            logits = model(rows[:, :-1])
        if i < len(groups[rank]):
            nats += F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").double()
    if world > 1:
        dist.all_reduce(nats)
    return nats.item() / n, nats.item() / (math.log(2) * n_bytes)


# ----------------------------------------------------------------------------
# The run


def pretrain(cfg: PretrainConfig) -> dict:
    """Train (or resume) the run in cfg.out; returns its summary."""
    check_run(cfg)
    cfg = replace(cfg, data=str(Path(cfg.data).resolve()), tokenizer=cfg.tokenizer and str(Path(cfg.tokenizer).resolve()))
    rank, world, device, own_group = start_distributed(cfg.device)
    try:
        summary = train(cfg, rank, world, device)
        if own_group:  # the others wait while rank 0 writes the last checkpoint: gloo aborts a peer that leaves early
            dist.barrier()
        return summary
    finally:
        if own_group:
            dist.destroy_process_group()


def train(cfg: PretrainConfig, rank: int, world: int, device) -> dict:
    out = Path(cfg.out)
    # data/ is prepared before the first checkpoint: with its meta.json, whatever else is in out is this run's
    state = load_state(out, cfg, "pretraining", RUN_CONTROL, own=("data",),
                       ours=(out / "data" / "meta.json").is_file())
    done = finished_before(out, state, cfg, rank)
    if done is not None:
        return done

    tok = rank0_first(rank, world, lambda: load_or_train_tokenizer(cfg, out / "data"))
    corpus = rank0_first(rank, world, lambda: D.prepare(cfg.data, tok, out / "data", cfg.val_fraction))
    mcfg = model_config(cfg, tok.hf.get_vocab_size(with_added_tokens=True))
    micro = cfg.micro_batch or cfg.batch_size // world
    accum = cfg.batch_size // max(1, micro * world)
    if micro < 1 or accum * micro * world != cfg.batch_size:
        raise LlmosError(f"batch_size {cfg.batch_size} is not micro_batch {micro} x {world} ranks x a whole number "
                         "of accumulation steps; change --batch-size or --micro-batch")
    T = mcfg.max_seq_len
    check_memory(cfg, mcfg, micro, world, device, rank)

    torch.manual_seed(cfg.seed), np.random.seed(cfg.seed), random.seed(cfg.seed)
    sharded = cfg.fsdp and world > 1
    model = Transformer(mcfg).to("cpu" if sharded else device)  # sharded: each rank's share moves to its device
    init_weights(model)
    if state:
        model.load_state_dict(state["model"])
    if sharded:
        shard(model, device, world)
    optimizer = make_optimizer(model, cfg, device)
    loader = D.Batches(corpus.train, T, micro, rank, world, cfg.seed)
    step, total, elapsed, history = 0, cfg.steps or None, 0.0, {"train_loss": [], "val": []}
    if state:
        load_optimizer_state(model, optimizer, state["optimizer"])
        step, total, elapsed, history = restore(state, loader)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not sharded else None
    train_model = torch.compile(ddp or model) if cfg.compile else ddp or model
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    log(rank, f"{mcfg.num_params():,} parameters ({mcfg.n_layers} layers, width {mcfg.dim}, {mcfg.n_heads} heads, "
              f"context {T}); {len(corpus.train):,} training and {corpus.meta['val_tokens']:,} validation tokens; "
              f"{cfg.batch_size * T:,} tokens per step ({world} x {micro} x {accum} accumulation) on {device}"
              + (", sharded (FSDP2)" if sharded else "") + (f"; resuming at step {step}" if state else ""))

    def validate():
        if corpus.val is None or (history["val"] and history["val"][-1][0] == step):
            return None
        loss, bpb = evaluate(model, corpus.val, corpus.val_bytes, T, micro, device, rank, world, amp)
        history["val"].append([step, loss, bpb])
        log(rank, f"step {step}: validation loss {loss:.4f}, {bpb:.4f} bits per byte", bar)
        return loss

    def checkpoint():
        weights, optimizer_state = full_state(model, optimizer)  # under FSDP every rank sends its shards
        if rank == 0:  # the model first, then the state that points a resume at it
            im_end = tok.hf.token_to_id("<|im_end|>")
            eos = list(dict.fromkeys(list(tok.eos_ids) + ([im_end] if im_end is not None else [])))
            write_model(out, Checkpoint(mcfg, weights, tok, {"format": "hf", "eos_token_ids": eos}), "f32")
            save_state(out, "pretraining", cfg, optimizer_state, loader, step, total, elapsed, history, model=weights,
                       model_config=mcfg.to_dict(), corpus=corpus.meta)

    bar = progress_bar("pretrain", total, step, rank == 0 and cfg.progress)
    start, run_steps, train_time, calib_time = time.perf_counter(), 0, 0.0, 0.0
    before = elapsed
    while total is None or step < total:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, total, cfg)
        loss_sum = 0.0
        for m in range(accum):
            x, y = (t.to(device) for t in next(loader))
            # DDP all-reduces once per step; FSDP reduce-scatters each micro-batch, keeping only shards of gradients.
            with ddp.no_sync() if ddp and m < accum - 1 else nullcontext(), amp():
                loss = F.cross_entropy(train_model(x).float().flatten(0, 1), y.flatten())
                (loss / accum).backward()
            loss_sum += loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, run_steps = step + 1, run_steps + 1
        history["train_loss"].append(on_all_ranks(loss_sum / accum, world, device, "mean"))
        dt = time.perf_counter() - t0
        train_time += dt
        calib_time += dt if run_steps > 1 else 0.0  # the first step pays for warm-up and compilation
        elapsed = before + time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", tok_s=f"{run_steps * cfg.batch_size * T / train_time:,.0f}",
                        refresh=False)

        if cfg.minutes and total is None and run_steps == CALIBRATE:
            t_val = time.perf_counter()
            validate()
            val_s = time.perf_counter() - t_val
            per_step = calib_time / (CALIBRATE - 1) + (val_s / cfg.eval_every if cfg.eval_every else 0.0)
            total = int(on_all_ranks(steps_in_budget(cfg, step, elapsed, per_step, bar, rank, val_s), world, device))
        total, stop = end_step(cfg, step, total, elapsed, validate, checkpoint, lambda v: on_all_ranks(v, world, device))
        if stop:
            break
    bar.close()
    last_val = history["val"][-1] if history["val"] else [None] * 3
    summary = {
        "steps": step, "total_steps": total, "tokens": step * cfg.batch_size * T,
        "train_loss": history["train_loss"][-1], "val_loss": last_val[1], "val_bpb": last_val[2],
        "tokens_per_s": run_steps * cfg.batch_size * T / train_time,
        "params": mcfg.num_params(), "flops_per_token": 6 * mcfg.num_params() + 12 * mcfg.n_layers * mcfg.dim * T,
        "wall_s": elapsed, "device": str(device), "world_size": world,
        "model_config": mcfg.to_dict(), "config": asdict(cfg),
    }
    if rank == 0:
        write_report(out, summary, history["train_loss"], history["val"], "pretraining",
                     f"last: {last_val[2]:.3f} bits per byte" if history["val"] else "")
    return summary


def check_memory(cfg: PretrainConfig, mcfg: Config, micro: int, world: int, device, rank: int) -> None:
    """Print the run's memory plan (llmos/planner.py: float32 weights, gradients, AdamW, activations of `micro`
    rows) before the model is built, and refuse a run that would not fit, naming a flag that would make it fit.
    Processes on one CPU machine (torchrun) each hold a whole plan; under --fsdp it is an overestimate."""
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1

    def need(micro_batch: int, seq_len: int, depth: int) -> float:
        try:
            c = model_config(replace(cfg, seq_len=seq_len, depth=depth), mcfg.vocab_size)
        except LlmosError:  # no valid model at that depth: never suggested
            return math.inf
        return planner.plan(c, "f32", c.max_seq_len, micro_batch, "full")["peak"] * procs

    T = mcfg.max_seq_len
    tries = [(f"--micro-batch {m}", need(m, T, cfg.depth)) for m in sorted({micro // 2, micro // 4, 1}, reverse=True)
             if 1 <= m < micro and cfg.batch_size % (m * world) == 0]
    tries += [(f"--seq-len {n}", need(micro, n, cfg.depth)) for n in (T // 2, T // 4) if n >= 32]
    tries += [(f"--depth {d}", need(micro, cfg.seq_len, d)) for d in range(cfg.depth - 1, 0, -1)]
    p = planner.plan(mcfg, "f32", T, micro, "full")
    src = planner.Source(f"depth {cfg.depth}", mcfg, "size")
    why = memory_verdict("memory plan, as llmos fit makes it" + (f" (x {procs} processes)" if procs > 1 else "") + ":",
                         planner.report(p, src), p["peak"] * procs, device, tries, rank)
    if on_all_ranks(why is not None, world, device):  # every rank stops, as rank 0 decides
        raise LlmosError(why or "rank 0 found that this run does not fit in memory; see its message")


def shard(model: Transformer, device, world: int) -> None:
    """FSDP2: every layer, then the rest (embedding, final norm, head), split in `world` shards, one per rank.
    A layer's whole weights are gathered just before it runs and freed after; on CUDA they are gathered in
    bfloat16 and gradients reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    bf16, f32 = (torch.bfloat16, torch.float32) if device.type == "cuda" else (None, None)  # None: as the weights are
    policy = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=f32)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def full_state(model, optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's whole state dicts in CPU memory on rank 0 (empty dicts on the others),
    keyed by parameter name. Under FSDP they are gathered from every rank's shards: every rank must call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, whole: dict) -> None:
    """The inverse of full_state for the optimizer: under FSDP each rank keeps its shard of `whole`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, whole, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------
# The tokenizer


def load_or_train_tokenizer(cfg: PretrainConfig, data_dir: Path):
    if cfg.tokenizer:
        return Tokenizer.from_hf_dir(cfg.tokenizer)
    if not (data_dir / "tokenizer" / "tokenizer.json").is_file():
        train, _ = D.split_documents(D.read_documents(cfg.data), cfg.val_fraction)
        save(train_bpe(train, cfg.vocab_size, cfg.pattern, cfg.min_frequency), data_dir / "tokenizer")
    return Tokenizer.from_hf_dir(data_dir / "tokenizer")
