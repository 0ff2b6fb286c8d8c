"""Pallas kernels (interpret mode on CPU) against their pure-jnp references, and the
references against straightforward numpy loops.

Inputs are fresh random normals (never zeros) of a few KiB to a few MiB: interpret mode is
slow. Shapes cover G > 1, the SmolLM2 grouping (9 query heads, 3 KV heads, d = 64), sizes
that are not multiples of the kernels' blocks, and the edge cases of each operation.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import compat
from pallas_kernels.kmeans import NORM_EPS
from pallas_kernels.sparse_attention import MASKED

TIE = 1e-5  # cosine similarities closer than this may legitimately round either way

# The references, jitted: one compilation per shape instead of one per op (3-5x faster here).
kmeans_assign_ref = jax.jit(pk.kmeans_assign_reference)
kmeans_update_ref = jax.jit(pk.kmeans_update_reference)
centroid_scores_ref = jax.jit(pk.centroid_scores_reference)
page_scores_ref = jax.jit(pk.page_scores_reference)
sparse_attention_ref = jax.jit(pk.sparse_decode_attention_reference, static_argnums=5)


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def normal(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# ----------------------------------------------------------------------------------------
# numpy loop oracles (float64)
# ----------------------------------------------------------------------------------------


def np_unit(x):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(max(float(x @ x), NORM_EPS))


def np_cos_sims(keys, centroids):
    """[G, n, C] float64 cosine similarities (NaN where a vector is non-finite)."""
    g_, n, _ = keys.shape
    c = centroids.shape[1]
    out = np.full((g_, n, c), np.nan)
    with np.errstate(invalid="ignore", over="ignore"):
        for g in range(g_):
            for i in range(n):
                for j in range(c):
                    out[g, i, j] = np_unit(keys[g, i]) @ np_unit(centroids[g, j])
    return out


def np_kmeans_assign(keys, centroids, token_valid, cluster_valid):
    g_, n, _ = keys.shape
    c = centroids.shape[1]
    sims = np_cos_sims(keys, centroids)
    labels = np.full((g_, n), c, np.int32)
    for g in range(g_):
        usable = [j for j in range(c) if cluster_valid[g, j] and np.isfinite(centroids[g, j]).all()]
        for i in range(n):
            if not token_valid[g, i] or not np.isfinite(keys[g, i]).all() or not usable:
                continue
            best = usable[0]
            for j in usable[1:]:
                if sims[g, i, j] > sims[g, i, best]:  # strict: first maximum wins
                    best = j
            labels[g, i] = best
    return labels


def np_kmeans_update(keys, labels, centroids):
    g_, n, d = keys.shape
    c = centroids.shape[1]
    sums = np.zeros((g_, c, d))
    sizes = np.zeros((g_, c), np.int32)
    for g in range(g_):
        for i in range(n):
            lab = labels[g, i]
            if lab < c:
                sums[g, lab] += keys[g, i]
                sizes[g, lab] += 1
    out = np.array(centroids, np.float64)
    for g in range(g_):
        for j in range(c):
            if sizes[g, j]:
                out[g, j] = sums[g, j] / sizes[g, j]
    return out, sizes


def np_centroid_scores(q, centroids, valid):
    b_, hq, d = q.shape
    hkv, c = centroids.shape[1], centroids.shape[2]
    out = np.zeros((b_, hq, c))
    for b in range(b_):
        for h in range(hq):
            kv = h // (hq // hkv)
            for j in range(c):
                s = sum(float(q[b, h, t]) * float(centroids[b, kv, j, t]) for t in range(d))
                out[b, h, j] = s if valid[b, kv, j] else -np.inf
    return out


def np_page_scores(q, lo, hi, valid):
    b_, hq, d = q.shape
    hkv, p = lo.shape[1], lo.shape[2]
    out = np.zeros((b_, hq, p))
    for b in range(b_):
        for h in range(hq):
            kv = h // (hq // hkv)
            for j in range(p):
                s = 0.0
                for t in range(d):
                    s += max(float(q[b, h, t]) * float(lo[b, kv, j, t]),
                             float(q[b, h, t]) * float(hi[b, kv, j, t]))
                out[b, h, j] = s if valid[b, kv, j] else -np.inf
    return out


def np_sparse_attention(q, k, v, indices, valid, block_size):
    """Exact softmax over the valid selected slots. A fully masked row gets the reference's
    documented value: lse = MASKED (+ log count, lost in float32), out = mean of gathered v."""
    b_, hq, d = q.shape
    hkv = k.shape[1]
    n = indices.shape[-1]
    out = np.zeros((b_, hq, d))
    lse = np.zeros((b_, hq))
    for b in range(b_):
        for h in range(hq):
            kv = h // (hq // hkv)
            scores, values, oks = [], [], []
            for e in range(n):
                for t in range(block_size):
                    slot = int(indices[b, h, e]) * block_size + t
                    ok = valid[b, h, e, t] if valid.ndim == 4 else valid[b, h, e]
                    scores.append(np.dot(q[b, h].astype(np.float64), k[b, kv, slot]) / np.sqrt(d))
                    values.append(np.asarray(v[b, kv, slot], np.float64))
                    oks.append(bool(ok))
            scores, values, oks = np.array(scores), np.array(values), np.array(oks)
            if oks.any():
                s = scores[oks]
                m = s.max()
                p = np.exp(s - m)
                out[b, h] = (p[:, None] * values[oks]).sum(0) / p.sum()
                lse[b, h] = m + np.log(p.sum())
            else:
                out[b, h] = values.mean(0)
                lse[b, h] = MASKED
    return out, lse


# ----------------------------------------------------------------------------------------
# Input builders
# ----------------------------------------------------------------------------------------


def kmeans_inputs(rng, g, n, d, c, *, poison=True):
    """Keys with duplicates, NaN/Inf rows, padded tokens; centroids with invalid clusters,
    a duplicate centroid and a NaN centroid; the last problem may have no valid cluster."""
    keys = normal(rng, (g, n, d))
    centroids = normal(rng, (g, c, d))
    token_valid = rng.random((g, n)) < 0.85
    cluster_valid = rng.random((g, c)) < 0.8
    cluster_valid[:, 0] = True
    keys[:, 1] = keys[:, 0]  # duplicate keys
    keys[:, n - 1] = keys[:, 2]
    if c >= 3:
        centroids[:, 2] = centroids[:, 1]  # duplicate centroids: exact tie, first wins
        cluster_valid[:, 1:3] = True
    if poison:
        keys[0, 3] = np.nan
        keys[0, 4, 0] = np.inf
        keys[-1, 5, d - 1] = -np.inf
        token_valid[:, 3:6] = True  # non-finite keys flagged valid: must still be left out
        if c >= 4:
            centroids[0, 3, 1] = np.nan  # a "valid" cluster with a NaN centroid never wins
            cluster_valid[0, 3] = True
    if g > 1 and poison:
        cluster_valid[-1] = False  # a problem without any valid cluster
    return keys, centroids, token_valid, cluster_valid


def assert_labels_match(got, want, sims, num_clusters, *, max_ties=3):
    """Equal labels, except near-ties (|sim difference| < TIE) that rounding may flip."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == np.int32
    diff = np.argwhere(got != want)
    for g, i in diff:
        a, b = int(got[g, i]), int(want[g, i])
        assert a < num_clusters and b < num_clusters, (g, i, a, b)
        assert abs(sims[g, i, a] - sims[g, i, b]) < TIE, (g, i, a, b, sims[g, i, a], sims[g, i, b])
    assert len(diff) <= max_ties


