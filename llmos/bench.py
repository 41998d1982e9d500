"""Speed and memory per precision, measured the way llama-bench measures llama.cpp.

    llmos bench [MODEL] [--shape smollm2-135m|tinyllama-1.1b] [--precisions f32,bf16,int8,int4]
                [--engine auto|fast|torch] [--json OUT]
    llmos bench --shape tinyllama-1.1b --json bench/results/tinyllama.json

For each precision, in a fresh process (so its peak resident memory is its own):

    prefill_tok_s   pp512: one forward over a 512-token prompt into an empty KV cache
    decode_tok_s    tg128: 128 single-token steps through the cache, greedy, from an empty context
    ttft_s          time to the first token of a 128-token prompt: cache allocation, prefill, argmax
    peak_rss_mb     the process's peak resident memory (getrusage ru_maxrss): loading included
    ceiling_tok_s   the machine's read bandwidth / the weight bytes a decode step reads

engine: "fast" times the decoder that `llmos run` uses on the CPU (llmos/fast.py: C++ kernels, one call
per token; int8 and int4 there are GGUF Q8_0 and Q4_1 blocks with a Q8_0 output head, so --group-size
does not apply), "torch" the PyTorch model loop (llmos.quant's int8/int4 modules); "auto" is fast
when the kernels build. Each record says which ran in `engine`.

Means of --reps runs after one short warm-up (standard deviations beside them, as llama-bench
prints). The model is MODEL (loaded by llmos.loader.load at the precision), or with --shape a model
of that shape with random weights (normal, std 0.02), so the numbers compare with llama.cpp's on
the same shapes. Each record also carries what llmos.planner predicted for the same run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmos import fast, kernels, loader, planner, quant
from llmos.model import Transformer
from llmos.errors import LlmosError

SHAPES = {"smollm2-135m": "135m", "tinyllama-1.1b": "1.1b"}
DEFAULT_PRECISIONS = ("f32", "bf16", "int8", "int4")
TTFT_PROMPT = 128

# ----------------------------------------------------------------------------
# The machine: memory read bandwidth


def bandwidth(nbytes: int = 1 << 30, reps: int = 5, probe: str = "auto") -> float:
    """Read bandwidth in bytes/s, the best of `reps` passes over `nbytes`. probe "kernels" streams the
    buffer as the decode kernels stream weights (prefetching 32-byte loads, torch's thread count; what
    the fast engine can reach), "torch" times torch's sum over float32 (about 10% lower on the machines
    measured); "auto" is kernels when they are built."""
    if probe in ("auto", "kernels"):
        ext = kernels.load()
        if ext is not None:
            buf = torch.ones(nbytes, dtype=torch.uint8)  # touched: every page resident before timing
            return ext.read_bandwidth(buf, reps, torch.get_num_threads())
        if probe == "kernels":
            raise LlmosError(f"the kernels' bandwidth probe needs the C++ kernels ({kernels.why_not()})")
    x = torch.ones(nbytes // 4)
    x.sum()  # first touch and warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def peak_rss() -> int:
    """Peak resident bytes of this process. On Linux VmHWM, not ru_maxrss: a child started by
    subprocess (vfork + exec) inherits its parent's peak in ru_maxrss, VmHWM starts afresh at exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r if sys.platform == "darwin" else r * 1024


def current_rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss()


# ----------------------------------------------------------------------------
# Models: random weights of a named shape, or a real one


@torch.no_grad()
def random_model(cfg, precision: str, group_size: int | None = None, seed: int = 0):
    """A Transformer of `cfg` with random weights at `precision` (built in bfloat16 and then quantized
    for int8/int4, so the float copy never exists in float32)."""
    build = {"f32": torch.float32, "f16": torch.float16}.get(precision, torch.bfloat16)
    torch.manual_seed(seed)
    with loader.no_init():
        model = Transformer(cfg).to(build)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    if precision in quant.SCHEMES:
        quant.quantize_model(model, precision, group_size)
    quant.release_memory()
    return model.eval()


def random_tokens(cfg, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (1, n), generator=g)


