"""bench/sampling.py on random logits: both forms timed per round and agreeing, the fallback
share and nucleus sizes what the logits imply."""

from __future__ import annotations

import statistics

import numpy as np

from bench import sampling
from kvjax.generation import SAMPLE_CANDIDATES


def test_nucleus_sizes_count_the_smallest_prefix_reaching_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    np.testing.assert_array_equal(sampling.nucleus_sizes(logits, 1.0, 0.5), [1, 1])
    np.testing.assert_array_equal(sampling.nucleus_sizes(logits, 1.0, 0.75), [2, 2])  # 0.5 < 0.75 <= 0.8
    np.testing.assert_array_equal(sampling.nucleus_sizes(logits, 1.0, 0.85), [3, 3])
    np.testing.assert_array_equal(sampling.nucleus_sizes(logits, 1.0, 1.0), [4, 4])


def test_measure_times_both_forms_and_reports_the_fallback_share():
    vocab = 2 * SAMPLE_CANDIDATES  # both paths: peaked rows fit the candidates, flat ones do not
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, vocab)).astype(np.float32)
    logits[::2] *= 30.0  # rows 0, 2, 4: a nucleus of a few tokens
    row = sampling.measure(logits, 1.0, 0.9, batch=2, rounds=3)  # asserts the forms draw the same tokens
    runs = row["runs_ms"]
    assert len(runs["candidates"]) == len(runs["full_ranking"]) == 3
    assert row["full_ranking_over_candidates"] == statistics.median(
        f / c for f, c in zip(runs["full_ranking"], runs["candidates"]))
    assert row["steps"] == 3 and row["fallback_share"] == 1.0  # every step holds one flat row
    sizes = sampling.nucleus_sizes(logits, 1.0, 0.9)
    assert row["nucleus_tokens_max"] == sizes.max() > SAMPLE_CANDIDATES
    peaked = sampling.measure(logits[::2], 1.0, 0.9, batch=1, rounds=1)
    assert peaked["fallback_share"] == 0.0
    assert "| 1.0 | 0.9 | 2 |" in sampling.markdown_table([row, peaked], 40.0)
