"""Prefix sums two ways: `jax.lax.associative_scan` against `jnp.cumsum`, at selection's sizes.

`kvjax.methods.base.prefix_sum` picks the scan on CPU and `jnp.cumsum` elsewhere; this
measures both sides of that choice on the backend it runs on: run time (each form summed
`--reps` times in one jitted loop, the two forms alternating within each of `--rounds`
rounds; the ratio is taken per round, then the median) and the operations in the compiled
program (on a GPU each is a kernel launch), with `bench/forms.py`.

Run from the repository root:

    .venv/bin/python -m bench.prefix_sum
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import forms
from bench.forms import time_forms
from bench.method_speed import median_ratio

# [B, heads, entries]: ClusterKV's candidates, clusters at 32k, budget slots + 1; FreeKV-sized rows.
SHAPES = ((1, 9, 58), (1, 9, 420), (1, 9, 1009), (1, 9, 4099), (1, 3, 32768))
FORMS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "associative_scan": lambda x: jax.lax.associative_scan(jnp.add, x, axis=-1),
    "cumsum": lambda x: jnp.cumsum(x, axis=-1),
}


def measure(shape: tuple[int, ...], rounds: int, reps: int) -> dict[str, Any]:
    x = jnp.asarray(np.random.default_rng(0).integers(0, 100, size=shape), jnp.int32)
    reference = np.cumsum(np.asarray(x), axis=-1)
    for fn in FORMS.values():
        np.testing.assert_array_equal(fn(x), reference)
    timed = time_forms(FORMS, (x,), rounds, reps)
    return {"shape": list(shape), **timed,
            "cumsum_over_scan": median_ratio(timed["runs_ms"]["cumsum"], timed["runs_ms"]["associative_scan"])}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    return forms.markdown_table(rows, "shape", lambda r: "x".join(map(str, r["shape"])),
                                "associative_scan", "cumsum", "cumsum_over_scan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    forms.add_timing_args(p)
    args = p.parse_args(argv)
    rows = forms.run("prefix_sum", args.output, {"rounds": args.rounds, "reps": args.reps},
                     (functools.partial(measure, shape, args.rounds, args.reps) for shape in SHAPES))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
