"""Training stages, one module and one command each: tokenizer → pretrain → sft → dpo → rl.

Every stage is a plain function taking one config dataclass. The dataclass's
fields are at once the command's flags (`--vocab-size`) and the recipe's TOML
keys (`vocab_size = 4096`); `--recipe FILE` loads a recipe and flags override it.
Unknown keys and values of the wrong type are errors, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import typing
from pathlib import Path

from llmos.errors import LlmosError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def option(default, help: str):
    """A config field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def _types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def read_toml(path, example: str = "(see recipes/)") -> dict:
    """A recipe file's TOML as a dict, or one line saying why not."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise LlmosError(f"{path}: no such recipe file; pass a .toml file {example}") from None
    except tomllib.TOMLDecodeError as e:
        raise LlmosError(f"{path}: not valid TOML ({e})") from None


def load_recipe(path, cls) -> dict:
    """A TOML recipe as a dict of known keys with values of the right type."""
    recipe = read_toml(path)
    types = _types(cls)
    for key, value in recipe.items():
        if key not in types:
            raise LlmosError(f"{path}: unknown key {key!r}; known keys are {', '.join(sorted(types))}")
        want = types[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            recipe[key], ok = float(value), True
        if not ok:
            raise LlmosError(f"{path}: {key} = {value!r} should be a {want.__name__}")
    return recipe


def make_config(cls, values: dict | None = None, recipe=None):
    """cls from its defaults, then a recipe file, then `values` (flags); unknown keys are errors."""
    merged = load_recipe(recipe, cls) if recipe else {}
    values = {k: v for k, v in (values or {}).items() if v is not None}
    unknown = set(values) - set(_types(cls))
    if unknown:
        raise LlmosError(f"unknown option {sorted(unknown)[0]!r}; known options are {', '.join(sorted(_types(cls)))}")
    for group in getattr(cls, "EXCLUSIVE", ()):  # e.g. --steps on the command line replaces the recipe's minutes
        if any(k in values for k in group):
            merged = {k: v for k, v in merged.items() if k not in group}
    return cls(**{**merged, **values})


def parser_for(cls, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field; every default is None so recipes can fill the gaps."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="TOML file with any of the options below; flags override it")
    for f in dataclasses.fields(cls):
        kind = _types(cls)[f.name]
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            metavar = {int: "N", float: "X"}.get(kind, f.name.upper())
            p.add_argument(flag, dest=f.name, type=kind, default=None, metavar=metavar, help=help)
    return p


def config_from_argv(cls, argv, prog: str, description: str):
    args = vars(parser_for(cls, prog, description).parse_args(argv))
    recipe = args.pop("recipe")
    return make_config(cls, args, recipe)


def run_main(fn, cls, argv, prog: str, description: str) -> int:
    """`python -m llmos.train.X` entry: parse, run, print a LlmosError as one line and exit 2."""
    try:
        fn(config_from_argv(cls, sys.argv[1:] if argv is None else argv, prog, description))
    except LlmosError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


UMASK = os.umask(0o022)
os.umask(UMASK)


def atomic_write(path, write) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`.

    A crash or a full disk leaves the previous file whole and no temporary behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise LlmosError(f"{path}: could not write ({e.strerror or e}); free some disk space and run again, "
                         "the previous file is kept") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------
# Shared by the stages: distributed runs (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK) and reports


def start_distributed(want: str = "auto"):
    """(rank, world size, device, whether this call started the process group)."""
    import torch
    import torch.distributed as dist

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
    import torch.distributed as dist

    result = fn() if rank == 0 else None
    if world > 1:
        dist.barrier()
    return fn() if rank != 0 else result


def on_all_ranks(value, world: int, device, how: str = "rank 0"):
    """The mean of the ranks' values, or rank 0's value (so that all ranks take the same branch)."""
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t) if how == "mean" else dist.broadcast(t, 0)
    return t.item() / world if how == "mean" else t.item()


def log(rank: int, message: str, bar=None) -> None:
    """A line on stderr from rank 0, above the progress bar when there is one."""
    if rank == 0:
        (bar.write if bar is not None else print)(message, file=sys.stderr)


def plot_losses(train: list[float], val: list, file, title: str, note: str = "") -> None:
    """Training loss per step and validation loss at (step, loss) points, as a PNG."""
    import matplotlib

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
    from tqdm import tqdm

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
    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def write_report(out, summary: dict, train_loss: list[float], val: list, title: str, note: str = "") -> None:
    """summary.json and loss.png in `out`."""
    atomic_write(Path(out) / "summary.json", lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))
    plot_losses(train_loss, val, Path(out) / "loss.png", title, note)
