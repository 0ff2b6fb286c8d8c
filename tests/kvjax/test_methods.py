"""Attention primitives and the two foundation methods against straightforward numpy references.

The methods are driven directly through the method interface (no model): random post-RoPE
q/k/v for a prompt, then decode steps, and every output is compared with dense softmax
attention over exactly the tokens the method is specified to keep.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import CacheSpec, ClusterKV, FreeKV, Full, Quest, StreamingLLM, init_cache
from kvjax.attention import causal_attention, decode_attention
from kvjax.methods import make_method
from tests.kvjax.method_harness import (
    HKV, HQ, TOL, D, check_prefill, check_steps, np_attention, random_stream, run_method, spec,
)

def _kept_by_streaming(method: StreamingLLM, current: int) -> np.ndarray:
    """Positions 0..current that StreamingLLM attends at `current`: sinks + the last window."""
    pos = np.arange(current + 1)
    return (pos < method.sink) | (pos > current - method.window)


# --- attention primitives -------------------------------------------------------------------


@pytest.mark.parametrize("mask_rank", ["token", "kv_head", "q_head"])
def test_decode_attention_matches_reference_with_masks(mask_rank):
    rng = np.random.default_rng(1)
    b, s = 2, 37
    q = rng.standard_normal((b, HQ, D)).astype(np.float32)
    k = rng.standard_normal((b, HKV, s, D)).astype(np.float32)
    v = rng.standard_normal((b, HKV, s, D)).astype(np.float32)
    heads = {"token": 1, "kv_head": HKV, "q_head": HQ}[mask_rank]
    valid = rng.random((b, heads, s)) < 0.5
    valid[..., 0] = True
    arg = valid[:, 0] if mask_rank == "token" else valid
    out = np.asarray(decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(arg)))
    g = HQ // HKV
    for i in range(b):
        for h in range(HQ):
            keep = valid[i, {"token": 0, "kv_head": h // g, "q_head": h}[mask_rank]]
            np.testing.assert_allclose(out[i, h], np_attention(q[i, h], k[i, h // g], v[i, h // g], keep),
                                       atol=TOL, rtol=0)


def test_decode_attention_fully_masked_row_is_finite():
    q = jnp.ones((1, HQ, D))
    k = v = jnp.ones((1, HKV, 5, D))
    out = decode_attention(q, k, v, jnp.zeros((1, 5), bool))
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("t", [40, 1024])
def test_causal_attention_matches_reference(t):
    """Short prompts take the one-block path, long ones the blocked online-softmax path."""
    rng = np.random.default_rng(t)
    q, k, v = random_stream(rng, 2, t)
    lengths = np.array([t, t // 2 + 3])
    out = np.asarray(causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths)))
    g = HQ // HKV
    for b, n in enumerate(lengths):
        for tq in rng.choice(n, size=12, replace=False):
            for h in range(HQ):
                keep = np.arange(t) <= tq
                np.testing.assert_allclose(out[b, tq, h], np_attention(q[b, tq, h], k[b, :, h // g], v[b, :, h // g], keep),
                                           atol=TOL, rtol=0)
    assert np.isfinite(out).all()  # padded rows included


# --- Full and StreamingLLM ------------------------------------------------------------------


def test_full_prefill_and_decode_match_dense_reference():
    lengths = [13, 20, 7]
    out, steps, q, k, v = run_method(Full(), lengths, decode_steps=6, seed=2)
    check_prefill(out, q, k, v, lengths)
    check_steps(steps, q, k, v, lambda c: np.ones(c + 1, bool))


@pytest.mark.parametrize(
    "budget,sink,lengths",
    [
        (12, 4, [30, 11, 5, 2]),  # longer than the budget, shorter, shorter than the sink
        (9, 0, [17, 9]),  # no sinks, exactly the budget
        (16, 4, [16, 1]),
    ],
)
def test_streaming_llm_keeps_sinks_and_recent_window(budget, sink, lengths):
    method = StreamingLLM(budget=budget, sink=sink)
    out, steps, q, k, v = run_method(method, lengths, decode_steps=2 * budget, seed=budget + sink)
    check_prefill(out, q, k, v, lengths)  # the prompt itself is attended densely
    check_steps(steps, q, k, v, lambda c: _kept_by_streaming(method, c))


def test_streaming_llm_device_memory_is_the_budget():
    method = StreamingLLM(budget=64, sink=4)
    layer = init_cache(method, spec(2, 10_000)).layers[0]
    assert layer.k.shape == (2, HKV, 64, D)


def test_streaming_llm_covering_budget_equals_full():
    lengths = [25, 18]
    steps = 10
    budget = max(lengths) + steps
    _, full_steps, *_ = run_method(Full(), lengths, steps, seed=5)
    _, stream_steps, *_ = run_method(StreamingLLM(budget=budget, sink=4), lengths, steps, seed=5)
    for (a, _), (b, _) in zip(full_steps, stream_steps):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"budget": 4, "sink": 4}, "budget must be an integer >= 5"),
        ({"budget": 0}, "budget"),
        ({"budget": 64, "sink": -1}, "sink must be an integer >= 0"),
        ({"budget": 64.0}, "budget"),
    ],
)
def test_streaming_llm_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamingLLM(**kwargs)  # on construction, before any cache exists


def test_make_method_builds_and_rejects():
    assert make_method("streaming-llm", budget=128, sink=None) == StreamingLLM(budget=128)
    assert make_method("full") == Full()
    with pytest.raises(ValueError, match="method='nope' is unknown"):
        make_method("nope")
    with pytest.raises(ValueError, match="not \\['window'\\]"):
        make_method("streaming_llm", window=3)
    with pytest.raises(ValueError, match="budget must be an integer >= 5, got 3"):
        make_method("streaming_llm", budget=3)


def test_methods_are_hashable_static_arguments():
    """Methods are jit static arguments: equal hyperparameters must hash equal."""
    assert hash(StreamingLLM(budget=32)) == hash(StreamingLLM(budget=32))
    assert StreamingLLM(budget=32) != StreamingLLM(budget=33)
    assert StreamingLLM(budget=32).describe() == {"method": "streaming_llm", "budget": 32, "sink": 4}


def test_numpy_hyperparameters_become_python_numbers():
    """Hyperparameters computed with numpy are taken as the numbers they hold: the method
    equals and hashes like the literal one, and describes itself as plain JSON."""
    import json

    from kvjax import LiveVLM

    for numpy_made, literal in [
        (StreamingLLM(budget=np.int64(32), sink=np.int32(2)), StreamingLLM(budget=32, sink=2)),
        (ClusterKV(budget=np.arange(256, 257)[0]), ClusterKV(budget=256)),
        (FreeKV(tau=np.float32(0.5)), FreeKV(tau=0.5)),
        (LiveVLM(short_frames=np.int64(4)), LiveVLM(short_frames=4)),
    ]:
        assert numpy_made == literal and hash(numpy_made) == hash(literal)
        assert json.loads(json.dumps(numpy_made.describe())) == literal.describe()
    with pytest.raises(ValueError, match="budget must be an integer >= 5, got 3"):
        StreamingLLM(budget=np.int64(3))
    with pytest.raises(ValueError, match="budget must be an integer >= 17"):
        ClusterKV(budget=np.bool_(True))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"batch": 0}, ValueError, r"CacheSpec.batch must be an integer >= 1, got 0"),
    ({"head_dim": 8.0}, ValueError, r"CacheSpec.head_dim must be an integer >= 1, got 8.0"),
    ({"num_heads": 4, "num_kv_heads": 3}, ValueError, r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
    ({"prompt_capacity": 40}, ValueError, r"prompt_capacity must be None or an integer in \[1, capacity=32\], got 40"),
    ({"dtype": jnp.int32}, TypeError, "CacheSpec.dtype must be a floating-point dtype"),
])
def test_cache_spec_rejects_impossible_sizes(kwargs, error, match):
    """A spec written by hand (a model brought to kvjax) fails where it is written, naming the
    field, not as a shape error inside a method's jitted step."""
    sizes = dict(batch=1, capacity=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    CacheSpec(**sizes, dtype=jnp.bfloat16, prompt_capacity=np.int64(16))  # numpy integers are fine
    with pytest.raises(error, match=match):
        CacheSpec(**{**sizes, **kwargs})


def test_init_cache_refuses_arguments_of_the_wrong_type():
    """A method name or a dict of sizes used to fail with "'str' object has no attribute 'validate'"."""
    spec = CacheSpec(batch=1, capacity=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    assert len(init_cache(StreamingLLM(budget=16), spec).layers) == 2
    with pytest.raises(TypeError, match=r"method must be a kvjax Method \(Full\(\), ClusterKV\(...\), ...\), got 'full'"):
        init_cache("full", spec)
    with pytest.raises(TypeError, match=r"spec must be a CacheSpec\(batch=\.\.\., .* got \{'batch': 1\}"):
        init_cache(StreamingLLM(budget=16), {"batch": 1})


@pytest.mark.parametrize("method", [
    Full(), StreamingLLM(budget=32), Quest(budget=64, page_size=8, dense_layers=1),
    ClusterKV(budget=64, sink=4, window=16, window_clusters=2, dense_layers=1),
    ClusterKV(budget=64, sink=4, window=16, window_clusters=2, dense_layers=1, offload=True),
    FreeKV(budget=64, page_size=8, sink=8, recent=16, dense_layers=1),
    FreeKV(budget=64, page_size=8, sink=8, recent=16, dense_layers=1, offload=True),
], ids=lambda m: m.name + ("-offload" if getattr(m, "offload", False) else ""))
def test_layer_inputs_that_do_not_fit_the_cache_are_refused(method):
    """For a model brought to kvjax (calling prefill/attend itself): a batch, head count, head
    size or lengths dtype that does not fit the cache is refused by name. Before, a smaller
    batch was broadcast into the cache and extra KV heads were dropped by its writes, with no
    error."""
    b, t, hq, hkv, d = 2, 40, 4, 2, 16
    cache_spec = CacheSpec(batch=b, capacity=128, num_layers=2, num_heads=hq, num_kv_heads=hkv, head_dim=d)
    rng = np.random.default_rng(0)
    x = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    lengths = jnp.array([t, t - 3])
    layer = 1  # sparse for the sparse methods
    cache = method.init_cache(layer, cache_spec)
    name = method.name
    with pytest.raises(ValueError, match=rf"{name} layer inputs: k has B=1 .*, but the cache has B=2"):
        method.prefill(layer, cache, x(1, t, hq, d), x(1, t, hkv, d), x(1, t, hkv, d), lengths[:1])
    with pytest.raises(ValueError, match=rf"{name} layer inputs: k has Hkv=3 .*, but the cache has Hkv=2"):
        method.prefill(layer, cache, x(b, t, 6, d), x(b, t, 3, d), x(b, t, 3, d), lengths)
    with pytest.raises(TypeError, match=rf"{name} layer inputs: lengths must hold int values"):
        method.prefill(layer, cache, x(b, t, hq, d), x(b, t, hkv, d), x(b, t, hkv, d), lengths.astype(jnp.float32))
    with pytest.raises(ValueError, match="q has Hq=3 heads, not a multiple of the Hkv=2 KV heads"):
        method.prefill(layer, cache, x(b, t, 3, d), x(b, t, hkv, d), x(b, t, hkv, d), lengths)
    # attend is checked before it reads the cache: the empty one does (well-formed calls are
    # every other test of the methods)
    with pytest.raises(ValueError, match=rf"{name} layer inputs: k has Hkv=3 .*, but the cache has Hkv=2"):
        method.attend(layer, cache, x(b, 6, d), x(b, 3, d), x(b, 3, d), lengths)
    with pytest.raises(ValueError, match=rf"{name} layer inputs: k must be \[B, Hkv, d\], got shape \(2, 1, 2, 16\)"):
        method.attend(layer, cache, x(b, 1, hq, d), x(b, 1, hkv, d), x(b, 1, hkv, d), lengths)
    with pytest.raises(ValueError, match=rf"{name} layer inputs: q has d=8 .*, but the cache has d=16"):
        method.attend(layer, cache, x(b, hq, 8), x(b, hkv, d), x(b, hkv, d), lengths)
