"""Our decoder vs `transformers` on tiny random checkpoints loaded by our safetensors loader."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kvjax import CacheSpec, Full, StreamingLLM, init_cache
from models.llama import forward as _forward
from models.safetensors_loader import load_safetensors_dir
from tests.hf_tiny import CONFIGS, save_tiny

TOL = 1e-4
forward = jax.jit(_forward, static_argnames=("method", "config"))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = save_tiny(request.param, directory)
    config, params = load_safetensors_dir(directory, dtype=jnp.float32)
    return hf_model, config, params


def _spec(config, batch, capacity):
    return CacheSpec(batch=batch, capacity=capacity, num_layers=config.num_layers, num_heads=config.num_heads,
                     num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)


def _prefill(config, params, prompts, bucket, method, capacity=None):
    """Right-padded prefill of a batch of prompts; returns all logits and the cache."""
    tokens = np.zeros((len(prompts), bucket), np.int32)
    positions = np.full((len(prompts), bucket), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        positions[i, : len(p)] = np.arange(len(p))
    cache = init_cache(method, _spec(config, len(prompts), capacity or bucket + 64))
    return forward(params, jnp.asarray(tokens), jnp.asarray(positions), cache, method, config=config)


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].numpy()


def test_single_sequence_matches_transformers(tiny):
    hf_model, config, params = tiny
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, 100).tolist()
    logits, _ = _prefill(config, params, [tokens], 128, Full())
    np.testing.assert_allclose(np.asarray(logits)[0, :100], _hf_logits(hf_model, tokens), atol=TOL, rtol=0)


def test_batched_right_padded_matches_transformers(tiny):
    hf_model, config, params = tiny
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (37, 64, 5)]
    logits, cache = _prefill(config, params, prompts, 64, Full())
    np.testing.assert_array_equal(np.asarray(cache.lengths), [37, 64, 5])
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(np.asarray(logits)[i, : len(p)], _hf_logits(hf_model, p), atol=TOL, rtol=0)


def test_long_prompt_uses_blocked_attention_and_matches(tiny):
    """1536 tokens: the causal attention runs in 512-token blocks with an online softmax."""
    hf_model, config, params = tiny
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (1500, 700)]
    logits, _ = _prefill(config, params, prompts, 1536, Full())
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(np.asarray(logits)[i, : len(p)], _hf_logits(hf_model, p), atol=TOL, rtol=0)


@pytest.mark.parametrize("method", [Full(), StreamingLLM(budget=512, sink=4)], ids=["full", "streaming"])
def test_incremental_decode_equals_full_forward(tiny, method):
    """Prefill a prefix, decode the rest one token at a time: logits equal one full forward."""
    hf_model, config, params = tiny
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (60, 41)]
    prefix = [p[:30] for p in prompts]
    _, cache = _prefill(config, params, prefix, 32, method, capacity=128)
    steps = max(len(p) for p in prompts) - 30
    for t in range(steps):
        fed = jnp.asarray([[p[min(30 + t, len(p) - 1)]] for p in prompts], jnp.int32)
        logits, cache = forward(params, fed, cache.lengths[:, None], cache, method, config=config)
        for i, p in enumerate(prompts):
            if 30 + t < len(p):
                expected = _hf_logits(hf_model, p[: 31 + t])[-1]
                np.testing.assert_allclose(np.asarray(logits)[i, 0], expected, atol=TOL, rtol=0)


def test_inputs_that_do_not_fit_the_model_are_refused_by_name(tiny):
    """Shape mismatches fail at trace time naming the argument. A cache with fewer layers
    than the model used to run only those layers and return wrong logits without an error."""
    _, config, params = tiny
    method = Full()
    tokens, positions = jnp.ones((2, 8), jnp.int32), jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    cache = init_cache(method, _spec(config, 2, 64))
    assert forward(params, tokens, positions, cache, method, config=config)[0].shape == (2, 8, config.vocab_size)
    shallow = init_cache(method, CacheSpec(batch=2, capacity=64, num_layers=config.num_layers - 1, num_heads=config.num_heads,
                                           num_kv_heads=config.num_kv_heads, head_dim=config.head_dim))
    cases = [
        ((tokens, positions, shallow), ValueError, f"cache holds {config.num_layers - 1} layers, the model has {config.num_layers}"),
        ((tokens, positions, init_cache(method, _spec(config, 1, 64))), ValueError, r"cache holds 1 sequences \(CacheSpec.batch\), the tokens 2"),
        ((tokens[:, :1], positions[:, :1], init_cache(method, _spec(config, 1, 64))), ValueError, "cache holds 1 sequences"),
        ((tokens, positions[:, :4], cache), ValueError, r"positions must be integers shaped like the tokens \(2, 8\), got int32 \(2, 4\)"),
        ((tokens, positions.astype(jnp.float32), cache), ValueError, "positions must be integers"),
        ((tokens.astype(jnp.float32), positions, cache), TypeError, r"tokens must be integer token ids \[B, T\], got float32 \(2, 8\)"),
        ((tokens[0], positions[0], cache), TypeError, r"tokens must be integer token ids \[B, T\], got int32 \(8,\)"),
    ]
    for (t, p, c), error, match in cases:
        with pytest.raises(error, match=match):
            forward(params, t, p, c, method, config=config)
