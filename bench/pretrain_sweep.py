"""Pretraining at equal wall-clock: which preset, schedule and learning rate reach the lowest
held-out bits per byte on tinyshakespeare in a fixed number of minutes on this machine.

    python bench/pretrain_sweep.py --minutes 10 --trials base               # the recipe as it is
    python bench/pretrain_sweep.py --minutes 2 --trials all --tag short     # every trial below, 2 minutes each

Each trial is `llmos train pretrain --recipe recipes/pretrain_tiny.toml` plus its flags, in a fresh
process and a fresh output directory (tokenizing is not counted: the clock starts at the first step).
The last 10% of the text is held out. Results: bench/results/pretrain_sweep[_TAG].json and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "corpora" / "tinyshakespeare.txt"

# name → flags over recipes/pretrain_tiny.toml (10 minutes; the rest is llmos train pretrain's defaults) as it was
# swept (depth 4, width 256, vocab 2048, context 256, batch 16, lr 3e-3, cosine); depth 3 won and is now the
# default, so "base" pins depth 4
TRIALS = {
    "base": ["--depth", "4"],
    "lr6e-3": ["--lr", "6e-3"],
    "lr1e-2": ["--lr", "1e-2"],
    "wsd": ["--schedule", "wsd"],
    "depth3": ["--depth", "3"],
    "depth6": ["--depth", "6"],
    "vocab1024": ["--vocab-size", "1024"],
    "vocab4096": ["--vocab-size", "4096"],
    "ctx128-b32": ["--seq-len", "128", "--batch-size", "32"],
    "batch8": ["--batch-size", "8"],
    # second round: the winners of the first combined
    "d3-b8": ["--depth", "3", "--batch-size", "8"],
    "d3-b8-lr6e-3-wsd": ["--depth", "3", "--batch-size", "8", "--lr", "6e-3", "--schedule", "wsd"],
    "d3-lr6e-3-wsd": ["--depth", "3", "--lr", "6e-3", "--schedule", "wsd"],
}


def run_trial(name: str, flags: list[str], minutes: float, threads: int, workdir: Path) -> dict:
    out = workdir / name
    cmd = [sys.executable, "-m", "llmos.train.pretrain", "--recipe", str(ROOT / "recipes" / "pretrain_tiny.toml"),
           "--data", str(DATA), "--out", str(out), "--minutes", str(minutes), "--eval-every", "0", "--no-progress", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"trial": name, "flags": flags, "error": proc.stderr.strip().splitlines()[-1:]}
    s = json.loads((out / "summary.json").read_text())
    return {"trial": name, "flags": flags, "val_bpb": s["val_bpb"], "val_loss": s["val_loss"], "steps": s["steps"],
            "tokens": s["tokens"], "tokens_per_s": s["tokens_per_s"], "params": s["params"], "wall_s": s["wall_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--trials", default="base", help=f"comma-separated names or 'all': {', '.join(TRIALS)}")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    if not DATA.is_file():
        print(f"error: {DATA} not found; this benchmark needs ../shared/data beside the repository", file=sys.stderr)
        return 2
    names = list(TRIALS) if args.trials == "all" else args.trials.split(",")
    unknown = [n for n in names if n not in TRIALS]
    if unknown:
        print(f"error: unknown trial {unknown[0]!r}; choose from {', '.join(TRIALS)}", file=sys.stderr)
        return 2
    results = []
    out = ROOT / "bench" / "results" / f"pretrain_sweep{'_' + args.tag if args.tag else ''}.json"
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = run_trial(name, TRIALS[name], args.minutes, args.threads, Path(tmp))
            results.append(r)
            line = (f"{name:12s} error {r['error']}" if "error" in r else
                    f"{name:12s} {r['val_bpb']:.4f} bpb  {r['steps']:5d} steps  {r['tokens_per_s']:7.0f} tok/s  "
                    f"{r['params'] / 1e6:.2f} M params")
            print(line, flush=True)
            record = {"minutes": args.minutes, "threads": args.threads, "load_avg": os.getloadavg(), "results": results}
            out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
