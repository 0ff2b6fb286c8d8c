"""`kvjax.generate` mechanics on a tiny random Llama with the real SmolLM2 tokenizer.

Greedy tokens are compared token for token between equivalent computations (prefill vs
decode, batched vs single); the `tiny_lm` fixture's peaked distributions make that robust.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kvjax import ClusterKV, Full, StreamingLLM, chat_prompt, generate
from kvjax.generation import COMPILE_COUNTS, prompt_bucket

VOCAB = 49152  # SmolLM2's, shared by the tiny model


@pytest.fixture
def tiny(tiny_lm):
    """Short name for the session's tiny model."""
    return tiny_lm


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, VOCAB, n).tolist()


def test_prompt_bucket():
    assert [prompt_bucket(n) for n in (1, 16, 17, 1000, 1024, 1025, 7500)] == [16, 16, 32, 1024, 1024, 1536, 7680]


def test_one_compile_per_bucket(tiny):
    """Prompts in the same bucket reuse the compiled prefill and decode; a new bucket compiles once."""
    before = COMPILE_COUNTS.copy()
    generate(tiny, _ids(20, 1), max_new_tokens=11)
    generate(tiny, _ids(27, 2), max_new_tokens=11)
    assert COMPILE_COUNTS["prefill"] - before["prefill"] == 1
    assert COMPILE_COUNTS["decode"] - before["decode"] == 1
    out = generate(tiny, _ids(40, 3), max_new_tokens=11)
    assert COMPILE_COUNTS["prefill"] - before["prefill"] == 2
    assert COMPILE_COUNTS["decode"] - before["decode"] == 2
    assert out.stats["compile_s"] > 0 and out.stats["prompt_bucket"] == 64
    assert out.stats["decode_steps"] == 10  # 11 tokens: the first comes from the prefill logits


def test_question_fed_token_by_token_equals_prefilling_it(tiny):
    context = _ids(50, 4)
    question = " What is the special magic number?"
    q_ids = tiny.tokenizer(question, add_special_tokens=False)["input_ids"]
    fed = generate(tiny, context, question=question, max_new_tokens=12)
    prefilled = generate(tiny, context + q_ids, max_new_tokens=12)
    assert fed.tokens == prefilled.tokens
    assert fed.stats["decode_steps"] == len(q_ids) + 11


def test_batch_equals_rows(tiny):
    contexts = [_ids(n, 10 + n) for n in (45, 12, 30)]
    batch = generate(tiny, contexts, question=["Hello there", "Why?", "Tell me more"], max_new_tokens=10)
    assert isinstance(batch.text, list) and len(batch.tokens) == 3
    for ctx, q, tokens, text in zip(contexts, ["Hello there", "Why?", "Tell me more"], batch.tokens, batch.text):
        single = generate(tiny, ctx, question=q, max_new_tokens=10)
        assert single.tokens == tokens
        assert single.text == text


def test_stops_at_eos(tiny):
    context = _ids(30, 5)
    free = generate(tiny, context, max_new_tokens=12)
    assert len(free.tokens) == 12
    eos = free.tokens[4]
    first = free.tokens.index(eos)
    with_eos = dataclasses.replace(tiny, config=dataclasses.replace(tiny.config, eos_token_ids=(eos,)))
    stopped = generate(with_eos, context, max_new_tokens=12)
    assert stopped.tokens == free.tokens[: first + 1]
    assert stopped.stats["generated_tokens"] == first + 1


def test_sampling_is_seeded(tiny):
    context = _ids(30, 6)
    a = generate(tiny, context, max_new_tokens=16, temperature=5.0, seed=1)
    b = generate(tiny, context, max_new_tokens=16, temperature=5.0, seed=1)
    c = generate(tiny, context, max_new_tokens=16, temperature=5.0, seed=2)
    greedy = generate(tiny, context, max_new_tokens=16)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert a.tokens != greedy.tokens
    # A nucleus this small keeps only the most likely token: sampling becomes greedy.
    assert generate(tiny, context, max_new_tokens=16, temperature=5.0, top_p=1e-6, seed=3).tokens == greedy.tokens


