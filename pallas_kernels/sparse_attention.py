"""Decode attention over tokens (or pages) selected by index, returning a mergeable part.

Each query head attends to its own selection of blocks of `block_size` consecutive cache
slots (`block_size=1`: single tokens, ClusterKV; `block_size=page_size`: pages, Quest and
FreeKV). The result is the normalised output over the selection and its log-sum-exp, so the
caller can merge it with other parts (sinks, window, current token) exactly.
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
    tiled_block_spec,
)
from pallas_kernels.compat import (
    SQUEEZED,
    compiler_params,
    default_scalar_prefetch,
    resolve_interpret,
    scalar_prefetch_grid_spec,
)

# Score of masked entries; a part with nothing valid gets lse ~ MASKED and weight 0 when merged.
MASKED = -1e30


def check_attention_operands(q, k, v, indices, valid, block_size: int) -> None:
    """Refuse operands whose shapes or dtypes do not fit together, naming the operand."""
    op = "sparse_decode_attention"
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"{op}: block_size must be an integer >= 1, got {block_size!r}")
    valid_layout = "B Hq n block" if getattr(valid, "ndim", 0) == 4 else "B Hq n"
    sizes = check_operands(
        op, {"block": ("block_size", block_size)},
        q=(q, "B Hq d", "float"), k=(k, "B Hkv S d", "float"), v=(v, "B Hkv S d", "float"),
        indices=(indices, "B Hq n", "int"), valid=(valid, valid_layout, "bool"),
    )
    if sizes["S"] % block_size:
        raise ValueError(f"{op}: the cache length S={sizes['S']} of k and v is not a multiple of "
                         f"block_size={block_size}")


def sparse_decode_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    valid: jax.Array,
    block_size: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Attention of each query head over its selected blocks.

    q [B, Hq, d]; k, v [B, Hkv, S, d] with S a multiple of block_size; indices [B, Hq, n]
    int32 block numbers (token slots when block_size == 1); valid [B, Hq, n] or
    [B, Hq, n, block_size] bool. Returns (out [B, Hq, d] float32, lse [B, Hq] float32) with
    scores scaled by 1/sqrt(d).
    """
    check_attention_operands(q, k, v, indices, valid, block_size)
    b, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    n = indices.shape[-1]
    # Gather per query head: [B, Hq, n, block, d] (what the Pallas kernel avoids materialising).
    # Whole blocks, taken per (sequence, KV head) from that head's [blocks, block * d] view: a
    # gather whose batch and head dimensions are explicit, so that on a device mesh XLA keeps
    # it on the devices holding those rows and heads (a take from the flattened cache made it
    # gather the whole cache onto every device), and as fast on one CPU.
    blocks = s // block_size
    local = jnp.where(indices < 0, indices + blocks, indices)  # negative indices wrap, as in jnp
    by_kv_head = jnp.clip(local, 0, blocks - 1).reshape(b, hkv, g * n, 1)  # a KV head's query heads together
    gather = lambda x: jnp.take_along_axis(x.reshape(b, hkv, blocks, block_size * d), by_kv_head, axis=2).reshape(
        b, hq, n * block_size, d).astype(jnp.float32)
    kg, vg = gather(k), gather(v)
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    scores = jnp.einsum("bhd,bhsd->bhs", q.astype(jnp.float32), kg) * scale
    mask = valid if valid.ndim == 4 else jnp.broadcast_to(valid[..., None], (b, hq, n, block_size))
    scores = jnp.where(mask.reshape(b, hq, n * block_size), scores, MASKED)
    m = scores.max(axis=-1)
    p = jnp.exp(scores - m[..., None])
    total = p.sum(axis=-1)
    out = jnp.einsum("bhs,bhsd->bhd", p, vg) / total[..., None]
    return out, m + jnp.log(total)


# ----------------------------------------------------------------------------------------
# Pallas kernel
# ----------------------------------------------------------------------------------------


