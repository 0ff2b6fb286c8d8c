"""bench/compile_cache.py: ratios are cold / warm within a round, then the median."""

from __future__ import annotations

from bench.compile_cache import markdown_table, summarize


def _run(wall, **compile_s):
    return {"wall_s": wall, "compile_s": compile_s}


def test_ratios_pair_the_runs_of_a_round():
    # Round 2 ran on a slow spell: both of its runs are 3x slower. The wall ratio per round is
    # 2, 2 and 4 (round 3's warm run was fast): median 2.0, where the ratio of the medians
    # would be 40 / 10 = 4.0.
    rounds = [
        {"cold": _run(20.0, full=8.0, clusterkv=16.0), "warm": _run(10.0, full=2.0, clusterkv=4.0)},
        {"cold": _run(60.0, full=24.0, clusterkv=48.0), "warm": _run(30.0, full=6.0, clusterkv=12.0)},
        {"cold": _run(40.0, full=16.0, clusterkv=32.0), "warm": _run(20.0, full=4.0, clusterkv=8.0)},
    ]
    rounds[2]["warm"]["wall_s"] = 10.0  # a fast warm run: this round's wall ratio is 4.0
    summary = summarize(rounds)
    assert summary["cold_over_warm"]["wall"] == 2.0
    assert summary["cold_over_warm"]["compile"] == 4.0
    assert summary["cold_over_warm"]["full"] == 4.0
    assert summary["wall_s"] == {"cold": 40.0, "warm": 10.0}
    assert summary["compile_s"]["warm"] == {"full": 4.0, "clusterkv": 8.0}
    table = markdown_table(summary)
    assert "| cold / warm | 4.00x | 4.00x | 2.00x |" in table
    assert table.splitlines()[0] == "| | full | clusterkv | wall |"


def test_the_sides_are_named_by_the_rounds():
    """`--compare threads` rounds: the ratio is one thread / side by side, named so."""
    rounds = [{"one_thread": _run(30.0, full=10.0, freekv=40.0), "side_by_side": _run(20.0, full=10.0, freekv=20.0)}]
    summary = summarize(rounds)
    assert summary["one_thread_over_side_by_side"] == {"wall": 1.5, "compile": 50.0 / 30.0, "full": 1.0, "freekv": 2.0}
    table = markdown_table(summary).splitlines()
    assert table[2] == "| compile s, one thread | 10.0 | 40.0 | 30.0 |"
    assert table[4] == "| one thread / side by side | 1.00x | 2.00x | 1.50x |"
