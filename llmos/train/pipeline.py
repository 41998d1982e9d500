"""The whole lifecycle in one command: tokenizer → pretrain → sft → dpo → evals → export.

    llmos train all --recipe recipes/e2e.toml [--out runs/e2e] [--data-dir ../shared/data] [--scale 0.1]
    llmos train all --recipe recipes/e2e.toml

The recipe's top-level keys are this command's flags (out, data_dir, scale, device, progress; a flag
overrides its key); each [stage] table holds that stage's own keys, exactly those of `llmos train
STAGE`, and a stage without a table is not run: a new pipeline is a file, not code. OUT becomes

    OUT/tokenizer/   tokenizer.json, tokenizer_config.json, summary.json
    OUT/base/        the pretrained model (+ its data shards, trainer_state.pt, summary.json, loss.png)
    OUT/sft/         the assistant: `llmos run OUT/sft`
    OUT/dpo/         the assistant after learning from comparisons
    OUT/evals.json   every model on held-out text (bits per byte), ARC-Easy, identity questions, GSM8K
    OUT/export/      model.gguf of the last model, and its logits checked against the HF directory
    OUT/report.md, report.json    the table printed at the end: one row per stage
    OUT/data/        what the pipeline assembled: corpus/ (links to the corpus files), sft.jsonl, ...

Running the same command again skips every finished stage (its summary.json says finished) and
resumes the unfinished one through the stage's own exact resume. A finished stage the edited recipe
no longer describes is refused, never silently reused: delete its directory (and the later ones) to
redo it. The evals, being cheap, simply run again.

Decisions:
- Paths: `data_dir` in the recipe is relative to the recipe file, --data-dir to the working
  directory; every data path in a table is relative to data_dir. `out` is relative to the working
  directory, like every --out. `data` may be a list: corpora are linked into one directory,
  conversation and preference files concatenated row by row (each checked on its own first).
- Each stage starts from the previous stage's output (pretrain from OUT/tokenizer, sft from
  OUT/base, dpo from OUT/sft) unless its table names a `tokenizer` or `model`.
- --scale X multiplies every stage's minutes (or steps), the ARC and GSM8K limits and the held-out
  text: --scale 0.02 checks the whole recipe in a minute or two. It is part of each stage's config,
  so a resume needs the same scale.
- The tokenizer learns from the pretraining corpus's training split only, so the held-out text
  that bits per byte are measured on is unseen by every stage.
- Held-out bits per byte in the evals read the text in non-overlapping windows of the model's
  context, as pretraining's validation does.
- transformers is a test dependency: the export stage compares its logits when it is installed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

from llmos import loader
from llmos.errors import LlmosError
from llmos.options import option, parser_for, read_toml
from llmos.files import atomic_write
from llmos.train.dpo import DPOConfig
from llmos.train.pretrain import PretrainConfig
from llmos.train.sft import SFTConfig
from llmos.train.tokenizer_train import TokenizerConfig
from llmos.train import chat_data as C
from llmos.train import data as D
from llmos.tokenizer import Tokenizer
from llmos.train.tokenizer_train import save, train_bpe
from llmos.train.pretrain import pretrain
from llmos.train.sft import sft
from llmos.train.dpo import dpo
import torch
from llmos import registry
from llmos.evals.run import evaluate
from llmos.evals.tasks import ARC, GSM8K, Contains, Perplexity
from llmos.formats import read_checkpoint, write_checkpoint
from llmos.train.loop import RUN_CONTROL


@dataclass
class PipelineConfig:
    out: str = option("runs/e2e", "output directory: one folder per stage, evals.json, report.md")
    data_dir: str = option("", "folder the recipe's data paths are relative to (in a recipe: relative to the recipe)")
    scale: float = option(1.0, "multiply every time budget and eval size by this (0.02: a quick check)")
    device: str = option("auto", "cpu, cuda or auto, for every stage")
    progress: bool = option(True, "show progress bars on stderr")


@dataclass
class EvalsConfig:
    heldout: bool = option(True, "bits per byte on the pretraining corpus's held-out split")
    arc: str = option("", "ARC JSONL file (multiple choice); empty: skip")
    arc_limit: int = option(0, "first N ARC questions (0 = all)")
    gsm8k: str = option("", "GSM8K JSONL file (generated answers); empty: skip")
    gsm8k_limit: int = option(0, "first N GSM8K problems (0 = all)")
    gsm8k_max_new_tokens: int = option(256, "most tokens of a GSM8K answer")
    questions: list = dataclasses.field(default_factory=list, metadata={"help": "questions asked of every model"})
    expect: str = option("", "what a right answer to `questions` mentions (the name SFT taught)")
    max_new_tokens: int = option(48, "most tokens of an answer to `questions`")
    batch_size: int = option(8, "sequences per forward pass or generation batch")


def stage_classes() -> dict:
    return {"tokenizer": TokenizerConfig, "pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOConfig,
            "evals": EvalsConfig}


ORDER = ["tokenizer", "pretrain", "sft", "dpo", "evals", "export"]
MODEL_STAGES = {"pretrain": "base", "sft": "sft", "dpo": "dpo"}  # stage → output folder


# ----------------------------------------------------------------------------
# The recipe: top-level keys and one table per stage, checked like every recipe


def checked(values: dict, cls, where: str) -> dict:
    """values with known keys and values of the right type (ints become floats where floats are wanted);
    `data` may also be a list of paths."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise LlmosError(f"{where}: unknown key {key!r}; known keys are {', '.join(sorted(hints))}")
        want = hints[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is list or (key == "data" and isinstance(value, list)):  # data: one file, or several as one
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value) and bool(value or want is list)
        else:
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            kind = "list of strings" if want is list else want.__name__
            raise LlmosError(f"{where}: {key} = {value!r} should be a {kind}")
        out[key] = value
    return out


