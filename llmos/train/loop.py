"""What every training stage shares: the options of a run (TrainConfig), distributed runs (torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK), the learning-rate schedule, the end of a step (time budget, validation, checkpoints),
checkpoints and their resume (trainer_state.pt, the model as a Hugging Face directory), and the report
(summary.json, loss.png). Pretraining (pretrain.py) and fine-tuning (finetune.py) build their loops from these."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from llmos import planner
from llmos.errors import LlmosError
from llmos.files import atomic_write
from llmos.formats import Checkpoint, hf
from llmos.options import option

# ----------------------------------------------------------------------------
# The options every training stage takes


@dataclass
class TrainConfig:
    """The data, the length of the run, the batch, the schedule and run control: fields shared by every training
    stage's config (flags = recipe keys). The defaults are pretraining's best measured run (see PretrainConfig);
    the fine-tuning stages set their own with options.defaults, so each stage's defaults are its best run."""
    EXCLUSIVE = [("steps", "minutes")]  # a flag for one replaces a recipe's other
    data: str = option("", "training data")
    out: str = option("", "output directory: the model, trainer_state.pt, summary.json, loss.png")
    val_fraction: float = option(0.1, "last fraction of the corpus held out for validation")
    steps: int = option(0, "optimizer steps (or give --minutes)")
    minutes: float = option(0.0, "time budget in minutes instead of --steps")
    # the batch: rows of seq_len tokens
    batch_size: int = option(16, "rows per optimizer step, all ranks and micro-batches together")
    micro_batch: int = option(0, "rows per forward pass on each rank (0 = batch_size / ranks); gradients "
                                 "accumulate over the rest")
    seq_len: int = option(256, "tokens per row")
    # the schedule
    lr: float = option(3e-3, "peak learning rate")
    schedule: str = option("cosine", "cosine, or wsd (warmup-stable-decay, linear decay over decay_frac)")
    warmup_steps: int = option(50, "linear warmup steps")
    decay_frac: float = option(0.2, "fraction of the run spent decaying, for wsd")
    min_lr_frac: float = option(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = option(0.1, "AdamW weight decay of matrices")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)")
    seed: int = option(0, "seed of the initialization, the held-out split and the data order")
    # run control: may change on resume (RUN_CONTROL)
    eval_every: int = option(250, "steps between validation passes (0 = only at the end)")
    save_every: int = option(500, "steps between checkpoints (0 = only at the end)")
    stop_at: int = option(0, "pause after this step, checkpointed; run again without it to continue")
    device: str = option("auto", "cpu, cuda or auto")
    progress: bool = option(True, "show a progress bar on stderr")


# Options that may change between a run and its resume (pretraining's compile and fsdp too); any other change
# is another run.
RUN_CONTROL = {"out", "micro_batch", "eval_every", "save_every", "stop_at", "device", "progress", "compile", "fsdp"}


def check_run(cfg: TrainConfig) -> None:
    """Refuse a run without data or output, given both or neither of --steps and --minutes, or an unknown schedule."""
    if not cfg.data or not cfg.out:
        raise LlmosError("pass --data and --out DIR")
    if bool(cfg.steps > 0) == bool(cfg.minutes > 0):
        raise LlmosError("pass exactly one of --steps N and --minutes M")
    if cfg.schedule not in ("cosine", "wsd"):
        raise LlmosError(f"schedule {cfg.schedule!r} is not known; use cosine or wsd")


