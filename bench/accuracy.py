"""Accuracy of the KV-cache methods on retrieval tasks, and perplexity fidelity, with SmolLM2.

Tasks (``kvjax.eval.tasks``, spec ALGORITHMS.md section 6): passkey, niah_multikey,
variable_tracking and kv_retrieval prompts fitted to each length, for Full, StreamingLLM, Quest
and ClusterKV at each token budget. Every sample is prefilled once, densely; every method's cache
is derived from that prefill (``kvjax.generation.convert``, what ``generate_many`` does), the
question is fed token by token and the answer decoded greedily. Decode shapes are fixed per
length (question padded to a bucket, one output size for all tasks), so each method compiles once
per length instead of once per question length.

Perplexity fidelity: the first L tokens of a novel are prefilled densely, each method's cache is
derived from it, and the next ``--ppl-positions`` tokens are scored one compressed decode step at
a time (teacher forcing, as ``kvjax.eval.perplexity``).

Samples run seed-major (seed 0 of every length and task, then seed 1, ...), so a run cut short
still covers every cell. The JSON is rewritten after every sample; ``--resume`` continues it.

    .venv/bin/python -m bench.accuracy --seeds 10 4 --output bench/results/accuracy-cpu-DATE.json
    .venv/bin/python -m bench.accuracy --report bench/results/accuracy-cpu-DATE.json   # table + plot
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # allow `python bench/accuracy.py` as well as `-m`
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
DEFAULT_TASKS = ("passkey", "niah_multikey", "variable_tracking", "kv_retrieval")
METHOD_NAMES = ("full", "streaming_llm", "quest", "clusterkv", "clusterkv_kv_head", "freekv", "freekv_tau09")
DISPLAY = {"full": "Full", "streaming_llm": "StreamingLLM", "quest": "Quest", "clusterkv": "ClusterKV",
           "clusterkv_kv_head": "ClusterKV (kv_head)",
           "freekv": "FreeKV (tau 0.8)", "freekv_tau09": "FreeKV (tau 0.9)"}
DEFAULT_METHODS = ("full", "streaming_llm", "quest", "clusterkv")
QUESTION_BUCKET = 64  # questions are padded to a multiple of this (decode compiles once)
GOLDEN = (math.sqrt(5) - 1) / 2


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def depth_for(seed: int) -> float:
    """Needle depth of a seed: a low-discrepancy sequence in [0.05, 0.95] (seed 0: 0.5).

    Any prefix of seeds spreads its needles over the whole context, whatever the seed count.
    """
    return round(0.05 + 0.9 * ((0.5 + seed * GOLDEN) % 1.0), 4)


def label(name: str, budget: int | None) -> str:
    return name if budget is None else f"{name}/{budget}"


def method_grid(names: Sequence[str], budgets: Sequence[int]) -> list[tuple[str, int | None]]:
    """(name, budget) pairs: Full once (no budget), every other method at every budget."""
    grid: list[tuple[str, int | None]] = []
    for name in names:
        if name not in METHOD_NAMES:
            raise ValueError(f"unknown method {name!r}; expected one of {METHOD_NAMES}")
        grid += [(name, None)] if name == "full" else [(name, b) for b in budgets]
    return grid


def build_method(name: str, budget: int | None):
    """A method by name. FreeKV's sink and recent scale with the budget (1/8 and 1/4, pages
    of 16 tokens: its defaults need a 1056-token budget); `freekv_tau09` corrects at tau 0.9;
    `clusterkv_kv_head` is ClusterKV with one selection per KV head."""
    from bench.method_speed import freekv
    from kvjax.methods import ClusterKV, make_method

    if name.startswith("freekv"):
        return freekv(budget, page_size=16, tau=0.9 if name == "freekv_tau09" else 0.8)
    if name == "clusterkv_kv_head":
        return ClusterKV(budget=budget, selection="kv_head")
    return make_method(name) if budget is None else make_method(name, budget=budget)


def describe_method(name: str, budget: int | None) -> dict[str, Any]:
    """The method's hyperparameters for the settings, or why they are invalid (methods check
    them on construction: FreeKV and Quest need a minimum budget)."""
    try:
        return build_method(name, budget).describe()
    except (ValueError, TypeError) as e:
        return {"method": name, "budget": budget, "invalid": f"{type(e).__name__}: {e}"}


def check_methods(grid, spec) -> tuple[dict[str, Any], dict[str, str]]:
    """Build and validate every (name, budget) against a cache spec: (valid methods, invalid reasons)."""
    valid, invalid = {}, {}
    for name, budget in grid:
        try:
            method = build_method(name, budget)
            method.validate(spec)
        except (ValueError, TypeError) as e:
            invalid[label(name, budget)] = f"{type(e).__name__}: {e}"
        else:
            valid[label(name, budget)] = method
    return valid, invalid


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD").strip(),
            "dirty": [line[3:] for line in git("status", "--porcelain").splitlines()]}


# ---------------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class Shapes:
    """Static decode shapes for one run: question width and generated-token buffer."""

    question_width: int
    out_size: int

    def extra_tokens(self, question_len: int) -> int:
        return self.width(question_len) + self.out_size

    def width(self, question_len: int) -> int:
        return max(self.question_width, QUESTION_BUCKET * math.ceil(question_len / QUESTION_BUCKET))


def decode(model, pre, method, question: list[int], max_new: int, shapes: Shapes) -> dict[str, Any]:
    """Feed `question`, greedily generate up to `max_new` tokens (`pre.cache` is consumed).

    `kvjax.generation._decode_from` with the question padded to a fixed width and a fixed output
    buffer (`max_new` is a runtime value), so one compilation serves every sample of a length.
    """
    import jax
    import jax.numpy as jnp

    from kvjax.generation import _decode_jit, check_finite_logits, compiled

    width = shapes.width(len(question))
    forced = np.zeros((1, width), np.int32)
    forced[0, : len(question)] = question
    args = (
        model.params, pre.cache, pre.first_logits, jnp.asarray(forced),
        jnp.asarray([len(question)], jnp.int32), jnp.int32(max_new),
        jnp.asarray(model.eos_token_ids or (-1,), jnp.int32), jax.random.key(0),
        jnp.float32(1e-6), jnp.float32(1.0),
    )
    exe, compile_s = compiled(_decode_jit, args, config=model.config, method=method, greedy=True,
                              out_size=shapes.out_size)
    t0 = time.perf_counter()
    out, count, steps, bad, _ = exe(*args)
    out = np.asarray(out)
    decode_s = time.perf_counter() - t0
    check_finite_logits(np.asarray(bad), method)
    tokens = out[0, : int(np.asarray(count)[0])].tolist()
    return {"text": model.tokenizer.decode(tokens, skip_special_tokens=True), "decode_s": decode_s,
            "steps": int(steps), "compile_s": compile_s}


def run_sample(model, sample, methods: dict[str, Any], max_new: int, shapes: Shapes) -> dict[str, Any]:
    """One dense prefill, then every method decodes from it (Full last: it consumes the dense cache)."""
    from kvjax.eval.tasks import score
    from kvjax.generation import _tokenize, convert, prefill
    from kvjax.methods import Full

    _, prompts, questions = _tokenize(model.tokenizer, sample.context, sample.question)
    question = questions[0]
    dense = prefill(model, prompts, Full(), extra_tokens=shapes.extra_tokens(len(question)))
    compile_s = dense.compile_s
    results: dict[str, Any] = {}
    order = sorted(methods, key=lambda k: methods[k] == Full())
    for key in order:
        method = methods[key]
        if key == order[-1] and method == Full():
            pre, convert_s = dense, 0.0
        else:
            pre = convert(dense, method)
            convert_s = pre.prefill_s - dense.prefill_s
            compile_s += pre.compile_s - dense.compile_s
        out = decode(model, pre, method, question, max_new, shapes)
        compile_s += out["compile_s"]
        results[key] = {"answer": out["text"], "score": score(sample, out["text"]),
                        "convert_s": round(convert_s, 3), "decode_s": round(out["decode_s"], 3),
                        "steps": out["steps"]}
    results = {key: results[key] for key in methods}  # grid order
    return {"prefill_s": round(dense.prefill_s, 3), "compile_s": round(compile_s, 3), "results": results}


def run_perplexity(model, tokens: list[int], length: int, positions: int,
                   methods: dict[str, Any]) -> list[dict[str, Any]]:
    """Perplexity of tokens[length : length + positions] under each method, from one dense prefill."""
    import jax.numpy as jnp

    from kvjax.eval.perplexity import _nll_jit
    from kvjax.generation import compiled, convert, prefill
    from kvjax.methods import Full

    dense = prefill(model, [tokens[:length]], Full(), extra_tokens=positions)
    targets = jnp.asarray([tokens[length : length + positions]], jnp.int32)
    rows = []
    for key, method in methods.items():
        t0 = time.perf_counter()
        pre = dense if method == Full() else convert(dense, method)  # _nll_jit does not donate
        args = (model.params, pre.cache, pre.first_logits, targets)
        exe, compile_s = compiled(_nll_jit, args, config=model.config, method=method)
        t1 = time.perf_counter()
        nll = float(np.asarray(exe(*args)).mean())
        rows.append({"length": length, "method": key, "positions": positions, "nll": nll,
                     "perplexity": math.exp(nll), "score_s": round(time.perf_counter() - t1, 3),
                     "build_s": round(t1 - t0 - compile_s, 3), "compile_s": round(compile_s, 3)})
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        if full is not None:
            r["delta_nll_vs_full"] = r["nll"] - full["nll"]
            r["ppl_ratio_vs_full"] = r["perplexity"] / full["perplexity"]
    return rows


def same_answer(a: str, b: str) -> bool:
    """Whether two generated answers are the same text (surrounding whitespace aside)."""
    return a.strip() == b.strip()


def accuracy_table(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, length, method, budget): score sum, fully-correct count, total, mean score,
    and how often the method generated Full's answer (fidelity to the uncompressed cache,
    which still compares methods where the model cannot do a task)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    agree: dict[tuple, list[bool]] = defaultdict(list)
    for s in samples:
        full = s["results"].get("full")
        for key, r in s["results"].items():
            groups[(s["task"], s["length"], key)].append(r["score"])
            if full is not None:
                agree[(s["task"], s["length"], key)].append(same_answer(r["answer"], full["answer"]))
    rows = []
    for (task, length, key), scores in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], _key_order(kv[0][2]))):
        name, _, budget = key.partition("/")
        same = agree.get((task, length, key), [])
        rows.append({"task": task, "length": length, "method": name, "budget": int(budget) if budget else None,
                     "correct": sum(x == 1.0 for x in scores), "score_sum": float(sum(scores)),
                     "total": len(scores), "accuracy": float(np.mean(scores)),
                     "same_as_full": sum(same), "compared_with_full": len(same)})
    return rows


def _accuracy_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The accuracy table of a payload, recomputed from its samples when it has them (files
    written before a column existed then report it too)."""
    return accuracy_table(payload["samples"]) if payload.get("samples") else payload.get("accuracy", [])