def read_recipe(path) -> tuple[dict, dict]:
    """(top-level keys, {stage: its table}) of a recipe file."""
    recipe = read_toml(path, "such as recipes/e2e.toml")
    classes = stage_classes()
    top = {k: v for k, v in recipe.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in recipe.items() if isinstance(v, dict)}
    for name in tables:
        if name not in classes:
            raise LlmosError(f"{path}: unknown table [{name}]; the stages are {', '.join(classes)}")
        if "out" in tables[name]:
            raise LlmosError(f"{path}: [{name}] sets out, but the pipeline places every stage in OUT/; remove it")
    return checked(top, PipelineConfig, path), {k: checked(t, classes[k], f"{path} [{k}]") for k, t in tables.items()}


@dataclass
class Plan:
    """Everything a run needs, resolved before any stage starts (so a bad path fails at once)."""
    cfg: PipelineConfig
    out: Path
    configs: dict  # stage → its config dataclass
    sources: dict  # stage → [data files], where the pipeline assembles the stage's input from several


def make_plan(argv) -> Plan:
    p = parser_for(PipelineConfig, "llmos train all", __doc__)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    recipe = args.pop("recipe", None)
    if not recipe:
        raise LlmosError("pass --recipe FILE, e.g. --recipe recipes/e2e.toml")
    top, tables = read_recipe(recipe)
    if "data_dir" in top and "data_dir" not in args:  # the recipe's own data_dir is relative to the recipe
        top["data_dir"] = str(Path(recipe).parent / top["data_dir"])
    cfg = PipelineConfig(**{**top, **args})
    if cfg.scale <= 0:
        raise LlmosError(f"scale {cfg.scale} must be above 0, e.g. 0.02 for a quick check or 1 for the recipe")
    data_dir = Path(cfg.data_dir or Path(recipe).parent).expanduser()
    out = Path(cfg.out).expanduser().resolve()
    classes = stage_classes()
    configs, sources = {}, {}

    def data(stage: str, key: str, value) -> str:
        files = []
        for v in value if isinstance(value, list) else [value]:
            path = (data_dir / Path(v).expanduser()).resolve()
            if not path.exists():
                raise LlmosError(f"{path}: no such data file ([{stage}] {key} in {recipe}); pass --data-dir DIR, "
                                 "the folder holding corpora/, sft/, preference/ and eval/ (../shared/data beside "
                                 "the repository)")
            files.append(path)
        if len(files) == 1:
            return str(files[0])
        sources[stage] = files
        name = {"pretrain": "corpus", "tokenizer": "corpus-tokenizer"}.get(stage, f"{stage}.jsonl")
        return str(out / "data" / name)

    for stage, table in tables.items():
        for key in ("data", "arc", "gsm8k"):
            if table.get(key):
                table[key] = data(stage, key, table[key])
    if "tokenizer" in tables and "data" not in tables["tokenizer"]:  # the pretraining corpus, by default
        if "data" not in tables.get("pretrain", {}):
            raise LlmosError(f"{recipe}: [tokenizer] needs data, or a [pretrain] table with data to learn from")
        tables["tokenizer"]["data"] = tables["pretrain"]["data"]
        if "pretrain" in sources:
            sources["tokenizer"] = sources["pretrain"]
    model = "default"
    for stage in ORDER[:-1]:
        if stage not in tables:
            continue
        values = dict(tables[stage])
        if stage == "pretrain" and "tokenizer" in tables:
            values.setdefault("tokenizer", str(out / "tokenizer"))
        if stage in ("sft", "dpo"):
            values.setdefault("model", model)
        if stage != "evals":
            values["out"] = str(out / MODEL_STAGES.get(stage, stage))
        if stage in MODEL_STAGES:
            model = values["out"]
            values = {"device": cfg.device, "progress": cfg.progress, **values, **scaled(values, cfg.scale)}
        configs[stage] = classes[stage](**values)
    if not configs:
        raise LlmosError(f"{recipe}: no stage tables; add [tokenizer], [pretrain], [sft], [dpo] or [evals]")
    return Plan(cfg, out, configs, sources)


