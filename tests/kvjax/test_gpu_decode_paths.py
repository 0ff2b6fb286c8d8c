"""The GPU paths of the decode step: no per-layer conditionals, `jnp.cumsum` prefix sums,
and the same results as the CPU paths.

XLA's GPU runtime blocks the host on every `lax.cond` (`kvjax.compat.conditionals_sync_host`),
so on GPUs ClusterKV ranks every cluster instead of taking its top-k-with-fallback cond,
FreeKV re-selects every step instead of only when a head is corrected, and ClusterKV's window
clustering runs under one cond per step for all layers (`begin_decode_step`), and sampling
sorts the whole vocabulary instead of ranking top-k candidates under a cond. Prefix sums
are associative scans on CPU only (`kvjax.compat.prefix_sums_as_scan`). These tests switch
the GPU paths on on the CPU, compare them with the CPU paths and the numpy references, and
count the conditionals traced into one decode step of a model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax.generation as generation_module
import kvjax.methods.base as base_module
import kvjax.methods.clusterkv as clusterkv_module
import kvjax.methods.freekv as freekv_module
from kvjax import CacheSpec, ClusterKV, FreeKV, init_cache
from kvjax.methods.base import prefix_sum
from models.config import ModelConfig
from models.llama import forward
from models.params import init_random
from tests.kvjax.method_harness import HKV, HQ, D, run_method
from tests.kvjax.test_clusterkv import _index_cache, np_select


@pytest.fixture
def gpu_paths(monkeypatch):
    """`use(True)`: the methods and the sampler take their GPU paths on this CPU (no
    conditionals, `jnp.cumsum` prefix sums)."""
    def use(gpu: bool) -> None:
        for module in (clusterkv_module, freekv_module, generation_module):
            monkeypatch.setattr(module, "conditionals_sync_host", lambda: gpu)
        monkeypatch.setattr(base_module, "prefix_sums_as_scan", lambda: not gpu)
    return use


def count_conds(jaxpr) -> int:
    """`cond` equations in a jaxpr, nested ones (loop bodies, branches, calls) included."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == "cond"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += count_conds(inner)
    return total


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-path", "gpu-path"])
def test_prefix_sum_paths_equal_numpy(gpu_paths, gpu):
    gpu_paths(gpu)
    rng = np.random.default_rng(0)
    for n in (1, 58, 1009):
        ints = rng.integers(0, 100, size=(2, 3, n)).astype(np.int32)
        np.testing.assert_array_equal(prefix_sum(jnp.asarray(ints)), np.cumsum(ints, axis=-1))
        floats = rng.random((4, n)).astype(np.float32)
        np.testing.assert_allclose(prefix_sum(jnp.asarray(floats)), np.cumsum(floats, axis=-1), rtol=1e-5)
    # A new function object: jax reuses a function's trace, and the path is a Python global.
    jaxpr = jax.make_jaxpr(lambda x: prefix_sum(x))(jnp.zeros((3, 1009), jnp.int32))
    assert ("cumsum[" in str(jaxpr)) == gpu