def test_streaming_llm_with_covering_budget_generates_like_full(tiny):
    context = _ids(60, 7)
    full = generate(tiny, context, question="and then", max_new_tokens=12)
    stream = generate(tiny, context, question="and then", method=StreamingLLM(budget=128, sink=4), max_new_tokens=12)
    assert stream.tokens == full.tokens


def test_stats_report_kv_bytes(tiny):
    c, item = tiny.config, 4
    full = generate(tiny, _ids(100, 8), max_new_tokens=4, method=Full())
    capacity = 128 + 64  # bucket 128 + 4 new tokens, rounded up to 64
    assert full.stats["device_kv_bytes"] == 2 * c.num_layers * c.num_kv_heads * capacity * c.head_dim * item
    assert full.stats["host_kv_bytes"] == 0
    for n in (100, 300):  # StreamingLLM holds `budget` slots whatever the context length
        s = generate(tiny, _ids(n, 9), max_new_tokens=4, method=StreamingLLM(budget=32)).stats
        assert s["device_kv_bytes"] == 2 * c.num_layers * c.num_kv_heads * 32 * c.head_dim * item + c.num_layers * 32 * 4
    assert full.stats["generated_tokens"] == len(full.tokens) == 4
    assert full.stats["tokens_per_s"] > 0 and full.stats["prefill_s"] > 0
    assert full.stats["method"] == {"method": "full"}


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be an integer >= 1"),
        ({"temperature": -1.0}, ValueError, "temperature must be a finite number >= 0, got -1.0"),
        ({"temperature": float("nan")}, ValueError, "temperature must be a finite number >= 0, got nan"),
        ({"temperature": float("inf")}, ValueError, "temperature must be a finite number >= 0, got inf"),
        ({"temperature": "1"}, ValueError, "temperature must be a finite number >= 0, got '1'"),
        ({"top_p": 0.0}, ValueError, r"top_p must be a number in \(0, 1\], got 0.0"),
        ({"top_p": float("nan")}, ValueError, "top_p must be a number in"),
        ({"seed": "x"}, ValueError, "seed must be an integer, got 'x'"),
        ({"method": "full"}, TypeError, "method must be a kvjax Method"),
        ({"method": ClusterKV(budget=1024, sink=600)}, ValueError, "sink=600 must be smaller than the cache capacity"),
        ({"max_new_tokens": 500}, ValueError, "exceeds the model's trained context of 512"),
        ({"question": ["a", "b"]}, ValueError, "2 questions for a batch of 1"),
        ({"question": [1, 2]}, TypeError, r"question must be a string or a list of strings \(one per context\), got \[1, 2\]"),
        ({"question": 7}, TypeError, "question must be a string"),
        ({"question": Full()}, TypeError, r"question got the method Full\(\): pass it by keyword, method=\.\.\."),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        generate(tiny, _ids(20, 0), **kwargs)


def test_chat_prompt_wants_strings(tiny):
    assert "Hi there" in chat_prompt(tiny.tokenizer, "Hi there", system="Be brief.")
    with pytest.raises(TypeError, match="message must be a string, got int"):
        chat_prompt(tiny.tokenizer, 5)
    with pytest.raises(TypeError, match="system must be a string, got list"):
        chat_prompt(tiny.tokenizer, "Hi", system=["Be brief."])


def test_a_model_that_is_not_loaded_is_refused_by_name():
    from kvjax import generate_many

    with pytest.raises(TypeError, match=r"model must be a loaded model \(models.load\('smollm2'\).* got 'smollm2'"):
        generate("smollm2", "Hello", max_new_tokens=2)
    with pytest.raises(TypeError, match="model must be a loaded model"):
        generate_many(None, "Hello", [Full()], max_new_tokens=2)


def test_numpy_scalars_are_valid_arguments(tiny):
    plain = generate(tiny, _ids(20, 0), max_new_tokens=3, temperature=0.5, top_p=0.9, seed=3)
    numpy = generate(tiny, _ids(20, 0), max_new_tokens=np.int64(3), temperature=np.float32(0.5),
                     top_p=np.float64(0.9), seed=np.int32(3))
    assert numpy.tokens == plain.tokens