def _key_order(key: str) -> tuple:
    name, _, budget = key.partition("/")
    return (METHOD_NAMES.index(name) if name in METHOD_NAMES else 99, int(budget) if budget else 0)


class Store:
    """The result JSON, rewritten atomically after every sample."""

    def __init__(self, path: Path, payload: dict[str, Any]):
        self.path = path
        self.payload = payload

    def save(self) -> None:
        self.payload["accuracy"] = accuracy_table(self.payload["samples"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.payload, indent=1) + "\n")
        os.replace(tmp, self.path)


PROTOCOL_KEYS = ("model", "max_new_tokens", "ppl_positions", "ppl_text", "haystack", "depths")


def run(args: argparse.Namespace, model=None) -> dict[str, Any]:
    """Run the benchmark described by `args` (see `parse_args`); returns the payload."""
    from kvjax.cache import CacheSpec
    from kvjax.environment import environment
    from kvjax.eval import perplexity as ppl_mod
    from kvjax.eval.runner import MAX_NEW_TOKENS
    from kvjax.eval.tasks import TASKS, default_haystack_path, make_sample
    from kvjax.generation import CAPACITY_ROUND, prompt_bucket

    for task in args.tasks:
        if task not in TASKS:
            raise SystemExit(f"unknown task {task!r}; expected some of {TASKS}")
    seeds = args.seeds if len(args.seeds) > 1 else args.seeds * len(args.lengths)
    if len(seeds) != len(args.lengths):
        raise SystemExit(f"--seeds takes one count or one per length ({len(args.lengths)}), got {args.seeds}")
    if model is None:
        import models

        t0 = time.perf_counter()
        model = models.load(args.model)
        log(f"# model {args.model} loaded in {time.perf_counter() - t0:.1f} s")
    grid = method_grid(args.methods, args.budgets)
    ppl_grid = method_grid(args.methods, args.ppl_budgets)
    max_new = {t: MAX_NEW_TOKENS[t] for t in args.tasks}
    shapes = Shapes(QUESTION_BUCKET, max(max_new.values(), default=1))
    novel = args.ppl_text or default_haystack_path()
    haystack = (default_haystack_path() if args.haystack == "novel" else args.haystack) or None

    protocol = {"model": getattr(model, "name", args.model), "max_new_tokens": max_new,
                "ppl_positions": args.ppl_positions, "ppl_text": str(novel) if novel else None,
                "haystack": str(haystack) if haystack else "noise sentences (kv_retrieval: its JSON object)",
                "depths": "0.05 + 0.9 * frac(0.5 + seed * 0.618034), rounded to 4 places"}
    output: Path = args.output
    payload: dict[str, Any] | None = None
    if args.resume and output.is_file():
        payload = json.loads(output.read_text())
        old = payload.get("settings", {})
        differ = [k for k in PROTOCOL_KEYS if json.dumps(old.get(k), sort_keys=True) != json.dumps(protocol[k], sort_keys=True)]
        if differ:
            raise SystemExit(f"--resume: {output} was run with other settings ({', '.join(differ)}); "
                             "use another --output or the same settings")
        log(f"# resuming {output}: {len(payload['samples'])} samples, {len(payload['perplexity'])} perplexity rows")
    if payload is None:
        payload = {"benchmark": "accuracy", "status": "running", "wall_s": 0.0, "runs": [],
                   "invalid": [], "samples": [], "perplexity": [], "accuracy": []}
    payload["environment"] = environment()
    payload["settings"] = {
        **protocol, "tasks": list(args.tasks), "lengths": list(args.lengths),
        "seeds_per_length": dict(zip(map(str, args.lengths), seeds)), "budgets": list(args.budgets),
        "methods": {label(n, b): describe_method(n, b) for n, b in grid},
        "ppl_lengths": list(args.ppl_lengths), "ppl_budgets": list(args.ppl_budgets),
        "protocol": "one dense prefill per sample; each method's cache derived from it "
                    "(kvjax.generation.convert); question fed token by token; greedy decoding",
    }
    wall_before = float(payload.get("wall_s", 0.0))
    payload["runs"].append({"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "argv": list(args.argv), "git": git_state()})
    payload["status"] = "running"
    store = Store(output, payload)
    t_start = time.perf_counter()

    def tick() -> None:
        payload["wall_s"] = round(wall_before + time.perf_counter() - t_start, 1)
        store.save()

    def methods_for(length: int, grid, extra: int) -> dict[str, Any]:
        c = model.config
        bucket = prompt_bucket(length)
        spec = CacheSpec(batch=1, capacity=CAPACITY_ROUND * math.ceil((bucket + extra) / CAPACITY_ROUND),
                         num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                         head_dim=c.head_dim, prompt_capacity=bucket)
        valid, invalid = check_methods(grid, spec)
        for key, reason in invalid.items():
            entry = {"length": length, "method": key, "reason": reason}
            if entry not in payload["invalid"]:
                payload["invalid"].append(entry)
                log(f"# skipped {key} at {length} tokens: {reason}")
        return valid

    # Perplexity fidelity first: a few minutes, and a cut-short run still has it.
    if args.ppl_lengths and args.ppl_positions > 0:
        if novel is None or not Path(novel).is_file():
            payload["perplexity_skipped"] = (f"novel not found ({novel or 'no ../shared/data/pride_and_prejudice.txt'}); "
                                             "give --ppl-text or set KVJAX_DATA_DIR")
            log(f"# perplexity skipped: {payload['perplexity_skipped']}")
        else:
            tokens = ppl_mod.load_text_tokens(model, novel, max(args.ppl_lengths) + args.ppl_positions)
            for length in args.ppl_lengths:
                methods = methods_for(length, ppl_grid, args.ppl_positions)
                done = {r["method"] for r in payload["perplexity"] if r["length"] == length}
                if set(methods) <= done:
                    continue
                t0 = time.perf_counter()
                rows = run_perplexity(model, tokens, length, args.ppl_positions, methods)
                payload["perplexity"] = [r for r in payload["perplexity"] if r["length"] != length] + rows
                tick()
                log(f"# perplexity at {length} ({time.perf_counter() - t0:.0f} s): "
                    + ", ".join(f"{r['method']} {r['perplexity']:.3f}" for r in rows))

    # Retrieval tasks, seed-major.
    cases = [(seed, length, task) for seed in range(max(seeds, default=0))
             for length, n in zip(args.lengths, seeds) if seed < n for task in args.tasks]
    methods_by_length = {n: methods_for(n, grid, shapes.extra_tokens(QUESTION_BUCKET)) for n in args.lengths}
    index = {(s["task"], s["length"], s["seed"]): i for i, s in enumerate(payload["samples"])}
    todo = [c for c in cases if not (
        (c[2], c[1], c[0]) in index
        and set(methods_by_length[c[1]]) <= set(payload["samples"][index[(c[2], c[1], c[0])]]["results"]))]
    log(f"# {len(cases)} samples planned ({len(cases) - len(todo)} already done), "
        f"{len(grid)} method/budget runs each")
    spent: dict[int, list[float]] = defaultdict(list)
    for i, (seed, length, task) in enumerate(todo):
        t0 = time.perf_counter()
        depth = depth_for(seed)
        sample = make_sample(task, model.tokenizer, length, depth=depth, seed=seed,
                             haystack=None if task == "kv_retrieval" else haystack)
        run_out = run_sample(model, sample, methods_by_length[length], max_new[task], shapes)
        record = {"task": task, "length": length, "seed": seed, "depth": depth,
                  "context_tokens": sample.context_tokens, "expected": list(sample.answers), **run_out,
                  "wall_s": round(time.perf_counter() - t0, 2)}
        key = (task, length, seed)
        if key in index:
            payload["samples"][index[key]] = record
        else:
            index[key] = len(payload["samples"])
            payload["samples"].append(record)
        tick()
        spent[length].append(time.perf_counter() - t0 - run_out["compile_s"])
        eta = sum(np.mean(spent[c[1]]) if spent[c[1]] else np.mean(sum(spent.values(), []))
                  for c in todo[i + 1:])
        marks = " ".join(f"{k}={r['score']:.2g}" for k, r in record["results"].items())
        log(f"[{i + 1}/{len(todo)}] {task} L={length} seed={seed} depth={depth:.2f} "
            f"({time.perf_counter() - t0:.0f} s, compile {run_out['compile_s']:.0f} s; elapsed "
            f"{(time.perf_counter() - t_start) / 60:.1f} min, ETA {eta / 60:.1f} min) expected "
            f"{sample.answers[0]!r} full={record['results'].get('full', {}).get('answer', '')!r}\n    {marks}")
    payload["status"] = "complete"
    tick()
    return payload


# ---------------------------------------------------------------------------------------------
# Reporting


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


def markdown_tables(payload: dict[str, Any]) -> str:
    """Accuracy (%) per task and length: methods x budgets; then perplexity fidelity."""
    acc = _accuracy_rows(payload)
    out: list[str] = []
    if acc:
        budgets = sorted({r["budget"] for r in acc if r["budget"] is not None})
        n_max = max(r["total"] for r in acc)
        out.append(f"Accuracy (%, mean score over seeds; n = {n_max} per cell unless marked) with "
                   f"{payload.get('environment', {}).get('backend', '?')} / "
                   f"{payload.get('settings', {}).get('model', '?')}:\n")
        out.append("| task | length | method | " + " | ".join(str(b) for b in budgets) + " |")
        out.append("|---|---:|---|" + "---:|" * len(budgets))
        cells: dict[tuple, dict] = {(r["task"], r["length"], r["method"], r["budget"]): r for r in acc}
        tasks = _task_order(payload, acc)
        lengths = sorted({r["length"] for r in acc})
        invalid = {(e["length"], e["method"]) for e in payload.get("invalid", [])}
        for length in lengths:
            for task in tasks:
                for name in METHOD_NAMES:
                    row = []
                    for b in budgets:
                        r = cells.get((task, length, name, None if name == "full" else b))
                        if r is None:
                            row.append("n/a" if (length, label(name, b)) in invalid else "-")
                        else:
                            row.append(_pct(r["accuracy"]) + ("" if r["total"] == n_max else f" (n={r['total']})"))
                    if any(c != "-" for c in row):
                        out.append(f"| {task} | {length} | {DISPLAY[name]} | " + " | ".join(row) + " |")
        out.append("\n(Full has no budget: its value is repeated in every column.)")
        # Paper's expected shape, checked.
        checks, uninformative = [], []
        for length in lengths:
            for task in tasks:
                full = cells.get((task, length, "full", None))
                if full and full["accuracy"] == 0.0:
                    uninformative.append(f"{task} {length}")
                for b in budgets:
                    ckv, quest = cells.get((task, length, "clusterkv", b)), cells.get((task, length, "quest", b))
                    if ckv and quest and ckv["accuracy"] < quest["accuracy"]:
                        checks.append(f"ClusterKV < Quest: {task} {length} budget {b} "
                                      f"({_pct(ckv['accuracy'])} vs {_pct(quest['accuracy'])})")
                ckv = cells.get((task, length, "clusterkv", max(budgets))) if budgets else None
                if full and ckv and full["accuracy"] - ckv["accuracy"] > 0.01:
                    checks.append(f"ClusterKV more than 1 point below Full: {task} {length} budget "
                                  f"{max(budgets)} ({_pct(ckv['accuracy'])} vs {_pct(full['accuracy'])})")
        out.append("\nExpected shape (ClusterKV within 1 point of Full at the largest budget, >= Quest at "
                   "every budget): " + ("holds in every cell." if not checks else
                                        f"{len(checks)} exception(s):\n" + "\n".join(f"- {c}" for c in checks)))
        if uninformative:
            out.append("Full scores 0 (the model cannot do the task at all, so accuracy cannot compare "
                       "the methods) on: " + ", ".join(uninformative) + ".")
            out.append(same_as_full_table(cells, uninformative, budgets))
    ppl = payload.get("perplexity") or []
    if ppl:
        budgets = sorted({int(r["method"].split("/")[1]) for r in ppl if "/" in r["method"]})
        positions = ppl[0]["positions"]
        out.append(f"\nPerplexity fidelity ({positions} scored positions after L tokens of "
                   f"{Path(payload.get('settings', {}).get('ppl_text') or 'the novel').name}; "
                   "ratio to Full in brackets):\n")
        out.append("| length | method | " + " | ".join(str(b) for b in budgets) + " |")
        out.append("|---:|---|" + "---:|" * len(budgets))
        by = {(r["length"], r["method"]): r for r in ppl}
        for length in sorted({r["length"] for r in ppl}):
            for name in METHOD_NAMES:
                row = []
                for b in budgets:
                    r = by.get((length, label(name, None if name == "full" else b)))
                    row.append("-" if r is None else f"{r['perplexity']:.3f}"
                               + ("" if name == "full" or "ppl_ratio_vs_full" not in r else f" ({r['ppl_ratio_vs_full']:.3f}x)"))
                if any(c != "-" for c in row):
                    out.append(f"| {length} | {DISPLAY[name]} | " + " | ".join(row) + " |")
    if payload.get("perplexity_skipped"):
        out.append(f"\nPerplexity skipped: {payload['perplexity_skipped']}")
    return "\n".join(out)


def same_as_full_table(cells: dict[tuple, dict], where: list[str], budgets: list[int]) -> str:
    """Share of samples (%) in which a method generated exactly Full's answer, for the
    "task length" cells in `where`: fidelity to the uncompressed cache where accuracy is 0."""
    n = max((r.get("compared_with_full", 0) for r in cells.values()), default=0)
    out = [f"\nSame answer as Full (%, whitespace aside; n = {n} samples per cell) where Full scores 0:\n",
           "| task | length | method | " + " | ".join(str(b) for b in budgets) + " |",
           "|---|---:|---|" + "---:|" * len(budgets)]
    for cell in where:
        task, length = cell.rsplit(" ", 1)
        for name in METHOD_NAMES[1:]:
            row = [cells.get((task, int(length), name, b)) for b in budgets]
            if any(r and r.get("compared_with_full") for r in row):
                out.append(f"| {task} | {length} | {DISPLAY[name]} | " + " | ".join(
                    _pct(r["same_as_full"] / r["compared_with_full"]) if r and r.get("compared_with_full") else "-"
                    for r in row) + " |")
    return "\n".join(out)


def _task_order(payload: dict[str, Any], acc: list[dict[str, Any]]) -> list[str]:
    present = {r["task"] for r in acc}
    listed = [t for t in payload.get("settings", {}).get("tasks", []) if t in present]
    return listed + sorted(present - set(listed))


def _budget_axis(ax, budgets: list[int]) -> None:
    ax.set_xscale("log", base=2)
    if budgets:
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    """Accuracy vs budget per method, one panel per (length, task), plus perplexity panels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        log(f"# no plot: matplotlib does not import ({e})")
        return None
    acc = _accuracy_rows(payload)
    ppl = payload.get("perplexity") or []
    tasks = _task_order(payload, acc)
    acc_lengths = sorted({r["length"] for r in acc})
    ppl_lengths = sorted({r["length"] for r in ppl})
    cols = len(tasks) + (1 if ppl else 0)
    rows = max(len(acc_lengths), len(ppl_lengths), 1)
    if cols == 0:
        log("# no plot: no results")
        return None
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    colors = {"full": "black", "streaming_llm": "tab:orange", "quest": "tab:blue", "clusterkv": "tab:green",
              "freekv": "tab:red", "freekv_tau09": "tab:purple", "clusterkv_kv_head": "tab:olive"}
    for i, length in enumerate(acc_lengths):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            for name in METHOD_NAMES:
                rs = sorted((r for r in acc if r["task"] == task and r["length"] == length and r["method"] == name),
                            key=lambda r: r["budget"] or 0)
                if not rs:
                    continue
                if name == "full":
                    ax.axhline(100 * rs[0]["accuracy"], color=colors[name], ls="--", lw=1, label=DISPLAY[name])
                else:
                    ax.plot([r["budget"] for r in rs], [100 * r["accuracy"] for r in rs], "o-",
                            color=colors[name], label=DISPLAY[name], ms=4)
            _budget_axis(ax, sorted({r["budget"] for r in acc if r["budget"]}))
            ax.set_ylim(-5, 105)
            n = max((r["total"] for r in acc if r["task"] == task and r["length"] == length), default=0)
            ax.set_title(f"{task}, {length} tok (n={n})", fontsize=9)
            ax.set_xlabel("budget (tokens)", fontsize=8)
            if j == 0:
                ax.set_ylabel("accuracy (%)", fontsize=8)
            ax.tick_params(labelsize=7)
    if ppl:
        for i, length in enumerate(ppl_lengths):
            ax = axes[i][cols - 1]
            for name in METHOD_NAMES:
                rs = [r for r in ppl if r["length"] == length and r["method"].split("/")[0] == name]
                if not rs:
                    continue
                if name == "full":
                    ax.axhline(rs[0]["perplexity"], color=colors[name], ls="--", lw=1, label=DISPLAY[name])
                else:
                    rs.sort(key=lambda r: int(r["method"].split("/")[1]))
                    ax.plot([int(r["method"].split("/")[1]) for r in rs], [r["perplexity"] for r in rs], "o-",
                            color=colors[name], label=DISPLAY[name], ms=4)
            _budget_axis(ax, sorted({int(r["method"].split("/")[1]) for r in ppl if "/" in r["method"]}))
            ax.set_title(f"perplexity, {length} tok", fontsize=9)
            ax.set_xlabel("budget (tokens)", fontsize=8)
            ax.tick_params(labelsize=7)
    for i in range(rows):  # hide unused panels
        for j in range(cols):
            if not axes[i][j].has_data() and not axes[i][j].lines:
                axes[i][j].set_visible(False)
    handles, labels = next(((h, l) for ax in axes.flat for h, l in [ax.get_legend_handles_labels()] if h), ([], []))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"{payload.get('settings', {}).get('model', '')} on "
                 f"{payload.get('environment', {}).get('backend', '?')}: accuracy vs KV budget", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 7168], help="prompt tokens")
    p.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHOD_NAMES)
    p.add_argument("--seeds", type=int, nargs="+", default=[10],
                   help="seeds 0..N-1: one count for every length, or one count per length")
    p.add_argument("--haystack", default=None,
                   help="haystack text file for the non-kv tasks, or 'novel' (default: noise sentences)")
    p.add_argument("--ppl-lengths", type=int, nargs="*", default=[4096, 7680])
    p.add_argument("--ppl-budgets", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--ppl-positions", type=int, default=64, help="scored positions per perplexity length")
    p.add_argument("--ppl-text", type=Path, default=None, help="default: ../shared/data/pride_and_prejudice.txt")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON path (default bench/results/accuracy-<backend>-<date>.json)")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--resume", action="store_true", help="continue an existing --output JSON")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="run nothing: print the markdown tables of JSON and write its plot")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        payload = json.loads(args.report.read_text())
        print(markdown_tables(payload))
        written = plot(payload, args.plot or args.report.with_suffix(".png"))
        if written:
            log(f"# wrote {written}")
        return 0
    if args.output is None:
        import jax

        args.output = RESULTS / f"accuracy-{jax.default_backend()}-{datetime.date.today()}.json"
    payload = run(args)
    log(f"# wrote {args.output} ({payload['wall_s'] / 60:.1f} min)")
    print(markdown_tables(payload))
    written = plot(payload, args.plot or args.output.with_suffix(".png"))
    if written:
        log(f"# wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
