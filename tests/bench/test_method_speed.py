"""bench/method_speed.py's repeated measurements (the timed runs themselves take minutes)."""

from __future__ import annotations

import pytest

from bench import method_speed


def test_median_run_takes_the_median_of_each_timing():
    runs = [{"decode_ms_per_token": ms, "index_build_s": s, "device_kv_bytes": 7}
            for ms, s in ((30.0, 2.0), (90.0, 1.0), (40.0, 5.0))]
    res = method_speed.median_run(runs)
    assert res == {"decode_ms_per_token": 40.0, "index_build_s": 2.0, "device_kv_bytes": 7, "repeats": 3,
                   "decode_ms_per_token_runs": [30.0, 90.0, 40.0]}
    assert runs[0]["decode_ms_per_token"] == 30.0  # the runs are not modified


def test_record_runs_keeps_the_median_run_saves_and_logs_the_latest(capsys):
    row, saves = {"context": 4096, "methods": {}}, []
    done = method_speed.record_runs(row, lambda: saves.append(dict(row["methods"])),
                                    lambda res: f"{res['decode_ms_per_token']:.1f} ms/token")
    runs = [{"decode_ms_per_token": ms, "index_build_s": 0.0} for ms in (50.0, 10.0, 30.0)]
    for n in range(1, 4):
        done("quest", runs[:n])
    assert row["methods"]["quest"] == method_speed.median_run(runs)
    assert [s["quest"]["decode_ms_per_token"] for s in saves] == [50.0, 30.0, 30.0]
    assert capsys.readouterr().err.splitlines() == [
        f"  4096                quest: {ms} ms/token" for ms in ("50.0", "10.0", "30.0")]


def test_interleaved_runs_time_every_method_once_per_round_in_rotated_order():
    calls, done = [], []

    def measure(name):
        calls.append(name)
        return {"decode_ms_per_token": float(len(calls))}

    runs = method_speed.interleaved_runs(["a", "b", "c"], measure, 3, lambda n, rs: done.append((n, len(rs))))
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert done == [("a", 1), ("b", 1), ("c", 1), ("b", 2), ("c", 2), ("a", 2), ("c", 3), ("a", 3), ("b", 3)]
    assert {n: [r["decode_ms_per_token"] for r in rs] for n, rs in runs.items()} == {
        "a": [1.0, 6.0, 8.0], "b": [2.0, 4.0, 9.0], "c": [3.0, 5.0, 7.0]}


def test_dense_prefill_is_timed_right_after_each_clusterkv_run():
    """The clustering share pairs each index build with a dense prefill of the same round."""
    calls = []

    def measure(name):
        calls.append(name)
        return {"decode_ms_per_token": 1.0, "index_build_s": float(len(calls))}

    def prefill():
        calls.append("prefill")
        return 10.0 * len(calls)

    runs = method_speed.interleaved_runs(["full", "clusterkv_xla"],
                                         method_speed.with_dense_prefill(measure, "clusterkv_xla", prefill), 2)
    assert calls == ["full", "clusterkv_xla", "prefill", "clusterkv_xla", "prefill", "full"]
    assert [(r["index_build_s"], r["dense_prefill_s"]) for r in runs["clusterkv_xla"]] == [(2.0, 30.0), (4.0, 50.0)]
    assert "dense_prefill_s" not in runs["full"][0]
    assert method_speed.median_run(runs["clusterkv_xla"])["dense_prefill_s"] == 40.0


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # Round 2 ran in a slow spell for both: the ratio of medians (20 / 20) would hide that
    # `a` takes twice as long as `b` in every other round.
    ms = lambda *xs: [{"decode_ms_per_token": x, "device_kv_bytes": 4 * x} for x in xs]
    runs = {"a": ms(10.0, 60.0, 40.0, 20.0), "b": ms(5.0, 60.0, 20.0, 10.0)}
    assert method_speed.paired_ratio(runs, "a", "b") == 2.0
    assert method_speed.paired_ratio(runs, "b", "a") == 0.5
    assert method_speed.paired_ratio(runs, "a", "b", key="device_kv_bytes") == 2.0
    assert method_speed.paired_ratio(runs, "a", "missing") is None


def test_table_ratios_come_from_the_paired_ratios():
    row = {"context": 4096, "methods": {n: {"decode_ms_per_token": 10.0} for n in ("full", "streaming_llm", "clusterkv_xla")},
           "paired_ratios": {"full_over_clusterkv": 3.0, "clusterkv_over_streaming_llm": 1.25},
           "clustering_share_of_prefill": 0.072}
    last = method_speed.markdown_table([row]).splitlines()[-1]
    assert last == "| 4096 | 10.0 | 10.0 | 10.0 | 3.00x | 1.25x | 7.2% |"


@pytest.mark.parametrize("flag", ["--repeats", "--steps", "--budget", "--contexts"])
def test_counts_must_be_positive(capsys, flag):
    with pytest.raises(SystemExit) as exc:
        method_speed.main([flag, "0"])
    assert exc.value.code == 2
    assert f"argument {flag}: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_warm_up_decodes_a_copy_and_leaves_the_prefill_to_the_timed_run(tiny_lm):
    import jax
    import numpy as np

    from kvjax import Full, StreamingLLM
    from kvjax.generation import _decode_from

    pre = method_speed.random_prefill(tiny_lm, context=40, extra=4, seed=0)
    before = [np.asarray(x) for x in jax.tree.leaves(pre.cache)]
    copy = method_speed.copy_prefill(pre)
    _decode_from(tiny_lm, copy, Full(), [[0] * 40], [[]], False, 3, 0.0, 1.0, 0)  # donates copy's cache
    assert all(x.is_deleted() for x in jax.tree.leaves(copy.cache))
    after = jax.tree.leaves(pre.cache)
    assert not any(x.is_deleted() for x in after)
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(b, np.asarray(a))

    for method in (Full(), StreamingLLM(budget=16, sink=2)):
        res = method_speed.time_decode(tiny_lm, method, 40, 3, seed=0)
        # 3 tokens: the first from the prefill's logits, then 2 decode steps.
        assert res["decode_steps"] == 2 and res["decode_ms_per_token"] > 0