@pytest.mark.parametrize(
    "context,error,match",
    [
        ([[1, 2], []], ValueError, "context 1 holds no tokens"),
        ("", ValueError, "context holds no tokens"),
        ([], ValueError, "context is empty"),
        ([5, -1], ValueError, r"context: token id -1 at position 1 is outside the model's vocabulary \[0, 49152\)"),
        ([[1, 2], [3, 4, 49152]], ValueError, "context 1: token id 49152 at position 2 is outside"),
        (np.array([1.0, 2.0]), TypeError, "context must be a string or a flat list of integer token ids, "
                                          r"got an array of shape \(2,\) and dtype float64"),
        ([[1, 2], 3], TypeError, r"context 1 must be a string or a flat list .* shape \(\)"),
        ([np.ones((2, 3), np.int32)], TypeError, r"shape \(2, 3\)"),
        (None, TypeError, "context must be a string, a list of strings, token ids .* got NoneType"),
        (7, TypeError, "context must be a string, .* got int"),
        ({"text": "hi"}, TypeError, "context must be a string, .* got dict"),
    ],
)
def test_bad_contexts_raise_naming_the_context(tiny, context, error, match):
    """An empty context, a non-integer one, or a token id outside the vocabulary (which the
    embedding lookup would clamp into a silent wrong answer) is refused before any compile."""
    with pytest.raises(error, match=match):
        generate(tiny, context, max_new_tokens=2)


def test_token_id_arrays_are_contexts(tiny):
    """A 1-D integer array is one context and a 2-D one a batch, like the lists they hold."""
    ids = np.asarray(_ids(20, 0), np.int32)
    assert generate(tiny, ids, max_new_tokens=3).tokens == generate(tiny, list(ids), max_new_tokens=3).tokens
    batch = np.stack([ids, ids[::-1]])
    assert generate(tiny, batch, max_new_tokens=3).tokens == generate(tiny, [list(r) for r in batch], max_new_tokens=3).tokens


@pytest.mark.parametrize("methods,error,match", [
    ([], TypeError, r"methods must be a non-empty list of kvjax Methods \(use generate for one\), got \[\]"),
    (Full(), TypeError, "methods must be a non-empty list of kvjax Methods"),
    ([Full(), "quest"], TypeError, "method must be a kvjax Method"),
    (["quest", Full()], TypeError, "method must be a kvjax Method .* got 'quest'"),
])
def test_generate_many_rejects_bad_method_lists(tiny, methods, error, match):
    from kvjax import generate_many

    with pytest.raises(error, match=match):
        generate_many(tiny, _ids(20, 0), methods, max_new_tokens=2)


def test_generate_many_shares_one_prefill_and_equals_generate(tiny, monkeypatch):
    """Methods derived from one dense prefill generate exactly what their own prefill gives;
    each derived cache is converted once (the decode loops compile before any conversion runs)."""
    from kvjax import ClusterKV, Quest, generate_many
    from kvjax import generation

    prefills, conversions = [], []
    real_prefill, real_convert = generation.prefill, generation.convert
    monkeypatch.setattr(generation, "prefill", lambda *a, **k: prefills.append(a[2]) or real_prefill(*a, **k))
    monkeypatch.setattr(generation, "convert", lambda pre, m: conversions.append(m) or real_convert(pre, m))

    contexts = [_ids(300, 1), _ids(170, 2)]
    methods = [Full(), StreamingLLM(budget=64, sink=4), Quest(budget=64, page_size=16, dense_layers=1),
               ClusterKV(budget=64, sink=8, tokens_per_cluster=16, dense_layers=1), Full()]
    shared = generate_many(tiny, contexts, methods, question=["Where?", "Who?"], max_new_tokens=12)
    assert prefills == [Full()]  # one dense prefill for five methods
    assert conversions == methods[:-1]  # the last Full decodes the dense cache itself
    for method, out in zip(methods, shared):
        alone = generate(tiny, contexts, question=["Where?", "Who?"], method=method, max_new_tokens=12)
        assert out.tokens == alone.tokens, method
        assert out.stats["device_kv_bytes"] == alone.stats["device_kv_bytes"]


