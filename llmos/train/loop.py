"""What every training stage shares: distributed runs (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK), the end of
a step (time budget, validation, checkpoints), random state for resuming, and the report (summary.json, loss.png)."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from llmos.errors import LlmosError
from llmos.files import atomic_write

# ----------------------------------------------------------------------------
# Shared by the stages: distributed runs (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK) and reports


def start_distributed(want: str = "auto"):
    """(rank, world size, device, whether this call started the process group)."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        raise LlmosError(f"device {want!r} is not available here; use cpu, cuda (with a GPU) or auto")
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


def check_length(cfg) -> None:
    """Refuse a run given both or neither of --steps and --minutes, or an unknown schedule."""
    if bool(cfg.steps > 0) == bool(cfg.minutes > 0):
        raise LlmosError("pass exactly one of --steps N and --minutes M")
    if cfg.schedule not in ("cosine", "wsd"):
        raise LlmosError(f"schedule {cfg.schedule!r} is not known; use cosine or wsd")


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


def refuse_other_run(out, saved: dict, now: dict, run_control: set) -> None:
    """A LlmosError when the run saved in `out` had another config than `now`, beyond what may change on resume."""
    for key, was in saved.items():
        if key not in run_control and now.get(key) != was:
            raise LlmosError(f"{out}: holds a run with {key} = {was!r}, not {now.get(key)!r}; run its original "
                             "command to resume it, or pass another --out for a new run")


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
