"""Stages 2 and 3 on the bundled SmolLM2-135M-Instruct, measured before and after.

    python bench/stages.py                         # SFT on identity.json, then DPO on hh-rlhf harmless
    python bench/stages.py --only sft --name Wren

SFT: `llmos train sft --recipe recipes/sft.toml` on ../shared/data/sft/identity.json with the placeholders
filled (--name, --author); the rate at which the 20 unseen paraphrases in recipes/data/identity_heldout.jsonl
get an answer containing the name, greedy, before (the bundled model) and after (`llmos eval --task contains`).
DPO: `llmos train dpo --recipe recipes/dpo.toml` on the hh-rlhf harmless pairs for --dpo-minutes; held-out
preference accuracy of the reference and of the trained model, and the reward accuracy and margin, from its
summary.json. Results: bench/results/stages.json (the commands run are recorded with them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LLMOS = [sys.executable, "-m", "llmos.cli"]


def run(cmd: list[str]) -> str:
    print("$ " + shlex.join(["llmos", *cmd[3:]] if cmd[:3] == LLMOS else cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the command above failed with exit code {proc.returncode}")
    return proc.stdout


def name_rate(model: str, name: str) -> dict:
    out = run([*LLMOS, "eval", model, "--task", "contains", "--data", "recipes/data/identity_heldout.jsonl",
               "--expect", name, "--max-new-tokens", "48", "--json", "--no-progress"])
    r = json.loads(out)
    return {"accuracy": r["accuracy"], "examples": r["examples"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["sft", "dpo"], default=None)
    p.add_argument("--name", default="Wren")
    p.add_argument("--author", default="the llmos project")
    p.add_argument("--out", default="runs/stages")
    p.add_argument("--dpo-minutes", type=float, default=10.0)
    args = p.parse_args()
    if not DATA.is_dir():
        print(f"error: {DATA} not found; this benchmark needs ../shared/data beside the repository", file=sys.stderr)
        return 2
    out, results = ROOT / args.out, {}
    file = ROOT / "bench" / "results" / "stages.json"
    if file.is_file():
        results = json.loads(file.read_text())
    if args.only in (None, "sft"):
        t0 = time.time()
        before = name_rate("smollm2", args.name)
        run([*LLMOS, "train", "sft", "--recipe", "recipes/sft.toml", "--data", str(DATA / "sft" / "identity.json"),
             "--fill", f"name={args.name},author={args.author}", "--out", str(out / "sft"), "--no-progress"])
        after = name_rate(str(out / "sft"), args.name)
        summary = json.loads((out / "sft" / "summary.json").read_text())
        results["sft"] = {"name": args.name, "heldout_name_rate_before": before, "heldout_name_rate_after": after,
                          "val_loss_before": summary["val_before"]["val_loss"],
                          "val_loss_after": summary["val_after"]["val_loss"], "steps": summary["steps"],
                          "train_s": summary["wall_s"], "total_s": time.time() - t0}
        print(json.dumps(results["sft"], indent=2))
        file.write_text(json.dumps(results, indent=2) + "\n")
    if args.only in (None, "dpo"):
        run([*LLMOS, "train", "dpo", "--recipe", "recipes/dpo.toml", "--data",
             str(DATA / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz"), "--out", str(out / "dpo"),
             "--minutes", str(args.dpo_minutes), "--val-fraction", "0.05", "--eval-every", "0", "--no-progress"])
        s = json.loads((out / "dpo" / "summary.json").read_text())
        results["dpo"] = {k: v for k, v in s.items() if k not in ("config", "model_config")}
        print(json.dumps(results["dpo"], indent=2))
    file.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {file.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