def scaled(values: dict, scale: float) -> dict:
    if scale == 1:
        return {}
    if values.get("minutes"):
        return {"minutes": values["minutes"] * scale}
    if values.get("steps"):
        return {"steps": max(1, round(values["steps"] * scale))}
    return {}


# ----------------------------------------------------------------------------
# Assembling inputs from several files


def assemble(plan: Plan, stage: str) -> None:
    """The stage's input made of several files: a directory of links (corpora) or one JSONL (rows)."""
    files, target = plan.sources.get(stage), Path(plan.configs[stage].data)
    if not files:
        return
    if stage in ("tokenizer", "pretrain"):
        target.mkdir(parents=True, exist_ok=True)
        links = {f"{i}-{f.name}": f for i, f in enumerate(files)}  # numbered: the recipe's order, names may repeat
        for old in target.iterdir():
            if old.is_symlink() and links.get(old.name) != old.resolve():  # a file the recipe no longer lists
                old.unlink()
        for name, f in links.items():
            if not (target / name).exists():
                (target / name).symlink_to(f)
        return
    fill = C.parse_fill(getattr(plan.configs[stage], "fill", ""))
    for f in files:  # errors name the source file and row, not the concatenation
        C.load_conversations(f, fill) if stage == "sft" else C.load_pairs(f, fill)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for f in files for _, row in C.read_rows(f)).encode()
    if not (target.is_file() and target.read_bytes() == text):
        atomic_write(target, lambda fh: fh.write(text))


def corpus_split(plan: Plan, data: str) -> tuple[list[str], list[str]]:
    """(training, held-out) documents of a corpus, split as pretraining splits it."""
    pre = plan.configs.get("pretrain")
    if pre is None or Path(pre.data) != Path(data):
        return D.read_documents(data), []
    return D.split_documents(D.read_documents(data), pre.val_fraction)


# ----------------------------------------------------------------------------
# The stages: each returns its summary, written to its summary.json (or evals.json)


def run_tokenizer(plan: Plan) -> dict:
    cfg = plan.configs["tokenizer"]
    assemble(plan, "tokenizer")
    t0 = time.perf_counter()
    train, heldout = corpus_split(plan, cfg.data)
    save(train_bpe(train, cfg.vocab_size, cfg.pattern, cfg.min_frequency), cfg.out)
    tok = Tokenizer.from_hf_dir(cfg.out)
    sample = "\n".join(heldout or train)[:1_000_000]
    summary = {"finished": True, "vocab_size": tok.hf.get_vocab_size(),
               "train_bytes": sum(len(d.encode()) for d in train),
               "bytes_per_token": len(sample.encode()) / max(1, tok.count(sample)),
               "bytes_per_token_on": "held-out split" if heldout else "training text",
               "wall_s": time.perf_counter() - t0, "config": asdict(cfg)}
    write_json(Path(cfg.out) / "summary.json", summary)
    return summary


def run_pretrain(plan: Plan) -> dict:
    assemble(plan, "pretrain")
    return pretrain(plan.configs["pretrain"])


def run_sft(plan: Plan) -> dict:
    assemble(plan, "sft")
    return sft(plan.configs["sft"])


def run_dpo(plan: Plan) -> dict:
    assemble(plan, "dpo")
    return dpo(plan.configs["dpo"])