# ----------------------------------------------------------------------------
# Timings, batch 1 (llama-bench's pp and tg tests)


@torch.inference_mode()
def time_prefill(model, n: int) -> float:
    tokens = random_tokens(model.cfg, n)
    cache = model.new_cache(1, n)
    t = time.perf_counter()
    model(tokens, cache, last=True)[:, -1].float().argmax(-1).item()
    return time.perf_counter() - t


@torch.inference_mode()
def time_decode(model, n: int) -> float:
    cache = model.new_cache(1, n + 1)
    token = random_tokens(model.cfg, 1)
    logits = model(token, cache)[:, -1]
    t = time.perf_counter()
    for _ in range(n):
        token = logits.float().argmax(-1, keepdim=True)
        logits = model(token, cache)[:, -1]
    logits.float().argmax(-1).item()
    return time.perf_counter() - t


@torch.inference_mode()
def time_first_token(model, prompt: int, new: int) -> float:
    tokens = random_tokens(model.cfg, prompt, seed=2)
    t = time.perf_counter()
    cache = model.new_cache(1, prompt + new)
    model(tokens, cache, last=True)[:, -1].float().argmax(-1).item()
    return time.perf_counter() - t


def time_fast_prefill(dec, n: int) -> float:
    tokens = random_tokens(dec.cfg, n)[0]
    t = time.perf_counter()
    dec.reset()
    dec.prefill(tokens).argmax().item()
    return time.perf_counter() - t


def time_fast_decode(dec, n: int) -> float:
    dec.reset()
    logits = dec.prefill(random_tokens(dec.cfg, 1)[0])
    t = time.perf_counter()
    for _ in range(n):
        logits = dec.decode(int(logits.argmax()))
    logits.argmax().item()
    return time.perf_counter() - t


def time_fast_first_token(dec, prompt: int) -> float:
    tokens = random_tokens(dec.cfg, prompt, seed=2)[0]
    t = time.perf_counter()
    dec.reset()
    dec.prefill(tokens).argmax().item()
    return time.perf_counter() - t


def fast_decoder(spec: dict, precision: str):
    """The fast decoder at `precision`, built as `llmos run` builds it: float weights as they are,
    int8/int4 as Q8_0/Q4_1 blocks quantized from the float model, which is then dropped."""
    build = "bf16" if precision in quant.SCHEMES else precision
    if spec.get("shape"):
        src = planner.Source(spec["shape"], planner.SIZES[SHAPES[spec["shape"]]], "random", tokenizer=False)
        src.read_bytes = src.config.num_params() * (4 if build == "f32" else 2)
        model, name = random_model(src.config, build), spec["shape"]
    else:
        src = planner.source(spec["model"])
        if src.blocks and planner.BLOCK_PRECISION[src.blocks] == precision:  # a GGUF of these blocks: as `llmos run` loads it
            runner = loader.load(spec["model"], "fast", tokenizer=False)
            return runner.decoder, src, runner.meta.get("name") or spec["model"]
        runner = loader.load(spec["model"], "torch", precision=build, tokenizer=False)
        model, name = runner.model, runner.meta.get("name") or spec["model"]
        del runner
    dec = fast.decoder(model, quant=precision if precision in quant.SCHEMES else None,
                       max_len=spec["prefill"] + spec["decode"] + TTFT_PROMPT)
    if precision in quant.SCHEMES:
        del model
        quant.release_memory()
    return dec, src, name


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


# ----------------------------------------------------------------------------
# One precision, in this process


