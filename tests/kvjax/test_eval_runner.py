"""Perplexity fidelity and the evaluation runner, on the tiny model with the SmolLM2 tokenizer."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import CacheSpec, Full, StreamingLLM, init_cache
from kvjax.eval import perplexity as ppl
from kvjax.eval import runner
from models.llama import forward

TEXT = " ".join(
    f"On day {i} the {['red', 'blue', 'green'][i % 3]} boat sailed {i * 7 % 13} miles north." for i in range(400)
)


def _dense_nll(model, tokens, context, n):
    """Reference: one causal forward over the whole sequence, NLL of tokens[context:context+n]."""
    c = model.config
    t = 512
    spec = CacheSpec(batch=1, capacity=t, num_layers=c.num_layers, num_heads=c.num_heads,
                     num_kv_heads=c.num_kv_heads, head_dim=c.head_dim)
    ids = np.zeros((1, t), np.int32)
    ids[0, : len(tokens)] = tokens
    pos = np.where(np.arange(t) < len(tokens), np.arange(t), -1)[None].astype(np.int32)
    logits, _ = jax.jit(forward, static_argnames=("method", "config"))(
        model.params, jnp.asarray(ids), jnp.asarray(pos), init_cache(Full(), spec), Full(), config=c)
    logp = jax.nn.log_softmax(np.asarray(logits)[0], axis=-1)
    targets = tokens[context : context + n]
    return -float(np.mean([logp[context - 1 + i, tok] for i, tok in enumerate(targets)]))


def test_full_perplexity_equals_a_dense_forward(tiny_lm):
    tokens = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:300]
    result = ppl.perplexity(tiny_lm, tokens, Full(), context_tokens=200, score_tokens=40)
    assert result.nll == pytest.approx(_dense_nll(tiny_lm, tokens, 200, 40), abs=1e-4)
    assert result.perplexity == pytest.approx(math.exp(result.nll))


def test_compressed_perplexity_differs_and_covering_budget_does_not(tiny_lm):
    tokens = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:300]
    full = ppl.perplexity(tiny_lm, tokens, Full(), 200, 40).nll
    covering = ppl.perplexity(tiny_lm, tokens, StreamingLLM(budget=256), 200, 40).nll
    small = ppl.perplexity(tiny_lm, tokens, StreamingLLM(budget=16), 200, 40).nll
    assert covering == pytest.approx(full, abs=1e-5)
    assert abs(small - full) > 1e-3


def test_perplexity_raises_naming_the_first_scored_token_with_nan_logits(tiny_lm):
    """Feeding a token whose embedding is NaN makes every later logit NaN: perplexity raises
    at the step that first scores from them instead of returning a NaN perplexity."""
    from tests.conftest import with_nan_embedding

    tokens = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:240]
    unused = next(t for t in range(1000, 49152) if t not in tokens)
    poisoned = with_nan_embedding(tiny_lm, unused)
    clean = ppl.perplexity(poisoned, tokens, Full(), 200, 40).nll
    assert clean == pytest.approx(ppl.perplexity(tiny_lm, tokens, Full(), 200, 40).nll, abs=1e-6)
    tokens[200 + 7] = unused  # scored at step 7, fed at step 8
    with pytest.raises(FloatingPointError, match=r"NaN or Inf logits \(sequence 0 at step 8;"):
        ppl.perplexity(poisoned, tokens, StreamingLLM(budget=64), 200, 40)


def test_perplexity_rejects_bad_arguments(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="score_tokens must be an integer >= 1, got 0"):
        ppl.perplexity(tiny_lm, [1] * 50, Full(), 20, 0)
    with pytest.raises(ValueError, match=r"score_tokens must be an integer >= 1, got 10\.5"):
        ppl.perplexity(tiny_lm, [1] * 50, Full(), 20, 10.5)
    for context_tokens in (0, -5, 20.0):  # -5 would slice off the end, 0 prefill nothing
        with pytest.raises(ValueError, match=f"context_tokens must be an integer >= 1, got {context_tokens}"):
            ppl.perplexity(tiny_lm, [1] * 50, Full(), context_tokens, 10)
    with pytest.raises(TypeError, match="method must be a kvjax Method"):
        ppl.perplexity(tiny_lm, [1] * 50, "full", 20, 10)
    with pytest.raises(TypeError, match="model must be a loaded model"):
        ppl.perplexity("smollm2", [1] * 50, Full(), 20, 10)
    with pytest.raises(ValueError, match="need 70 tokens"):
        ppl.perplexity(tiny_lm, [1] * 50, Full(), 20, 50)
    with pytest.raises(ValueError, match=r"tokens: token id 49152 at position 30 is outside the model's vocabulary \[0, 49152\)"):
        ppl.perplexity(tiny_lm, [1] * 30 + [49152] + [1] * 19, Full(), 20, 20)  # a scored token
    with pytest.raises(FileNotFoundError, match="text file not found"):
        ppl.load_text_tokens(tiny_lm, tmp_path / "missing.txt", 10)
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(ValueError, match="fewer than the 100 needed"):
        ppl.load_text_tokens(tiny_lm, short, 100)


def test_run_task_rows_summary_and_json(tiny_lm, tmp_path):
    methods = [Full(), StreamingLLM(budget=32)]
    rows = runner.run_task(tiny_lm, "passkey", [200], [0.5], [0, 1], methods, progress=False)
    assert len(rows) == 4
    assert {r["method"] for r in rows} == {"full", "streaming_llm"}
    assert all(r["score"] in (0.0, 1.0) and abs(r["context_tokens"] - 200) <= 20 for r in rows)
    summary = runner.summarize(rows)
    assert {s["method"] for s in summary} == {"full", "streaming_llm(budget=32, sink=4)"}
    for s in summary:
        label_rows = [r for r in rows if runner.method_label(r) == s["method"]]
        assert s["n"] == 2 and s["score"] == pytest.approx(np.mean([r["score"] for r in label_rows]))
    table = runner.format_table(summary)
    assert "streaming_llm(budget=32, sink=4)" in table and table.count("\n") == 3
    path = runner.write_results(tmp_path / "out" / "passkey.json", rows, task="passkey")
    payload = json.loads(path.read_text())
    assert payload["rows"] == json.loads(json.dumps(rows))
    assert payload["environment"]["backend"] == jax.default_backend()


def test_kv_retrieval_ignores_the_haystack_file(tiny_lm, tmp_path):
    novel = tmp_path / "novel.txt"
    novel.write_text(TEXT)
    rows = runner.run_task(tiny_lm, "kv_retrieval", [200], [0.5], [0], [Full()], haystack=novel, progress=False)
    assert len(rows) == 1


def test_run_task_rejects_unknown_task(tiny_lm):
    with pytest.raises(ValueError, match="task='nope' is unknown"):
        runner.run_task(tiny_lm, "nope", [200], [0.5], [0], [Full()])


@pytest.mark.parametrize("grid,match", [
    ({"seeds": 2}, "seeds must be a non-empty list"),
    ({"lengths": []}, "lengths must be a non-empty list"),
    ({"depths": "0.5"}, "depths must be a non-empty list"),
    ({"methods": Full()}, "methods must be a non-empty list"),
])
def test_run_task_refuses_a_grid_that_is_not_a_list(tiny_lm, grid, match):
    """A bare value used to fail with "not iterable"; an empty list ran nothing and returned []."""
    args = {"lengths": [200], "depths": [0.5], "seeds": [0], "methods": [Full()], **grid}
    with pytest.raises(TypeError, match=match):
        runner.run_task(tiny_lm, "passkey", **args, progress=False)


def test_run_perplexity_refuses_empty_lengths(tiny_lm, tmp_path):
    with pytest.raises(TypeError, match="lengths must be a non-empty list"):
        runner.run_perplexity(tiny_lm, tmp_path / "unused.txt", [], [Full()])


def test_numpy_grids_give_json_rows(tiny_lm, tmp_path):
    """Lengths and seeds from numpy (np.arange) run like ints and their rows write as JSON."""
    rows = runner.run_task(tiny_lm, "passkey", np.array([200]), np.array([0.5]), np.arange(1), [Full()], progress=False)
    assert (rows[0]["length"], rows[0]["depth"], rows[0]["seed"]) == (200, 0.5, 0)
    assert [type(rows[0][k]) for k in ("length", "depth", "seed")] == [int, float, int]
    plain = runner.run_task(tiny_lm, "passkey", [200], [0.5], [0], [Full()], progress=False)
    assert rows[0]["prediction"] == plain[0]["prediction"]
    runner.write_results(tmp_path / "numpy.json", rows)
