"""Cosine K-means steps for ClusterKV: assign keys to clusters, recompute the centroids.

Shapes: `G` independent problems (batch x KV heads, flattened), `n` keys of dim `d`, `C`
clusters. Invalid keys (padding, sinks, NaN/Inf) take the label `C` ("no cluster"): they
never move a centroid and are never selected.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.numpy as jnp

from pallas_kernels._util import (
    check_impl,
    check_operands,
    next_power_of_2,
    pad_axis,
    refuse_unverified_gpu,
    tiled_block_spec,
)
from pallas_kernels.compat import SQUEEZED, compiler_params, resolve_interpret

NORM_EPS = 1e-12


def normalize(x: jax.Array) -> jax.Array:
    """Unit vectors along the last axis in float32 (zero vectors stay zero)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), NORM_EPS))


# Similarities per key block on CPU: the [C, block] block stays in cache, where the whole
# [n, C] matrix would not (assignment 3-4x faster at 16k-32k keys than one matmul + top-1).
CPU_BLOCK_SIMILARITIES = 2**17


def assign_block_keys(n: int, num_clusters: int) -> int:
    """Keys per block of the XLA assignment: cache-sized on CPU, all keys elsewhere (a GPU
    or TPU does one large matmul best, and a loop over blocks would serialise it)."""
    if jax.default_backend() != "cpu":
        return n
    per_block = CPU_BLOCK_SIMILARITIES // max(num_clusters, 1)
    return min(n, max(128, 1 << (per_block.bit_length() - 1)))  # a power of two


def check_assign_operands(keys, centroids, token_valid, cluster_valid) -> None:
    """Refuse operands whose shapes or dtypes do not fit together, naming the operand."""
    check_operands("kmeans_assign", keys=(keys, "G n d", "float"), centroids=(centroids, "G C d", "float"),
                   token_valid=(token_valid, "G n", "bool"), cluster_valid=(cluster_valid, "G C", "bool"))


def check_update_operands(keys, labels, centroids) -> None:
    """Refuse operands whose shapes or dtypes do not fit together, naming the operand."""
    check_operands("kmeans_update", keys=(keys, "G n d", "float"), labels=(labels, "G n", "int"),
                   centroids=(centroids, "G C d", "float"))


