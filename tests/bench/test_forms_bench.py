"""bench/forms.py and its two users (bench/prefix_sum.py, bench/page_scores.py): the forms
agree, operation counts and per-round ratios are what they say."""

from __future__ import annotations

import statistics

import jax.numpy as jnp
import pytest

from bench import page_scores, prefix_sum
from bench.forms import compiled_ops


def test_compiled_ops_counts_work_not_parameters_or_views():
    x = jnp.zeros((4, 8), jnp.float32)
    assert compiled_ops(lambda x: x + 1.0, x) == 1  # one fusion; the parameter and constant do not count
    assert compiled_ops(lambda x: (x + 1.0, x.sum(axis=-1)), x) == 2  # the output tuple does not count
    assert compiled_ops(lambda x, y: x @ y, x, x.T) == 1  # several arguments


@pytest.mark.parametrize("bench,size,ratio,first,second,label", [
    (prefix_sum, (1, 2, 9), "cumsum_over_scan", "cumsum", "associative_scan", "| 1x2x9 |"),
    (page_scores, 24, "reference_over_matmul", "reference", "matmul", "| 24 |"),
])
def test_measure_pairs_rounds_and_counts_both_forms(bench, size, ratio, first, second, label):
    row = bench.measure(size, rounds=3, reps=2)
    runs = row["runs_ms"]
    assert len(runs[first]) == len(runs[second]) == 3
    assert row[ratio] == statistics.median(a / b for a, b in zip(runs[first], runs[second]))
    assert row["ms"][first] == statistics.median(runs[first])
    assert row["compiled_ops"][first] > 0 and row["compiled_ops"][second] > 0
    assert bench.markdown_table([row]).splitlines()[2].startswith(label)


def test_page_scores_main_writes_the_shape_it_measured(tmp_path):
    import json

    out = tmp_path / "page_scores.json"
    assert page_scores.main(["--shape", "llama3-8b", "--pages", "16", "--rounds", "1", "--reps", "1",
                             "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["shape"] == "llama3-8b"
    assert [r["pages"] for r in result["rows"]] == [16]
    assert result["rows"][0]["shape"] == {"query_heads": 32, "kv_heads": 8, "head_dim": 128}
