"""bench/prefix_sum.py: both forms agree, op counts and per-round ratios are what they say."""

from __future__ import annotations

import statistics

import jax.numpy as jnp

from bench.prefix_sum import compiled_ops, markdown_table, measure


def test_compiled_ops_counts_work_not_parameters_or_views():
    x = jnp.zeros((4, 8), jnp.float32)
    assert compiled_ops(lambda x: x + 1.0, x) == 1  # one fusion; the parameter and constant do not count
    assert compiled_ops(lambda x: (x + 1.0, x.sum(axis=-1)), x) == 2  # the output tuple does not count


def test_measure_pairs_rounds_and_counts_both_forms():
    row = measure((1, 2, 9), rounds=3, reps=2)
    runs = row["runs_ms"]
    assert len(runs["cumsum"]) == len(runs["associative_scan"]) == 3
    per_round = [c / s for c, s in zip(runs["cumsum"], runs["associative_scan"])]
    assert row["cumsum_over_scan"] == statistics.median(per_round)
    assert row["compiled_ops"]["associative_scan"] > 0 and row["compiled_ops"]["cumsum"] > 0
    assert markdown_table([row]).splitlines()[2].startswith("| 1x2x9 |")