def sparse_inputs(rng, b, hq, hkv, d, s, bs, n, valid_kind, dtype=np.float32):
    q = normal(rng, (b, hq, d))
    k = normal(rng, (b, hkv, s, d)).astype(dtype)
    v = normal(rng, (b, hkv, s, d)).astype(dtype)
    num_blocks = s // bs
    indices = rng.integers(0, num_blocks, (b, hq, n)).astype(np.int32)
    indices[..., 1] = indices[..., 0]  # repeated indices are attended twice, like the reference
    indices[-1, 0, -1] -= num_blocks  # a negative index wraps once, like jnp indexing
    shape = (b, hq, n) if valid_kind == "3d" else (b, hq, n, bs)
    valid = rng.random(shape) < 0.7
    valid[0, 0] = False  # a fully masked row
    valid[-1, -1] = True  # a fully valid row
    if valid_kind == "3d" and n > 3:
        indices[0, 1, 3] = -1  # invalid entry with a negative index (wraps like jnp)
        valid[0, 1, 3] = False
    return q, k, v, indices, valid


# ----------------------------------------------------------------------------------------
# References against numpy loops (tiny shapes)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("g,n,d,c", [(1, 9, 4, 3), (3, 14, 8, 5)])
def test_kmeans_assign_reference_matches_loops(g, n, d, c):
    rng = rng_for("assign_ref", g, n, d, c)
    keys, centroids, tv, cv = kmeans_inputs(rng, g, n, d, c)
    keys[0, 6] = 0.0  # a zero key: all similarities 0, first usable cluster
    tv[0, 6] = True
    want = np_kmeans_assign(keys, centroids, tv, cv)
    got = kmeans_assign_ref(*map(jnp.asarray, (keys, centroids, tv, cv)))
    assert_labels_match(got, want, np_cos_sims(keys, centroids), c, max_ties=0)
    assert want[0, 3] == want[0, 4] == c  # the non-finite keys were left out
    if g > 1:
        assert (want[-1] == c).all()


