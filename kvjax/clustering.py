"""Cosine K-means of keys with static shapes, for ClusterKV (ALGORITHMS.md section 3).

`G` independent problems (batch x KV heads) are clustered at once. Each problem clusters its
first `count` keys into `ceil(count / tokens_per_cluster)` clusters (or a fixed number);
the arrays are sized for `max_clusters`, extra clusters are invalid (size 0). Keys that are
NaN/Inf are left out of every cluster.

Iteration: assign, then `iters` times (update centroids, re-assign), then a last update, so
the returned centroids are exactly the means of the returned clusters' raw keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels as pk

INITS = ("even", "random")


def initial_indices(count: jax.Array, num_clusters: jax.Array, max_clusters: int, n: int,
                    init: str, key: jax.Array | None) -> jax.Array:
    """[G, max_clusters] distinct key indices in [0, count) for the first `num_clusters`
    clusters of each problem: evenly spaced, or drawn without replacement from `key`."""
    c = jnp.arange(max_clusters)
    if init == "even":
        idx = (c[None, :] * count[:, None]) // jnp.maximum(num_clusters[:, None], 1)
    elif init == "random":
        draws = jax.random.uniform(key, (count.shape[0], n))
        draws = jnp.where(jnp.arange(n)[None, :] < count[:, None], draws, -1.0)
        idx = jax.lax.top_k(draws, max_clusters)[1] if max_clusters <= n else jnp.zeros(
            (count.shape[0], max_clusters), jnp.int32)
    else:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return jnp.clip(idx, 0, n - 1).astype(jnp.int32)


def cluster_keys(
    keys: jax.Array,
    count: jax.Array,
    num_clusters: jax.Array,
    max_clusters: int,
    iters: int = 20,
    init: str = "even",
    key: jax.Array | None = None,
    impl: str = "xla",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cluster `keys` [G, n, d]: the first `count` [G] keys of each problem into
    `num_clusters` [G] (<= max_clusters, <= count) clusters.

    Returns (centroids [G, C, d] float32, sizes [G, C] int32, labels [G, n] int32 with C
    for keys in no cluster).
    """
    g, n, _ = keys.shape
    in_range = jnp.arange(n)[None, :] < count[:, None]
    token_valid = in_range & jnp.all(jnp.isfinite(keys), axis=-1)
    cluster_valid = jnp.arange(max_clusters)[None, :] < num_clusters[:, None]
    idx = initial_indices(count, num_clusters, max_clusters, n, init, key)
    centroids = jnp.take_along_axis(keys.astype(jnp.float32), idx[..., None], axis=1)
    centroids = jnp.where(jnp.isfinite(centroids), centroids, 0.0)

    def assign(c):
        return pk.kmeans_assign(keys, c, token_valid, cluster_valid, impl=impl)

    def step(_, carry):
        labels, c = carry
        c, _ = pk.kmeans_update(keys, labels, c, impl=impl)
        return assign(c), c

    labels, centroids = jax.lax.fori_loop(0, iters, step, (assign(centroids), centroids))
    centroids, sizes = pk.kmeans_update(keys, labels, centroids, impl=impl)
    return centroids, sizes, labels
