"""`kvjax bench compare` on committed result files (the `all` runs themselves take minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import suite
from kvjax.cli import main as kvjax_main

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
CPU = RESULTS / "method_speed-cpu-2026-11-22.json"
GPU = RESULTS / "freekv-gpu-2026-11-23.json"


def test_compare_rows_table_and_plot(tmp_path, capsys):
    rows = suite.speed_rows(CPU) + suite.speed_rows(GPU)
    for path in (CPU, GPU):
        data = json.loads(path.read_text())
        for r in data["rows"]:
            full = r["methods"]["full"]["decode_ms_per_token"]
            for method, m in r["methods"].items():
                (row,) = [x for x in rows if x["file"] == path.name and x["context"] == r["context"]
                          and x["method"] == method]
                assert row["ms_per_token"] == m["decode_ms_per_token"]
                assert row["speedup_over_full"] == pytest.approx(full / m["decode_ms_per_token"])
    png = tmp_path / "compare.png"
    assert kvjax_main(["bench", "compare", str(CPU), str(GPU), "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    assert len(table.strip().splitlines()) == len(rows) + 2  # header, rule, one line per row
    row = next(x for x in rows if x["method"] == "clusterkv_xla" and x["context"] == 32768)
    assert f"| {row['ms_per_token']:.1f} | {row['speedup_over_full']:.2f}x |" in table
    assert png.stat().st_size > 10_000


def test_compare_rejects_other_files(tmp_path, capsys):
    accuracy = RESULTS / "accuracy-cpu-2026-11-22.json"
    with pytest.raises(ValueError, match="not a speed result"):
        suite.speed_rows(accuracy)
    assert kvjax_main(["bench", "compare", str(tmp_path / "missing.json")]) == 2
    assert "result files not found" in capsys.readouterr().err


def test_compare_skips_files_that_are_not_speed_results(tmp_path, capsys):
    """What `bench/results/*cpu*.json` matches: speed results and accuracy, vs_kvpress,
    host_pool, ... results; the others are skipped with one line each."""
    others = [RESULTS / name for name in ("accuracy-cpu-2026-11-22.json", "vs_kvpress-cpu-2026-11-23.json",
                                          "host_pool-smollm2-cpu-2026-11-23.json")]
    stream = tmp_path / "stream-cpu.json"
    stream.write_text(json.dumps({"benchmark": "stream", "rows": []}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    suite_file = RESULTS / "cpu-cpu-2026-11-23.json"  # a `kvjax bench all` suite
    skipped = [*others, stream, broken]
    assert kvjax_main(["bench", "compare", str(others[0]), str(CPU), *map(str, skipped[1:]), str(suite_file)]) == 0
    out, err = capsys.readouterr()
    rows = suite.speed_rows(CPU) + suite.speed_rows(suite_file)
    assert 2 + len(rows) >= len(out.strip().splitlines()) > 2 + len(suite.speed_rows(CPU))
    notices = [line for line in err.splitlines() if line.startswith("# skipped")]
    assert len(notices) == len(skipped)
    for path, line in zip(skipped, notices):
        assert line.startswith(f"# skipped {path}: ")
    assert "benchmark='accuracy'" in notices[0] and "benchmark='stream'" in notices[3]
    assert "not a JSON file" in notices[4]
    assert not any(str(path) in err for path in (CPU, suite_file))


def test_compare_without_any_speed_result_is_an_error(capsys):
    files = [RESULTS / "accuracy-cpu-2026-11-22.json", RESULTS / "host_pool-smollm2-cpu-2026-11-23.json"]
    assert kvjax_main(["bench", "compare", *map(str, files)]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 files is a speed result" in err
    assert err.count("# skipped") == 2


def test_all_runs_the_operation_benchmarks_and_compare_leaves_them_out(tmp_path, monkeypatch):
    """Every preset measures both forms of the backend-dependent operations; in a suite file
    they sit beside the speed parts, which alone make `compare`'s rows."""
    assert all({"page_scores", "prefix_sum"} <= {name for name, _ in preset} for preset in suite.PRESETS.values())
    tiny = [("page_scores", ["--pages", "16", "--rounds", "1", "--reps", "1"]),
            ("prefix_sum", ["--rounds", "1", "--reps", "1"])]
    monkeypatch.setitem(suite.PRESETS, "tiny", tiny)
    output = suite.run_all("tiny", tmp_path / "suite.json")
    merged = json.loads(output.read_text())
    assert [part["benchmark"] for part in merged["results"]] == ["page_scores", "prefix_sum"]
    assert [r["pages"] for r in merged["results"][0]["rows"]] == [16]
    assert all(r["cumsum_over_scan"] > 0 for r in merged["results"][1]["rows"])
    assert suite.not_speed_result(output) == "a suite without decode-speed results"

    merged["results"].insert(0, json.loads(CPU.read_text()))
    with_speed = tmp_path / "with_speed.json"
    with_speed.write_text(json.dumps(merged))
    assert suite.not_speed_result(with_speed) is None
    rename = lambda rows: [{**r, "file": None} for r in rows]  # noqa: E731
    assert rename(suite.speed_rows(with_speed)) == rename(suite.speed_rows(CPU))