def test_kmeans_assign_reference_in_key_blocks_matches_loops(monkeypatch):
    """The XLA assignment runs over blocks of keys on CPU: with blocks of 128 keys, 300 keys
    are two whole blocks and a partial one, and non-finite, zero and padded keys sit in later
    blocks too."""
    from pallas_kernels import kmeans

    monkeypatch.setattr(kmeans, "CPU_BLOCK_SIMILARITIES", 2**12)
    g, n, d, c = 2, 300, 8, 40
    assert kmeans.assign_block_keys(n, c) == 128 or jax.default_backend() != "cpu"
    rng = rng_for("assign_blocks", g, n, d, c)
    keys, centroids, tv, cv = kmeans_inputs(rng, g, n, d, c)
    keys[0, 200] = np.nan  # problem 0 (problem 1 has no valid cluster)
    keys[0, 140] = 0.0
    tv[0, [140, 200]] = True
    want = np_kmeans_assign(keys, centroids, tv, cv)
    got = jax.jit(pk.kmeans_assign_reference)(*map(jnp.asarray, (keys, centroids, tv, cv)))
    assert_labels_match(got, want, np_cos_sims(keys, centroids), c, max_ties=0)
    assert want[0, 200] == c and want[0, 140] < c
    empty = pk.kmeans_assign_reference(jnp.asarray(keys[:, :0]), jnp.asarray(centroids),
                                       jnp.asarray(tv[:, :0]), jnp.asarray(cv))
    assert empty.shape == (g, 0) and empty.dtype == jnp.int32


@pytest.mark.parametrize("g,n,d,c", [(1, 9, 4, 3), (2, 17, 6, 5)])
def test_kmeans_update_reference_matches_loops(g, n, d, c):
    rng = rng_for("update_ref", g, n, d, c)
    keys = normal(rng, (g, n, d))
    centroids = normal(rng, (g, c, d))
    labels = rng.integers(0, c + 1, (g, n)).astype(np.int32)
    labels[labels == c - 1] = c  # cluster c-1 is empty: keeps its centroid
    labels[0, 0] = c
    keys[0, 0] = np.nan  # labelled out: must not reach any sum
    want_c, want_s = np_kmeans_update(keys, labels, centroids)
    got_c, got_s = kmeans_update_ref(*map(jnp.asarray, (keys, labels, centroids)))
    np.testing.assert_array_equal(np.asarray(got_s), want_s)
    np.testing.assert_allclose(np.asarray(got_c), want_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_c)[:, c - 1], centroids[:, c - 1])


@pytest.mark.parametrize("b,hq,hkv,d,c", [(1, 2, 2, 4, 5), (2, 6, 2, 8, 7)])
def test_score_references_match_loops(b, hq, hkv, d, c):
    rng = rng_for("scores_ref", b, hq, hkv, d, c)
    q = normal(rng, (b, hq, d))
    lo = normal(rng, (b, hkv, c, d))
    hi = lo + np.abs(normal(rng, (b, hkv, c, d)))
    valid = rng.random((b, hkv, c)) < 0.7
    got = centroid_scores_ref(jnp.asarray(q), jnp.asarray(lo), jnp.asarray(valid))
    want = np_centroid_scores(q, lo, valid)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    want = np_page_scores(q, lo, hi, valid)
    for form in (page_scores_ref, jax.jit(pk.page_scores_matmul)):
        got = form(*map(jnp.asarray, (q, lo, hi, valid)))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_page_scores_matmul_matches_reference(dtype):
    """The sign-split matrix-product form of Quest's bound on the cases where the choice
    between `q * min` and `q * max` matters: query entries of both signs and exactly zero,
    pages with min == max (one token), all-zero digests (empty pages), bfloat16 digests."""
    rng = rng_for("page_scores_matmul", str(dtype))
    b, hq, hkv, d, p = 2, 6, 2, 16, 40
    q = normal(rng, (b, hq, d))
    q[rng.random(q.shape) < 0.2] = 0.0
    lo = normal(rng, (b, hkv, p, d))
    hi = lo + np.abs(normal(rng, (b, hkv, p, d)))
    hi[:, :, :5] = lo[:, :, :5]
    lo[:, :, 5:9] = hi[:, :, 5:9] = 0.0
    valid = rng.random((b, hkv, p)) < 0.8
    args = (jnp.asarray(q), jnp.asarray(lo, dtype), jnp.asarray(hi, dtype), jnp.asarray(valid))
    got = np.asarray(jax.jit(pk.page_scores_matmul)(*args))
    want = np.asarray(page_scores_ref(*args))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("as_matmuls", [True, False])
