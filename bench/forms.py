"""Two jitted forms of one operation side by side, for the backend-specific choices in
`kvjax.compat` and `pallas_kernels.compat`.

Each form is applied `reps` times in one jitted loop (its arguments passed in, so nothing is
constant-folded; the first one shifted by the loop counter, so nothing is hoisted; the whole
result reduced, so nothing is pruned), the forms alternate within each of `rounds` rounds (this
machine has slow and fast spells: a ratio is taken per round, then the median), and the
operations of each compiled program are counted (on a GPU each one is a kernel launch).
Used by `bench/prefix_sum.py` and `bench/page_scores.py`.
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

# Entry-computation lines that are not work: parameters, constants, views and tuples.
NOT_WORK = re.compile(r" (parameter|constant|bitcast|get-tuple-element|tuple)\(")


def compiled_ops(fn: Callable[..., Any], *args: jax.Array) -> int:
    """Operations in the entry computation of `fn` compiled for `args` (fusions count once)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("\nENTRY"):].splitlines()[2:]
    return sum(1 for line in entry if " = " in line and not NOT_WORK.search(line))


def loop_ms(fn: Callable[..., jax.Array], args: tuple[jax.Array, ...], reps: int) -> Callable[[], float]:
    """A timer of `fn(*args)` applied `reps` times in one jitted loop (ms per application).
    The arguments are parameters of the loop, not constants XLA could fold."""
    def loop(*args):
        def body(i, acc):
            y = fn(args[0] + i, *args[1:])  # depends on the counter: not hoisted out of the loop
            # A reduction over the whole result: with only a slice of it used, XLA sinks the
            # slice into the form and computes part of it (it did, for page scores and scans).
            return acc + y.max().astype(jnp.float32)

        return jax.lax.fori_loop(0, reps, body, jnp.float32(0))

    run = jax.jit(loop)
    jax.block_until_ready(run(*args))

    def timed() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(run(*args))
        return (time.perf_counter() - t0) / reps * 1e3

    return timed


def time_forms(forms: dict[str, Callable[..., jax.Array]], args: tuple[jax.Array, ...], rounds: int,
               reps: int) -> dict[str, Any]:
    """Median ms of each form, every round's ms (`runs_ms`, round r at index r) and the
    compiled operation counts. Rounds alternate the order of the forms."""
    timers = {name: loop_ms(fn, args, reps) for name, fn in forms.items()}
    runs: dict[str, list[float]] = {name: [] for name in forms}
    for r in range(rounds):
        for name in (list(forms) if r % 2 == 0 else list(forms)[::-1]):
            runs[name].append(timers[name]())
    return {
        "ms": {name: statistics.median(v) for name, v in runs.items()},
        "runs_ms": runs,
        "compiled_ops": {name: compiled_ops(fn, *args) for name, fn in forms.items()},
    }


def add_timing_args(p: argparse.ArgumentParser) -> None:
    from kvjax.cli import positive_int

    p.add_argument("--rounds", type=positive_int, default=7)
    p.add_argument("--reps", type=positive_int, default=200, help="applications per timed loop")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/...)")


def run(benchmark: str, output: Path | None, settings: dict[str, Any],
        measurements: Iterable[Callable[[], dict[str, Any]]]) -> list[dict[str, Any]]:
    """Take each measurement (a row), writing the JSON after each one (default path:
    bench/results/<benchmark>-<backend>-<date>.json)."""
    from bench.method_speed import save_result
    from kvjax.environment import environment

    env = environment()
    date = datetime.date.today().isoformat()
    output = output or Path(__file__).resolve().parent / "results" / f"{benchmark}-{env['backend']}-{date}.json"
    rows: list[dict[str, Any]] = []
    for measurement in measurements:
        rows.append(measurement())
        save_result(output, benchmark, env, settings, rows)
    print(f"wrote {output}", file=sys.stderr)
    return rows


def markdown_table(rows: list[dict[str, Any]], label: str, label_of: Callable[[dict[str, Any]], str],
                   first: str, second: str, ratio: str) -> str:
    """Median ms, the per-round ratio `ratio` (`second` / `first`) and compiled operations."""
    lines = [f"| {label} | {first} ms | {second} ms | {second} / {first} | {first} ops | {second} ops |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {label_of(r)} | {r['ms'][first]:.4f} | {r['ms'][second]:.4f} | {r[ratio]:.2f}x "
                     f"| {r['compiled_ops'][first]} | {r['compiled_ops'][second]} |")
    return "\n".join(lines)
