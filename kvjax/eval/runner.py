"""Run evaluation tasks over lengths, depths, seeds and methods; tabulate and save results."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from kvjax.environment import environment
from kvjax.eval import perplexity as ppl
from kvjax.eval.tasks import TASKS, make_sample, score
from kvjax.generation import generate_many
from kvjax.methods import Method
from models.bundle import Model

# Answer lengths: enough tokens for the longest reference of each task.
MAX_NEW_TOKENS = {
    "passkey": 8,
    "niah_single": 16,
    "niah_multikey": 16,
    "niah_multivalue": 48,
    "variable_tracking": 32,
    "kv_retrieval": 40,
}


def check_grid(**axes: Any) -> None:
    """Raise unless each named argument is a non-empty list of values (one run per entry):
    a bare value would fail with "not iterable", an empty list would run nothing."""
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)) or len(values) == 0:
            raise TypeError(f"{name} must be a non-empty list (one run per entry), got {values!r:.80}")


def run_task(
    model: Model,
    task: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    seeds: Sequence[int],
    methods: Sequence[Method],
    haystack: str | Path | None = None,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per (length, depth, seed, method): the prediction, its score and timings."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; expected one of {TASKS} or 'perplexity'")
    check_grid(lengths=lengths, depths=depths, seeds=seeds, methods=methods)
    new_tokens = max_new_tokens or MAX_NEW_TOKENS[task]
    cases = [(n, d, s) for n in lengths for d in depths for s in seeds]
    rows = []
    bar = tqdm(total=len(cases) * len(methods), desc=task, disable=not progress, unit="run")
    for length, depth, seed in cases:
        # kv_retrieval's haystack is its JSON object: a haystack file applies to the other tasks.
        task_haystack = None if task == "kv_retrieval" else haystack
        sample = make_sample(task, model.tokenizer, length, depth=depth, seed=seed, haystack=task_haystack)
        outputs = generate_many(model, sample.context, methods, question=sample.question,
                                max_new_tokens=new_tokens)
        for method, out in zip(methods, outputs):
            rows.append({
                "task": task,
                "length": int(length),  # checked by make_sample (numpy integers too)
                "context_tokens": sample.context_tokens,
                "depth": sample.depth,
                "seed": sample.seed,
                **{f"method_{k}" if k != "method" else k: v for k, v in method.describe().items()},
                "score": score(sample, out.text),
                "prediction": out.text,
                "answers": list(sample.answers),
                "prefill_s": out.stats["prefill_s"],
                "decode_s": out.stats["decode_s"],
            })
            bar.update()
    bar.close()
    return rows


def run_perplexity(
    model: Model,
    text: str | Path,
    lengths: Sequence[int],
    methods: Sequence[Method],
    score_tokens: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Perplexity of the `score_tokens` after each context length, per method."""
    check_grid(lengths=lengths, methods=methods)
    tokens = ppl.load_text_tokens(model, text, max(lengths) + score_tokens)
    rows = []
    bar = tqdm(total=len(lengths) * len(methods), desc="perplexity", disable=not progress, unit="run")
    for length in lengths:
        for method in methods:
            r = ppl.perplexity(model, tokens, method, length, score_tokens)
            rows.append({
                "task": "perplexity",
                "length": int(length),  # checked by perplexity (numpy integers too)
                **{f"method_{k}" if k != "method" else k: v for k, v in method.describe().items()},
                "score_tokens": score_tokens,
                "nll": r.nll,
                "perplexity": r.perplexity,
                "seconds": r.seconds,
            })
            bar.update()
    bar.close()
    return rows


def method_label(row: dict[str, Any]) -> str:
    """`full`, `streaming_llm(budget=256)`, ...: the method and its non-default-looking knobs."""
    knobs = [f"{k[7:]}={v}" for k, v in row.items() if k.startswith("method_")]
    return row["method"] + (f"({', '.join(knobs)})" if knobs else "")


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean score (or perplexity) per (task, length, method)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["length"], method_label(r))].append(r)
    summary = []
    for (task, length, label), rs in groups.items():
        metric = "perplexity" if task == "perplexity" else "score"
        summary.append({
            "task": task,
            "length": length,
            "method": label,
            "n": len(rs),
            metric: sum(r[metric] for r in rs) / len(rs),
        })
    return summary


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table (also valid Markdown)."""
    if not rows:
        return "(no results)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(x.ljust(w) for x, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(b) for b in body)])


def write_results(path: str | Path, rows: list[dict[str, Any]], **extra: Any) -> Path:
    """Write rows, their summary and the environment as one JSON file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), **extra, "summary": summarize(rows), "rows": rows}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
