"""Batch-1 decode and prefill speed, time to first token and peak memory, per precision, for the
random-weight SmolLM2-135M and TinyLlama-1.1B shapes (comparable with llama-bench on the same
shapes, /work/shared/notes/cpu-inference.md) and the bundled SmolLM2-135M-Instruct.

    python bench/decode.py                          # all three models, pp512 + tg128, 3 repetitions
    python bench/decode.py --smoke                  # a few tokens each: checks the pipeline, not the speed
    python bench/decode.py --models tinyllama-1.1b --precisions int8,int4 --threads 2

Writes bench/results/decode-<model>-<date>.json: one record per precision (llmos/bench.py lists the
keys), atomically. Run it on an otherwise idle machine: the numbers are meaningless beside other work.
"""

import argparse
import sys
import time
from pathlib import Path

from llmos import bench

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("smollm2-135m", "tinyllama-1.1b", "default")  # two shapes with random weights, then the bundled model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: shapes, or model names/paths")
    p.add_argument("--precisions", default=",".join(bench.DEFAULT_PRECISIONS))
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default 32)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="prefill 16, decode 4, one repetition")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    prefill, decode, reps = (16, 4, 1) if args.smoke else (512, 128, args.reps)
    precisions = [x for x in args.precisions.split(",") if x]
    for name in [m for m in args.models.split(",") if m]:
        shape = name if name in bench.SHAPES else None
        print(f"== {name}", flush=True)
        records = bench.bench(None if shape else name, shape, precisions, args.group_size, prefill, decode, reps,
                              args.threads, log=lambda line: print(line, flush=True))
        label = Path(name).stem if not shape else name
        out = args.out / f"decode-{label}{'-smoke' if args.smoke else ''}-{time.strftime('%Y%m%d-%H%M')}.json"
        bench.write_json(records, out)
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
