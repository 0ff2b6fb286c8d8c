"""Quest's page bound two ways: the element-wise reduction against two matrix products.

`pallas_kernels.page_scores` (impl "xla") computes `sum_d max(q[d] * min[d], q[d] * max[d])`
as `max(q, 0) . max + min(q, 0) . min` (`page_scores_matmul`) on CPU and with the
reference's element-wise reduction elsewhere (`pallas_kernels.compat.page_bounds_as_matmuls`);
this measures both sides of that choice on the backend it runs on, at the page counts of
Quest (pages of 16) and FreeKV (pages of 32) at 4k-32k tokens on the SmolLM2 shape (9 query
heads over 3 KV heads of 64 dimensions; `--shape llama3-8b`: 32 over 8 of 128): run time in
alternating rounds and the operations in the compiled program (`bench/forms.py`).

Run from the repository root:

    .venv/bin/python -m bench.page_scores
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from bench import forms
from bench.forms import time_forms
from bench.method_speed import median_ratio
from kvjax.cli import positive_int

PAGES = (128, 256, 512, 1024, 2048)  # 4k / 32, ..., 32k / 16
# (query heads, KV heads, head dimension) of the model shapes of bench/method_speed.py.
HEADS = {"smollm2": (9, 3, 64), "llama3-8b": (32, 8, 128)}
FORMS = {"reference": pk.page_scores_reference, "matmul": pk.page_scores_matmul}


def measure(pages: int, rounds: int, reps: int, shape: str = "smollm2") -> dict[str, Any]:
    query_heads, kv_heads, head_dim = HEADS[shape]
    rng = np.random.default_rng(pages)
    lo = rng.standard_normal((1, kv_heads, pages, head_dim)).astype(np.float32)
    args = tuple(jnp.asarray(a) for a in (
        rng.standard_normal((1, query_heads, head_dim)).astype(np.float32),
        lo, lo + np.abs(rng.standard_normal(lo.shape)).astype(np.float32),
        rng.random((1, kv_heads, pages)) < 0.9,
    ))
    want = np.asarray(FORMS["reference"](*args))
    np.testing.assert_allclose(np.asarray(FORMS["matmul"](*args)), want, rtol=1e-5, atol=1e-4)
    timed = time_forms(FORMS, args, rounds, reps)
    return {"pages": pages, "shape": {"query_heads": query_heads, "kv_heads": kv_heads, "head_dim": head_dim},
            **timed, "reference_over_matmul": median_ratio(timed["runs_ms"]["reference"], timed["runs_ms"]["matmul"])}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    return forms.markdown_table(rows, "pages", lambda r: str(r["pages"]), "matmul", "reference",
                                "reference_over_matmul")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pages", type=positive_int, nargs="+", default=list(PAGES))
    p.add_argument("--shape", choices=sorted(HEADS), default="smollm2", help="query heads, KV heads and head size")
    forms.add_timing_args(p)
    args = p.parse_args(argv)
    rows = forms.run("page_scores", args.output, {"shape": args.shape, "rounds": args.rounds, "reps": args.reps},
                     (functools.partial(measure, pages, args.rounds, args.reps, args.shape) for pages in args.pages))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
