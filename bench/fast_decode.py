"""Batch-1 CPU decode (tg128) and prefill (pp512) of llmos.fast on random-weight models of the two shapes
the issue compares with llama.cpp: SmolLM2-135M and TinyLlama-1.1B.

    python bench/fast_decode.py                                  # both shapes, f32 bf16 int8 int4 → bench/results/fast_decode.json
    python bench/fast_decode.py --shapes 135m --precisions int8 int4 --tg 32 --pp 128 --baseline

Each record: shape, precision, backend, decode_tok_s (median of --repeat runs of --tg tokens after a
1-token prompt, like llama-bench's tg), prefill_tok_s (one prompt of --pp tokens), ttft_s (prefill
of --pp tokens plus the first decoded token), weight_mb (bytes read per token), bandwidth_gb_s
(measured here: sum over a 1 GiB tensor) and ceiling_tok_s = bandwidth / bytes per token.
--clock cpu times with process CPU time instead of the wall clock: on a machine shared with other work,
`--threads 1 --clock cpu` approximates a quiet machine's single-thread speed (memory bandwidth is
still shared). --baseline adds the plain PyTorch loop (model.forward with its KV cache; int8/int4 through
llmos.quant's torch kernels) under the same conditions, for relative comparisons on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmos import fast  # noqa: E402
from llmos.model import Config, Transformer  # noqa: E402

SHAPES = {
    "135m": Config(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                   max_seq_len=2048, rope_theta=100000.0, tie_embeddings=True),
    "1.1b": Config(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                   max_seq_len=2048, tie_embeddings=False),
}
PRECISIONS = ("f32", "bf16", "int8", "int4")


def random_model(cfg: Config) -> Transformer:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    for name, p in model.named_parameters():
        with torch.no_grad():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    model.inv_freq = fast.rope_frequencies(cfg)
    return model.eval()


def bandwidth_gb_s() -> float:
    x = torch.ones(1 << 28)  # 1 GiB of float32
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(3))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


clock = time.perf_counter  # --clock cpu: time.process_time


def bench_fast(dec, vocab: int, pp: int, tg: int, repeat: int) -> dict:
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (pp,), generator=g)
    dec.reset()
    dec.prefill(prompt[:8])  # warm up: threads, first-touch of buffers
    dec.reset()
    t = clock()
    logits = dec.prefill(prompt)
    t_prefill = clock() - t
    dec.decode(int(logits.argmax()))
    ttft = clock() - t
    runs = []
    for _ in range(repeat):
        dec.reset()
        tok = int(dec.prefill(prompt[:1]).argmax())
        t = clock()
        for _ in range(tg):
            tok = int(dec.decode(tok).argmax())
        runs.append(tg / (clock() - t))
    return {"decode_tok_s": statistics.median(runs), "decode_runs": runs, "prefill_tok_s": pp / t_prefill,
            "ttft_s": ttft}


@torch.inference_mode()
def bench_baseline(model: Transformer, precision: str, pp: int, tg: int, repeat: int) -> dict:
    """The plain PyTorch loop: model.forward over its KVCache, as llmos.engine runs it today."""
    import copy

    from llmos import quant

    m = copy.deepcopy(model)
    if precision in ("int8", "int4"):
        quant.quantize_model(m, precision, 32 if precision == "int4" else None, dtype=torch.bfloat16)
    elif precision == "bf16":
        m = m.to(torch.bfloat16)
    vocab = model.cfg.vocab_size
    prompt = torch.randint(0, vocab, (1, pp), generator=torch.Generator().manual_seed(1))
    cache = m.new_cache(1, pp + 8)
    m(prompt[:, :8], cache)
    cache = m.new_cache(1, pp + 8)
    t = clock()
    m(prompt, cache)
    t_prefill = clock() - t
    runs = []
    for _ in range(repeat):
        cache = m.new_cache(1, tg + 2)
        tok = m(prompt[:, :1], cache)[:, -1].argmax(-1, keepdim=True)
        t = clock()
        for _ in range(tg):
            tok = m(tok, cache)[:, -1].argmax(-1, keepdim=True)
        runs.append(tg / (clock() - t))
    return {"decode_tok_s": statistics.median(runs), "decode_runs": runs, "prefill_tok_s": pp / t_prefill}


def weight_bytes(dec) -> int:
    """Bytes of weights one decode step reads: every layer matrix and the head (one embedding row aside)."""
    return sum(w.nbytes() for k, w in dec.weights.items() if isinstance(w, fast.Weight) and k != "embed.weight")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS) + ["q4_1"])
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--baseline", action="store_true", help="also time the plain PyTorch loop")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fast_decode.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    bw = bandwidth_gb_s()
    records = []
    for shape in args.shapes:
        cfg = SHAPES[shape]
        model = random_model(cfg)
        for precision in args.precisions:
            dec = fast.decoder(model, quant=None if precision == "f32" else precision)
            r = bench_fast(dec, cfg.vocab_size, args.pp, args.tg, args.repeat)
            mb = weight_bytes(dec) / 1e6
            rec = {"shape": shape, "precision": precision, "backend": dec.backend, **r, "weight_mb": round(mb, 1),
                   "bandwidth_gb_s": round(bw, 1), "ceiling_tok_s": round(bw * 1e3 / mb, 1)}
            if args.baseline:
                rec["baseline"] = bench_baseline(model, precision, args.pp, args.tg, args.repeat)
            records.append(rec)
            base = f"  (plain PyTorch {rec['baseline']['decode_tok_s']:.1f} / {rec['baseline']['prefill_tok_s']:.0f})" if args.baseline else ""
            print(f"{shape:5} {precision:5} {dec.backend}: decode {r['decode_tok_s']:7.1f} tok/s  prefill "
                  f"{r['prefill_tok_s']:7.1f} tok/s  ttft {r['ttft_s']:.3f} s  ceiling {rec['ceiling_tok_s']:.0f}{base}",
                  flush=True)
            del dec
        del model
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "args": vars(args), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