def test_page_scores_xla_form_follows_backend(monkeypatch, as_matmuls):
    """impl="xla" computes page scores as matrix products where `compat` says so (CPUs)
    and with the reference's element-wise reduction elsewhere."""
    import pallas_kernels.scores as scores

    monkeypatch.setattr(scores, "page_bounds_as_matmuls", lambda: as_matmuls)
    for form in ("matmul", "reference"):
        monkeypatch.setattr(scores, f"page_scores_{form}", lambda *a, _f=form: _f)
    assert pk.page_scores(*(object(),) * 4) == ("matmul" if as_matmuls else "reference")


@pytest.mark.parametrize(
    "b,hq,hkv,d,s,bs,n,valid_kind",
    [(1, 2, 1, 8, 12, 1, 5, "3d"), (2, 6, 2, 8, 16, 4, 3, "4d"), (1, 3, 3, 4, 8, 2, 4, "3d")],
)
def test_sparse_attention_reference_matches_loops(b, hq, hkv, d, s, bs, n, valid_kind):
    rng = rng_for("sparse_ref", b, hq, hkv, d, s, bs, n, valid_kind)
    q, k, v, idx, valid = sparse_inputs(rng, b, hq, hkv, d, s, bs, n, valid_kind)
    want_o, want_l = np_sparse_attention(q, k, v, idx, valid, bs)
    got_o, got_l = sparse_attention_ref(*map(jnp.asarray, (q, k, v, idx, valid)), bs)
    np.testing.assert_allclose(np.asarray(got_o), want_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_l), want_l, rtol=1e-5, atol=1e-5)


