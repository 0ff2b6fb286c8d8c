"""Decode-time scores of cluster centroids (ClusterKV) and page digests (Quest, FreeKV).

Query heads are grouped by KV head: q [B, Hq, d] is scored against the centroids/digests of
its own KV head. Scores are float32; invalid entries score -inf.

Both Pallas kernels are written for the Triton lowering on GPU (selected by
`compat.compiler_params`): static power-of-two blocks, elementwise products and row sums
instead of a [G, d] x [d, C] matmul (Triton's dot rejects G < 16), and the [G, d]
query-group block zero-padded to a power of two (3 -> 4; padded rows are never computed).

Verified: CPU interpret mode (jax 0.10) and, for float32 inputs, compiled for an H100 (jax
0.11.2, Triton). The bfloat16 test cases gave wrong scores there. Their last block (130
entries in blocks of 32) overflowed every row into the next and, with G = 4, no padding row
caught the last row's overflow, which landed in the next KV head's scores: the likely cause
is that unpadded block (now padded), not bfloat16. Until bfloat16 has matched the reference
on a GPU it is refused there. Not yet run on a TPU.
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
from pallas_kernels.compat import SQUEEZED, compiler_params, page_bounds_as_matmuls, resolve_interpret


def check_centroid_operands(q, centroids, valid) -> None:
    """Refuse operands whose shapes or dtypes do not fit together, naming the operand."""
    check_operands("centroid_scores", q=(q, "B Hq d", "float"), centroids=(centroids, "B Hkv C d", "float"),
                   valid=(valid, "B Hkv C", "bool"))


def check_page_operands(q, page_min, page_max, valid) -> None:
    """Refuse operands whose shapes or dtypes do not fit together, naming the operand."""
    check_operands("page_scores", q=(q, "B Hq d", "float"), page_min=(page_min, "B Hkv P d", "float"),
                   page_max=(page_max, "B Hkv P d", "float"), valid=(valid, "B Hkv P", "bool"))


def _grouped(q: jax.Array, num_kv_heads: int) -> jax.Array:
    b, hq, d = q.shape
    return q.reshape(b, num_kv_heads, hq // num_kv_heads, d).astype(jnp.float32)


def centroid_scores_reference(q: jax.Array, centroids: jax.Array, valid: jax.Array) -> jax.Array:
    """Raw dot products `q_h . mu_c`: q [B, Hq, d], centroids [B, Hkv, C, d], valid
    [B, Hkv, C] bool -> [B, Hq, C] float32."""
    check_centroid_operands(q, centroids, valid)
    b, hkv, c, _ = centroids.shape
    s = jnp.einsum("bhgd,bhcd->bhgc", _grouped(q, hkv), centroids.astype(jnp.float32))
    return jnp.where(valid[:, :, None], s, -jnp.inf).reshape(b, -1, c)


def page_scores_reference(
    q: jax.Array, page_min: jax.Array, page_max: jax.Array, valid: jax.Array
) -> jax.Array:
    """Quest's upper bound `sum_d max(q[d] * min[d], q[d] * max[d])` per page.

    q [B, Hq, d], page_min/page_max [B, Hkv, P, d], valid [B, Hkv, P] bool -> [B, Hq, P].
    """
    check_page_operands(q, page_min, page_max, valid)
    b, hkv, p, _ = page_min.shape
    qg = _grouped(q, hkv)[:, :, :, None, :]
    lo = qg * page_min.astype(jnp.float32)[:, :, None]
    hi = qg * page_max.astype(jnp.float32)[:, :, None]
    s = jnp.maximum(lo, hi).sum(axis=-1)
    return jnp.where(valid[:, :, None], s, -jnp.inf).reshape(b, -1, p)


def page_scores_matmul(
    q: jax.Array, page_min: jax.Array, page_max: jax.Array, valid: jax.Array
) -> jax.Array:
    """`page_scores_reference` as two matrix products (same arguments and result).

    Since `min <= max` in every dimension, `max(q[d] * min[d], q[d] * max[d])` is `q[d] *
    max[d]` where `q[d] >= 0` and `q[d] * min[d]` elsewhere, so the bound is `max(q, 0) .
    max + min(q, 0) . min`: the same products, summed in another order (equal to float
    tolerance for finite digests; an infinite digest entry gives NaN here, where the
    reference gives NaN only if `q[d] = 0`). On a CPU the two products run as matrix
    multiplications, 1.8-3.2x faster than the element-wise reduction at 128-2048 pages
    (`bench/page_scores.py`); `page_scores` uses this form there only
    (`compat.page_bounds_as_matmuls`).
    """
    check_page_operands(q, page_min, page_max, valid)
    b, hkv, p, _ = page_min.shape
    qg = _grouped(q, hkv)
    product = functools.partial(jnp.einsum, "bhgd,bhpd->bhgp", precision=jax.lax.Precision.HIGHEST)
    s = product(jnp.maximum(qg, 0.0), page_max.astype(jnp.float32)) + product(
        jnp.minimum(qg, 0.0), page_min.astype(jnp.float32)
    )
    return jnp.where(valid[:, :, None], s, -jnp.inf).reshape(b, -1, p)


# ----------------------------------------------------------------------------------------
# Pallas kernels
# ----------------------------------------------------------------------------------------


def _centroid_kernel(q_ref, c_ref, valid_ref, out_ref, *, group):
    c = c_ref[...].astype(jnp.float32)  # [bc, d], read once for the whole query group
    ok = valid_ref[...] != 0  # [bc]
    for h in range(group):  # static unroll over the group's real query heads
        qh = q_ref[pl.ds(h, 1), :].astype(jnp.float32)  # [1, d]
        out_ref[h, :] = jnp.where(ok, jnp.sum(c * qh, axis=1), -jnp.inf)


def _page_kernel(q_ref, lo_ref, hi_ref, valid_ref, out_ref, *, group):
    lo = lo_ref[...].astype(jnp.float32)  # [bp, d]
    hi = hi_ref[...].astype(jnp.float32)
    ok = valid_ref[...] != 0
    for h in range(group):
        qh = q_ref[pl.ds(h, 1), :].astype(jnp.float32)  # [1, d]
        s = jnp.sum(jnp.maximum(qh * lo, qh * hi), axis=1)
        out_ref[h, :] = jnp.where(ok, s, -jnp.inf)


def _grouped_call(kernel, q, tables, valid, *, interpret, block, name):
    """Grid (B, Hkv, blocks of `block` entries): one step scores one block of one KV head's
    entries against all G query heads of that head. Entries are padded to whole blocks
    (invalid) and sliced back: Triton does not mask a partial block (`tiled_block_spec`)."""
    b, hq, d = q.shape
    _, hkv, c, _ = tables[0].shape
    g = hq // hkv
    gp = next_power_of_2(g)  # rows >= g are padding: zero in q, never written in out
    qg = pad_axis(q.reshape(b, hkv, g, d), 2, gp)
    bc = min(next_power_of_2(block), next_power_of_2(c))
    c_pad = pl.cdiv(c, bc) * bc
    tables = [pad_axis(t, 2, c_pad) for t in tables]
    valid = pad_axis(valid.astype(jnp.int32), 2, c_pad)
    table_spec = tiled_block_spec(tables[0].shape, (SQUEEZED, SQUEEZED, bc, d), lambda i, h, j: (i, h, j, 0))
    out = pl.pallas_call(
        functools.partial(kernel, group=g),
        out_shape=jax.ShapeDtypeStruct((b, hkv, gp, c_pad), jnp.float32),
        grid=(b, hkv, c_pad // bc),
        in_specs=[
            tiled_block_spec(qg.shape, (SQUEEZED, SQUEEZED, gp, d), lambda i, h, j: (i, h, 0, 0)),
            *([table_spec] * len(tables)),
            tiled_block_spec(valid.shape, (SQUEEZED, SQUEEZED, bc), lambda i, h, j: (i, h, j)),
        ],
        out_specs=tiled_block_spec((b, hkv, gp, c_pad), (SQUEEZED, SQUEEZED, gp, bc), lambda i, h, j: (i, h, 0, j)),
        compiler_params=compiler_params(("parallel", "parallel", "parallel"), interpret),
        interpret=interpret,
        name=name,
    )(qg, *tables, valid)
    return out[:, :, :g, :c].reshape(b, hq, c)


@functools.partial(jax.jit, static_argnames=("interpret", "block"))
def _centroid_scores_pallas(q, centroids, valid, *, interpret, block):
    return _grouped_call(
        _centroid_kernel, q, (centroids,), valid, interpret=interpret, block=block,
        name="centroid_scores",
    )


@functools.partial(jax.jit, static_argnames=("interpret", "block"))
def _page_scores_pallas(q, page_min, page_max, valid, *, interpret, block):
    return _grouped_call(
        _page_kernel, q, (page_min, page_max), valid, interpret=interpret, block=block,
        name="page_scores",
    )


def centroid_scores_pallas(
    q: jax.Array,
    centroids: jax.Array,
    valid: jax.Array,
    *,
    interpret: bool | None = None,
    block: int = 512,
) -> jax.Array:
    """Pallas version of `centroid_scores_reference` (same arguments and result).

    Grid (B, Hkv, blocks of `block` clusters): each step reads a block of one KV head's
    centroids once and scores it against all G query heads of the group (static unroll).

    Verification status and GPU design: see the module docstring.
    """
    check_centroid_operands(q, centroids, valid)
    interpret = resolve_interpret(interpret)
    if centroids.dtype != jnp.float32:
        refuse_unverified_gpu("centroid_scores", interpret, f"{centroids.dtype} centroids were wrong on an H100")
    return _centroid_scores_pallas(q, centroids, valid, interpret=interpret, block=block)


def page_scores_pallas(
    q: jax.Array,
    page_min: jax.Array,
    page_max: jax.Array,
    valid: jax.Array,
    *,
    interpret: bool | None = None,
    block: int = 512,
) -> jax.Array:
    """Pallas version of `page_scores_reference` (same arguments and result).

    Grid (B, Hkv, blocks of `block` pages): each step reads a block of one KV head's page
    min/max digests once and computes Quest's bound for all G query heads of the group.

    Verification status and GPU design: see the module docstring.
    """
    check_page_operands(q, page_min, page_max, valid)
    interpret = resolve_interpret(interpret)
    if page_min.dtype != jnp.float32:
        refuse_unverified_gpu("page_scores", interpret, f"{page_min.dtype} digests were wrong on an H100")
    return _page_scores_pallas(q, page_min, page_max, valid, interpret=interpret, block=block)


def centroid_scores(
    q: jax.Array, centroids: jax.Array, valid: jax.Array, *, impl: str = "xla"
) -> jax.Array:
    """ClusterKV centroid scores; `impl="xla"` (reference) or `"pallas"` (kernel)."""
    check_impl(impl)
    if impl == "pallas":
        return centroid_scores_pallas(q, centroids, valid)
    return centroid_scores_reference(q, centroids, valid)


def page_scores(
    q: jax.Array,
    page_min: jax.Array,
    page_max: jax.Array,
    valid: jax.Array,
    *,
    impl: str = "xla",
) -> jax.Array:
    """Quest page scores; `impl="xla"` (the reference, as matrix products on a CPU:
    `page_scores_matmul`) or `"pallas"` (kernel)."""
    check_impl(impl)
    if impl == "pallas":
        return page_scores_pallas(q, page_min, page_max, valid)
    if page_bounds_as_matmuls():
        return page_scores_matmul(q, page_min, page_max, valid)
    return page_scores_reference(q, page_min, page_max, valid)
