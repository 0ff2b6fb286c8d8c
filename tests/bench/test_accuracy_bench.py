"""bench/accuracy.py on the tiny random model (schema, invalid budgets, resume, report), and the
real SmolLM2 answering a short passkey through the benchmark's shared-prefill path."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench import accuracy as bench
from kvjax.eval import perplexity as ppl
from kvjax.methods import ClusterKV, Full, Quest, StreamingLLM

TEXT = " ".join(
    f"On day {i} the {['red', 'blue', 'green'][i % 3]} boat sailed {i * 7 % 13} miles north." for i in range(300)
)


def _args(tmp_path, *extra: str):
    text = tmp_path / "novel.txt"
    text.write_text(TEXT)
    return bench.parse_args([
        "--tasks", "passkey", "kv_retrieval", "--lengths", "256", "--budgets", "16", "64",
        "--seeds", "2", "--ppl-lengths", "200", "--ppl-budgets", "64", "--ppl-positions", "12",
        "--ppl-text", str(text), "--output", str(tmp_path / "acc.json"), *extra,
    ])


@pytest.fixture(scope="module")
def tiny_run(tiny_lm, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("acc")
    args = _args(tmp_path)
    payload = bench.run(args, model=tiny_lm)
    return tmp_path, args, payload


def test_json_schema_and_invalid_budgets(tiny_run):
    tmp_path, args, payload = tiny_run
    saved = json.loads(args.output.read_text())
    assert saved["status"] == "complete" and saved["benchmark"] == "accuracy"
    assert {"environment", "settings", "wall_s", "runs", "samples", "accuracy", "perplexity", "invalid"} <= set(saved)
    assert saved["environment"]["backend"] and saved["runs"][0]["argv"] == args.argv
    # Quest needs budget >= 2 * page_size (32) and ClusterKV budget > sink (16): recorded, not run.
    invalid = {(e["length"], e["method"]): e["reason"] for e in saved["invalid"]}
    assert set(invalid) == {(256, "quest/16"), (256, "clusterkv/16")}
    assert "budget" in invalid[(256, "quest/16")] and "budget" in invalid[(256, "clusterkv/16")]
    assert "budget must be" in saved["settings"]["methods"]["quest/16"]["invalid"]
    assert saved["settings"]["methods"]["quest/64"] == {"method": "quest", **dataclasses.asdict(Quest(budget=64))}
    runs = ["full", "streaming_llm/16", "streaming_llm/64", "quest/64", "clusterkv/64"]
    assert len(saved["samples"]) == 4  # 2 tasks x 2 seeds
    for s in saved["samples"]:
        assert list(s["results"]) == runs
        assert s["depth"] == bench.depth_for(s["seed"]) and abs(s["context_tokens"] - 256) <= 8
        assert s["expected"] and all(isinstance(r["answer"], str) and r["score"] in (0.0, 1.0)
                                     for r in s["results"].values())
    assert {(s["task"], s["seed"]) for s in saved["samples"]} == {(t, k) for t in ("passkey", "kv_retrieval") for k in (0, 1)}
    # Aggregation matches the samples.
    for row in saved["accuracy"]:
        key = bench.label(row["method"], row["budget"])
        scores = [s["results"][key]["score"] for s in saved["samples"] if s["task"] == row["task"]]
        assert row["total"] == 2 and row["correct"] == sum(x == 1.0 for x in scores)
        assert row["accuracy"] == pytest.approx(sum(scores) / 2)
        same = [s["results"][key]["answer"].strip() == s["results"]["full"]["answer"].strip()
                for s in saved["samples"] if s["task"] == row["task"]]
        assert (row["same_as_full"], row["compared_with_full"]) == (sum(same), 2)
    assert len(saved["accuracy"]) == 2 * len(runs)


def test_perplexity_matches_the_library_per_method(tiny_run, tiny_lm):
    """One shared dense prefill + convert gives each method's own perplexity."""
    tmp_path, args, payload = tiny_run
    rows = {r["method"]: r for r in payload["perplexity"]}
    assert set(rows) == {"full", "streaming_llm/64", "quest/64", "clusterkv/64"}
    tokens = ppl.load_text_tokens(tiny_lm, args.ppl_text, 212)
    for key, method in [("full", Full()), ("streaming_llm/64", StreamingLLM(budget=64)),
                        ("quest/64", Quest(budget=64)), ("clusterkv/64", ClusterKV(budget=64))]:
        ref = ppl.perplexity(tiny_lm, tokens, method, 200, 12)
        assert rows[key]["nll"] == pytest.approx(ref.nll, abs=2e-4), key
    assert rows["full"]["ppl_ratio_vs_full"] == 1.0
    assert abs(rows["streaming_llm/64"]["delta_nll_vs_full"]) > 1e-3  # 64 of 200 tokens: not exact


