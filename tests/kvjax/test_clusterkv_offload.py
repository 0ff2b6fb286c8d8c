"""`ClusterKV(offload=True)`: clustered K/V in host memory, recalled per step (ALGORITHMS.md
section 3 item 7).

- Same attention outputs / logits as `offload=False` (prefill, decode, window clustering,
  padded batches), through the method interface and through the tiny model.
- The host leaves are `pinned_host`; device K/V bytes are smaller and do not grow with the
  context at a fixed budget.
- Recall accounting on hand-built clusters: bytes copied = tokens of the newly selected
  clusters * recall heads * 2 (K and V) * head_dim * itemsize; hit rate.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import Cache, CacheSpec, ClusterKV, init_cache, kv_bytes
from kvjax.generation import COMPILE_COUNTS, generate_many, prefill
from kvjax.methods import clusterkv as clusterkv_module
from kvjax.methods.clusterkv import ClusterLayerCache
from tests.kvjax.method_harness import HKV, HQ, D, run_method
from tests.kvjax.test_sparse_exactness import forced_logits


def _recall_counts(cache, q, positions):
    """What the harness records before each step: windows clustered and the counters."""
    r = cache.recall
    return np.asarray(cache.windows), int(r.selected.sum()), int(r.hits.sum()), int(r.copied.sum())


@pytest.mark.parametrize(
    "kwargs,lengths,steps",
    [
        (dict(budget=14, sink=2, tokens_per_cluster=4, window=6, window_clusters=2), [40, 23, 3, 1], 16),
        (dict(budget=9, sink=0, tokens_per_cluster=5, window=5, window_clusters=1, selection="kv_head"), [33, 30], 12),
    ],
)
def test_offload_equals_device_cache_step_by_step(kwargs, lengths, steps):
    method = ClusterKV(dense_layers=0, **kwargs)
    device = run_method(method, lengths, steps, seed=5)
    host = run_method(dataclasses.replace(method, offload=True), lengths, steps, seed=5, observe=_recall_counts)
    np.testing.assert_allclose(host[0], device[0], atol=1e-6, rtol=0)
    for (a, *_), (b, *_) in zip(device[1], host[1]):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    counts = [step[2] for step in host[1]]
    assert (counts[-1][0] > 0).all()  # windows were clustered into the host region
    copied = np.diff([c[3] for c in counts])
    assert (copied > 0).any() and (copied < copied.max()).any()  # recalls happen, not every token every step
    assert 0 < counts[-1][2] < counts[-1][1]  # some selected clusters were resident, not all


def test_offload_logits_equal_device_cache_through_the_model(tiny_lm):
    """Batch 2 (one padded row), a budget well below the context, window clustering."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 49152, size=n).tolist() for n in (150, 97)]
    forced = rng.integers(0, 49152, size=(2, 40)).astype(np.int32)
    method = ClusterKV(budget=40, sink=4, tokens_per_cluster=8, window=16, window_clusters=2, dense_layers=1)
    device, _ = forced_logits(tiny_lm, method, prompts, forced)
    host, cache = forced_logits(tiny_lm, dataclasses.replace(method, offload=True), prompts, forced)
    np.testing.assert_allclose(host, device, atol=1e-4, rtol=0)
    sparse = cache.layers[1]
    np.testing.assert_array_equal(np.asarray(sparse.windows), [2, 2])
    assert sparse.recall.host_k.sharding.memory_kind == "pinned_host"  # still on the host after decoding
    assert 0 < method.decode_stats(cache)["cluster_hit_rate"] < 1


def _kv_leaves(layer):
    leaves = [layer.k, layer.v]
    if isinstance(layer, ClusterLayerCache) and layer.recall is not None:
        leaves += [layer.recall.k, layer.recall.v, layer.recall.host_k, layer.recall.host_v]
    return leaves


def test_host_leaves_are_pinned_host_and_device_kv_does_not_grow(tiny_lm):
    rng = np.random.default_rng(1)
    device_kv, host_kv, totals = {}, {}, {}
    for n in (100, 400):
        prompt = [rng.integers(0, 49152, size=n).tolist()]
        for offload in (False, True):
            method = ClusterKV(budget=64, sink=4, tokens_per_cluster=8, window=16, window_clusters=2,
                               dense_layers=0, offload=offload)
            cache = prefill(tiny_lm, prompt, method, extra_tokens=8).cache
            for path, leaf in jax.tree_util.tree_leaves_with_path(cache.layers):
                on_host = jax.tree_util.keystr(path).endswith((".recall.host_k", ".recall.host_v"))
                assert leaf.sharding.memory_kind == ("pinned_host" if on_host else "device"), path
            leaves = [x for layer in cache.layers for x in _kv_leaves(layer)]
            device_kv[n, offload] = sum(x.nbytes for x in leaves if x.sharding.memory_kind == "device")
            host_kv[n, offload] = sum(x.nbytes for x in leaves if x.sharding.memory_kind == "pinned_host")
            totals[n, offload] = kv_bytes(cache)
    assert device_kv[100, True] == device_kv[400, True]  # sinks + window + recall buffer
    assert device_kv[400, False] > 2 * device_kv[100, False]
    assert host_kv[400, True] > 2 * host_kv[100, True] and host_kv[100, False] == 0
    for n in (100, 400):
        assert totals[n, True][0] < totals[n, False][0]  # kv_bytes: device bytes (index included)
        assert totals[n, True][1] == host_kv[n, True]  # kv_bytes: host bytes are the host K/V


