"""What quantization costs in quality: perplexity on wiki_demo.txt at bf16, int8 and int4 (llmos.quant).

    python bench/quant_ppl.py                                   # the bundled SmolLM2, first 200 kB of the text
    python bench/quant_ppl.py --model runs/e2e/base --kb 0      # any model, the whole file

Each precision is loaded with `llmos.loader.load(..., precision=P)` (int8: per output channel; int4: groups of
32, asymmetric) and scored by `llmos eval`'s perplexity (windows of 1024 tokens, stride 512). The
increase is relative to bf16. Note: the bundled SmolLM2 is itself a Q4_1 file, so its "bf16" is the
dequantized Q4_1 weights; requantizing those measures rounding on top of rounding. A model trained
here in float (e.g. the end-to-end recipe's base model) has no such history.
With --engine fast the int8/int4 models are the fast CPU decoder's (llmos/fast.py: Q8_0 / Q4_0 blocks with a
Q8_0 head, int8 activations where they meet quantized weights, as `llmos run` computes), each window decoded
one token at a time through the decode kernel; "stored" is the GGUF file's own blocks, as `llmos run` loads it.

    python bench/quant_ppl.py --engine fast --precisions bf16,stored,int8,int4 --kb 50 --tag fast

Results: bench/results/quant_ppl[_TAG].json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "corpora" / "wiki_demo.txt"


def main() -> int:
    from llmos.evals.run import evaluate
    from llmos.evals.tasks import Perplexity
    from llmos import loader

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--precisions", default="bf16,int8,int4")
    p.add_argument("--kb", type=int, default=200, help="kilobytes of the text to score (0 = all)")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--tag", default="")
    p.add_argument("--engine", choices=["torch", "fast"], default="torch",
                   help="fast: int8/int4/stored through the fast decoder's kernels (bf16 stays the torch reference)")
    args = p.parse_args()
    if not TEXT.is_file():
        print(f"error: {TEXT} not found; this benchmark needs ../shared/data beside the repository", file=sys.stderr)
        return 2
    text = TEXT.read_text(encoding="utf-8")
    if args.kb:
        text = text[: args.kb * 1000]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "text.txt"
        path.write_text(text, encoding="utf-8")
        for precision in args.precisions.split(","):
            if args.engine == "fast" and precision != "bf16":
                model, tok = fast_scorer(args.model, precision)
            else:
                runner = loader.load(args.model, "torch", precision=precision)
                model, tok = runner.model, runner.tokenizer
            r = evaluate(Perplexity(path), model, tok, context=args.context, stride=args.context // 2)
            records.append({"precision": precision, "perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"],
                            "tokens": r["tokens"]})
            base = records[0]["perplexity"]
            print(f"{precision:5s} ppl {r['perplexity']:.4f}  ({100 * (r['perplexity'] / base - 1):+.2f}% vs "
                  f"{records[0]['precision']})  {r['tokens']} tokens", flush=True)
            del model
    for r in records:
        r["increase_pct"] = 100 * (r["perplexity"] / records[0]["perplexity"] - 1)
    out = ROOT / "bench" / "results" / f"quant_ppl{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({"model": args.model, "engine": args.engine, "text": TEXT.name, "kb": args.kb, "context": args.context,
                               "records": records}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def fast_scorer(name: str, precision: str):
    """(model-like scorer, tokenizer): forward(tokens [1, T]) → logits [1, T, V], every position through the
    fast decoder's decode kernel, so the scores carry its int8 activation rounding."""
    import torch

    from llmos import fast, loader
    from llmos.quant import release_memory

    if precision == "stored":
        runner = loader.load(name, "fast")
        tok, dec = runner.tokenizer, runner.decoder
    else:
        runner = loader.load(name, "torch", precision="bf16")
        model, tok = runner.model, runner.tokenizer
        del runner
        dec = fast.decoder(model, quant=precision)
        del model
        release_memory()

    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.where = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # evaluate() asks its device
            self.cfg = dec.cfg

        def forward(self, tokens):
            dec.reset()
            dec.reserve(tokens.shape[1])
            return torch.stack([dec.decode(int(t)) for t in tokens[0]])[None]

    return Scorer(), tok


if __name__ == "__main__":
    raise SystemExit(main())