def kmeans_assign_reference(
    keys: jax.Array, centroids: jax.Array, token_valid: jax.Array, cluster_valid: jax.Array
) -> jax.Array:
    """Label of each key: the valid cluster of highest cosine similarity (first on ties).

    Keys with a NaN/Inf entry count as invalid; clusters with a non-finite centroid as
    invalid clusters.

    keys [G, n, d], centroids [G, C, d], token_valid [G, n] bool, cluster_valid [G, C] bool
    -> labels [G, n] int32 in [0, C] (C for invalid keys or when no cluster is valid).

    Evaluated over blocks of keys (`assign_block_keys`), clusters on the major axis: the
    first maximum is a max over clusters, then the smallest cluster id reaching it (the same
    max/iota/min as the Pallas kernel), two reductions that vectorise over the keys.
    """
    check_assign_operands(keys, centroids, token_valid, cluster_valid)
    g, n = keys.shape[:2]
    num_clusters = centroids.shape[1]
    if n == 0:
        return jnp.zeros((g, 0), jnp.int32)
    # Non-finite keys are invalid, and a cluster whose centroid is non-finite cannot win:
    # the maximum of a row with a NaN is NaN, so a NaN key would otherwise join cluster 0 and
    # a NaN centroid would attract every key.
    usable_cluster = cluster_valid & jnp.all(jnp.isfinite(centroids), axis=-1)
    unit_centroids = normalize(centroids)
    ids = jnp.arange(num_clusters, dtype=jnp.int32)[None, :, None]

    def block_labels(unit_keys):  # [G, block, d] -> [G, block]
        sim = jnp.einsum("gcd,gnd->gcn", unit_centroids, unit_keys)
        sim = jnp.where(usable_cluster[:, :, None], sim, -jnp.inf)
        best = jnp.max(sim, axis=1, keepdims=True)
        return jnp.min(jnp.where(sim == best, ids, num_clusters), axis=1)

    block = assign_block_keys(n, num_clusters)
    unit_keys = normalize(keys)

    def label_block(i, labels):
        # The last block ends at n, overlapping the one before: it recomputes the same labels.
        start = jnp.minimum(i * block, n - block)
        part = block_labels(jax.lax.dynamic_slice_in_dim(unit_keys, start, block, axis=1))
        return jax.lax.dynamic_update_slice_in_dim(labels, part, start, axis=1)

    labels = jax.lax.fori_loop(0, -(-n // block), label_block, jnp.zeros((g, n), jnp.int32))
    usable = (
        token_valid
        & jnp.all(jnp.isfinite(keys), axis=-1)
        & jnp.any(usable_cluster, axis=-1, keepdims=True)
    )
    return jnp.where(usable, labels, num_clusters)


def kmeans_update_reference(
    keys: jax.Array, labels: jax.Array, centroids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """New centroids (mean of the raw keys of each cluster) and cluster sizes.

    keys [G, n, d], labels [G, n] in [0, C] (C = no cluster), centroids [G, C, d] (kept for
    empty clusters) -> (centroids [G, C, d] float32, sizes [G, C] int32).
    """
    check_update_operands(keys, labels, centroids)
    num_clusters = centroids.shape[1]
    # Labelled-out keys may be NaN/Inf: zero them so they cannot reach any sum.
    clean = jnp.where((labels < num_clusters)[..., None], keys.astype(jnp.float32), 0.0)
    segment = jax.vmap(
        lambda x, s: jax.ops.segment_sum(x, s, num_segments=num_clusters + 1)[:num_clusters]
    )
    sums = segment(clean, labels)
    sizes = segment(jnp.ones(labels.shape, jnp.int32), labels)
    means = sums / jnp.maximum(sizes, 1)[..., None].astype(jnp.float32)
    return jnp.where((sizes > 0)[..., None], means, centroids.astype(jnp.float32)), sizes


# ----------------------------------------------------------------------------------------
# Pallas kernels
# ----------------------------------------------------------------------------------------

_F32_MAX = float(jnp.finfo(jnp.float32).max)
_HIGHEST = jax.lax.Precision.HIGHEST
_MIN_DOT = 16  # Triton's dot needs every matmul dimension >= 16: blocks are at least this


def _finite_rows(x: jax.Array) -> jax.Array:
    """[r, d] -> [r] bool: every entry finite. Comparisons only (NaN compares false), which
    lower on every backend."""
    bad = jnp.where(jnp.abs(x) <= _F32_MAX, 0, 1)
    return jnp.sum(bad, axis=1) == 0


def _normalize_rows(x: jax.Array) -> jax.Array:
    # Same operations as `normalize`, so the kernel's unit vectors match the reference's.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=1, keepdims=True), NORM_EPS))


def _assign_kernel(keys_ref, cent_ref, tok_ref, clu_ref, out_ref, *, num_clusters: int):
    x = keys_ref[...].astype(jnp.float32)  # [bn, d]
    c = cent_ref[...].astype(jnp.float32)  # [Cp, d] (all clusters, padded to Cp)
    cluster_ok = (clu_ref[...] != 0) & _finite_rows(c)  # [Cp]
    sim = jax.lax.dot_general(
        _normalize_rows(x),
        _normalize_rows(c),
        (((1,), (1,)), ((), ())),
        precision=_HIGHEST,
        preferred_element_type=jnp.float32,
    )  # [bn, Cp]
    sim = jnp.where(cluster_ok[None, :], sim, -jnp.inf)
    best = jnp.max(sim, axis=1, keepdims=True)
    ids = jax.lax.broadcasted_iota(jnp.int32, sim.shape, 1)
    # First maximum (jnp.argmax's tie rule); sims are finite or -inf here, never NaN.
    label = jnp.min(jnp.where(sim == best, ids, sim.shape[1]), axis=1)
    any_cluster = jnp.max(cluster_ok.astype(jnp.int32)) > 0
    usable = (tok_ref[...] != 0) & _finite_rows(x) & any_cluster
    out_ref[...] = jnp.where(usable, label, num_clusters).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("interpret", "block_keys"))
def _kmeans_assign_pallas(keys, centroids, token_valid, cluster_valid, *, interpret, block_keys):
    g, n, d = keys.shape
    num_clusters = centroids.shape[1]
    # Clusters (small) padded to a power of two, keys to whole blocks; padding is invalid.
    cp = max(_MIN_DOT, next_power_of_2(num_clusters))
    bn = max(_MIN_DOT, min(next_power_of_2(block_keys), next_power_of_2(n)))
    n_pad = pl.cdiv(n, bn) * bn
    keys = pad_axis(keys, 1, n_pad)
    token_valid = pad_axis(token_valid.astype(jnp.int32), 1, n_pad)
    centroids = pad_axis(centroids, 1, cp)
    cluster_valid = pad_axis(cluster_valid.astype(jnp.int32), 1, cp)
    kernel = functools.partial(_assign_kernel, num_clusters=num_clusters)
    labels = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g, n_pad), jnp.int32),
        grid=(g, n_pad // bn),
        in_specs=[
            tiled_block_spec(keys.shape, (SQUEEZED, bn, d), lambda i, j: (i, j, 0)),
            tiled_block_spec(centroids.shape, (SQUEEZED, cp, d), lambda i, j: (i, 0, 0)),
            tiled_block_spec(token_valid.shape, (SQUEEZED, bn), lambda i, j: (i, j)),
            tiled_block_spec(cluster_valid.shape, (SQUEEZED, cp), lambda i, j: (i, 0)),
        ],
        out_specs=tiled_block_spec((g, n_pad), (SQUEEZED, bn), lambda i, j: (i, j)),
        compiler_params=compiler_params(("parallel", "parallel"), interpret),
        interpret=interpret,
        name="kmeans_assign",
    )(keys, centroids, token_valid, cluster_valid)
    return labels[:, :n]