# --- recall accounting -----------------------------------------------------------------------


def _grouped_prompt(sink, groups, size):
    """Keys in `groups` runs of `size` tokens after the sinks, run j along direction e_j:
    cosine K-means (even init) finds exactly these clusters, in position order."""
    n = sink + groups * size
    k = np.zeros((1, n, HKV, D), np.float32)
    k[0, :sink] = 0.1
    for j in range(groups):
        k[0, sink + j * size : sink + (j + 1) * size, :, j] = 1.0 + 0.01 * np.arange(size)[:, None]
    return k


@pytest.mark.parametrize("selection,recall_heads", [("query_head", HQ), ("kv_head", HKV)])
def test_recall_accounting_on_known_clusters(selection, recall_heads):
    """Select clusters {0, 1}, the same again, then {1, 3}: the copies are exactly the
    newly selected clusters' tokens, per recall head, K and V rows of head_dim bf16 values."""
    sink, groups, size = 2, 4, 5
    method = ClusterKV(budget=sink + 2 * size, sink=sink, tokens_per_cluster=size, dense_layers=0,
                       selection=selection, offload=True)
    k = _grouped_prompt(sink, groups, size)
    n = k.shape[1]
    cache_spec = CacheSpec(batch=1, capacity=n + 4, num_layers=1, num_heads=HQ, num_kv_heads=HKV,
                           head_dim=D, dtype=jnp.bfloat16)
    layer = init_cache(method, cache_spec).layers[0]
    q = np.zeros((1, n, HQ, D), np.float32)
    _, layer = jax.jit(lambda c: method.prefill(0, c, jnp.asarray(q), jnp.asarray(k), jnp.asarray(k),
                                                jnp.array([n])))(layer)
    np.testing.assert_array_equal(np.asarray(layer.sizes)[0, :, :groups], size)
    attend = jax.jit(lambda c, q, pos: method.attend(0, c, q, jnp.zeros((1, HKV, D)), jnp.zeros((1, HKV, D)), pos))
    select = jax.jit(method.select)

    def query(weights):
        return jnp.asarray(np.broadcast_to(np.pad(weights, (0, D - groups)), (1, HQ, D)), jnp.float32)

    row = 2 * D * 2  # bytes of one token's K and V rows (bfloat16)
    expected = [  # (query, clusters selected, hits, tokens copied) per step, cumulative
        (query([4.0, 3.0, 1.0, 2.0]), 2, 0, 2 * size),
        (query([4.0, 3.0, 1.0, 2.0]), 4, 2, 2 * size),
        (query([1.0, 4.0, 2.0, 3.0]), 6, 3, 3 * size),
    ]
    for t, (qt, selected, hits, tokens) in enumerate(expected):
        positions, valid = map(np.asarray, select(qt, layer))
        assert valid.all() and positions.shape[-1] == 2 * size
        _, layer = attend(layer, qt, jnp.array([n + t]))
        stats = method.decode_stats(Cache(layers=(layer,), lengths=jnp.array([n + t + 1])))
        assert stats["clusters_selected"] == selected * recall_heads
        assert stats["clusters_hit"] == hits * recall_heads
        assert stats["cluster_hit_rate"] == pytest.approx(hits / selected)
        assert stats["recall_bytes"] == tokens * recall_heads * row
        assert stats["recall_bytes_per_step"] == pytest.approx(tokens * recall_heads * row / (t + 1))
    # The last selection really is clusters 1 and 3.
    np.testing.assert_array_equal(np.sort(positions[0, 0]), np.r_[sink + size : sink + 2 * size,
                                                                  sink + 3 * size : sink + 4 * size])


def test_generate_reports_recall_stats_and_same_tokens(tiny_lm):
    """Through `generate_many` (the offload cache converted from a shared dense prefill);
    the decode loop compiles once."""
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, 49152, size=200).tolist()
    method = ClusterKV(budget=48, sink=4, tokens_per_cluster=8, window=16, window_clusters=2, dense_layers=1)
    compiles = COMPILE_COUNTS["decode"]
    device, host = generate_many(tiny_lm, prompt, [method, dataclasses.replace(method, offload=True)],
                                 max_new_tokens=20)
    assert COMPILE_COUNTS["decode"] - compiles == 2  # one per method, not per step
    assert host.tokens == device.tokens
    assert "cluster_hit_rate" not in device.stats
    assert 0 <= host.stats["cluster_hit_rate"] <= 1 and host.stats["recall_bytes_per_step"] > 0
    assert host.stats["host_kv_bytes"] > 0 and host.stats["device_kv_bytes"] < device.stats["device_kv_bytes"]