def models(plan: Plan) -> dict[str, Path]:
    return {folder: plan.out / folder for stage, folder in MODEL_STAGES.items() if stage in plan.configs}


def device_of(plan: Plan) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if plan.cfg.device == "auto" else plan.cfg.device


def run_evals(plan: Plan) -> dict:
    """Every model the pipeline made, on every task of the [evals] table."""
    cfg, scale, t0 = plan.configs["evals"], plan.cfg.scale, time.perf_counter()
    size = lambda n: max(1, math.ceil(n * scale)) if n else 0  # noqa: E731
    tasks = []  # (label, task, limit, max_new_tokens)
    if cfg.heldout and "pretrain" in plan.configs:
        _, heldout = corpus_split(plan, plan.configs["pretrain"].data)
        text = "\n".join(heldout)
        if scale < 1:
            text = text[: max(1000, math.ceil(len(text) * scale))]
        if text.strip():
            atomic_write(plan.out / "data" / "heldout.txt", lambda f: f.write(text.encode()))
            tasks.append(("heldout", Perplexity(plan.out / "data" / "heldout.txt"), 0, 0))
    if cfg.arc:
        tasks.append(("arc", ARC(cfg.arc), size(cfg.arc_limit), 0))
    if cfg.questions:
        rows = "".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in cfg.questions)
        atomic_write(plan.out / "data" / "questions.jsonl", lambda f: f.write(rows.encode()))
        questions = Contains(plan.out / "data" / "questions.jsonl", cfg.expect)
        tasks.append(("identity", questions, 0, cfg.max_new_tokens))
    if cfg.gsm8k:
        tasks.append(("gsm8k", GSM8K(cfg.gsm8k), size(cfg.gsm8k_limit), cfg.gsm8k_max_new_tokens))
    if not tasks:
        raise LlmosError("[evals] has no task: set arc, gsm8k, or questions and expect (or heldout, with [pretrain])")
    results = {}
    for name, path in models(plan).items():
        r = loader.load(str(path), "torch", device_of(plan), precision="f32", tokenizer=False)
        model, tok, ckpt = r.model, r.tokenizer, r.checkpoint
        results[name] = {}
        for label, task, limit, max_new in tasks:
            log(f"evals: {name} on {label}")
            T = model.cfg.max_seq_len  # held-out text in non-overlapping windows, as pretraining validates
            report = evaluate(task, model, tok, limit, cfg.batch_size, max_new or 1, T, T,
                              ckpt.meta.get("eos_token_ids"), plan.cfg.progress)
            keep = report.pop("results")
            if label == "identity":  # the answers themselves are worth reading
                report["answers"] = [{"question": q, "answer": r["output"]} for q, r in zip(cfg.questions, keep)]
            results[name][label] = report
    summary = {"finished": True, "models": results, "wall_s": time.perf_counter() - t0, "config": asdict(cfg),
               "scale": scale}
    write_json(plan.out / "evals.json", summary)
    return summary


def run_export(plan: Plan) -> dict:
    """The last model as one GGUF file; its logits read back from the GGUF, and from transformers when it is
    installed, against llmos's reading of the Hugging Face directory."""

    t0 = time.perf_counter()
    source = list(models(plan).values())[-1]
    out = plan.out / "export"
    out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(read_checkpoint(source), out / "model.gguf", "gguf", "f32")
    r = loader.load(str(source), "torch", precision="f32", tokenizer=False)
    model, tok = r.model, r.tokenizer
    text = "The capital of France is Paris. Who are you?"
    ids = torch.tensor([tok.encode(text)[: model.cfg.max_seq_len]])
    with torch.no_grad():
        want = model(ids)
        r = loader.load(str(out / "model.gguf"), "torch", precision="f32", tokenizer=False)
        gguf_model, gguf_tok = r.model, r.tokenizer
        summary = {"finished": True, "source": str(source), "gguf": str(out / "model.gguf"),
                   "gguf_bytes": (out / "model.gguf").stat().st_size,
                   "gguf_max_logit_diff": (gguf_model(ids) - want).abs().max().item(),
                   "gguf_same_tokens": gguf_tok.encode(text) == tok.encode(text), "transformers_max_logit_diff": None}
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            log("export: transformers is not installed, so its check is skipped (pip install transformers)")
        else:
            hf = AutoModelForCausalLM.from_pretrained(source).float().eval()
            summary["transformers_max_logit_diff"] = (hf(ids).logits - want).abs().max().item()
    summary["wall_s"] = time.perf_counter() - t0
    write_json(out / "summary.json", summary)
    return summary


