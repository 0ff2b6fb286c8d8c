"""Dense generation speed: kvjax `Full()` versus `transformers` (PyTorch CPU) on SmolLM2.

Both sides load the same embedded SmolLM2-135M-Instruct GGUF file in float32 and receive
the same prompt token ids (the first L tokens of a novel). For every prompt length the two
are timed side by side in one process, interleaved (the order alternates per repeat), so
that load from other work on the machine hits both alike; the table reports medians over
the repeats and the ratios between them.

- prefill: ours is the jitted bucketed prefill (`stats["prefill_s"]`, compilation excluded
  by a warm-up call per length); transformers is one forward of the prompt with
  `use_cache=True` and `logits_to_keep=1` (what `generate` does: no `[T, V]` logits).
- decode: ours is the jitted `lax.while_loop` (`stats["decode_ms_per_step"]`, one forward
  per step); transformers is a manual greedy loop that feeds one token at a time with
  `past_key_values` (a `DynamicCache`) for the same number of forward steps.
- agreement: the number of leading greedy tokens on which the two agree.

Run from the repository root:

    .venv/bin/python -m bench.decode_speed --lengths 1024 4096 7680 --repeats 3

`--suite methods` runs the other half instead (`bench/method_speed.py`): decode ms/token of
Full, StreamingLLM, Quest and ClusterKV (XLA and Pallas) at 4k/16k/32k with budget 1024 on
the SmolLM2 architecture, and ClusterKV's clustering time as a share of prefill:

    .venv/bin/python -m bench.decode_speed --suite methods --contexts 4096 16384 32768
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # allow `python bench/decode_speed.py` as well as `-m`
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
DEFAULT_LENGTHS = (1024, 4096, 7680)


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Prompt


def prompt_pool(tokenizer, needed: int) -> tuple[list[int], str]:
    """At least `needed` token ids of running novel text (or a synthetic text if absent)."""
    from kvjax.eval.tasks import default_haystack_path

    path = default_haystack_path()
    if path is not None:
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        sentence = (
            "The quiet village by the river woke slowly; the baker lit his ovens, the ferryman "
            "checked his ropes, and the children ran along the bank counting boats. "
        )
        text, source = sentence * 2000, "synthetic repeated text"
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    while len(ids) < needed:  # a short novel: repeat it
        ids = ids + ids
    return ids, source


# ---------------------------------------------------------------------------------------------
# Competitors


class Ours:
    name = "kvjax"

    def __init__(self, model, max_new_tokens: int):
        import kvjax

        self.kvjax = kvjax
        self.model = model
        self.max_new = max_new_tokens

    def run(self, ids: list[int]) -> dict[str, Any]:
        out = self.kvjax.generate(
            self.model, ids, method=self.kvjax.methods.Full(), max_new_tokens=self.max_new
        )
        s = out.stats
        return {
            "prefill_s": s["prefill_s"],
            "decode_s": s["decode_s"],
            "decode_steps": s["decode_steps"],
            "decode_ms_per_step": s["decode_ms_per_step"],
            "compile_s": s["compile_s"],
            "prompt_bucket": s["prompt_bucket"],
            "tokens": list(out.tokens),
        }


def load_transformers_gguf(gguf: Path):
    """`transformers`' float32 model of a GGUF file, and a note of how it was loaded.

    `from_pretrained(gguf_file=...)` insists on `accelerate` being installed; without it the
    same dequantised weights are loaded through `transformers`' own GGUF reader
    (`load_gguf_checkpoint`, which also undoes llama.cpp's Q/K permutation) into a model
    built from the file's config, with the tied output matrix re-tied.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        loader = "AutoModelForCausalLM.from_pretrained(gguf_file=..., dtype=float32)"
    except (ImportError, ValueError) as e:
        if "accelerate" not in str(e):
            raise
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(
            str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
        )["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"GGUF tensors do not fit: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        loader = ("from_config + load_gguf_checkpoint (from_pretrained(gguf_file=...) needs "
                  "accelerate, which is not installed)")
    floats = {p.dtype for p in model.parameters()}
    if floats != {torch.float32}:
        raise RuntimeError(f"expected a float32 (dequantised) model, got parameter dtypes {floats}")
    return model.eval(), loader


class Transformers:
    name = "transformers"

    def __init__(self, gguf: Path, max_new_tokens: int):
        import torch

        self.torch = torch
        self.model, self.loader = load_transformers_gguf(gguf)
        self.max_new = max_new_tokens

    @property
    def attn_implementation(self) -> str | None:
        return getattr(self.model.config, "_attn_implementation", None)

    def run(self, ids: list[int], steps: int | None = None) -> dict[str, Any]:
        """Greedy: one prefill forward, then `steps` one-token forwards (default max_new - 1)."""
        torch = self.torch
        steps = self.max_new - 1 if steps is None else steps
        with torch.inference_mode():
            input_ids = torch.tensor([ids], dtype=torch.long)
            t0 = time.perf_counter()
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
            token = int(out.logits[0, -1].argmax())
            prefill_s = time.perf_counter() - t0
            past = out.past_key_values
            tokens = [token]
            t0 = time.perf_counter()
            for _ in range(steps):
                out = self.model(
                    input_ids=torch.tensor([[token]], dtype=torch.long),
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
                token = int(out.logits[0, -1].argmax())
                tokens.append(token)
            decode_s = time.perf_counter() - t0
        return {
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "decode_steps": steps,
            "decode_ms_per_step": 1e3 * decode_s / max(steps, 1),
            "tokens": tokens,
        }


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                   help="prompt lengths in tokens (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="generated tokens per run; decode steps = this - 1 (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side and length (median)")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                   help="torch.set_num_threads (default: the CPU count, %(default)s)")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON path (default: bench/results/decode_speed-<backend>-<date>.json)")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.lengths):
        p.error(f"--lengths must be >= 1, got {args.lengths}")
    if args.max_new_tokens < 2:
        p.error(f"--max-new-tokens must be >= 2 (at least one decode step), got {args.max_new_tokens}")
    if args.torch_threads < 1:
        p.error(f"--torch-threads must be >= 1, got {args.torch_threads}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| prompt tokens | prefill tok/s ours | prefill tok/s HF | prefill ours/HF "
        "| decode ms/tok ours | decode ms/tok HF | decode HF/ours | agree |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompt_tokens']} | {r['ours']['prefill_tokens_per_s']:.0f} "
            f"| {r['transformers']['prefill_tokens_per_s']:.0f} | {r['prefill_speedup']:.2f} "
            f"| {r['ours']['decode_ms_per_token']:.1f} | {r['transformers']['decode_ms_per_token']:.1f} "
            f"| {r['decode_speedup']:.2f} | {r['agreement']['leading_tokens_min']}/{r['agreement']['compared']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["--suite", "methods"]:
        from bench import method_speed

        return method_speed.main(argv[2:])
    if argv[:2] == ["--suite", "transformers"]:
        argv = argv[2:]
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.torch_threads)
    load_at_start = list(os.getloadavg())

    import jax

    import kvjax
    import kvjax.methods  # noqa: F401 - `kvjax.methods.Full`
    import models
    from bench.method_speed import interleaved_runs
    from kvjax.environment import environment
    from models.loading import embedded_model_path

    env = environment()
    log(f"# backend {env['backend']} on {env['cpu']} ({env['cpu_count']} CPUs), "
        f"torch threads {torch.get_num_threads()}")
    gguf = embedded_model_path()
    t0 = time.perf_counter()
    model = models.load("smollm2")
    log(f"# kvjax model loaded in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    theirs = Transformers(gguf, args.max_new_tokens)
    log(f"# transformers model loaded in {time.perf_counter() - t0:.1f} s "
        f"(attn_implementation={theirs.attn_implementation})")
    ours = Ours(model, args.max_new_tokens)

    limit = model.config.max_position_embeddings
    for n in args.lengths:
        if n + args.max_new_tokens > limit:
            raise SystemExit(f"--lengths {n} + --max-new-tokens {args.max_new_tokens} exceeds the "
                             f"model's context of {limit} tokens")
    pool, source = prompt_pool(model.tokenizer, max(args.lengths))

    # One short warm-up of torch (lazy initialisation, thread pool) before anything is timed.
    theirs.run(pool[:64], steps=2)

    rows = []
    for n in args.lengths:
        ids = pool[:n]
        log(f"## {n} prompt tokens: warm-up (compiles ours)")
        t0 = time.perf_counter()
        warm = ours.run(ids)
        log(f"   ours warm-up {time.perf_counter() - t0:.1f} s (compile {warm['compile_s']:.1f} s)")
        competitors = {"ours": ours, "transformers": theirs}

        def done(key, runs_of_key):
            res = runs_of_key[-1]
            log(f"   repeat {len(runs_of_key)}/{args.repeats} {key:>12}: prefill {res['prefill_s']:.2f} s, "
                f"decode {res['decode_ms_per_step']:.1f} ms/step x {res['decode_steps']}")

        runs = interleaved_runs(list(competitors), lambda key: competitors[key].run(ids), args.repeats, done)
        agreements = [
            leading_agreement(a["tokens"], b["tokens"])
            for a, b in zip(runs["ours"], runs["transformers"])
        ]
        compared = min(len(runs["ours"][0]["tokens"]), len(runs["transformers"][0]["tokens"]))
        summary = {}
        for key, rs in runs.items():
            pre = median(rs, "prefill_s")
            summary[key] = {
                "prefill_s": pre,
                "prefill_tokens_per_s": n / pre,
                "decode_ms_per_token": median(rs, "decode_ms_per_step"),
                "decode_steps": rs[0]["decode_steps"],
                "runs": [{k: v for k, v in x.items() if k != "tokens"} for x in rs],
                "tokens": rs[0]["tokens"],
            }
        row = {
            "prompt_tokens": n,
            "ours": summary["ours"],
            "transformers": summary["transformers"],
            "prefill_speedup": summary["ours"]["prefill_tokens_per_s"]
            / summary["transformers"]["prefill_tokens_per_s"],
            "decode_speedup": summary["transformers"]["decode_ms_per_token"]
            / summary["ours"]["decode_ms_per_token"],
            "agreement": {
                "leading_tokens_per_repeat": agreements,
                "leading_tokens_min": min(agreements),
                "compared": compared,
            },
        }
        rows.append(row)
        log(f"   median: prefill ours/HF {row['prefill_speedup']:.2f}x, "
            f"decode HF/ours {row['decode_speedup']:.2f}x, agreement {min(agreements)}/{compared}")

    date = datetime.date.today().isoformat()
    output = args.output or RESULTS / f"decode_speed-{env['backend']}-{date}.json"
    result = {
        "benchmark": "decode_speed",
        "environment": env,
        "settings": {
            "model": f"smollm2 ({gguf.name}, dequantised to float32 on both sides)",
            "method": kvjax.methods.Full().describe(),
            "lengths": args.lengths,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "statistic": "median over repeats; ours and transformers interleaved, order "
                         "alternating per repeat",
            "prompt_source": source,
            "torch_num_threads": torch.get_num_threads(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": list(os.getloadavg()),
            "torch_attn_implementation": theirs.attn_implementation,
            "transformers_loader": theirs.loader,
            "jax_devices": [str(d) for d in jax.devices()],
            "transformers_prefill": "one forward, use_cache=True, logits_to_keep=1",
            "transformers_decode": "manual greedy loop, one token per forward with "
                                   "past_key_values (DynamicCache), max_new_tokens - 1 steps",
            "ours_decode": "kvjax.generate decode_ms_per_step (jitted lax.while_loop), "
                           "compilation excluded (warm-up call per length)",
            "ratios": "prefill_speedup = ours/transformers prefill tokens/s; decode_speedup = "
                      "transformers/ours decode ms per token (> 1: ours faster)",
        },
        "rows": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    log(f"# wrote {output}")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