def kmeans_assign_pallas(
    keys: jax.Array,
    centroids: jax.Array,
    token_valid: jax.Array,
    cluster_valid: jax.Array,
    *,
    interpret: bool | None = None,
    block_keys: int = 256,
) -> jax.Array:
    """Pallas version of `kmeans_assign_reference` (same arguments and result).

    Grid (G, key blocks of `block_keys`): each step normalises its keys and all C centroids
    of its problem (padded to a power of two >= 16, padding invalid), takes the [block, C] cosine
    similarities with one matmul (HIGHEST precision, so no TF32 on GPU), and a first-max
    argmax written with max/iota/min. Invalid tokens, non-finite keys and problems without a
    usable cluster get label C. Keys are padded to whole blocks (invalid) and the labels
    sliced back: Triton does not mask a partial block (`_util.tiled_block_spec`).

    Verified: CPU interpret mode (jax 0.10). Compiled for an H100 (jax 0.11.2, Triton) the
    version before that padding returned wrong labels for G > 1 or a partial key block: its
    last block wrote past the row into the next problem's labels. Until the padded version
    has matched the reference on a GPU it refuses GPUs; not yet run on a TPU. Written for
    the Triton lowering on GPU (`compat.compiler_params`; static power-of-two blocks >= 16
    for its dot, no argmax primitive, comparisons instead of isfinite) and Mosaic TPU
    (whole-C centroid block in VMEM).
    """
    check_assign_operands(keys, centroids, token_valid, cluster_valid)
    interpret = resolve_interpret(interpret)
    refuse_unverified_gpu("kmeans_assign", interpret, "wrong labels on an H100 before its blocks were padded")
    return _kmeans_assign_pallas(
        keys,
        centroids,
        token_valid,
        cluster_valid,
        interpret=interpret,
        block_keys=block_keys,
    )


def _update_kernel(
    keys_ref, lab_row_ref, lab_col_ref, cent_ref, cent_out, size_out, *, num_clusters, bn, bc
):
    n_blocks = keys_ref.shape[0] // bn
    first = pl.program_id(1) * bc
    ids = first + jax.lax.broadcasted_iota(jnp.int32, (bc, bn), 0)  # cluster of each row

    def body(i, carry):
        sums, counts = carry
        start = pl.multiple_of(i * bn, bn)
        x = keys_ref[pl.ds(start, bn), :].astype(jnp.float32)  # [bn, d]
        lab_row = lab_row_ref[:, pl.ds(start, bn)]  # [1, bn]
        lab_col = lab_col_ref[pl.ds(start, bn), :]  # [bn, 1]
        # Labelled-out keys may be NaN/Inf and 0 * NaN = NaN: zero them before the matmul.
        x = jnp.where((lab_col >= 0) & (lab_col < num_clusters), x, 0.0)
        onehot = lab_row == ids  # [bc, bn]
        sums = sums + jax.lax.dot_general(
            onehot.astype(jnp.float32),
            x,
            (((1,), (0,)), ((), ())),
            precision=_HIGHEST,
            preferred_element_type=jnp.float32,
        )
        counts = counts + jnp.sum(onehot.astype(jnp.int32), axis=1)
        return sums, counts

    d = keys_ref.shape[1]
    init = (jnp.zeros((bc, d), jnp.float32), jnp.zeros((bc,), jnp.int32))
    sums, counts = jax.lax.fori_loop(0, n_blocks, body, init)
    means = sums / jnp.maximum(counts, 1)[:, None].astype(jnp.float32)
    old = cent_ref[...].astype(jnp.float32)
    cent_out[...] = jnp.where((counts > 0)[:, None], means, old)
    size_out[...] = counts


