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
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err
