"""Load on `llmos serve`: N concurrent streaming chat clients over loopback.

    python bench/serve_load.py                                  # the bundled model, 8 clients x 4 requests
    python bench/serve_load.py --model tiny --clients 4 --requests 2 --max-tokens 16   # a smoke run
    python bench/serve_load.py --url http://127.0.0.1:8000 --model smollm2            # a server already running

Without --url the server runs in this process on a free loopback port (uvicorn in a thread), so
the clients and the server share the machine: that is what a local server sees. `--model tiny`
is a 2-layer random model with a byte-level BPE trained here (no files needed). Each client sends
its requests one after another (stream=True, include_usage); --max-tokens is a ceiling (replies
that end early count the tokens they made).

Reports: wall seconds, completion tokens, aggregate tokens/s (all tokens over wall time), time to
first token p50/p99 (request sent -> first content chunk), per-request tokens/s p50, errors by
status. Bounded: at most 64 clients, 32 requests each, 1024 tokens a reply, --timeout seconds in
all. Results go to --out (default bench/results/serve_load.json), written atomically.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def tiny_app(home: str):
    """A random 2-layer model and a byte-level BPE trained on a few sentences."""
    import torch
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from llmos.model import Config, Transformer
    from llmos.server.app import create_app
    from llmos.server.serving import ServerConfig
    from llmos.tokenizer import Tokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(["the cat sat on the mat.", "hello world, how are you today?"] * 50, trainer)
    d = Path(home) / "tok"
    d.mkdir(parents=True, exist_ok=True)
    hf.save(str(d / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>", "add_bos_token": False}))
    tok = Tokenizer.from_hf_dir(d)
    torch.manual_seed(0)
    model = Transformer(Config(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                               max_seq_len=2048)).eval()
    return create_app({"tiny": (model, tok, None)}, ServerConfig(home=home, rate_limit=0, max_pending=64, engine="torch"))


def start_server(model: str, home: str) -> tuple[str, object]:
    from llmos.server.app import create_app, listen, uvicorn_server
    from llmos.server.serving import ServerConfig

    if model == "tiny":
        app = tiny_app(home)
    else:
        from llmos import loader

        runner = loader.load(model, "torch")
        app = create_app({model: (runner.model, runner.tokenizer, runner.checkpoint)}, ServerConfig(home=home, rate_limit=0, max_pending=64, engine="torch"))
    sock = listen("127.0.0.1", 0)
    server = uvicorn_server(app, log_level="warning")
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


async def one_request(http: httpx.AsyncClient, body: dict) -> dict:
    sent, first, tokens, status = time.perf_counter(), None, 0, 200
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        status = r.status_code
        if status != 200:
            await r.aread()
            return {"status": status}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"status": status, "ttft": None if first is None else first - sent, "tokens": tokens, "seconds": end - sent}


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int, timeout: float) -> dict:
    prompts = ["Tell me a story about a cat.", "What is the capital of France?", "Explain rain to a child.", "Write a haiku."]

    async def client(k: int) -> list[dict]:
        out = []
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
            for j in range(requests):
                body = {"model": model, "messages": [{"role": "user", "content": prompts[(k + j) % len(prompts)]}],
                        "max_tokens": max_tokens, "temperature": 0.7, "seed": k * 1000 + j, "stream": True,
                        "stream_options": {"include_usage": True}}
                out.append(await one_request(http, body))
        return out

    start = time.perf_counter()
    results = [r for rs in await asyncio.wait_for(asyncio.gather(*map(client, range(clients))), timeout) for r in rs]
    wall = time.perf_counter() - start
    done = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in done if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in done)
    errors: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    return {
        "wall_s": round(wall, 3), "requests": len(results), "completed": len(done), "errors": errors,
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "per_request_tokens_per_s_p50": statistics.median([r["tokens"] / r["seconds"] for r in done]) if done else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="registry name, or 'tiny' (random, no files)")
    ap.add_argument("--url", help="a running server on loopback; default: start one in this process")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=300, help="seconds for the whole run")
    ap.add_argument("--out", default="bench/results/serve_load.json")
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 32 and 1 <= args.max_tokens <= 1024 and 0 < args.timeout <= 3600):
        ap.error("bounds: --clients 1..64, --requests 1..32, --max-tokens 1..1024, --timeout 0..3600")
    if args.url:
        host = urlparse(args.url).hostname or ""
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            ap.error("--url must be a loopback address: this benchmark never loads other machines")
        url = args.url.rstrip("/")
    else:
        import tempfile

        url, _ = start_server(args.model, tempfile.mkdtemp(prefix="llmos-load-"))
    result = asyncio.run(load(url, args.model, args.clients, args.requests, args.max_tokens, args.timeout))
    result = {"model": args.model, "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}, **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps(result, indent=2))
    return 0 if result["completed"] == result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
