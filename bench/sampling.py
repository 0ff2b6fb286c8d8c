"""Temperature + top-p sampling two ways: ranking the top `SAMPLE_CANDIDATES` tokens with
`lax.top_k` (with a full-ranking fallback when they do not hold the nucleus) against ranking
the whole vocabulary (a sort: what sampling did before, and what it does on GPUs).

The logits are the real SmolLM2's at consecutive positions of a novel (teacher-forced), so
the nucleus sizes and the fallback rate are those of real text. Each form samples every
position once in one jitted `lax.scan` (a fresh key per step, as in the decode loop), the two
forms alternate within each of `--rounds` rounds (ratio per round, then the median), and
both must draw the same tokens. For scale, the greedy decode step of `kvjax.generate` with
`Full` at a 1024-token prompt is timed too.

Run from the repository root:

    .venv/bin/python -m bench.sampling
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import forms
from bench.method_speed import interleaved_runs, median_ratio
from kvjax.cli import positive_int

SETTINGS = ((0.7, 0.9), (1.0, 0.9), (1.0, 0.95), (1.0, 1.0))  # (temperature, top_p)
BATCHES = (1, 4)


def position_logits(model, text: Path, positions: int) -> np.ndarray:
    """Float32 logits [positions, V] of the model reading the start of `text`."""
    import kvjax
    import models
    from kvjax.cache import CacheSpec
    from kvjax.eval.perplexity import load_text_tokens

    c = model.config
    ids = load_text_tokens(model, text, positions)
    spec = CacheSpec(batch=1, capacity=positions, num_layers=c.num_layers, num_heads=c.num_heads,
                     num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=model.params.embed.dtype)
    cache = kvjax.init_cache(kvjax.Full(), spec)
    logits, _ = jax.jit(functools.partial(models.llama.forward, method=kvjax.Full(), config=c))(
        model.params, jnp.asarray([ids]), jnp.arange(positions)[None], cache)
    return np.asarray(logits[0], np.float32)


def sampler(candidates: int) -> Callable[..., jax.Array]:
    """Jitted: tokens [steps, B] sampled from logits [steps, B, V], a new key per step."""
    from kvjax.generation import sample_tokens

    def run(logits, key, temperature, top_p):
        def step(key, row):
            key, sub = jax.random.split(key)
            return key, sample_tokens(row, sub, temperature, top_p, False, candidates)

        return jax.lax.scan(step, key, logits)[1]

    return jax.jit(run)


def nucleus_sizes(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Tokens in each row's nucleus (float64 reference), any leading shape."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    ranked = -np.sort(-probs, axis=-1)
    return ((np.cumsum(ranked, axis=-1) - ranked) < top_p).sum(axis=-1)


def measure(logits: np.ndarray, temperature: float, top_p: float, batch: int, rounds: int) -> dict[str, Any]:
    from kvjax.generation import SAMPLE_CANDIDATES

    vocab = logits.shape[-1]
    steps = logits.shape[0] // batch
    rows = jnp.asarray(logits[: steps * batch].reshape(steps, batch, vocab))
    args = (rows, jax.random.PRNGKey(0), jnp.float32(temperature), jnp.float32(top_p))
    fns = {"candidates": sampler(SAMPLE_CANDIDATES), "full_ranking": sampler(vocab)}
    tokens = {name: np.asarray(fn(*args)) for name, fn in fns.items()}  # compiles
    np.testing.assert_array_equal(tokens["candidates"], tokens["full_ranking"])

    def ms_per_sample(name: str) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name](*args))
        return (time.perf_counter() - t0) / steps * 1e3

    runs = interleaved_runs(list(fns), ms_per_sample, rounds)
    sizes = nucleus_sizes(np.asarray(rows), temperature, top_p)  # [steps, B]
    return {
        "temperature": temperature, "top_p": top_p, "batch": batch, "steps": steps,
        "candidates": SAMPLE_CANDIDATES, "vocab": vocab,
        "ms": {name: statistics.median(v) for name, v in runs.items()}, "runs_ms": runs,
        "full_ranking_over_candidates": median_ratio(runs["full_ranking"], runs["candidates"]),
        "fallback_share": None if top_p >= 1 else float((sizes > SAMPLE_CANDIDATES).any(axis=1).mean()),
        "nucleus_tokens_median": float(np.median(sizes)), "nucleus_tokens_max": int(sizes.max()),
    }


def greedy_decode_ms(model, text: Path) -> float:
    """Decode ms/token of `kvjax.generate` (Full, greedy) after a 1024-token prompt."""
    import kvjax
    from kvjax.eval.perplexity import load_text_tokens

    ids = load_text_tokens(model, text, 1024)
    kvjax.generate(model, ids, max_new_tokens=4)  # compiles
    return kvjax.generate(model, ids, max_new_tokens=64).stats["decode_ms_per_step"]


def markdown_table(rows: list[dict[str, Any]], decode_ms: float) -> str:
    lines = ["| temperature | top_p | batch | candidates ms | full ranking ms | full / candidates | "
             "fallback share | nucleus tokens (median / max) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fallback = "-" if r["fallback_share"] is None else f"{r['fallback_share']:.2f}"
        lines.append(f"| {r['temperature']} | {r['top_p']} | {r['batch']} | {r['ms']['candidates']:.2f} "
                     f"| {r['ms']['full_ranking']:.2f} | {r['full_ranking_over_candidates']:.1f}x | {fallback} "
                     f"| {r['nucleus_tokens_median']:.0f} / {r['nucleus_tokens_max']} |")
    lines.append(f"\n(greedy decode step with Full, 1024-token prompt: {decode_ms:.1f} ms)")
    return "\n".join(lines)


def main(argv=None) -> int:
    import models
    from kvjax.eval.tasks import default_haystack_path

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", type=Path, default=default_haystack_path(),
                   help="text the model reads (default: ../shared/data/pride_and_prejudice.txt)")
    p.add_argument("--positions", type=positive_int, default=512, help="logits rows sampled per form and round")
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/...)")
    args = p.parse_args(argv)
    if args.text is None or not args.text.is_file():
        p.error(f"--text: file not found: {args.text or '../shared/data/pride_and_prejudice.txt'}")
    model = models.load("smollm2")
    logits = position_logits(model, args.text, args.positions)
    decode_ms = greedy_decode_ms(model, args.text)
    settings = {"model": model.name, "text": args.text.name, "positions": args.positions, "rounds": args.rounds,
                "greedy_decode_ms_per_token": decode_ms}
    rows = forms.run("sampling", args.output, settings,
                     (functools.partial(measure, logits, t, top_p, b, args.rounds)
                      for b in BATCHES for t, top_p in SETTINGS))
    print(markdown_table(rows, decode_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