def test_resume_skips_done_samples_and_adds_new_ones(tiny_run, tiny_lm, monkeypatch):
    tmp_path, args, _ = tiny_run
    calls = []
    real = bench.run_sample
    monkeypatch.setattr(bench, "run_sample", lambda *a, **k: calls.append(a[1].seed) or real(*a, **k))
    payload = bench.run(_args(tmp_path, "--resume", "--seeds", "3", "--tasks", "passkey", "kv_retrieval"),
                        model=tiny_lm)
    assert calls == [2, 2]  # only seed 2 of each task
    assert len(payload["samples"]) == 6 and len(payload["runs"]) == 2
    assert {r["total"] for r in payload["accuracy"]} == {3}
    with pytest.raises(SystemExit, match="other settings"):
        bench.run(_args(tmp_path, "--resume", "--ppl-positions", "8"), model=tiny_lm)


def test_report_table_and_plot(tiny_run, capsys):
    tmp_path, args, _ = tiny_run
    png = tmp_path / "acc.png"
    assert bench.main(["--report", str(args.output), "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    assert "| task | length | method | 16 | 64 |" in table
    assert "| passkey | 256 | Quest | n/a |" in table and "| kv_retrieval | 256 | ClusterKV | n/a |" in table
    assert "Perplexity fidelity" in table and "| 200 | Full |" in table
    pytest.importorskip("matplotlib")
    assert png.stat().st_size > 1000


def test_same_as_full_table_where_full_scores_zero():
    sample = lambda seed, full, ckv: {"task": "niah_multikey", "length": 4096, "seed": seed, "results": {
        "full": {"answer": full, "score": 0.0}, "clusterkv/256": {"answer": ckv, "score": 0.0}}}
    samples = [sample(0, " 123.", "123. "), sample(1, " 456.", " 789."), sample(2, " 1.", " 1.\n")]
    payload = {"samples": samples, "settings": {"tasks": ["niah_multikey"]}}
    (ckv,) = [r for r in bench.accuracy_table(samples) if r["method"] == "clusterkv"]
    assert (ckv["same_as_full"], ckv["compared_with_full"]) == (2, 3)
    table = bench.markdown_tables(payload)
    assert "Full scores 0" in table and "| niah_multikey | 4096 | ClusterKV | 67 |" in table


def test_method_names_build_their_methods():
    assert bench.build_method("clusterkv", 256) == ClusterKV(budget=256)
    assert bench.build_method("clusterkv_kv_head", 256) == ClusterKV(budget=256, selection="kv_head")
    assert bench.build_method("freekv_tau09", 256).tau == 0.9
    with pytest.raises(ValueError, match="unknown method"):
        bench.method_grid(["clusterkv_kvhead"], [256])


def test_depths_spread_over_the_context():
    depths = [bench.depth_for(s) for s in range(10)]
    assert depths[0] == 0.5 and len(set(depths)) == 10 and all(0.05 <= d <= 0.95 for d in depths)
    assert sum(d < 0.35 for d in depths) >= 3 and sum(d > 0.65 for d in depths) >= 3


@pytest.mark.slow
def test_real_model_full_answers_a_short_passkey(smollm2, tmp_path):
    args = bench.parse_args(["--tasks", "passkey", "--lengths", "512", "--methods", "full", "--seeds", "2",
                             "--ppl-lengths", "--output", str(tmp_path / "real.json")])
    payload = bench.run(args, model=smollm2)
    assert [s["results"]["full"]["score"] for s in payload["samples"]] == [1.0, 1.0], payload["samples"]
