"""bench/vs_kvpress.py, the parts that run in our environment: prompt dumping, merging the kvpress
worker's answers, scoring and the tables, with the worker's output as a fixture. The worker itself
runs only where its virtual environment exists (not in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import vs_kvpress as bench
from bench.accuracy import depth_for


def test_parse_cells():
    assert bench.parse_cells(["passkey:4096:10", "kv_retrieval:7168:2"]) == [("passkey", 4096, 10),
                                                                            ("kv_retrieval", 7168, 2)]
    with pytest.raises(SystemExit, match="task:length:seeds"):
        bench.parse_cells(["passkey:4096"])
    with pytest.raises(SystemExit, match="unknown task"):
        bench.parse_cells(["nope:4096:1"])


@pytest.fixture(scope="module")
def tok(tiny_lm):
    """The real SmolLM2 tokenizer, from the session's tiny model (loading it is the slow part)."""
    return tiny_lm.tokenizer


@pytest.fixture(scope="module")
def dumped(tok):
    cells = bench.parse_cells(["passkey:256:2", "kv_retrieval:256:1"])
    samples = bench.make_samples(tok, cells)
    spec = bench.dump_prompts(tok, samples, [64], bench.PRESSES, (2,), Path("/x/model.gguf"))
    return samples, spec


def test_prompts_are_our_tokens_seed_major(tok, dumped):
    from kvjax.generation import _tokenize

    samples, spec = dumped
    assert list(samples) == ["passkey/256/0", "kv_retrieval/256/0", "passkey/256/1"]
    assert [p["id"] for p in spec["prompts"]] == list(samples)
    for p in spec["prompts"]:
        s = samples[p["id"]]
        assert s.depth == depth_for(s.seed)
        _, contexts, questions = _tokenize(tok, s.context, s.question)
        assert p["context_ids"] == contexts[0] and p["question_ids"] == questions[0]
        assert len(p["context_ids"]) + len(p["question_ids"]) == s.context_tokens
    assert spec["check_ids"] == spec["prompts"][0]["context_ids"][: bench.CHECK_TOKENS]
    assert spec["budgets"] == [64] and spec["presses"] == list(bench.PRESSES) and spec["eos_token_ids"] == [2]
    json.dumps(spec)  # the worker reads it as JSON


def _ours(score_full: float, score_ckv: float) -> dict:
    run_out = {"prefill_s": 1.0, "compile_s": 2.0, "results": {
        "full": {"answer": "a", "score": score_full, "convert_s": 0.0, "decode_s": 0.2, "steps": 10},
        "clusterkv/64": {"answer": "b", "score": score_ckv, "convert_s": 0.1, "decode_s": 0.1, "steps": 10}}}
    return bench.ours_record(run_out)


def test_merge_score_and_tables(tok, dumped, tmp_path):
    samples, _ = dumped
    key = "passkey/256/0"
    right = tok.encode(" " + samples[key].answers[0], add_special_tokens=False)
    wrong = tok.encode(" 1", add_special_tokens=False)
    lines = [{"type": "environment", "kvpress": "0.5.5", "torch": "2.13.0"},
             {"type": "replay_check", "snapkv": 0.0},
             {"type": "sample", "id": key, "prefill_s": 3.0, "wall_s": 9.0, "results": {
                 "snapkv/64": {"tokens": right, "question_s": 0.1, "step_s": [0.02, 0.04], "compress_s": 0.5, "kept": 64},
                 "full": {"tokens": wrong, "question_s": 0.1, "step_s": [0.05], "compress_s": 0.0, "kept": 250}}},
             {"type": "sample", "id": "passkey/999/0", "results": {}}]  # not in this run: ignored
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"type\": \"sam")  # last line half-written
    payload = {"samples": []}
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert bench.merge_worker_output(payload, answers, samples, decode) == 1
    assert payload["kvpress_environment"]["kvpress"] == "0.5.5" and payload["replay_check"] == {"snapkv": 0.0}
    (record,) = payload["samples"]
    theirs = record["kvpress"]["results"]
    assert theirs["snapkv/64"]["score"] == 1.0 and theirs["full"]["score"] == 0.0
    assert theirs["snapkv/64"]["ms_per_step"] == pytest.approx(30.0) and theirs["snapkv/64"]["steps"] == 3
    assert bench.summary_rows(payload["samples"]) == []  # only rows both sides answered
    record["ours"] = _ours(1.0, 0.0)
    rows = bench.summary_rows(payload["samples"])
    by = {(r["side"], r["method"], r["budget"]): r for r in rows}
    assert [(r["side"], r["method"]) for r in rows] == [("ours", "full"), ("ours", "clusterkv"),
                                                         ("kvpress", "full"), ("kvpress", "snapkv")]
    assert by[("ours", "full", None)]["accuracy"] == 1.0 and by[("ours", "full", None)]["decode_ms_per_step"] == 20.0
    assert by[("kvpress", "snapkv", 64)]["accuracy"] == 1.0 and by[("kvpress", "full", None)]["prefill_s"] == 3.0
    text = bench.markdown_tables({"rows": rows})
    assert "| kvpress | SnapKV | 64 | 100 |" in text and "| kvjax | ClusterKV | 64 | 0 |" in text
    assert "| kvjax | ClusterKV | 64 | 10.0 (0.50x) |" in text
    assert "kvpress (torch) ms/step over kvjax ms/step: 256: 2.50x" in text