RUN = {"tokenizer": run_tokenizer, "pretrain": run_pretrain, "sft": run_sft, "dpo": run_dpo, "evals": run_evals,
       "export": run_export}


def summary_file(plan: Plan, stage: str) -> Path:
    return plan.out / ("evals.json" if stage == "evals" else f"{MODEL_STAGES.get(stage, stage)}/summary.json")


def finished(plan: Plan, stage: str) -> dict | None:
    """The stage's summary when it finished (a paused run writes one too, marked unfinished)."""
    file = summary_file(plan, stage)
    if not file.is_file():
        return None
    s = json.loads(file.read_text())
    if s.get("finished") is False:
        return None
    if "total_steps" in s and not (s["total_steps"] and s["steps"] >= s["total_steps"]):  # pretraining's summary
        return None
    return s


def changed(plan: Plan, stage: str, summary: dict) -> list[str]:
    """Keys whose value in the recipe differs from the one the finished stage was run with."""
    if stage == "export":
        return []
    now = {**asdict(plan.configs[stage]), **({"scale": plan.cfg.scale} if stage == "evals" else {})}
    was = {**summary.get("config", {}), **({"scale": summary.get("scale")} if stage == "evals" else {})}
    control = RUN_CONTROL if stage in ("pretrain", "sft", "dpo") else set()
    return [k for k in now if k not in control and was.get(k) != now[k]]


# ----------------------------------------------------------------------------
# The report: one row per stage


COLUMNS = ["stage", "steps", "trained on", "time", "train loss", "val loss", "pref acc", "margin", "held-out bpb",
           "ARC-Easy", "identity", "notes"]


def report_rows(plan: Plan, wall: dict) -> list[dict]:
    """One dict per stage that has a summary: numbers for report.json (the table formats them)."""
    evals = (finished(plan, "evals") or {}).get("models", {})
    rows = []
    for stage in [s for s in ORDER if s in plan.configs or (s == "export" and models(plan))]:
        file = summary_file(plan, stage)
        if not file.is_file():
            continue
        s = json.loads(file.read_text())
        row = {"stage": stage, "finished": finished(plan, stage) is not None,
               "wall_s": wall.get(stage, s.get("wall_s"))}
        if stage == "tokenizer":
            row |= {k: s[k] for k in ("train_bytes", "vocab_size", "bytes_per_token")}
        elif stage == "pretrain":
            row |= {k: s.get(k) for k in ("steps", "tokens", "train_loss", "val_loss", "val_bpb", "tokens_per_s")}
        elif stage in ("sft", "dpo"):
            after = s.get("val_after") or {}
            row |= {"steps": s["steps"], "train_loss": s["train_loss"], "val_loss": after.get("val_loss")}
            if stage == "sft":
                row["conversations"] = sft_conversations(plan)
            else:
                before = s.get("val_before") or {}
                row |= {"pairs": s["steps"] * plan.configs["dpo"].batch_size,
                        "pref_accuracy": after.get("reward_accuracy"), "margin": after.get("reward_margin"),
                        "policy_accuracy": after.get("policy_accuracy"),
                        "policy_accuracy_before": before.get("policy_accuracy")}
        elif stage == "export":
            row |= {k: s.get(k) for k in ("gguf_bytes", "gguf_max_logit_diff", "transformers_max_logit_diff")}
        scores = evals.get(MODEL_STAGES.get(stage, ""), {})
        for label, key, metric in (("heldout", "heldout_bpb", "bits_per_byte"), ("arc", "arc_accuracy", "accuracy"),
                                   ("identity", "identity", "accuracy"), ("gsm8k", "gsm8k", "accuracy")):
            if label in scores:
                row[key] = scores[label][metric]
        rows.append(row)
    return rows


def sft_conversations(plan: Plan) -> int | None:
    """Conversations the SFT run consumed: its data cursor."""
    file = plan.out / "sft" / "trainer_state.pt"
    return torch.load(file, map_location="cpu", weights_only=False)["loader"]["cursor"] if file.is_file() else None