@functools.partial(jax.jit, static_argnames=("interpret", "block_keys", "block_clusters"))
def _kmeans_update_pallas(keys, labels, centroids, *, interpret, block_keys, block_clusters):
    g, n, d = keys.shape
    num_clusters = centroids.shape[1]
    bn = max(_MIN_DOT, min(next_power_of_2(block_keys), next_power_of_2(n)))
    bc = max(_MIN_DOT, min(next_power_of_2(block_clusters), next_power_of_2(num_clusters)))
    n_pad = pl.cdiv(n, bn) * bn
    c_pad = pl.cdiv(num_clusters, bc) * bc
    # Padded keys are zeros labelled "no cluster"; padded clusters (ids >= C) get no key
    # (label C's keys are zeroed in the kernel) and are sliced off.
    keys = pad_axis(keys, 1, n_pad)
    labels = pad_axis(labels.astype(jnp.int32), 1, n_pad, num_clusters)
    centroids = pad_axis(centroids, 1, c_pad)
    kernel = functools.partial(_update_kernel, num_clusters=num_clusters, bn=bn, bc=bc)
    sums, sizes = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((g, c_pad, d), jnp.float32),
            jax.ShapeDtypeStruct((g, c_pad), jnp.int32),
        ),
        grid=(g, c_pad // bc),
        in_specs=[
            tiled_block_spec(keys.shape, (SQUEEZED, n_pad, d), lambda i, j: (i, 0, 0)),
            tiled_block_spec((g, 1, n_pad), (SQUEEZED, 1, n_pad), lambda i, j: (i, 0, 0)),
            tiled_block_spec((g, n_pad, 1), (SQUEEZED, n_pad, 1), lambda i, j: (i, 0, 0)),
            tiled_block_spec(centroids.shape, (SQUEEZED, bc, d), lambda i, j: (i, j, 0)),
        ],
        out_specs=(
            tiled_block_spec((g, c_pad, d), (SQUEEZED, bc, d), lambda i, j: (i, j, 0)),
            tiled_block_spec((g, c_pad), (SQUEEZED, bc), lambda i, j: (i, j)),
        ),
        compiler_params=compiler_params(("parallel", "parallel"), interpret),
        interpret=interpret,
        name="kmeans_update",
    )(keys, labels[:, None, :], labels[:, :, None], centroids)
    return sums[:, :num_clusters], sizes[:, :num_clusters]


def kmeans_update_pallas(
    keys: jax.Array,
    labels: jax.Array,
    centroids: jax.Array,
    *,
    interpret: bool | None = None,
    block_keys: int = 256,
    block_clusters: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """Pallas version of `kmeans_update_reference` (same arguments and result).

    Grid (G, cluster blocks of `block_clusters`): each step loops over key blocks of
    `block_keys` (keys padded to a whole number of blocks with label C), zeroes keys whose
    label is not a cluster (NaN/Inf included), and accumulates per-cluster sums with a
    one-hot [clusters, keys] x [keys, d] matmul (HIGHEST precision) and sizes with a row sum
    of the one-hot. Empty clusters keep their centroid. Labels are passed twice (as a row and
    as a column) so no in-kernel transpose is needed. Clusters are padded to whole blocks
    and sliced back: Triton does not mask a partial block (`_util.tiled_block_spec`).

    Verified: CPU interpret mode (jax 0.10). Compiled for an H100 (jax 0.11.2, Triton) the
    version before that padding gave wrong sums and sizes: its last cluster block wrote past
    the problem's rows. Until the padded version has matched the reference on a GPU it
    refuses GPUs; not yet run on a TPU. Written
    for the Triton lowering (the [n, d] key slab is a pointer there, power-of-two blocks
    >= 16 are sliced out with `pl.ds` in a `fori_loop`). On TPU the whole slab would be
    copied to VMEM, which bounds n * d (a production TPU version would stream key blocks
    with `emit_pipeline`). The one-hot matmul does C * n * d multiply-adds per problem
    (the reference's scatter-add does n * d): dense, atomic-free work instead.
    """
    check_update_operands(keys, labels, centroids)
    interpret = resolve_interpret(interpret)
    refuse_unverified_gpu("kmeans_update", interpret, "wrong sums on an H100 before its blocks were padded")
    return _kmeans_update_pallas(
        keys,
        labels,
        centroids,
        interpret=interpret,
        block_keys=block_keys,
        block_clusters=block_clusters,
    )


def kmeans_assign(
    keys: jax.Array,
    centroids: jax.Array,
    token_valid: jax.Array,
    cluster_valid: jax.Array,
    *,
    impl: str = "xla",
) -> jax.Array:
    """Cosine K-means assignment; `impl="xla"` (reference) or `"pallas"` (kernel)."""
    check_impl(impl)
    if impl == "pallas":
        return kmeans_assign_pallas(keys, centroids, token_valid, cluster_valid)
    return kmeans_assign_reference(keys, centroids, token_valid, cluster_valid)


def kmeans_update(
    keys: jax.Array, labels: jax.Array, centroids: jax.Array, *, impl: str = "xla"
) -> tuple[jax.Array, jax.Array]:
    """K-means centroid update; `impl="xla"` (reference) or `"pallas"` (kernel)."""
    check_impl(impl)
    if impl == "pallas":
        return kmeans_update_pallas(keys, labels, centroids)
    return kmeans_update_reference(keys, labels, centroids)
