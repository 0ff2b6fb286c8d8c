"""Every sparse method equals `Full` through the whole model when its budget covers the
context (ALGORITHMS.md section 0): logits of the prompt and of every decode step, batch 2."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kvjax import ClusterKV, FreeKV, Full, Quest
from kvjax.generation import prefill
from models.llama import forward

STEPS = 40


def forced_logits(model, method, prompts, forced):
    """Logits after the prompt, then after each forced token ([steps + 1, B, V]), and the cache."""
    pre = prefill(model, prompts, method, extra_tokens=forced.shape[1])
    step = jax.jit(
        lambda params, token, cache: forward(params, token, cache.lengths[:, None], cache, method, config=model.config),
        donate_argnums=2,
    )
    cache, out = pre.cache, [np.asarray(pre.first_logits)]
    for t in range(forced.shape[1]):
        logits, cache = step(model.params, forced[:, t : t + 1], cache)
        out.append(np.asarray(logits[:, 0]))
    return np.stack(out), cache


@pytest.fixture(scope="module")
def reference(tiny_lm):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 49152, size=n).tolist() for n in (150, 97)]
    forced = rng.integers(0, 49152, size=(2, STEPS)).astype(np.int32)
    return prompts, forced, forced_logits(tiny_lm, Full(), prompts, forced)[0]


@pytest.mark.parametrize(
    "method",
    [
        Quest(budget=256, page_size=16, dense_layers=0),
        Quest(budget=208, page_size=8, dense_layers=1),
        ClusterKV(budget=256, sink=16, dense_layers=0, window=16, window_clusters=2),
        ClusterKV(budget=200, sink=4, dense_layers=1, tokens_per_cluster=20, selection="kv_head", init="random"),
        FreeKV(budget=256, page_size=16, sink=32, recent=32, tau=0.5, dense_layers=0),
        FreeKV(budget=208, page_size=8, sink=16, recent=16, dense_layers=1),
        FreeKV(budget=208, page_size=8, sink=16, recent=16, dense_layers=1, offload=True),
    ],
    ids=lambda m: f"{m.name}-" + "-".join(f"{k}={v}" for k, v in m.describe().items() if k != "method"),
)
def test_covering_budget_equals_full(tiny_lm, reference, method):
    prompts, forced, full = reference
    np.testing.assert_allclose(forced_logits(tiny_lm, method, prompts, forced)[0], full, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "method",
    [
        Quest(budget=16, page_size=4, dense_layers=0),
        ClusterKV(budget=14, sink=2, tokens_per_cluster=4, window=6, window_clusters=2, dense_layers=0),
        ClusterKV(budget=12, sink=0, tokens_per_cluster=5, selection="kv_head", dense_layers=0),
        FreeKV(budget=24, page_size=4, sink=4, recent=8, tau=0.1, dense_layers=0),
    ],
    ids=lambda m: m.name,
)
def test_pallas_impl_equals_xla_impl(method):
    """The method with its Pallas kernels (interpret mode here) matches its XLA path step by step."""
    import dataclasses

    from tests.kvjax.method_harness import run_method

    lengths, steps = [37, 22], 9
    xla = run_method(method, lengths, steps, seed=11)
    pallas = run_method(dataclasses.replace(method, impl="pallas"), lengths, steps, seed=11)
    np.testing.assert_allclose(pallas[0], xla[0], atol=1e-6, rtol=0)
    for (a, *_), (b, *_) in zip(xla[1], pallas[1]):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=0)
