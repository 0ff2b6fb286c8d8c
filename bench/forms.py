"""Two jitted forms of one operation side by side, for the backend-specific choices in
`kvjax.compat` and `pallas_kernels.compat`.

Each form is applied `reps` times in one jitted loop (its first argument shifted by the loop
counter, so nothing is hoisted; the whole result reduced, so nothing is pruned), the forms alternate within each of `rounds` rounds (this
machine has slow and fast spells: a ratio is taken per round, then the median), and the
operations of each compiled program are counted (on a GPU each one is a kernel launch).
Used by `bench/prefix_sum.py` and `bench/page_scores.py`.
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Any, Callable

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
    """A timer of `fn(*args)` applied `reps` times in one jitted loop (ms per application)."""
    def body(i, acc):
        y = fn(args[0] + i, *args[1:])  # depends on the counter: not hoisted out of the loop
        # A reduction over the whole result: with only a slice of it used, XLA sinks the
        # slice into the form and computes part of it (it did, for page scores and scans).
        return acc + y.max().astype(jnp.float32)

    run = jax.jit(lambda: jax.lax.fori_loop(0, reps, body, jnp.float32(0)))
    jax.block_until_ready(run())

    def timed() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(run())
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


def per_round_ratio(runs_ms: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of `a`'s time / `b`'s time in the same round."""
    return statistics.median(x / y for x, y in zip(runs_ms[a], runs_ms[b]))