def duration(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def table(rows: list[dict]) -> str:
    def num(v, fmt="{:.3f}"):
        return "" if v is None else fmt.format(v)

    def count(v, unit):
        return "" if v is None else (f"{v / 1e6:.2f}M {unit}" if v >= 1e6 else f"{v:,} {unit}")

    lines = []
    for r in rows:
        notes, seen = [], ""
        if r["stage"] == "tokenizer":
            seen = count(r["train_bytes"], "bytes")
            notes = [f"vocab {r['vocab_size']}, {r['bytes_per_token']:.2f} bytes/token"]
        elif r["stage"] == "pretrain":
            seen = count(r.get("tokens"), "tokens")
            notes = [f"val {r['val_bpb']:.3f} bpb" if r.get("val_bpb") else "",
                     f"{r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s") else ""]
        elif r["stage"] == "sft":
            seen = count(r.get("conversations"), "conversations")
        elif r["stage"] == "dpo":
            seen = count(r.get("pairs"), "pairs")
            if r.get("policy_accuracy") is not None:
                notes = [f"policy prefers chosen {r['policy_accuracy']:.2f} (before {r['policy_accuracy_before']:.2f})"]
        elif r["stage"] == "export":
            hf = r["transformers_max_logit_diff"]
            notes = [f"GGUF {r['gguf_bytes'] / 1e6:.1f} MB, logits Δ {r['gguf_max_logit_diff']:.1e}",
                     "transformers not installed" if hf is None else f"transformers logits Δ {hf:.1e}"]
        if not r["finished"]:
            notes.insert(0, "UNFINISHED")
        lines.append([r["stage"], num(r.get("steps"), "{}"), seen, duration(r["wall_s"]), num(r.get("train_loss")),
                      num(r.get("val_loss")), num(r.get("pref_accuracy")), num(r.get("margin")),
                      num(r.get("heldout_bpb")), num(r.get("arc_accuracy")), num(r.get("identity"), "{:.2f}"),
                      "; ".join(n for n in notes if n)])
    total = sum(r["wall_s"] or 0 for r in rows)
    lines.append(["total", "", "", duration(total)] + [""] * (len(COLUMNS) - 4))
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(COLUMNS)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(COLUMNS), rule] + [fmt(line) for line in lines])


# ----------------------------------------------------------------------------
# The run


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_json(path: Path, value) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()))


def run(plan: Plan) -> list[dict]:
    """Run (or resume) every stage of the plan in order; returns the report's rows."""
    stages = [s for s in ORDER if s in plan.configs or (s == "export" and models(plan))]
    plan.out.mkdir(parents=True, exist_ok=True)
    times_file = plan.out / "pipeline.json"  # all-in seconds per stage, summed over resumes
    wall = json.loads(times_file.read_text())["wall_s"] if times_file.is_file() else {}
    for i, stage in enumerate(stages, 1):
        where = summary_file(plan, stage) if stage == "evals" else summary_file(plan, stage).parent
        done = finished(plan, stage)
        if done and changed(plan, stage, done) and stage != "evals":  # evals are cheap: they just run again
            key = changed(plan, stage, done)[0]
            raise LlmosError(f"{where}: made with {key} = {done['config'].get(key)!r}, but the recipe now says "
                             f"{getattr(plan.configs[stage], key)!r}; delete {where} and the stages after it to "
                             "redo them, or pass another --out")
        if done and not changed(plan, stage, done):
            log(f"[{i}/{len(stages)}] {stage}: finished before, skipped")
            continue
        log(f"[{i}/{len(stages)}] {stage} → {where}")
        if stage == "evals" or not where.exists():  # a fresh start: earlier time (a deleted run's) does not count
            wall[stage] = 0.0
        t0 = time.perf_counter()
        try:
            RUN[stage](plan)
        finally:
            wall[stage] = wall.get(stage, 0.0) + time.perf_counter() - t0
            write_json(times_file, {"wall_s": wall})
        if not finished(plan, stage):
            if not summary_file(plan, stage).is_file():
                raise LlmosError(f"{summary_file(plan, stage).parent}: the {stage} run is complete but wrote no "
                                 "summary.json; delete that folder and run again to redo the stage")
            log(f"{stage} paused before its end; run the same command again to resume it")
            break
    rows = report_rows(plan, wall)
    text = table(rows)
    atomic_write(plan.out / "report.md", lambda f: f.write((text + "\n").encode()))
    write_json(plan.out / "report.json", {"rows": rows, "total_wall_s": sum(r["wall_s"] or 0 for r in rows),
                                          "config": asdict(plan.cfg), "out": str(plan.out)})
    print(text, flush=True)
    return rows
