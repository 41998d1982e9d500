"""Evals: the measuring instrument of every stage.

One shape for every dataset, eval, reward and arena prompt (llmos/evals/tasks.py):

    class Task:
        kind: "generate" | "choice" | "perplexity"
        def examples(self) -> Iterator[dict]
        def score(self, example: dict, output) -> float

`llmos eval MODEL --task NAME --data FILE [--limit N]` (llmos/evals/run.py) runs one on a model and prints
a table (or JSON); `evaluate(task, model, tokenizer)` does the same from Python.
"""

from llmos.evals.tasks import ARC, GSM8K, TASKS, Contains, Perplexity, Task, extract_answer, get_task

__all__ = ["ARC", "GSM8K", "TASKS", "Contains", "Perplexity", "Task", "extract_answer", "get_task"]
