"""bench/method_speed.py's repeated measurements (the timed runs themselves take minutes)."""

from __future__ import annotations

import pytest

from bench import method_speed


def test_median_run_takes_the_median_of_each_timing():
    runs = [{"decode_ms_per_token": ms, "index_build_s": s, "device_kv_bytes": 7}
            for ms, s in ((30.0, 2.0), (90.0, 1.0), (40.0, 5.0))]
    res = method_speed.median_run(runs)
    assert res == {"decode_ms_per_token": 40.0, "index_build_s": 2.0, "device_kv_bytes": 7, "repeats": 3}
    assert runs[0]["decode_ms_per_token"] == 30.0  # the runs are not modified


def test_repeats_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        method_speed.main(["--repeats", "0"])
    assert exc.value.code == 2
    assert "argument --repeats: must be at least 1, got 0" in capsys.readouterr().err


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
