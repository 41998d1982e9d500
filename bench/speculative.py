"""Speculative decoding on the bundled SmolLM2-135M-Instruct (float32): plain greedy decoding vs
speculative with a cheaper draft, in tokens/s, with the draft's acceptance rate and tokens per
target forward.

    python bench/speculative.py                          # drafts layers:8, layers:15, int8; k 2 4 6; 128 tokens
    python bench/speculative.py --drafts layers:10 --k 4 --tokens 64 --prompts 2
    python bench/speculative.py --smoke                  # a few tokens: checks the pipeline, not the speed

Drafts: "layers:N" is the target cut to its first N blocks (same embedding, norm and head: no
training, so acceptance is whatever the early layers already predict); "int8"/"int4" a weight-only
quantized copy (llmos.quant). Greedy, so every speculative output must equal the plain one; the
script checks that. Writes bench/results/speculative.json (or --out). Run it on an idle machine.
"""

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from llmos import loader, quant
from llmos.engine import Engine, SamplingParams
from llmos.speculative import Draft

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["Write a short story about a robot who learns to paint.",
           "Explain how a rainbow forms, step by step.",
           "List five tips for learning a new language."]


def make_draft(target, spec: str):
    if spec.startswith("layers:"):
        n = int(spec.split(":")[1])
        draft = copy.deepcopy(target)
        draft.layers = draft.layers[:n]
        draft.cfg = dataclasses.replace(target.cfg, n_layers=n)
        return draft
    if spec in ("int8", "int4"):
        return quant.quantize_model(copy.deepcopy(target), spec)
    raise SystemExit(f"unknown draft {spec!r}: use layers:N, int8 or int4")


def timed(engine, prompts, params):
    t0, ids = time.perf_counter(), []
    for p in prompts:
        ids.append(engine.generate(p, params).token_ids)
    return time.perf_counter() - t0, ids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--drafts", default="layers:8,layers:15,int8")
    p.add_argument("--k", default="2,4,6", help="draft tokens per round, comma-separated")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="4 tokens, one prompt, one draft, k=2")
    p.add_argument("--out", default=str(RESULTS / "speculative.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.drafts, args.k, args.tokens, args.prompts = "layers:4", "2", 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = loader.load(args.model, "torch", precision="f32")
    target, tok, eos = runner.model, runner.tokenizer, runner.eos_ids or None
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in PROMPTS[: args.prompts]]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.tokens)
    plain_s, plain_ids = timed(Engine(target, tok, eos_ids=eos), prompts, params)
    n_tokens = sum(map(len, plain_ids))
    records = [{"draft": None, "k": None, "tokens": n_tokens, "seconds": plain_s, "tokens_per_s": n_tokens / plain_s}]
    print(f"plain: {n_tokens / plain_s:.1f} tok/s")
    for spec in args.drafts.split(","):
        draft_model = make_draft(target, spec)
        for k in map(int, args.k.split(",")):
            draft = Draft(draft_model, tok, k)
            s, ids = timed(Engine(target, tok, eos_ids=eos, draft=draft), prompts, params)
            st = draft.stats
            rec = {"draft": spec, "k": k, "tokens": n_tokens, "seconds": s, "tokens_per_s": n_tokens / s,
                   "speedup": plain_s / s, "acceptance": st.acceptance, "tokens_per_target_forward": st.tokens_per_forward,
                   "same_as_plain": ids == plain_ids}
            records.append(rec)
            print(f"{spec} k={k}: {rec['tokens_per_s']:.1f} tok/s ({rec['speedup']:.2f}x), acceptance {st.acceptance:.0%}, "
                  f"{st.tokens_per_forward:.2f} tokens/target forward, same output: {rec['same_as_plain']}")
    result = {"model": args.model, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "max_new_tokens": args.tokens, "prompts": len(prompts), "smoke": args.smoke, "records": records}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