def test_compiled_together_compiles_each_program_once_and_runs_like_jit():
    """Programs compiled side by side run like `jax.jit`; one asked for twice is compiled once
    (the repeat reports 0 s), one compiled before costs 0 s; a generator of requests works."""
    import jax
    import jax.numpy as jnp

    from kvjax.generation import compiled, compiled_together

    power = jax.jit(lambda x, *, n: x**n, static_argnames="n")
    x = jnp.arange(5.0)
    (square, square_s), (cube, cube_s), (again, again_s) = compiled_together(
        (power, (x,), {"n": n}) for n in (2, 3, 2))
    assert again is square and again_s == 0.0 and square_s > 0 and cube_s > 0
    np.testing.assert_array_equal(square(x), np.arange(5.0) ** 2)
    np.testing.assert_array_equal(cube(x), np.arange(5.0) ** 3)
    assert compiled(power, (x,), n=3) == (cube, 0.0)


def test_a_program_lowered_on_abstract_host_arrays_is_the_real_arrays_program():
    """`compat.abstract_outputs` of a result in host memory lowers a program that reads host
    memory (jax takes an abstract value's memory kind from a `NamedSharding` only), and the
    real array finds that executable already compiled."""
    import jax
    import jax.numpy as jnp

    from kvjax.compat import abstract_outputs, host_take_heads, to_host
    from kvjax.generation import compiled, compiled_together

    store = jax.jit(to_host).lower(jnp.zeros((2, 8, 3))).compile()
    take = jax.jit(host_take_heads)
    rows = jnp.array([[5], [1]], jnp.int32)
    [(exe, _)] = compiled_together([(take, (abstract_outputs(store), rows), {})])
    host = store(jnp.arange(48.0).reshape(2, 8, 3))
    assert host.sharding.memory_kind == "pinned_host"
    assert compiled(take, (host, rows)) == (exe, 0.0)
    np.testing.assert_array_equal(exe(host, rows), np.arange(48.0).reshape(2, 8, 3)[[[0], [1]], [[5], [1]]])


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_compile_thread_count_names_the_variable(monkeypatch, value):
    from kvjax.generation import COMPILE_THREADS_ENV, compile_threads

    monkeypatch.setenv(COMPILE_THREADS_ENV, value)
    with pytest.raises(ValueError, match=f"KVJAX_COMPILE_THREADS must be an integer >= 1, got '{value}'"):
        compile_threads()
    monkeypatch.setenv(COMPILE_THREADS_ENV, " 3 ")
    assert compile_threads() == 3


@pytest.mark.parametrize("method_name", ["full", "streaming_llm", "quest", "clusterkv", "freekv"])
def test_nan_logits_raise_naming_the_sequence_and_step(tiny, method_name):
    """A NaN key/value from the 3rd question token on: generate raises at that step for that
    sequence (greedy tokens from NaN logits would be a silent wrong answer); the other
    sequence and a clean run are unaffected."""
    from kvjax.methods import make_method
    from tests.conftest import with_nan_embedding

    method = make_method(method_name, **{
        "full": {}, "streaming_llm": {"budget": 32}, "quest": {"budget": 32, "page_size": 8},
        "clusterkv": {"budget": 32, "sink": 4, "tokens_per_cluster": 8}, "freekv": {"budget": 48, "sink": 8,
                                                                                   "recent": 16, "page_size": 8},
    }[method_name])
    question = " What is the special magic number?"
    q_ids = tiny.tokenizer(question, add_special_tokens=False)["input_ids"]
    contexts = [[t for t in _ids(60, 40 + i) if t != q_ids[2]] for i in range(2)]
    poisoned = with_nan_embedding(tiny, q_ids[2])
    clean = generate(poisoned, contexts, question=" Hello", max_new_tokens=3, method=method)
    assert clean.tokens == generate(tiny, contexts, question=" Hello", max_new_tokens=3, method=method).tokens
    with pytest.raises(FloatingPointError, match=r"NaN or Inf logits \(sequence 1 at step 3;"):
        generate(poisoned, contexts, question=[" Hello", question], max_new_tokens=3, method=method)
