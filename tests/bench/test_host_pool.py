"""bench/host_pool.py: the three host-pool copies agree and the JSON has one row per way."""

from __future__ import annotations

import json

from bench import host_pool


def test_host_pool_bench_writes_a_row_per_layout(tmp_path):
    out = tmp_path / "hp.json"
    assert host_pool.main(["--blocks", "3", "--repeats", "1", "--dtype", "bfloat16", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["layout"] for r in rows} == {"pinned_per_block", "pinned_host_gather", "numpy",
                                          "pinned_per_block_16bit_floats"}
    assert all(r["blocks"] == 3 and r["us_per_call"] > 0 for r in rows)
    assert next(r for r in rows if r["layout"] == "pinned_per_block")["vs_pinned_per_block"] == 1.0
