"""bench/freekv.py's ratios and argument check (the timed runs themselves take minutes)."""

from __future__ import annotations

import pytest

from bench import freekv


def _runs(**ms_and_bytes):
    return {name: [{"decode_ms_per_token": ms, "device_kv_bytes": kv} for ms, kv in rounds]
            for name, rounds in ms_and_bytes.items()}


def test_ratios_pair_the_variants_round_by_round():
    runs = _runs(
        full=[(50.0, 1000), (100.0, 1000), (60.0, 1000)],
        freekv_device=[(40.0, 900), (80.0, 900), (40.0, 900)],
        freekv_offload=[(44.0, 100), (96.0, 100), (50.0, 100)],
        freekv_sync_offload=[(33.0, 90), (96.0, 90), (40.0, 90)],
    )
    r = freekv.ratios(runs)
    assert r["offload_over_device"] == pytest.approx(1.2)  # 1.1, 1.2, 1.25
    assert r["sync_offload_over_offload"] == pytest.approx(0.8)  # 0.75, 1.0, 0.8
    assert r["full_over_offload"] == pytest.approx(50 / 44)  # 1.136, 1.042, 1.2
    assert r["full_device_kv_over_offload"] == 10.0


def test_ratios_of_variants_not_run_are_none():
    r = freekv.ratios(_runs(full=[(50.0, 1000)], freekv_offload=[(44.0, 100)]))
    assert r["offload_over_device"] is None and r["sync_offload_over_offload"] is None
    assert r["full_device_kv_over_offload"] == 10.0


def test_contexts_must_exceed_the_budget(capsys):
    with pytest.raises(SystemExit) as exc:
        freekv.main(["--contexts", "1024", "--budget", "1024"])
    assert exc.value.code == 2
    assert "--contexts must exceed --budget 1024" in capsys.readouterr().err