def lr_factor(step: int, total: int | None, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total` (None: not known yet)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if total is None:
        return 1.0
    if cfg.schedule == "wsd":
        decay_start = total - round(cfg.decay_frac * total)
        progress = max(0, step - decay_start) / max(1, total - decay_start)
        return 1 - (1 - cfg.min_lr_frac) * progress
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------
# Memory: every run prints its plan (llmos/planner.py) before it starts, and does not start when it cannot fit


def memory_verdict(title: str, lines: list[str], need: int, device, tries, rank: int = 0) -> str | None:
    """Print a run's memory plan (`lines`, as `llmos fit` prints them) and whether `need` bytes fit in what this
    machine has free: RAM, or the GPU's memory for a CUDA device. None when it fits, else the one-line reason,
    naming the first of `tries`, [(flags, bytes the run would need with them)], that would fit."""
    here = planner.machine()
    gpus = here["gpus"]
    if device.type == "cuda" and gpus:
        where, free = "GPU memory", gpus[min(device.index or 0, len(gpus) - 1)]["free"]
    else:
        where, free = "RAM", here["ram_available"]
    log(rank, title)
    for line in lines:
        log(rank, "  " + line)
    log(rank, f"  {'fits' if need <= free else 'does not fit'} in {where}: {planner.gb(need)} needed, "
              f"{planner.gb(free)} available")
    if need <= free:
        return None
    fix = next((flags for flags, n in tries if n <= free), None)
    return (f"this run needs {planner.gb(need)} and {planner.gb(free)} of {where} is available here; "
            + (f"pass {fix} to make it fit" if fix else "nothing these flags can change makes it fit: free memory, "
               "or train a smaller model"))


# ----------------------------------------------------------------------------
# Distributed runs (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK) and reports


def device_kind(want: str) -> str:
    """cpu or cuda: what --device asks for (auto: cuda when there is a GPU), refused when it is not here."""
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        raise LlmosError(f"device {want!r} is not available here; use cpu, cuda (with a GPU) or auto")
    return kind


def start_distributed(want: str = "auto"):
    """(rank, world size, device, whether this call started the process group)."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    kind = device_kind(want)
    device = torch.device(f"cuda:{local}" if kind == "cuda" else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    own = world > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return rank, world, device, own


def rank0_first(rank: int, world: int, fn):
    """fn() on rank 0, then on the others, which find on disk what rank 0 built and cached."""
    result = fn() if rank == 0 else None
    if world > 1:
        dist.barrier()
    return fn() if rank != 0 else result


def on_all_ranks(value, world: int, device, how: str = "rank 0"):
    """The mean of the ranks' values, or rank 0's value (so that all ranks take the same branch)."""
    if world == 1:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t) if how == "mean" else dist.broadcast(t, 0)
    return t.item() / world if how == "mean" else t.item()


def log(rank: int, message: str, bar=None) -> None:
    """A line on stderr from rank 0, above the progress bar when there is one."""
    if rank == 0:
        (bar.write if bar is not None else print)(message, file=sys.stderr)


def plot_losses(train: list[float], val: list, file, title: str, note: str = "") -> None:
    """Training loss per step and validation loss at (step, loss) points, as a PNG."""
    import matplotlib  # deferred: pyplot takes a second to import, and only reports need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(range(1, len(train) + 1), train, lw=0.8, label="train")
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", label="validation" + (f" ({note})" if note else ""))
    ax.set(xlabel="step", ylabel="loss (nats per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_write(file, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------
# The end of a training step, the same in every stage: time budget, validation, checkpoints, report


def progress_bar(desc: str, total: int | None, step: int, enabled: bool):
    return tqdm(total=total, initial=step, unit="step", desc=desc, file=sys.stderr, dynamic_ncols=True,
                disable=not enabled)


def steps_in_budget(cfg, step: int, elapsed: float, per_step: float, bar, rank: int = 0, spent: float = 0.0) -> int:
    """The total steps of a --minutes run: those of per_step seconds that fit in what is left of the budget
    after `elapsed` seconds and `spent` more (time measured but not yet in elapsed)."""
    total = step + max(1, int((cfg.minutes * 60 - elapsed - spent) / per_step))
    bar.total = total
    log(rank, f"{per_step * 1000:.0f} ms per step: {total} steps fit in {cfg.minutes:g} minutes", bar)
    return total


def end_step(cfg, step: int, total: int | None, elapsed: float, validate, checkpoint, agree=lambda v: v):
    """(total, stop) after optimizer step `step`: validate and checkpoint when due; stop when the run is finished
    or paused at --stop-at. agree(value) makes every rank take the same branch (rank 0's value)."""
    if cfg.minutes and agree(elapsed > 1.1 * cfg.minutes * 60):
        total = step  # over budget: end here, with the decay cut short
    finished = total is not None and step >= total
    if finished or (cfg.eval_every and step % cfg.eval_every == 0):
        validate()
    paused = not finished and cfg.stop_at and step >= cfg.stop_at
    if finished or paused or (cfg.save_every and step % cfg.save_every == 0):
        checkpoint()
    return total, bool(finished or paused)


# ----------------------------------------------------------------------------
# Checkpoints: trainer_state.pt (everything a resume needs) beside the model as a Hugging Face directory


def load_state(out: Path, cfg, stage: str, run_control: set, own: tuple = (), ours: bool = False) -> dict | None:
    """The unfinished `stage` run saved in `out`, or None to start one. Refused: a directory holding anything else
    (beyond hidden files and the stage's `own` entries, or anything at all when `ours`: the stage prepared it),
    another stage's run, or a run started with another config than cfg beyond what may change on resume."""
    file = out / "trainer_state.pt"
    if not file.is_file():
        if out.is_dir() and not ours and any(p.name not in own and not p.name.startswith(".") for p in out.iterdir()):
            raise LlmosError(f"{out}: exists and holds no unfinished {stage} run; pass a new or empty --out")
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise LlmosError(f"{file}: cannot read the checkpoint ({type(e).__name__}); remove {out} to start over") from None
    if state.get("stage", "pretraining") != stage:  # pretraining's first checkpoints had no stage
        raise LlmosError(f"{out}: holds a {state.get('stage', 'pretraining')} run, not {stage}; pass another --out")
    for key, was in state["config"].items():
        if key not in run_control and asdict(cfg).get(key) != was:
            raise LlmosError(f"{out}: holds a run with {key} = {was!r}, not {asdict(cfg).get(key)!r}; run its "
                             "original command to resume it, or pass another --out for a new run")
    return state


def finished_before(out: Path, state: dict | None, cfg, rank: int = 0) -> dict | None:
    """The summary of the run in `out` when it has nothing left to do (finished, or at --stop-at), else None."""
    if not state or not ((state["total_steps"] and state["step"] >= state["total_steps"])
                         or 0 < cfg.stop_at <= state["step"]):
        return None
    log(rank, f"{out}: nothing to do, the run is at step {state['step']} of {state['total_steps'] or '?'} "
              "(finished, or at --stop-at); pass another --out or a later --stop-at")
    return json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}


def restore(state: dict, loader) -> tuple[int, int | None, float, dict]:
    """(step, total steps, elapsed seconds, history) of a saved run, its data position and random states put back."""
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    return state["step"], state["total_steps"], state["elapsed"], state["history"]


def save_state(out: Path, stage: str, cfg, optimizer_state: dict, loader, step: int, total: int | None,
               elapsed: float, history: dict, **weights) -> None:
    """trainer_state.pt, replaced atomically: with `weights` (the model's, or the trained part), all a resume needs."""
    state = {"stage": stage, "config": asdict(cfg), **weights, "optimizer": optimizer_state, "loader": loader.state_dict(),
             "step": step, "total_steps": total, "elapsed": elapsed, "history": history, "rng": rng_state()}
    atomic_write(out / "trainer_state.pt", lambda f: torch.save(state, f))


def write_model(out: Path, ckpt: Checkpoint, dtype: str, extra_files=None) -> None:
    """The model as a Hugging Face directory in `out`, written into a hidden folder and then moved file by file
    (the config never changes within a run, so the files may land one by one); extra_files(folder) adds more."""
    staging = out / ".model"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        hf.write(ckpt, staging, dtype=dtype)
        if extra_files:
            extra_files(staging)
        for f in staging.iterdir():
            os.replace(f, out / f.name)
        staging.rmdir()
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise LlmosError(f"{out}: could not write the model ({e.strerror or e}); free disk space and run the same "
                         "command again to resume from the last checkpoint") from None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def write_report(out, summary: dict, train_loss: list[float], val: list, title: str, note: str = "") -> None:
    """summary.json and loss.png in `out`."""
    atomic_write(Path(out) / "summary.json", lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))
    plot_losses(train_loss, val, Path(out) / "loss.png", title, note)