def run_one(spec: dict) -> dict:
    """Load or build the model, time it, and return its record. spec: model or shape, precision,
    group_size, prefill, decode, reps, threads, bandwidth (bytes/s)."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    precision, group = spec["precision"], spec.get("group_size")
    if spec.get("engine", "torch") == "fast":
        return run_fast(spec)
    group = quant.check_scheme(precision, group) if precision in quant.SCHEMES else None
    t = time.perf_counter()
    if spec.get("shape"):
        src = planner.Source(spec["shape"], planner.SIZES[SHAPES[spec["shape"]]], "random", tokenizer=False)
        src.read_bytes = src.config.num_params() * (4 if precision == "f32" else 2)  # the build before quantizing
        model = random_model(src.config, precision, group)
        name = spec["shape"]
    else:
        src = planner.source(spec["model"])
        runner = loader.load(spec["model"], "torch", precision=precision, group_size=group, tokenizer=False)
        model, name = runner.model, runner.meta.get("name") or spec["model"]
        del runner
    load_s = time.perf_counter() - t
    timings = measure(spec, name, model.cfg, lambda n: time_prefill(model, n), lambda n: time_decode(model, n),
                      lambda n: time_first_token(model, n, spec["decode"]))
    per_token = planner.bytes_per_token(model.cfg, precision, group or 32)
    return record(spec, "torch", name, model.cfg, src, group, per_token, load_s, timings)


def run_fast(spec: dict) -> dict:
    """run_one on the fast decoder: the same tests and record keys."""
    precision = spec["precision"]
    t = time.perf_counter()
    dec, src, name = fast_decoder(spec, precision)
    load_s = time.perf_counter() - t
    timings = measure(spec, name, dec.cfg, lambda n: time_fast_prefill(dec, n), lambda n: time_fast_decode(dec, n),
                      lambda n: time_fast_first_token(dec, n))
    # What one decode step reads: every matrix as packed, the head (a tied one too) whole, one row of the embedding.
    per_token = sum(w.nbytes() for n, w in dec.weights.items() if n != "embed.weight" and isinstance(w, fast.Weight))
    group = 32 if precision in quant.SCHEMES else None
    simd = dec.ext.simd() if dec.ext is not None else "none"
    prefill = "bf16" if dec.ext is not None and dec.bf16_prefill else "int8"
    return record(spec, "fast", name, dec.cfg, src, group, per_token, load_s, timings, backend=dec.backend,
                  simd=simd, prefill_path=prefill if precision in quant.SCHEMES else "float")


def measure(spec: dict, name: str, cfg, prefill_s, decode_s, first_s):
    """Warm up, then --reps runs of each test: (mean, sd) of decode tok/s, prefill tok/s and TTFT.
    prefill_s(n), decode_s(n), first_s(prompt): seconds for n tokens / to the first token."""
    prefill, decode, reps = spec["prefill"], spec["decode"], spec["reps"]
    if prefill + decode > cfg.max_seq_len:
        raise LlmosError(f"--prefill {prefill} + --decode {decode} exceed {name}'s context of {cfg.max_seq_len}")
    prefill_s(min(16, prefill))  # warm-up: first calls pick kernels and allocate
    decode_s(min(4, decode))
    pp = [prefill / prefill_s(prefill) for _ in range(reps)]
    tg = [decode / decode_s(decode) for _ in range(reps)]
    ft = [first_s(min(TTFT_PROMPT, prefill)) for _ in range(reps)]
    return mean_sd(tg), mean_sd(pp), mean_sd(ft)


def record(spec, engine, name, cfg, src, group, per_token, load_s, timings, **extra) -> dict:
    """One precision's JSON record: the issue's keys first, then the details."""
    precision, prefill, decode, reps = spec["precision"], spec["prefill"], spec["decode"], spec["reps"]
    (decode_s, decode_sd), (prefill_s, prefill_sd), (ttft, ttft_sd) = timings
    ctx = max(prefill, decode + 1, min(TTFT_PROMPT, prefill) + decode)
    plan = planner.plan(src, precision, ctx=ctx, prompt=prefill, group_size=group or 32, engine=engine)
    ceiling = spec["bandwidth"] / per_token
    return {
        "precision": precision, "engine": engine, "decode_tok_s": round(decode_s, 2), "prefill_tok_s": round(prefill_s, 1),
        "ttft_s": round(ttft, 4), "peak_rss_mb": round(peak_rss() / 1e6, 1), "ceiling_tok_s": round(ceiling, 1),
        "model": name, "random_weights": bool(spec.get("shape")), "params": cfg.num_params(),
        "group_size": group, "decode_tok_s_sd": round(decode_sd, 2), "prefill_tok_s_sd": round(prefill_sd, 1),
        "ttft_s_sd": round(ttft_sd, 4), "decode_tokens": decode, "prefill_tokens": prefill,
        "ttft_prompt_tokens": min(TTFT_PROMPT, prefill), "reps": reps, "ceiling_fraction": round(decode_s / ceiling, 3),
        "bytes_per_token": per_token, "bandwidth_gb_s": round(spec["bandwidth"] / 1e9, 2),
        "rss_mb": round(current_rss() / 1e6, 1), "planned_peak_mb": round(plan["peak"] / 1e6, 1),
        "planned_running_mb": round(plan["running"] / 1e6, 1), "load_s": round(load_s, 2),
        "threads": torch.get_num_threads(), **extra, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }


# ----------------------------------------------------------------------------
# Every precision, each in a fresh process


def bench(model: str | None = None, shape: str | None = None, precisions=DEFAULT_PRECISIONS, group_size=None,
          prefill: int = 512, decode: int = 128, reps: int = 3, threads: int | None = None, log=print,
          engine: str = "auto") -> list[dict]:
    if shape is not None and shape not in SHAPES:
        raise LlmosError(f"unknown shape {shape!r}; use {' or '.join(SHAPES)}")
    if model and shape:
        raise LlmosError("pass a MODEL or --shape, not both")
    for p in precisions:
        if p not in loader.PRECISIONS:
            raise LlmosError(f"unknown precision {p!r}; use some of {', '.join(loader.PRECISIONS)}")
    if min(prefill, decode, reps) < 1:
        raise LlmosError("--prefill, --decode and --reps must be at least 1")
    engine = "fast" if loader.backend(engine) == "fast" else "torch"  # here, so each child finds the kernels built
    if threads:
        torch.set_num_threads(threads)
    bw = bandwidth()
    log(f"read bandwidth {bw / 1e9:.1f} GB/s ({torch.get_num_threads()} threads); engine {engine}")
    log(HEADER)
    records = []
    for p in precisions:
        spec = dict(model=None if shape else (model or "default"), shape=shape, precision=p, group_size=group_size,
                    prefill=prefill, decode=decode, reps=reps, threads=threads or torch.get_num_threads(), bandwidth=bw,
                    engine=engine)
        out = subprocess.run([sys.executable, "-m", "llmos.bench", json.dumps(spec)], capture_output=True, text=True)
        if out.returncode:
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            if out.returncode == 2 and last.startswith("error: "):  # main() below: the child's one-line LlmosError
                raise LlmosError(f"bench of {p} failed: {last.removeprefix('error: ')}")
            raise RuntimeError(f"bench of {p} crashed (exit code {out.returncode}): {last}")  # a bug, not a user error
        records.append(json.loads(out.stdout.strip().splitlines()[-1]))
        log(row(records[-1]))
    return records


HEADER = f"{'precision':<10}{'decode tok/s':>16}{'prefill tok/s':>18}{'ttft s':>9}{'peak MB':>10}{'planned':>9}{'ceiling':>9}"


def row(r: dict) -> str:
    return (f"{r['precision']:<10}{r['decode_tok_s']:>9.1f} ± {r['decode_tok_s_sd']:<4.1f}"
            f"{r['prefill_tok_s']:>11.0f} ± {r['prefill_tok_s_sd']:<5.0f}{r['ttft_s']:>9.3f}"
            f"{r['peak_rss_mb']:>10.0f}{r['planned_peak_mb']:>9.0f}{r['ceiling_tok_s']:>9.1f}")


def write_json(records, out) -> None:
    """Atomically: a temporary file beside OUT, then renamed over it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=2) + "\n")
    os.replace(tmp, out)


def main(argv=None) -> int:
    """The child process: one precision, its record as JSON on the last line of stdout."""
    spec = json.loads((argv or sys.argv[1:])[0])
    try:
        print(json.dumps(run_one(spec)), flush=True)
    except LlmosError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