def test_sparse_attention_reference_full_selection_is_dense_attention():
    """Selecting every token of the head gives plain softmax attention over the cache."""
    rng = rng_for("dense")
    b, hq, hkv, d, s = 1, 4, 2, 8, 10
    q, k, v = normal(rng, (b, hq, d)), normal(rng, (b, hkv, s, d)), normal(rng, (b, hkv, s, d))
    idx = np.broadcast_to(rng.permutation(s).astype(np.int32), (b, hq, s))
    out, lse = pk.sparse_decode_attention_reference(
        *map(jnp.asarray, (q, k, v, idx)), jnp.ones((b, hq, s), bool)
    )
    kh = np.repeat(k, hq // hkv, axis=1)
    vh = np.repeat(v, hq // hkv, axis=1)
    sc = np.einsum("bhd,bhsd->bhs", q, kh) / np.sqrt(d)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    want = np.einsum("bhs,bhsd->bhd", p / p.sum(-1, keepdims=True), vh)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.log(np.exp(sc).sum(-1)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Pallas kernels against the references (interpret mode)
# ----------------------------------------------------------------------------------------


def test_interpret_defaults_to_true_on_cpu_only():
    assert compat.resolve_interpret(None) is (jax.default_backend() == "cpu")
    assert compat.resolve_interpret(False) is False


@pytest.mark.parametrize(
    "g,n,d,c,block",
    [
        (1, 64, 32, 8, 64),  # one exact block
        (3, 200, 64, 37, 64),  # G > 1, n and C not multiples of the blocks
        (2, 130, 16, 5, 32),
        (2, 50, 64, 400, 256),  # many clusters (ClusterKV's 400), one partial key block
    ],
)
def test_kmeans_assign_pallas(g, n, d, c, block):
    rng = rng_for("assign", g, n, d, c, block)
    keys, centroids, tv, cv = kmeans_inputs(rng, g, n, d, c)
    args = tuple(map(jnp.asarray, (keys, centroids, tv, cv)))
    want = kmeans_assign_ref(*args)
    got = pk.kmeans_assign_pallas(*args, block_keys=block)
    assert_labels_match(got, want, np.asarray(jnp.einsum(
        "gnd,gcd->gnc", pk.kmeans.normalize(args[0]), pk.kmeans.normalize(args[1]))), c)
    got = np.asarray(got)
    assert (got[~tv] == c).all()
    assert got[0, 3] == got[0, 4] == c  # non-finite keys left out
    if c >= 4:
        assert not (got[0] == 3).any()  # the NaN centroid wins nothing
    if g > 1:
        assert (got[-1] == c).all()  # no valid cluster
    assert (got[0][tv[0]] < c).any()  # problem 0 has valid clusters: keys were assigned


@pytest.mark.parametrize(
    "g,n,d,c,block_keys,block_clusters",
    [
        (1, 64, 32, 8, 64, 8),
        (3, 200, 64, 37, 64, 16),  # partial key and cluster blocks
        (2, 130, 16, 5, 256, 128),  # blocks larger than the problem
        (2, 300, 64, 150, 128, 64),
    ],
)
def test_kmeans_update_pallas(g, n, d, c, block_keys, block_clusters):
    rng = rng_for("update", g, n, d, c, block_keys, block_clusters)
    keys, centroids, tv, cv = kmeans_inputs(rng, g, n, d, c)
    cv[:, c - 1] = False  # guaranteed empty cluster
    labels = kmeans_assign_ref(*map(jnp.asarray, (keys, centroids, tv, cv)))
    assert (np.asarray(labels) == c).any()  # NaN/invalid keys labelled out
    want_c, want_s = kmeans_update_ref(jnp.asarray(keys), labels, jnp.asarray(centroids))
    got_c, got_s = pk.kmeans_update_pallas(
        jnp.asarray(keys), labels, jnp.asarray(centroids),
        block_keys=block_keys, block_clusters=block_clusters,
    )
    assert got_c.dtype == jnp.float32 and got_s.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got_s), np.asarray(want_s))
    np.testing.assert_allclose(np.asarray(got_c), np.asarray(want_c), rtol=1e-5, atol=1e-5)
    assert (np.asarray(got_s) == 0).any()
    # Only the deliberately NaN centroid may be non-finite, and only if it got no key.
    finite = np.isfinite(np.asarray(got_c)).all(-1)
    assert finite[1:].all() and finite[0, np.arange(c) != 3].all()


@pytest.mark.parametrize("g,n,d,c", [(2, 100, 32, 12)])
def test_kmeans_update_pallas_random_labels(g, n, d, c):
    """Labels drawn directly (many in [0, C), some C) with NaN keys only under label C."""
    rng = rng_for("update_random", g, n, d, c)
    keys = normal(rng, (g, n, d))
    labels = rng.integers(0, c + 1, (g, n)).astype(np.int32)
    labels[:, :7] = c
    keys[:, :3] = np.nan
    keys[:, 3:5] = np.inf
    centroids = normal(rng, (g, c, d))
    args = tuple(map(jnp.asarray, (keys, labels, centroids)))
    want_c, want_s = kmeans_update_ref(*args)
    got_c, got_s = pk.kmeans_update_pallas(*args, block_keys=32, block_clusters=8)
    np.testing.assert_array_equal(np.asarray(got_s), np.asarray(want_s))
    np.testing.assert_allclose(np.asarray(got_c), np.asarray(want_c), rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(got_c)).all()


SCORE_CASES = [
    (1, 4, 4, 32, 16, 512, np.float32),  # G = 1, block larger than C
    (2, 9, 3, 64, 45, 16, np.float32),  # SmolLM2 grouping, partial last block
    (2, 8, 2, 16, 130, 32, jnp.bfloat16),  # G = 4, bf16 cache
]


def _assert_scores(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    assert np.isneginf(want).any() and np.isfinite(want).any()
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("b,hq,hkv,d,c,block,dtype", SCORE_CASES)
def test_centroid_scores_pallas(b, hq, hkv, d, c, block, dtype):
    rng = rng_for("centroid", b, hq, hkv, d, c, block)
    q = jnp.asarray(normal(rng, (b, hq, d)), dtype)
    cents = jnp.asarray(normal(rng, (b, hkv, c, d)), dtype)
    valid = jnp.asarray(rng.random((b, hkv, c)) < 0.8)
    _assert_scores(
        pk.centroid_scores_pallas(q, cents, valid, block=block),
        centroid_scores_ref(q, cents, valid),
    )


@pytest.mark.parametrize("b,hq,hkv,d,c,block,dtype", SCORE_CASES)
def test_page_scores_pallas(b, hq, hkv, d, c, block, dtype):
    rng = rng_for("page", b, hq, hkv, d, c, block)
    q = jnp.asarray(normal(rng, (b, hq, d)), dtype)
    lo = normal(rng, (b, hkv, c, d))
    hi = lo + np.abs(normal(rng, (b, hkv, c, d)))
    valid = jnp.asarray(rng.random((b, hkv, c)) < 0.8)
    lo, hi = jnp.asarray(lo, dtype), jnp.asarray(hi, dtype)
    _assert_scores(
        pk.page_scores_pallas(q, lo, hi, valid, block=block),
        page_scores_ref(q, lo, hi, valid),
    )


SPARSE_CASES = [
    # b, hq, hkv, d, s, block_size, n, chunk, valid_kind, dtype, scalar_prefetch
    (2, 9, 3, 64, 160, 1, 50, 16, "4d", np.float32, False),  # SmolLM2, tokens, n % chunk != 0
    (2, 9, 3, 64, 160, 16, 7, 32, "4d", np.float32, False),  # pages, per-slot validity
    (2, 9, 3, 64, 160, 16, 7, 32, "3d", np.float32, True),  # scalar-prefetch index path
    (1, 3, 1, 64, 256, 16, 16, 128, "3d", np.float32, False),
    (1, 6, 2, 64, 96, 1, 20, 1000, "3d", jnp.bfloat16, False),  # chunk > n, bf16 cache
    (2, 4, 4, 16, 48, 1, 3, 128, "3d", np.float32, True),  # tiny n
]


@pytest.mark.parametrize("b,hq,hkv,d,s,bs,n,chunk,valid_kind,dtype,prefetch", SPARSE_CASES)
def test_sparse_decode_attention_pallas(
    b, hq, hkv, d, s, bs, n, chunk, valid_kind, dtype, prefetch
):
    if prefetch and jax.default_backend() not in ("cpu", "tpu"):
        pytest.skip("scalar prefetch is a TPU (Mosaic) feature; Triton has no lowering for it")
    rng = rng_for("sparse", b, hq, hkv, d, s, bs, n, chunk, valid_kind, prefetch)
    q, k, v, idx, valid = sparse_inputs(rng, b, hq, hkv, d, s, bs, n, valid_kind, dtype)
    args = tuple(map(jnp.asarray, (q, k, v, idx, valid)))
    want_o, want_l = sparse_attention_ref(*args, bs)
    got_o, got_l = pk.sparse_decode_attention_pallas(
        *args, bs, chunk=chunk, scalar_prefetch=prefetch
    )
    got_o, got_l, want_o, want_l = map(np.asarray, (got_o, got_l, want_o, want_l))
    assert got_o.shape == (b, hq, d) and got_l.shape == (b, hq)
    assert got_o.dtype == np.float32 and got_l.dtype == np.float32
    any_valid = valid.reshape(b, hq, -1).any(-1)
    assert (~any_valid).any() and any_valid.any()
    np.testing.assert_allclose(got_o[any_valid], want_o[any_valid], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got_l[any_valid], want_l[any_valid], rtol=2e-5, atol=2e-5)
    # Fully masked rows: only the merge contract (weight 0, finite output).
    assert (got_l[~any_valid] <= -1e29).all()
    assert np.isfinite(got_o).all()


def test_sparse_decode_attention_pallas_gathers_nothing_outside_the_kernel():
    """K/V are read by index inside the kernel: the traced program has no gather (the
    reference's has one, so this check can fail)."""
    rng = rng_for("nogather")
    q, k, v, idx, valid = sparse_inputs(rng, 1, 4, 2, 16, 32, 1, 8, "3d")
    args = tuple(map(jnp.asarray, (q, k, v, idx, valid)))

    from jax.extend.core import jaxprs_in_params

    def primitives(jaxpr, skip_pallas=True):
        names = set()
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            if skip_pallas and eqn.primitive.name == "pallas_call":
                continue
            for sub in jaxprs_in_params(eqn.params):
                names |= primitives(sub, skip_pallas)
        return names

    kernel = primitives(jax.make_jaxpr(pk.sparse_decode_attention_pallas)(*args).jaxpr)
    ref = primitives(jax.make_jaxpr(pk.sparse_decode_attention_reference)(*args).jaxpr)
    assert "pallas_call" in kernel and "gather" not in kernel
    assert "gather" in ref


# ----------------------------------------------------------------------------------------
# Dispatchers
# ----------------------------------------------------------------------------------------


DISPATCHERS = [  # module, dispatcher, number of positional arguments
    ("kmeans", "kmeans_assign", 4),
    ("kmeans", "kmeans_update", 3),
    ("scores", "centroid_scores", 3),
    ("scores", "page_scores", 4),
    ("sparse_attention", "sparse_decode_attention", 6),
]


@pytest.mark.parametrize("module,name,nargs", DISPATCHERS)
def test_dispatcher_routes_by_impl(monkeypatch, module, name, nargs):
    """impl="xla" (the default) calls the reference, impl="pallas" the kernel, with the
    same positional arguments."""
    import importlib

    mod = importlib.import_module(f"pallas_kernels.{module}")
    if hasattr(mod, "page_bounds_as_matmuls"):  # the CPU's XLA form of page scores: tested above
        monkeypatch.setattr(mod, "page_bounds_as_matmuls", lambda: False)
    calls = []
    for suffix in ("reference", "pallas"):
        monkeypatch.setattr(
            mod, f"{name}_{suffix}", lambda *a, _s=suffix, **kw: calls.append((_s, a, kw)) or _s
        )
    dispatch = getattr(pk, name)
    args = tuple(object() for _ in range(nargs))
    assert dispatch(*args) == "reference"
    assert dispatch(*args, impl="xla") == "reference"
    assert dispatch(*args, impl="pallas") == "pallas"
    assert [c[0] for c in calls] == ["reference", "reference", "pallas"]
    assert all(c[1] == args and not c[2] for c in calls)


@pytest.mark.parametrize("bad", ["triton", "XLA", "", None])
@pytest.mark.parametrize("module,name,nargs", DISPATCHERS)
def test_dispatcher_rejects_unknown_impl(module, name, nargs, bad):
    args = tuple(object() for _ in range(nargs))
    with pytest.raises(ValueError, match=r"impl.*'xla'.*'pallas'"):
        getattr(pk, name)(*args, impl=bad)


# ----------------------------------------------------------------------------------------
# Whole blocks (Triton does not mask a partial block) and the GPU refusal
# ----------------------------------------------------------------------------------------


def test_tiled_block_spec_refuses_a_partial_block():
    from pallas_kernels._util import tiled_block_spec

    index_map = lambda i, j: (i, j)
    assert tiled_block_spec((3, 256), (compat.SQUEEZED, 64), index_map) is not None
    with pytest.raises(ValueError, match=r"dimension 1: 200 is not a multiple of 64"):
        tiled_block_spec((3, 200), (compat.SQUEEZED, 64), index_map)
    with pytest.raises(ValueError, match="another rank"):
        tiled_block_spec((3, 200, 4), (compat.SQUEEZED, 64), index_map)


def _block_size(dim) -> int:
    if isinstance(dim, int):
        return dim
    return getattr(dim, "block_size", 1)  # squeezed: 1 (None or a marker object, by jax version)


def _pallas_tilings(jaxpr):
    """(array shape, block sizes) of every operand and output of every pallas_call in `jaxpr`."""
    from jax.extend.core import jaxprs_in_params

    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            for bm in eqn.params["grid_mapping"].block_mappings:
                aval = getattr(bm, "array_aval", None) or getattr(bm, "array_shape_dtype")
                found.append((tuple(aval.shape), tuple(_block_size(d) for d in bm.block_shape)))
        for sub in jaxprs_in_params(eqn.params):
            found += _pallas_tilings(sub)
    return found


def test_every_kernel_tiles_its_arrays_exactly():
    """On shapes that are not multiples of any block (G > 1, 200 keys, 37 clusters, 130
    entries with G = 4, n = 50 selected tokens), every operand of every kernel is covered by
    whole blocks. The previous kernels' last blocks wrote past their rows on an H100."""
    rng = rng_for("tiling")
    keys, centroids, tv, cv = map(jnp.asarray, kmeans_inputs(rng, 3, 200, 64, 37))
    labels = kmeans_assign_ref(keys, centroids, tv, cv)
    q = jnp.asarray(normal(rng, (2, 8, 16)))
    table = jnp.asarray(normal(rng, (2, 2, 130, 16)))
    valid = jnp.asarray(rng.random((2, 2, 130)) < 0.8)
    sparse = tuple(map(jnp.asarray, sparse_inputs(rng, 2, 9, 3, 64, 160, 1, 50, "4d")))
    calls = [
        (functools.partial(pk.kmeans_assign_pallas, block_keys=64), (keys, centroids, tv, cv)),
        (functools.partial(pk.kmeans_update_pallas, block_keys=64, block_clusters=16), (keys, labels, centroids)),
        (functools.partial(pk.centroid_scores_pallas, block=32), (q, table, valid)),
        (functools.partial(pk.page_scores_pallas, block=32), (q, table, table + 1.0, valid)),
        (functools.partial(pk.sparse_decode_attention_pallas, chunk=16, scalar_prefetch=False), sparse),
    ]
    for fn, args in calls:
        tilings = _pallas_tilings(jax.make_jaxpr(fn)(*args).jaxpr)
        assert tilings, fn
        for shape, block in tilings:
            assert all(size % step == 0 for size, step in zip(shape, block)), (fn, shape, block)


def test_unverified_kernels_refuse_a_gpu_unless_a_verification_run_allows_them(monkeypatch):
    from pallas_kernels import _util

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv(_util.ALLOW_UNVERIFIED_ENV, raising=False)
    with pytest.raises(NotImplementedError, match=r"kmeans_assign is not verified on GPUs.*KVJAX_ALLOW_UNVERIFIED"):
        _util.refuse_unverified_gpu("kmeans_assign", interpret=False, why="test")
    _util.refuse_unverified_gpu("kmeans_assign", interpret=True, why="test")  # interpret mode runs anywhere
    monkeypatch.setenv(_util.ALLOW_UNVERIFIED_ENV, "1")
    _util.refuse_unverified_gpu("kmeans_assign", interpret=False, why="test")


TRITON_CALL = "__gpu$xla.gpu.triton"


def test_every_kernel_passes_the_triton_lowering(monkeypatch):
    """Each kernel lowered for CUDA on this machine (cross-platform lowering with the Triton
    compiler parameters a GPU backend selects): Triton's lowering rules run here, so
    non-power-of-two in-kernel shapes or unsupported operations fail without a GPU.
    Compiling and running the Triton code still needs one."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what compat.compiler_params asks
    S = jax.ShapeDtypeStruct
    f32, bf16 = jnp.float32, jnp.bfloat16
    calls = {
        "kmeans_assign": (functools.partial(pk.kmeans_assign_pallas, block_keys=64),
                          (S((3, 200, 64), f32), S((3, 37, 64), f32), S((3, 200), bool), S((3, 37), bool))),
        "kmeans_update": (functools.partial(pk.kmeans_update_pallas, block_keys=64, block_clusters=16),
                          (S((3, 200, 64), f32), S((3, 200), jnp.int32), S((3, 37, 64), f32))),
        "centroid_scores": (functools.partial(pk.centroid_scores_pallas, block=32),
                            (S((2, 8, 64), bf16), S((2, 2, 130, 64), bf16), S((2, 2, 130), bool))),
        "page_scores": (functools.partial(pk.page_scores_pallas, block=16),
                        (S((2, 9, 64), f32), S((2, 3, 45, 64), f32), S((2, 3, 45, 64), f32), S((2, 3, 45), bool))),
        "sparse_decode_attention": (functools.partial(pk.sparse_decode_attention_pallas, chunk=16),
                                    (S((2, 9, 64), f32), S((2, 3, 160, 64), bf16), S((2, 3, 160, 64), bf16),
                                     S((2, 9, 50), jnp.int32), S((2, 9, 50, 1), bool))),
    }
    # The target GPU: jax >= 0.11 asks the abstract mesh's device for the compute capability
    # when no GPU is attached (0.10 assumed 9.0 then), so name the H100 the GPU runs use.
    h100 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100", num_cores=None, platform="gpu"))
    for name, (fn, args) in calls.items():
        with jax.sharding.use_abstract_mesh(h100):
            exported = jax.export.export(
                jax.jit(fn), platforms=("cuda",),
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
            )(*args)
        assert exported.mlir_module().count(TRITON_CALL) == 1, name
