"""`llmos eval`: run a task on a model and report its numbers as a table and as JSON.

    llmos eval MODEL --task ppl --data text.txt [--context 1024 --stride 512]
    llmos eval MODEL --task arc --data ../shared/data/eval/arc_easy_test.jsonl --limit 200
    llmos eval MODEL --task gsm8k --data ../shared/data/math/gsm8k_test.jsonl --limit 50 --max-new-tokens 384
    llmos eval MODEL --task contains --data questions.jsonl --expect Ada

Measurements:
- ppl: the text after one start token (the tokenizer's BOS, else its EOS, so the first text token is
  scored too) read in windows of --context tokens moved by --stride; each token is predicted once, by
  the first window whose predictions reach it, so after the first window every prediction has at least
  context - stride tokens before it (stride = context: plain non-overlapping chunks). Perplexity = exp(nats / tokens);
  bits per byte = total nats / UTF-8 bytes of the text / ln 2, exact for any tokenizer.
- choice (arc): each choice's summed log-probability after the context, encoded separately (context with
  the tokenizer's default BOS, continuation without), so a choice is scored by its own tokens; accuracy
  is the argmax's, accuracy_norm divides each log-probability by the choice's length in characters
  (lm-evaluation-harness's acc_norm).
- generate (gsm8k, contains): greedy decoding with the engine, chat template applied, in batches.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmos import loader
from llmos.errors import LlmosError
from llmos.evals.tasks import Task, get_task
from llmos.options import option
from llmos.files import atomic_write
from llmos.engine import Engine, SamplingParams
from llmos.train.chat_data import adapt_for_template


@dataclass
class EvalConfig:
    model: str = option("default", "model name or path (also the first positional argument)")
    task: str = option("", "ppl, arc, gsm8k or contains")
    data: str = option("", "the task's data file")
    limit: int = option(0, "evaluate only the first N examples (0 = all)")
    expect: str = option("", "contains: the text a right answer mentions")
    max_new_tokens: int = option(512, "generate tasks: most tokens per answer")
    batch_size: int = option(8, "sequences per forward pass or generation batch")
    context: int = option(0, "ppl: window length in tokens (0 = the model's context)")
    stride: int = option(0, "ppl: tokens the window moves by (0 = half the window)")
    device: str = option("cpu", "cpu or cuda")
    out: str = option("", "also write the results (with every example's output) to this JSON file")
    json: bool = option(False, "print the results as JSON instead of a table")
    progress: bool = option(True, "show a progress bar on stderr")


# ----------------------------------------------------------------------------
# Scoring primitives, reusable by training, RL, search and the arena


@torch.no_grad()
def text_nll(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """(total nats, tokens scored) of predicting ids[1:] from what precedes them, in sliding windows."""
    if not 0 < stride <= context:
        raise LlmosError(f"stride {stride} must be between 1 and the context {context}")
    if len(ids) < 2:
        return 0.0, 0
    device = next(model.parameters()).device
    nats, scored, done = 0.0, 0, 1  # positions < done are already scored
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + context + 1, len(ids))  # the model reads ids[begin:end - 1]: at most `context` tokens
        window = torch.tensor([ids[begin:end]], device=device)
        logits = model(window[:, :-1]).float()[0]
        first = done - begin - 1  # index into the window's predictions of the first new target
        lp = F.log_softmax(logits[first:], dim=-1)
        targets = window[0, first + 1 :]
        nats -= lp.gather(-1, targets[:, None]).sum().item()
        scored += len(targets)
        done = end
        if end == len(ids):
            break
    return nats, scored


@torch.no_grad()
def continuation_logprobs(model, tok, context: str, continuations: list[str], batch_size: int = 8) -> list[float]:
    """Summed log-probability of each continuation's tokens after the context."""
    device, limit = next(model.parameters()).device, model.cfg.max_seq_len
    ctx = tok.encode(context)
    rows = [(ctx + (c := tok.encode(cont, add_bos=False)), len(c)) for cont in continuations]
    rows = [(ids[-limit - 1 :], min(n, limit)) for ids, n in rows]  # too long: keep the end, the continuation
    out = []
    for i in range(0, len(rows), batch_size):
        group = rows[i : i + batch_size]
        width = max(len(ids) for ids, _ in group)
        x = torch.zeros((len(group), width), dtype=torch.long, device=device)
        for r, (ids, _) in enumerate(group):
            x[r, : len(ids)] = torch.tensor(ids)
        lp = F.log_softmax(model(x[:, :-1]).float(), dim=-1)
        for r, (ids, n) in enumerate(group):
            pos = torch.arange(len(ids) - n - 1, len(ids) - 1, device=device)  # predictions of the continuation
            out.append(lp[r, pos, x[r, pos + 1]].sum().item())
    return out