# --- options -----------------------------------------------------------------------------


def test_offload_with_pallas_kernels_equals_xla():
    """Offload uses the Pallas K-means and centroid scoring too (the recall buffer is
    attended densely, so the sparse-attention kernel is not involved)."""
    method = ClusterKV(budget=10, sink=2, tokens_per_cluster=4, window=5, window_clusters=1, dense_layers=0,
                       offload=True)
    xla = run_method(method, [19, 12], 6, seed=7)
    pallas = run_method(dataclasses.replace(method, impl="pallas"), [19, 12], 6, seed=7)
    for (a, *_), (b, *_) in zip(xla[1], pallas[1]):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=0)


def test_rejects_a_non_boolean_offload():
    with pytest.raises(ValueError, match="offload must be True or False"):
        ClusterKV(offload="yes")


def test_cli_offload_flag():
    from kvjax.cli import _method_from_args, build_parser

    parse = lambda *flags: build_parser().parse_args(["generate", "--prompt", "x", "--method", "clusterkv", *flags])
    assert _method_from_args("clusterkv", parse("--offload")) == ClusterKV(offload=True)
    assert _method_from_args("clusterkv", parse("--no-offload")) == ClusterKV(offload=False)
    assert _method_from_args("clusterkv", parse()) == ClusterKV()


# --- 16-bit host storage -----------------------------------------------------------------


def _f32_arrays_of_size(hlo: str, size: int) -> list[str]:
    """Float32 arrays of `size` elements (any shape) in an HLO text."""
    shapes = set(re.findall(r"f32\[([\d,]+)\]", hlo))
    return [s for s in shapes if math.prod(map(int, s.split(","))) == size]


@pytest.mark.parametrize("chunk", [None, 1], ids=["one-copy", "copies-of-8-rows-per-head"])
def test_offload_bfloat16_host_recall_copies_rows_without_converting_the_store(chunk, monkeypatch):
    """bfloat16 clustered tokens are stored as their uint16 bits: the recall returns the exact
    rows, and a compiled decode step never converts the whole host store (XLA's CPU backend
    computes bfloat16 in float32 and hoisted that conversion of every host row out of the
    per-chunk copy loop: a full-store conversion per layer and step). With small chunks the
    ~22 misses per (sequence, KV head) take several copies."""
    if chunk is not None:
        monkeypatch.setattr(clusterkv_module, "RECALL_CHUNK", chunk)
    method = ClusterKV(budget=20, sink=2, tokens_per_cluster=4, window=6, window_clusters=2, dense_layers=0,
                       offload=True)
    n, lengths = 40, jnp.array([40, 35])
    cache_spec = CacheSpec(batch=2, capacity=n + 8, num_layers=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
                           dtype=jnp.bfloat16)
    layer = init_cache(method, cache_spec).layers[0]
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, h, D)), jnp.float32) for h in (HQ, HKV, HKV))
    _, layer = jax.jit(lambda c: method.prefill(0, c, q, k, v, lengths))(layer)
    r = layer.recall
    host_size = r.host_k.size
    assert r.host_k.dtype == r.host_v.dtype == jnp.uint16 and r.host_k.sharding.memory_kind == "pinned_host"

    # Recall random index entries of every recall head into zeroed buffers.
    b, hr, slots, _ = r.k.shape
    entries = n - method.sink
    index = jnp.asarray(rng.integers(0, entries, (b, hr, slots)), jnp.int32)
    missed = jnp.asarray(rng.random((b, hr, slots)) < 0.6)
    zeros = jnp.zeros((b, hr, slots, D), jnp.bfloat16)
    got_k, got_v = jax.jit(lambda r, i, m: method._fetch(r, i, m, zeros, zeros))(r, index, missed)
    assert got_k.dtype == jnp.bfloat16
    # Index entry i of (sequence, KV head) holds the token at position order[i].
    position = np.take_along_axis(np.asarray(layer.order), np.asarray(index).reshape(b, HKV, -1), axis=-1)
    position = position.reshape(b, hr, slots)
    kv_head = np.arange(hr) // (hr // HKV)
    for got, x in ((got_k, k), (got_v, v)):
        want = np.asarray(x.astype(jnp.bfloat16))[np.arange(b)[:, None, None], position, kv_head[None, :, None]]
        want = np.where(np.asarray(missed)[..., None], want, 0).reshape(-1, D)
        np.testing.assert_array_equal(np.asarray(got, np.float32).reshape(-1, D), np.asarray(want, np.float32))

    # A decode step (recall and window clustering into the host store) converts no host array.
    attend = jax.jit(lambda c, q, k, v, pos: method.attend(0, c, q, k, v, pos))
    hlo = attend.lower(layer, q[:, 0], k[:, 0], v[:, 0], lengths).compile().as_text()
    assert not _f32_arrays_of_size(hlo, host_size)