@pytest.mark.slow
@pytest.mark.skipif(not bench.venv_python(bench.VENV).is_file(),
                    reason="the kvpress worker runs in its own virtual environment (~1 GB, created by "
                           "`python -m bench.vs_kvpress`); not installed in CI")
def test_kvpress_worker_answers_like_our_full(smollm2, tmp_path):
    """The worker in its environment (kvpress, transformers, torch) on one real passkey prompt:
    its dense answer is our Full's, token for token (same GGUF weights, greedy), every press
    keeps exactly `budget` tokens, and replaying a press's hook on the recorded prefill equals
    kvpress's own prefill under the press."""
    import subprocess

    import kvjax
    from tests.conftest import embedded_gguf

    samples = bench.make_samples(smollm2.tokenizer, bench.parse_cells(["passkey:512:1"]))
    spec = bench.dump_prompts(smollm2.tokenizer, samples, [64], bench.PRESSES, smollm2.eos_token_ids or (),
                              embedded_gguf())
    prompts, answers = tmp_path / "prompts.json", tmp_path / "answers.jsonl"
    prompts.write_text(json.dumps(spec))
    subprocess.run([str(bench.venv_python(bench.VENV)), str(bench.WORKER), "--prompts", str(prompts),
                    "--output", str(answers), "--check-tokens", "256"], check=True, timeout=900)
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    (replay,) = [x for x in lines if x["type"] == "replay_check"]
    assert all(replay[press] == 0.0 for press in bench.PRESSES), replay
    (theirs,) = [x for x in lines if x["type"] == "sample"]
    assert all(theirs["results"][f"{press}/64"]["kept"] == 64 for press in bench.PRESSES)

    (sample,) = samples.values()
    ours = kvjax.generate(smollm2, sample.context, question=sample.question,
                          max_new_tokens=spec["prompts"][0]["max_new"])
    full = theirs["results"]["full"]["tokens"]
    assert full == ours.tokens[: len(full)], (smollm2.tokenizer.decode(full), ours.text)
    assert sample.answers[0] in ours.text  # the prompt is one a dense model answers


def test_ours_from_an_accuracy_run(dumped, tmp_path):
    samples, _ = dumped
    s = samples["passkey/256/0"]
    rec = {"task": "passkey", "length": 256, "seed": 0, "context_tokens": s.context_tokens,
           "expected": list(s.answers), "prefill_s": 1.0, "compile_s": 5.0, "results": {
               "full": {"answer": "x", "score": 1.0, "decode_s": 0.3, "steps": 3},
               "clusterkv/64": {"answer": "y", "score": 0.0, "decode_s": 0.3, "steps": 3},
               "clusterkv/128": {"answer": "z", "score": 0.0, "decode_s": 0.3, "steps": 3}}}
    other = {"settings": {"haystack": "noise sentences (kv_retrieval: its JSON object)",
                          "max_new_tokens": {"passkey": 8}},
             "samples": [rec, {**rec, "length": 999}]}  # a sample outside this grid: ignored
    path = tmp_path / "acc.json"
    path.write_text(json.dumps(other))
    got = bench.ours_from_accuracy(path, samples, [64])
    assert list(got) == ["passkey/256/0"]
    assert set(got["passkey/256/0"]["results"]) == {"full", "clusterkv/64"}  # budget 128 not in this run
    assert got["passkey/256/0"]["results"]["full"]["ms_per_step"] == pytest.approx(100.0)
    path.write_text(json.dumps({**other, "samples": [{**rec, "context_tokens": 7}]}))
    with pytest.raises(SystemExit, match="another prompt"):
        bench.ours_from_accuracy(path, samples, [64])
    assert bench.ours_from_accuracy(tmp_path / "missing.json", samples, [64]) == {}
    # A second run over the same prompt with another method adds to the first; a method both
    # ran is taken from the later file.
    second = tmp_path / "acc2.json"
    freekv = {"full": {"answer": "w", "score": 0.0, "decode_s": 0.6, "steps": 3},
              "freekv/64": {"answer": "v", "score": 1.0, "decode_s": 0.3, "steps": 3}}
    path.write_text(json.dumps(other))
    second.write_text(json.dumps({**other, "samples": [{**rec, "results": freekv}]}))
    merged = bench.ours_from_files([path, second], samples, [64])["passkey/256/0"]
    assert set(merged["results"]) == {"full", "clusterkv/64", "freekv/64"}
    assert merged["results"]["full"]["score"] == 0.0 and merged["results"]["clusterkv/64"]["answer"] == "y"
    assert merged["source"] == f"{path}, {second}"