# ----------------------------------------------------------------------------
# Running a task


def evaluate(task: Task, model, tok, limit: int = 0, batch_size: int = 8, max_new_tokens: int = 512,
             context: int = 0, stride: int = 0, eos_ids=None, progress: bool = False) -> dict:
    """{"task", "examples", metric: value, ..., "results": [per example]} for any task kind."""
    model.eval()
    examples = []
    for ex in task.examples():
        if limit and len(examples) >= limit:
            break
        examples.append(ex)
    if not examples:
        raise LlmosError(f"task {task.name}: no examples to evaluate")
    bar = tqdm(total=len(examples), desc=task.name, unit="ex", file=sys.stderr, disable=not progress)
    t0, results, metrics = time.perf_counter(), [], {}
    if task.kind == "perplexity":
        context = min(context or model.cfg.max_seq_len, model.cfg.max_seq_len)
        stride = stride or max(1, context // 2)
        nats = tokens = n_bytes = 0
        for ex in examples:
            start = next((i for i in (tok.bos_id, tok.eos_id) if i is not None), None)
            ids = ([start] if start is not None else []) + tok.encode(ex["text"], add_bos=False)
            n, k = text_nll(model, ids, context, stride)
            nats, tokens, n_bytes = nats + n, tokens + k, n_bytes + ex["bytes"]
            results.append({"nats": n, "tokens": k, "bytes": ex["bytes"], "bits_per_byte": task.score(ex, n)})
            bar.update(1)
        metrics = {"perplexity": math.exp(nats / tokens), "bits_per_byte": nats / n_bytes / math.log(2),
                   "nats_per_token": nats / tokens, "tokens": tokens, "bytes": n_bytes, "context": context,
                   "stride": stride}
    elif task.kind == "choice":
        acc = acc_norm = 0.0
        for ex in examples:
            lps = continuation_logprobs(model, tok, ex["context"], ex["choices"], batch_size)
            norm = [lp / max(1, len(c)) for lp, c in zip(lps, ex["choices"])]
            s, s_norm = task.score(ex, lps), task.score(ex, norm)
            acc, acc_norm = acc + s, acc_norm + s_norm
            results.append({"id": ex.get("id"), "logprobs": lps, "score": s, "score_norm": s_norm})
            bar.update(1)
        metrics = {"accuracy": acc / len(examples), "accuracy_norm": acc_norm / len(examples)}
    elif task.kind == "generate":
        engine = Engine(model, tok, eos_ids=eos_ids or None)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        total = 0.0
        for i in range(0, len(examples), batch_size):
            group = examples[i : i + batch_size]
            # tool calls and schemas rendered as SFT rendered them (as text for templates without tool support)
            prompts = []
            for ex in group:
                messages, tools = adapt_for_template(ex["messages"], ex.get("tools"), tok.chat_template)
                prompts.append(tok.encode_chat(messages, add_generation_prompt=True, tools=tools))
            room = model.cfg.max_seq_len - max(map(len, prompts))
            params.max_new_tokens = max(1, min(max_new_tokens, room))
            for ex, done in zip(group, engine.generate_batch(prompts, params)):
                s = task.score(ex, done.text)
                total += s
                results.append({"id": ex.get("id"), "output": done.text, "score": s})
            bar.update(len(group))
        metrics = {"accuracy": total / len(examples)}
    else:
        raise LlmosError(f"task {task.name} has kind {task.kind!r}; llmos runs generate, choice and perplexity tasks")
    bar.close()
    return {"task": task.name, "examples": len(examples), **metrics, "seconds": time.perf_counter() - t0,
            "results": results}


def table(report: dict) -> str:
    skip = {"task", "model", "examples", "results", "config"}
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in report.items() if k not in skip]
    width = max(len(k) for k, _ in rows)
    head = f"{report['task']} on {report.get('model', '?')}: {report['examples']} examples"
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


def run(cfg: EvalConfig) -> dict:
    task = get_task(cfg.task, cfg.data, cfg.expect)
    r = loader.load(cfg.model, "torch", cfg.device, tokenizer=False)
    model, tok, ckpt = r.model, r.tokenizer, r.checkpoint
    if tok is None:
        raise LlmosError(f"{cfg.model}: the model has no tokenizer; evaluation needs one")
    report = {"task": task.name, "model": str(ckpt.meta.get("path", cfg.model)),
              **evaluate(task, model, tok, cfg.limit, cfg.batch_size, cfg.max_new_tokens, cfg.context, cfg.stride,
                         ckpt.meta.get("eos_token_ids"), cfg.progress), "config": asdict(cfg)}
    if cfg.out:
        atomic_write(cfg.out, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    return report