def test_sampling_gpu_path_ranks_every_token_without_a_conditional(gpu_paths):
    """Sampling's CPU path ranks the top candidates under a cond (a full sort as fallback);
    the GPU path sorts every step, with no cond, and draws the same tokens."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((2, 16)) * np.array([[4.0], [0.5]]), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    args = (jnp.float32(1.0), jnp.float32(0.9), False, 4)
    tokens, conds = {}, {}
    for gpu in (False, True):
        gpu_paths(gpu)
        draw = lambda key: generation_module.sample_tokens(logits, key, *args)  # a new function: a new trace
        conds[gpu] = count_conds(jax.make_jaxpr(draw)(keys[0]).jaxpr)
        tokens[gpu] = np.asarray(jax.vmap(draw)(keys))
    assert conds == {False: 1, True: 0}
    np.testing.assert_array_equal(tokens[True], tokens[False])


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-path", "gpu-path"])
@pytest.mark.parametrize("extra_budget,needs_fallback", [(12, False), (70, True)])
def test_selection_paths_equal_the_numpy_reference(gpu_paths, gpu, extra_budget, needs_fallback):
    """Many small clusters (80 over 120 tokens): the top-k candidates (34 clusters) cover a
    budget of 12 but not one of 70, where the CPU path falls back to ranking every cluster."""
    gpu_paths(gpu)
    rng = np.random.default_rng(extra_budget)
    batch, n, clusters, sink = 2, 120, 80, 2
    cache, _, sizes, order, centroids = _index_cache(rng, batch, n, clusters, sink, 0.0)
    method = ClusterKV(budget=sink + extra_budget, sink=sink)
    q = rng.standard_normal((batch, HQ, D)).astype(np.float32)
    candidates = 2 * -(-extra_budget // method.tokens_per_cluster) + 32
    scores = np.einsum("bhd,bhcd->bhc", q, np.repeat(centroids, HQ // HKV, axis=1))
    best = np.argsort(-scores, axis=-1, kind="stable")[..., :candidates]
    covered = np.take_along_axis(np.repeat(sizes, HQ // HKV, axis=1), best, -1).sum(-1) >= extra_budget
    assert (not covered.all()) == needs_fallback  # the case exercises the path it is meant to

    positions, valid = map(np.asarray, method.select(jnp.asarray(q), cache))
    for b in range(batch):
        for h in range(HQ):
            kv = h // (HQ // HKV)
            ref = np_select(q[b, h], centroids[b, kv], sizes[b, kv], order[b, kv], extra_budget)
            np.testing.assert_array_equal(positions[b, h][valid[b, h]], ref)
    conds = count_conds(jax.make_jaxpr(method.select_index)(jnp.asarray(q), cache).jaxpr)
    assert conds == (0 if gpu else 1)


def test_freekv_gpu_path_equals_the_conditional_path(gpu_paths):
    """A low tau on random queries: at some steps a head is corrected, at others none, so
    the CPU path takes both branches of its conditional."""
    method = FreeKV(budget=24, page_size=4, sink=4, recent=8, tau=0.05, dense_layers=0)
    corrected = jax.jit(lambda cache, q, positions: method.corrected_heads(cache, q))
    runs = []
    for gpu in (False, True):
        gpu_paths(gpu)
        _, steps, *_ = run_method(method, [61], 16, seed=3, observe=corrected)
        runs.append(np.stack([out for out, *_ in steps]))
        any_corrected = [bool(np.asarray(seen).any()) for *_, seen in steps[1:]]
        assert any(any_corrected) and not all(any_corrected)
    np.testing.assert_array_equal(runs[0], runs[1])


def _decode_step_conds(method, layers: int = 4, prompt: int = 64) -> int:
    """Conditionals traced into one decode step of a tiny random Llama."""
    config = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_layers=layers, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_position_embeddings=256)
    params = init_random(config, jax.random.key(0))
    spec = CacheSpec(batch=1, capacity=prompt + 16, num_layers=layers, num_heads=HQ, num_kv_heads=HKV,
                     head_dim=D, prompt_capacity=prompt)
    cache = init_cache(method, spec)
    step = lambda params, token, cache: forward(params, token, cache.lengths[:, None], cache, method, config=config)
    return count_conds(jax.make_jaxpr(step)(params, jnp.zeros((1, 1), jnp.int32), cache).jaxpr)


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-path", "gpu-path"])
def test_one_decode_step_has_at_most_one_conditional_on_gpus(gpu_paths, gpu):
    """4 layers, 3 of them sparse. ClusterKV's 62 clusters exceed its 40 top-k candidates,
    so the CPU path keeps one fallback cond per sparse layer; the window clustering is one
    cond for all layers on every path. FreeKV's correction cond is per sparse layer on CPUs."""
    gpu_paths(gpu)
    sparse_layers = 3
    clusterkv = ClusterKV(budget=6, sink=2, tokens_per_cluster=1, window=8, window_clusters=2, dense_layers=1)
    freekv = FreeKV(budget=24, page_size=4, sink=4, recent=8, dense_layers=1)
    assert _decode_step_conds(clusterkv) == 1 + (0 if gpu else sparse_layers)
    assert _decode_step_conds(freekv) == (0 if gpu else sparse_layers)
