"""Tasks: the one shape every dataset, eval, reward and arena prompt has in llmos.

    task = GSM8K("gsm8k_test.jsonl")
    for example in task.examples():          # plain dicts
        output = ...                          # what the model made of it (see `kind`)
        print(task.score(example, output))    # a float, 1.0 = right

`kind` says what `output` is, and so how llmos/evals/run.py (or an RL loop, a search, the arena) gets it:

    "generate"    the model's text answer to example["messages"] (chat messages); scored by the task
    "choice"      one number per entry of example["choices"], the log-likelihood of that continuation
                  after example["context"]; the task scores the argmax against example["answer"] (an index)
    "perplexity"  example["text"] is scored as a whole; output = its total negative log-likelihood in nats,
                  score = bits per byte of that example

Tasks here: Perplexity (a text file), ARC (multiple choice, the AI2 ARC JSONL format), GSM8K (grade-school
math, exact match of the final number) and Contains (any conversation file: does the answer contain a
string, e.g. the name an identity SFT taught).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator

from llmos.errors import LlmosError
from llmos.train import chat_data as C


class Task:
    name = "task"
    kind = "generate"  # "generate" | "choice" | "perplexity"

    def examples(self) -> Iterator[dict]:
        raise NotImplementedError

    def score(self, example: dict, output) -> float:
        raise NotImplementedError


def read_jsonl(path, what: str) -> Iterator[tuple[int, dict]]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LlmosError(f"{path}: no such file; pass --data with a {what} JSONL file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LlmosError(f"{path}: cannot read as UTF-8 text ({e}); pass a {what} JSONL file") from None
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield i, json.loads(line)
            except ValueError as e:
                raise LlmosError(f"{path}: line {i} is not JSON ({e}); pass a {what} JSONL file") from None


# ----------------------------------------------------------------------------
# Perplexity and bits per byte of a text


class Perplexity(Task):
    name, kind = "ppl", "perplexity"

    def __init__(self, path):
        self.path = Path(path)

    def examples(self):
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LlmosError(f"{self.path}: no such file; pass --data with a text file") from None
        except UnicodeDecodeError as e:
            raise LlmosError(f"{self.path}: not UTF-8 text (byte offset {e.start}); convert it to UTF-8") from None
        if not text:
            raise LlmosError(f"{self.path}: empty file; pass a text file to measure perplexity on")
        yield {"text": text, "bytes": len(text.encode("utf-8"))}

    def score(self, example, output) -> float:
        return output / example["bytes"] / math.log(2)


# ----------------------------------------------------------------------------
# Multiple choice by log-likelihood: ARC


class ARC(Task):
    """AI2 ARC JSONL: {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}; lm-eval-harness's
    prompt "Question: {stem}\\nAnswer:" with each choice as the continuation " {text}"."""

    name, kind = "arc", "choice"

    def __init__(self, path):
        self.path = path

    def examples(self):
        for i, row in read_jsonl(self.path, "ARC"):
            try:
                q = row["question"]
                labels = [c["label"] for c in q["choices"]]
                yield {"id": row.get("id", i), "context": f"Question: {q['stem']}\nAnswer:",
                       "choices": [" " + c["text"] for c in q["choices"]], "answer": labels.index(row["answerKey"])}
            except (KeyError, TypeError, ValueError):
                raise LlmosError(f"{self.path}: line {i} is not an ARC question; expected {{\"question\": {{\"stem\", "
                                 '"choices": [{"text", "label"}]}, "answerKey"} with answerKey among the labels') from None

    def score(self, example, output) -> float:
        best = max(range(len(output)), key=lambda k: output[k])
        return float(best == example["answer"])


# ----------------------------------------------------------------------------
# GSM8K: the last number of the answer must equal the reference's


NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def normalize_number(text: str) -> str | None:
    """'$1,234.50' → '1234.5'; '-3.0' → '-3'; None when it is not a number."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str) -> str | None:
    """The final number of a model's answer: after '####' when there is one, else the last number in the text."""
    if "####" in text:
        numbers = NUMBER.findall(text.rsplit("####", 1)[1])
        if numbers:
            return normalize_number(numbers[0])
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


class GSM8K(Task):
    name, kind = "gsm8k", "generate"
    instruction = "Solve the problem step by step, then give the final answer as a number after '####'."

    def __init__(self, path):
        self.path = path

    def examples(self):
        for i, row in read_jsonl(self.path, "GSM8K"):
            if not isinstance(row.get("question"), str) or "####" not in str(row.get("answer", "")):
                raise LlmosError(f"{self.path}: line {i} is not a GSM8K problem; expected {{\"question\", \"answer\"}} "
                                 "with the final answer after '#### '")
            answer = normalize_number(row["answer"].rsplit("####", 1)[1])
            yield {"id": i, "messages": [{"role": "user", "content": f"{row['question']}\n\n{self.instruction}"}],
                   "answer": answer}

    def score(self, example, output) -> float:
        return float(extract_answer(output) == example["answer"])


# ----------------------------------------------------------------------------
# Contains: does the answer to each conversation's last user turn mention a string?


class Contains(Task):
    """Prompts from any conversation file (chat_data formats): each conversation up to its last assistant
    turn, or whole when it has none.
    Score 1 when the generated answer contains `expect` (case-insensitive)."""

    name, kind = "contains", "generate"

    def __init__(self, path, expect: str):
        if not expect:
            raise LlmosError("the contains task needs --expect TEXT: the string a right answer mentions")
        self.path, self.expect = path, expect

    def examples(self):
        for where, row in C.read_rows(self.path):
            try:
                conv = C.conversation(row)
            except C.RowError as e:
                raise LlmosError(f"{self.path}: {where} {e}") from None
            msgs = conv["messages"]
            answers = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
            prompt = msgs[: answers[-1]] if answers else msgs  # a file of questions alone works too
            yield {"id": where, "messages": prompt, "tools": conv["tools"], "expect": self.expect}

    def score(self, example, output) -> float:
        return float(example["expect"].lower() in output.lower())


TASKS = {"ppl": Perplexity, "arc": ARC, "gsm8k": GSM8K, "contains": Contains}


def get_task(name: str, data: str | None, expect: str = "") -> Task:
    if not name:
        raise LlmosError(f"pass --task NAME: one of {', '.join(TASKS)} (llmos eval MODEL --help shows every option)")
    if name not in TASKS:
        raise LlmosError(f"unknown task {name!r}; llmos knows {', '.join(TASKS)}")
    if not data:
        examples = {"ppl": "a .txt file", "arc": "eval/arc_easy_test.jsonl", "gsm8k": "math/gsm8k_test.jsonl",
                    "contains": "an SFT conversation file"}
        raise LlmosError(f"task {name} needs --data FILE ({examples[name]})")
    return Contains(data, expect) if name == "contains" else TASKS[name](data)