def _chunk_kernel(*refs, n, cb, bs, scale, prefetch):
    """One (batch, query head, chunk) step: online softmax over the chunk's `cb` blocks.

    Each block is read by index straight from the KV head's [S, d] cache slab with a
    dynamic `pl.ds` slice; nothing is gathered outside the kernel.
    """
    if prefetch:  # indices: the whole [B, Hq, n_pad] array (SMEM on TPU)
        idx_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, m_ref, l_ref = refs
        bi, hi, ci = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        block_index = lambda j: idx_ref[bi, hi, ci * cb + j]
    else:  # indices: this chunk's [cb] slice
        q_ref, idx_ref, k_ref, v_ref, mask_ref, o_ref, m_ref, l_ref = refs
        ci = pl.program_id(2)
        block_index = lambda j: idx_ref[j]
    q = q_ref[...].astype(jnp.float32)  # [1, d]

    def body(j, carry):
        m, l, acc = carry  # [1, 1], [1, 1], [1, d]
        start = pl.multiple_of(block_index(j) * bs, bs)
        kb = k_ref[pl.ds(start, bs), :].astype(jnp.float32)  # [bs, d]
        vb = v_ref[pl.ds(start, bs), :].astype(jnp.float32)
        s = jnp.sum(kb * q, axis=1, keepdims=True) * scale  # [bs, 1]
        s = jnp.where(mask_ref[pl.ds(j * bs, bs), :] != 0, s, MASKED)
        # Entries past n are padding: weight exactly 0 (masked entries weigh as in the
        # reference, so a fully masked row gives the reference's result too).
        s = jnp.where(ci * cb + j < n, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=0, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)  # [bs, 1]
        l = alpha * l + jnp.sum(p, axis=0, keepdims=True)
        acc = alpha * acc + jnp.sum(p * vb, axis=0, keepdims=True)
        return m_new, l, acc

    # m starts at MASKED (not -inf) so that exp(m - m_new) is never exp(-inf + inf).
    init = (
        jnp.full((1, 1), MASKED, jnp.float32),
        jnp.zeros((1, 1), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, cb, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(
    jax.jit, static_argnames=("block_size", "interpret", "chunk", "scalar_prefetch")
)
def _sparse_decode_attention_pallas(
    q, k, v, indices, valid, *, block_size, interpret, chunk, scalar_prefetch
):
    b, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    n = indices.shape[-1]
    bs = block_size
    if n == 0:
        raise ValueError("sparse_decode_attention needs at least one selected block (n >= 1)")
    num_blocks = s // bs
    # Blocks per chunk: a power of two, at most `chunk` cache slots, no more than n needs.
    cb = min(1 << (max(1, chunk // bs).bit_length() - 1), next_power_of_2(n))
    nc = pl.cdiv(n, cb)
    n_pad = nc * cb

    # Index semantics of the reference's jnp gather: negative indices wrap, others clamp.
    idx = indices.astype(jnp.int32)
    idx = jnp.clip(jnp.where(idx < 0, idx + num_blocks, idx), 0, num_blocks - 1)
    mask = valid if valid.ndim == 4 else jnp.broadcast_to(valid[..., None], (b, hq, n, bs))
    # Padded to whole chunks: small per-head metadata only; K/V are never padded or copied.
    idx = pad_axis(idx, 2, n_pad)
    mask = pad_axis(mask.astype(jnp.int32), 2, n_pad).reshape(b, hq, n_pad * bs, 1)

    kernel = functools.partial(
        _chunk_kernel, n=n, cb=cb, bs=bs, scale=1.0 / float(d) ** 0.5, prefetch=scalar_prefetch
    )
    out_shape = (
        jax.ShapeDtypeStruct((b, hq, nc, d), jnp.float32),  # unnormalised chunk outputs
        jax.ShapeDtypeStruct((b, hq, nc, 1), jnp.float32),  # chunk max
        jax.ShapeDtypeStruct((b, hq, nc, 1), jnp.float32),  # chunk sum of exp(s - max)
    )
    grid = (b, hq, nc)
    # With scalar prefetch, index maps also receive the prefetched refs (ignored here).
    im = lambda f: (lambda i, h, c, *_: f(i, h, c))
    q4 = q.reshape(b, hq, 1, d)
    q_spec = tiled_block_spec(q4.shape, (SQUEEZED, SQUEEZED, 1, d), im(lambda i, h, c: (i, h, 0, 0)))
    # The whole [S, d] slab of the query head's KV head; blocks are sliced out by index.
    kv_spec = tiled_block_spec(k.shape, (SQUEEZED, SQUEEZED, s, d), im(lambda i, h, c: (i, h // g, 0, 0)))
    mask_spec = tiled_block_spec(mask.shape, (SQUEEZED, SQUEEZED, cb * bs, 1), im(lambda i, h, c: (i, h, c, 0)))
    stat_specs = tuple(
        tiled_block_spec(o.shape, (SQUEEZED, SQUEEZED, 1, o.shape[-1]), im(lambda i, h, c: (i, h, c, 0)))
        for o in out_shape
    )
    params = compiler_params(("parallel", "parallel", "parallel"), interpret)
    if scalar_prefetch:
        grid_spec = scalar_prefetch_grid_spec(
            1, grid, [q_spec, kv_spec, kv_spec, mask_spec], stat_specs
        )
        acc, m, l = pl.pallas_call(
            kernel, out_shape=out_shape, grid_spec=grid_spec, compiler_params=params,
            interpret=interpret, name="sparse_decode_attention",
        )(idx, q4, k, v, mask)
    else:
        idx_spec = tiled_block_spec(idx.shape, (SQUEEZED, SQUEEZED, cb), lambda i, h, c: (i, h, c))
        acc, m, l = pl.pallas_call(
            kernel, out_shape=out_shape, grid=grid,
            in_specs=[q_spec, idx_spec, kv_spec, kv_spec, mask_spec], out_specs=stat_specs,
            compiler_params=params, interpret=interpret, name="sparse_decode_attention",
        )(q4, idx, k, v, mask)

    # Log-sum-exp merge of the chunks (split-K epilogue; tiny: [B, Hq, nc]).
    m_all = jnp.max(m, axis=2, keepdims=True)  # [B, Hq, 1, 1]
    w = jnp.exp(m - m_all)  # [B, Hq, nc, 1]
    total = jnp.sum(w * l, axis=2)  # [B, Hq, 1]
    out = jnp.sum(w * acc, axis=2) / total
    return out, m_all[:, :, 0, 0] + jnp.log(total[:, :, 0])


def sparse_decode_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    valid: jax.Array,
    block_size: int = 1,
    *,
    interpret: bool | None = None,
    chunk: int = 128,
    scalar_prefetch: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pallas version of `sparse_decode_attention_reference` (same arguments and result).

    Split-K ("flash decoding"): grid (B, Hq, chunks). Each query head's n selected blocks
    are cut into chunks of `chunk` cache slots (rounded to a power-of-two number of blocks,
    at least one block, at most what n needs; n is padded to whole chunks with weight-0
    entries). A step loops (`fori_loop`) over its chunk's blocks, reads each one by index
    from the full k/v cache with a dynamic `pl.ds` slice (no gathered copy of K/V exists),
    and keeps an online-softmax (max, sum, unnormalised output). A jnp epilogue merges the
    chunks with log-sum-exp into (out [B, Hq, d] float32, lse [B, Hq] float32).

    Indices follow the reference's gather: negative ones wrap once, out-of-range ones clamp.
    `scalar_prefetch` (default: on TPU only) passes the indices whole as a scalar-prefetch
    operand (SMEM) instead of as a blocked input.

    Fully masked rows (no valid entry): the contract is lse <= -1e29 (weight 0 when merged)
    and a finite out. This kernel happens to reproduce the reference there too (lse =
    MASKED + log(n * block_size), out = mean of the gathered v), but callers must not rely
    on that; tests check only the contract.

    Verified: CPU interpret mode (jax 0.10), both index paths, and compiled for an H100
    (jax 0.11.2, Triton; the blocked index path: Triton has no scalar prefetch). Not yet run
    on a TPU. Written for the Triton lowering on GPU, which `compat.compiler_params` selects
    (jax >= 0.10 defaults to Mosaic GPU, which this kernel does not target): static
    power-of-two in-kernel shapes
    [block_size, d], [1, d], [1, 1] (d a power of two); scalar index reads and dynamic slices
    inside `fori_loop`; the [S, d] slab is a pointer on GPU, only the selected rows are
    loaded. On
    TPU the slab block would be copied to VMEM whole, which bounds S * d; a production TPU
    version would keep K/V in HBM (`memory_space=pl.ANY`) and DMA the selected blocks.
    Block size 1 means one [1, d] load per token, which is slow on every backend.
    """
    check_attention_operands(q, k, v, indices, valid, block_size)
    interpret = resolve_interpret(interpret)
    return _sparse_decode_attention_pallas(
        q,
        k,
        v,
        indices,
        valid,
        block_size=block_size,
        interpret=interpret,
        chunk=chunk,
        scalar_prefetch=default_scalar_prefetch(scalar_prefetch, interpret),
    )


def sparse_decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    valid: jax.Array,
    block_size: int = 1,
    *,
    impl: str = "xla",
) -> tuple[jax.Array, jax.Array]:
    """Attention over blocks selected by index; `impl="xla"` (reference) or `"pallas"`."""
    check_impl(impl)
    if impl == "pallas":
        return sparse_decode_attention_pallas(q, k, v, indices, valid, block_size)
    return sparse_decode_attention_reference(q, k, v, indices, valid, block_size)
