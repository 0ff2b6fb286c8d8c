"""ClusterKV against straightforward numpy references of ALGORITHMS.md section 3.

- K-means (`kvjax.clustering.cluster_keys`) vs a numpy loop with the same initialisation.
- Selection (`ClusterKV.select`) vs a numpy whole-cluster fill, as property tests.
- Decode steps vs dense attention over exactly sinks + selection + window + current token,
  through prefill, decode and decode-time window clustering, with padded batches.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax import Full, init_cache
from kvjax.clustering import cluster_keys
from kvjax.methods.clusterkv import ClusterKV, ClusterLayerCache
from tests.kvjax.method_harness import HKV, HQ, D, check_steps_per_head, run_method, spec

G = HQ // HKV


# --- numpy references ------------------------------------------------------------------------


def np_normalize(x):
    return x / np.sqrt(np.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def np_kmeans(keys, count, num_clusters, max_clusters, iters):
    """One problem: keys [n, d] -> (centroids [C, d], sizes [C], labels [n])."""
    n = len(keys)
    valid = (np.arange(n) < count) & np.isfinite(keys).all(-1)
    idx = np.clip((np.arange(max_clusters) * count) // max(num_clusters, 1), 0, n - 1)
    cent = keys[idx].astype(np.float32).copy()
    cent[~np.isfinite(cent)] = 0.0
    cluster_valid = np.arange(max_clusters) < num_clusters
    safe = np.where(valid[:, None], keys, 0.0).astype(np.float32)

    def assign(cent):
        sim = np_normalize(safe) @ np_normalize(cent).T
        sim[:, ~cluster_valid] = -np.inf
        labels = sim.argmax(-1)
        return np.where(valid & cluster_valid.any(), labels, max_clusters)

    def update(labels, cent):
        new = cent.copy()
        sizes = np.zeros(max_clusters, np.int64)
        for c in range(max_clusters):
            members = labels == c
            sizes[c] = members.sum()
            if sizes[c]:
                new[c] = safe[members].mean(0)
        return new, sizes

    labels = assign(cent)
    for _ in range(iters):
        cent, _ = update(labels, cent)
        labels = assign(cent)
    cent, sizes = update(labels, cent)
    return cent, sizes, labels


def np_select(q, centroids, sizes, order, slots):
    """Whole clusters in descending score order (stable), truncated to `slots` positions.
    q [d] (or the group's mean scores when given as scores), centroids [C, d]."""
    scores = centroids @ q
    scores = np.where(sizes > 0, scores, -np.inf)
    starts = np.cumsum(sizes) - sizes
    picked: list[int] = []
    for c in np.argsort(-scores, kind="stable"):
        if sizes[c]:
            picked.extend(order[starts[c] : starts[c] + sizes[c]])
    return np.array(picked[:slots], np.int64)


# --- K-means ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    g, n, d, per = 3, 57, 8, 6
    keys = rng.standard_normal((g, n, d)).astype(np.float32)
    count = np.array([n, 40, 13])
    num_clusters = -(-count // per)
    max_clusters = int(num_clusters.max())
    cent, sizes, labels = cluster_keys(jnp.asarray(keys), jnp.asarray(count), jnp.asarray(num_clusters),
                                       max_clusters, iters=20)
    for i in range(g):
        rc, rs, rl = np_kmeans(keys[i], count[i], num_clusters[i], max_clusters, 20)
        np.testing.assert_array_equal(np.asarray(labels[i]), rl)
        np.testing.assert_array_equal(np.asarray(sizes[i]), rs)
        np.testing.assert_allclose(np.asarray(cent[i]), rc, atol=1e-5)
        assert rs.sum() == count[i]  # every key in range lands in exactly one cluster


@pytest.mark.parametrize("combined_keys", [True, False])
def test_cluster_order_is_a_stable_sort_by_label(monkeypatch, combined_keys):
    """The index order: positions sorted by (cluster, position), label C (no cluster) last,
    through one sort of combined keys or, where they would overflow int32, a stable argsort."""
    from kvjax.methods import clusterkv

    if not combined_keys:
        monkeypatch.setattr(clusterkv, "SORT_KEY_LIMIT", 8 * 50)  # (7 + 1) * 50 reaches it
    labels = np.random.default_rng(5).integers(0, 8, (2, 3, 50)).astype(np.int32)  # 7: no cluster
    got = np.asarray(jax.jit(lambda x: clusterkv._by_label(x, 7))(jnp.asarray(labels)))
    np.testing.assert_array_equal(got, np.argsort(labels, axis=-1, kind="stable"))


def test_kmeans_centroids_are_means_of_their_clusters():
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((2, 64, D)).astype(np.float32) * 5
    cent, sizes, labels = cluster_keys(jnp.asarray(keys), jnp.array([64, 64]), jnp.array([7, 7]), 7)
    cent, sizes, labels = map(np.asarray, (cent, sizes, labels))
    for i in range(2):
        for c in range(7):
            if sizes[i, c]:
                np.testing.assert_allclose(cent[i, c], keys[i][labels[i] == c].mean(0), atol=1e-5)


def test_kmeans_survives_nan_inf_and_duplicate_keys():
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((2, 48, D)).astype(np.float32)
    keys[0, 0] = np.nan  # an initial centroid position
    keys[0, 5, 3] = np.inf
    keys[0, 9] = -np.inf
    keys[1, :24] = keys[1, 0]  # half the keys identical
    keys[1, 30] = 0.0  # a zero key
    for init in ("even", "random"):
        cent, sizes, labels = cluster_keys(jnp.asarray(keys), jnp.array([48, 48]), jnp.array([6, 6]), 6,
                                           init=init, key=jax.random.key(0))
        cent, sizes, labels = map(np.asarray, (cent, sizes, labels))
        assert np.isfinite(cent).all()
        assert sizes[0].sum() == 45 and sizes[1].sum() == 48
        assert (labels[0, [0, 5, 9]] == 6).all()  # bad keys belong to no cluster
        assert len(set(labels[1, :24].tolist())) == 1  # duplicates stay together


def test_kmeans_random_init_is_seeded_and_distinct():
    from kvjax.clustering import initial_indices

    a = initial_indices(jnp.array([30, 12]), jnp.array([8, 3]), 8, 40, "random", jax.random.key(1))
    b = initial_indices(jnp.array([30, 12]), jnp.array([8, 3]), 8, 40, "random", jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    a = np.asarray(a)
    assert len(set(a[0].tolist())) == 8 and (a[0] < 30).all()
    assert len(set(a[1, :3].tolist())) == 3 and (a[1, :3] < 12).all()


# --- selection -------------------------------------------------------------------------------


def _index_cache(rng, batch, n, clusters, sink, empty_fraction):
    """A hand-built index: random labels (some clusters empty), random centroids."""
    labels = rng.integers(0, clusters, size=(batch, HKV, n))
    drop = rng.random((batch, HKV, clusters)) < empty_fraction
    labels = np.where(np.take_along_axis(drop, labels, -1), clusters, labels)  # dropped: no cluster
    sizes = np.stack([[np.bincount(l[l < clusters], minlength=clusters) for l in row] for row in labels])
    order = np.argsort(labels, axis=-1, kind="stable") + sink
    centroids = rng.standard_normal((batch, HKV, clusters, D)).astype(np.float32)
    cache = ClusterLayerCache(
        k=jnp.zeros((batch, HKV, sink + n, D)), v=jnp.zeros((batch, HKV, sink + n, D)),
        centroids=jnp.asarray(centroids), sizes=jnp.asarray(sizes, jnp.int32),
        order=jnp.asarray(order, jnp.int32), window_start=jnp.zeros((batch,), jnp.int32),
        windows=jnp.zeros((batch,), jnp.int32), first_window_cluster=clusters,
    )
    return cache, labels, sizes, order, centroids


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 60),
    clusters=st.integers(1, 12),
    sink=st.integers(0, 4),
    extra_budget=st.integers(1, 70),
    empty_fraction=st.sampled_from([0.0, 0.3]),
    selection=st.sampled_from(["query_head", "kv_head"]),
)
def test_selection_matches_numpy_reference(seed, n, clusters, sink, extra_budget, empty_fraction, selection):
    rng = np.random.default_rng(seed)
    batch = 2
    cache, labels, sizes, order, centroids = _index_cache(rng, batch, n, clusters, sink, empty_fraction)
    method = ClusterKV(budget=sink + extra_budget, sink=sink, selection=selection)
    q = rng.standard_normal((batch, HQ, D)).astype(np.float32)
    positions, valid = map(np.asarray, jax.jit(method.select)(jnp.asarray(q), cache))
    assert positions.shape == (batch, HQ, extra_budget)
    for b in range(batch):
        for h in range(HQ):
            kv = h // G
            query = q[b, kv * G : (kv + 1) * G].mean(0) if selection == "kv_head" else q[b, h]
            ref = np_select(query, centroids[b, kv], sizes[b, kv], order[b, kv], extra_budget)
            got = positions[b, h][valid[b, h]]
            np.testing.assert_array_equal(got, ref)
            # Invariants: as many as fit, distinct, inside the clustered range.
            assert len(got) == min(extra_budget, sizes[b, kv].sum())
            assert len(set(got.tolist())) == len(got)
            assert ((got >= sink) & (got < sink + n)).all()
            # Whole clusters in order, only the last one truncated (to its lowest positions).
            got_labels = labels[b, kv][got - sink]
            runs = [c for i, c in enumerate(got_labels) if i == 0 or c != got_labels[i - 1]]
            assert len(runs) == len(set(runs))
            for c in runs[:-1]:
                assert (got_labels == c).sum() == sizes[b, kv, c]
            if runs:
                last = got[got_labels == runs[-1]]
                members = np.flatnonzero(labels[b, kv] == runs[-1]) + sink
                np.testing.assert_array_equal(last, members[: len(last)])


# --- decode steps ----------------------------------------------------------------------------


def _observe(method):
    """What the method attends at a step: its selection after any window clustering."""
    @jax.jit
    def selection(cache, q, positions):
        cache = method.cluster_full_windows(0, cache, positions)
        return (*method.select(q, cache), cache.window_start)

    return lambda cache, q, positions: tuple(map(np.asarray, selection(cache, q, positions)))


def _kept(method):
    def keep(step, b, h):
        _, cur, (sel, valid, window_start) = step
        c = cur[b]
        mask = np.zeros(c + 1, bool)
        mask[: min(method.sink, c)] = True
        mask[sel[b, h][valid[b, h]]] = True
        mask[window_start[b] :] = True
        mask[c] = True  # the current token (a sink position when c < sink)
        return mask
    return keep


@pytest.mark.parametrize(
    "kwargs,lengths,steps",
    [
        (dict(budget=14, sink=2, tokens_per_cluster=4, window=6, window_clusters=2), [40, 23, 3, 1], 16),
        (dict(budget=9, sink=0, tokens_per_cluster=5, window=5, window_clusters=1, selection="kv_head"), [33, 30], 12),
        (dict(budget=20, sink=4, tokens_per_cluster=3, window=8, window_clusters=3, init="random"), [50], 10),
    ],
)
@pytest.mark.parametrize("begin_step", [False, True], ids=["attend-only", "begin-step"])
def test_decode_attends_sinks_selection_window_and_current(kwargs, lengths, steps, begin_step):
    """Also when the windows are clustered by `begin_decode_step`, as the model does."""
    method = ClusterKV(dense_layers=0, **kwargs)
    _, step_list, q, k, v = run_method(method, lengths, steps, seed=sum(lengths), observe=_observe(method),
                                       begin_step=begin_step)
    check_steps_per_head(step_list, q, k, v, _kept(method))
    # The selection really is sparse for the long rows (the test would pass trivially otherwise).
    sel, valid, _ = step_list[-1][2]
    assert valid[0].sum(-1).max() == method.budget - method.sink


def test_window_is_clustered_and_appended_every_window_tokens():
    method = ClusterKV(budget=16, sink=2, tokens_per_cluster=4, window=6, window_clusters=2, dense_layers=0)
    lengths, steps = [30, 17], 13
    rng = np.random.default_rng(0)
    total = 30 + steps
    k = rng.standard_normal((2, total, HKV, D)).astype(np.float32)
    cache = init_cache(method, dataclasses.replace(spec(2, total), prompt_capacity=30)).layers[0]
    q = rng.standard_normal((2, 30, HQ, D)).astype(np.float32)
    _, cache = method.prefill(0, cache, jnp.asarray(q), jnp.asarray(k[:, :30]), jnp.asarray(k[:, :30]),
                              jnp.asarray(lengths))
    assert cache.first_window_cluster == math.ceil(28 / 4)
    np.testing.assert_array_equal(np.asarray(cache.sizes).sum(-1), [[28, 28], [15, 15]])
    cur = np.array(lengths)
    attend = jax.jit(lambda *args: method.attend(0, *args))
    for _ in range(steps):
        q = rng.standard_normal((2, HQ, D)).astype(np.float32)
        _, cache = attend(cache, jnp.asarray(q), jnp.asarray(k[[0, 1], cur]), jnp.asarray(k[[0, 1], cur]),
                                 jnp.asarray(cur))
        cur = cur + 1
    # 13 decode tokens: two windows of 6 clustered, one token still in the window.
    np.testing.assert_array_equal(np.asarray(cache.windows), [2, 2])
    np.testing.assert_array_equal(np.asarray(cache.window_start), [42, 29])
    sizes, order = np.asarray(cache.sizes), np.asarray(cache.order)
    first = cache.first_window_cluster
    for b, n0 in enumerate([28, 15]):
        for h in range(HKV):
            assert sizes[b, h, first : first + 4].sum() == 12
            assert sizes[b, h].sum() == n0 + 12
            indexed = order[b, h, : n0 + 12]
            np.testing.assert_array_equal(np.sort(indexed), np.arange(2, 2 + n0 + 12))
            # The cache holds the indexed tokens in index order: slot sink + i has order[i].
            np.testing.assert_array_equal(np.asarray(cache.k)[b, h, 2 : 2 + n0 + 12], k[b, indexed, h])
            np.testing.assert_array_equal(np.asarray(cache.v)[b, h, 2 : 2 + n0 + 12], k[b, indexed, h])


def test_nan_prompt_keys_are_left_out_and_windows_stay_contiguous():
    """A NaN key is in no cluster: the index (and the cache order) skip it, windows follow."""
    method = ClusterKV(budget=16, sink=2, tokens_per_cluster=4, window=6, window_clusters=2, dense_layers=0)
    rng = np.random.default_rng(1)
    total, n_prompt = 40, 20
    k = rng.standard_normal((1, total, HKV, D)).astype(np.float32)
    k[0, 7, 1] = np.nan  # one head's key at position 7
    cache = init_cache(method, dataclasses.replace(spec(1, total), prompt_capacity=n_prompt)).layers[0]
    q = rng.standard_normal((1, n_prompt, HQ, D)).astype(np.float32)
    _, cache = method.prefill(0, cache, jnp.asarray(q), jnp.asarray(k[:, :n_prompt]), jnp.asarray(k[:, :n_prompt]),
                              jnp.asarray([n_prompt]))
    attend = jax.jit(lambda *args: method.attend(0, *args))
    for t in range(n_prompt, n_prompt + 7):
        qt = rng.standard_normal((1, HQ, D)).astype(np.float32)
        out, cache = attend(cache, jnp.asarray(qt), jnp.asarray(k[:, t]), jnp.asarray(k[:, t]), jnp.asarray([t]))
        assert np.isfinite(np.asarray(out)).all()
    sizes, order = np.asarray(cache.sizes)[0], np.asarray(cache.order)[0]
    np.testing.assert_array_equal(sizes.sum(-1), [24 - (h == 1) for h in range(HKV)])
    for h in range(HKV):
        indexed = order[h, : sizes[h].sum()]
        expected = [p for p in range(2, 26) if not (h == 1 and p == 7)]
        np.testing.assert_array_equal(np.sort(indexed), expected)
        np.testing.assert_array_equal(np.asarray(cache.k)[0, h, 2 : 2 + len(indexed)], k[0, indexed, h])


def test_covering_budget_equals_full():
    lengths, steps = [37, 21], 15
    full = run_method(Full(), lengths, steps, seed=9)[1]
    for kwargs in (dict(sink=2, window=5, window_clusters=2, tokens_per_cluster=4),
                   dict(sink=0, tokens_per_cluster=7, selection="kv_head")):
        method = ClusterKV(budget=64, dense_layers=0, **kwargs)
        got = run_method(method, lengths, steps, seed=9)[1]
        for (a, *_), (b, *_) in zip(full, got):
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"budget": 16, "sink": 16}, "budget must be an integer >= 17"),
        ({"tokens_per_cluster": 0}, "tokens_per_cluster"),
        ({"selection": "head"}, "selection must be one of"),
        ({"init": "kmeans++"}, "init must be one of"),
        ({"impl": "cuda"}, "impl must be one of"),
        ({"window": 2, "window_clusters": 4}, "window must be an integer >= 4"),
        ({"dense_layers": -1}, "dense_layers"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClusterKV(**kwargs)  # on construction, before any cache exists


def test_rejects_sinks_that_fill_the_cache():
    with pytest.raises(ValueError, match="sink=128 must be smaller than the cache capacity 128"):
        init_cache(ClusterKV(sink=128), spec(1, 128))
