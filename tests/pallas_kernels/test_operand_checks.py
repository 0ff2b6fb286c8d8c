"""Every kernel and its reference refuse operands that do not fit together, naming the
operand and the dimension, before anything runs.

Before these checks the Pallas kernels accepted many such mismatches silently (a `v` shorter
than `k`, centroids with another head size, labels for fewer keys: the kernels read past or
short of the rows and returned numbers), and the references failed with reshape or
broadcasting errors that named neither the kernel nor the operand.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

B, HQ, HKV, S, D, N = 1, 4, 2, 32, 8, 5


def normal(*shape):
    return jnp.asarray(np.random.default_rng(len(shape)).standard_normal(shape), jnp.float32)


def mask(*shape):
    return jnp.ones(shape, bool)


def attention(impl, *, q=None, k=None, v=None, indices=None, valid=None, block_size=1):
    """sparse_decode_attention on well-formed operands, with the given ones replaced."""
    pick = lambda given, default: default if given is None else given
    return pk.sparse_decode_attention(
        pick(q, normal(B, HQ, D)), pick(k, normal(B, HKV, S, D)), pick(v, normal(B, HKV, S, D)),
        pick(indices, jnp.zeros((B, HQ, N), jnp.int32)), pick(valid, mask(B, HQ, N)), block_size, impl=impl)


CASES = {
    "attention: q heads": (lambda impl: attention(impl, q=normal(B, 3, D)), ValueError,
                           r"sparse_decode_attention: indices has Hq=4 .*, but q has Hq=3"),
    "attention: query groups": (lambda impl: attention(impl, q=normal(B, 3, D), indices=jnp.zeros((B, 3, N), jnp.int32),
                                                       valid=mask(B, 3, N)), ValueError,
                                r"q has Hq=3 heads, not a multiple of the Hkv=2 KV heads"),
    "attention: head size": (lambda impl: attention(impl, q=normal(B, HQ, 16)), ValueError,
                             r"k has d=8 .*, but q has d=16"),
    "attention: v length": (lambda impl: attention(impl, v=normal(B, HKV, 16, D)), ValueError,
                            r"v has S=16 .*, but k has S=32"),
    "attention: valid length": (lambda impl: attention(impl, valid=mask(B, HQ, 3)), ValueError,
                                r"valid has n=3 .*, but indices has n=5"),
    "attention: valid blocks": (lambda impl: attention(impl, valid=mask(B, HQ, N, 4), block_size=8), ValueError,
                                r"valid has block=4 .*, but block_size=8"),
    "attention: block size": (lambda impl: attention(impl, block_size=3), ValueError,
                              r"the cache length S=32 of k and v is not a multiple of block_size=3"),
    "attention: float indices": (lambda impl: attention(impl, indices=jnp.zeros((B, HQ, N))), TypeError,
                                 r"indices must hold int values, got dtype float32"),
    "attention: int mask": (lambda impl: attention(impl, valid=jnp.ones((B, HQ, N), jnp.int32)), TypeError,
                            r"valid must hold bool values, got dtype int32"),
    "attention: rank": (lambda impl: attention(impl, k=normal(HKV, S, D)), ValueError,
                        r"k must be \[B, Hkv, S, d\], got shape \(2, 32, 8\)"),
    "centroids: head size": (lambda impl: pk.centroid_scores(normal(B, HQ, D), normal(B, HKV, 6, 16), mask(B, HKV, 6),
                                                             impl=impl), ValueError,
                             r"centroid_scores: centroids has d=16 .*, but q has d=8"),
    "centroids: valid": (lambda impl: pk.centroid_scores(normal(B, HQ, D), normal(B, HKV, 6, D), mask(B, HKV, 5),
                                                         impl=impl), ValueError,
                         r"valid has C=5 .*, but centroids has C=6"),
    "pages: min and max": (lambda impl: pk.page_scores(normal(B, HQ, D), normal(B, HKV, 6, D), normal(B, HKV, 5, D),
                                                       mask(B, HKV, 6), impl=impl), ValueError,
                           r"page_scores: page_max has P=5 .*, but page_min has P=6"),
    "assign: groups": (lambda impl: pk.kmeans_assign(normal(2, 10, D), normal(3, 3, D), mask(2, 10), mask(2, 3),
                                                     impl=impl), ValueError,
                       r"kmeans_assign: centroids has G=3 .*, but keys has G=2"),
    "update: labels": (lambda impl: pk.kmeans_update(normal(2, 10, D), jnp.zeros((2, 9), jnp.int32), normal(2, 3, D),
                                                     impl=impl), ValueError,
                       r"kmeans_update: labels has n=9 .*, but keys has n=10"),
    "update: float labels": (lambda impl: pk.kmeans_update(normal(2, 10, D), jnp.zeros((2, 10)), normal(2, 3, D),
                                                           impl=impl), TypeError,
                             r"kmeans_update: labels must hold int values"),
}


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("case", list(CASES))
def test_mismatched_operands_are_refused_by_name(case, impl):
    call, error, message = CASES[case]
    with pytest.raises(error, match=message):
        call(impl)


def test_page_scores_matmul_checks_too():
    with pytest.raises(ValueError, match=r"page_scores: valid has P=4 .*, but page_min has P=6"):
        pk.page_scores_matmul(normal(B, HQ, D), normal(B, HKV, 6, D), normal(B, HKV, 6, D), mask(B, HKV, 4))


def test_well_formed_operands_pass_in_every_dtype_the_methods_use():
    """bfloat16 caches and queries and narrow integer indices are accepted."""
    out, lse = attention("xla", q=normal(B, HQ, D).astype(jnp.bfloat16), k=normal(B, HKV, S, D).astype(jnp.bfloat16),
                         v=normal(B, HKV, S, D).astype(jnp.bfloat16), indices=jnp.zeros((B, HQ, N), jnp.int16))
    assert out.shape == (B, HQ, D) and lse.shape == (B, HQ) and bool(jnp.all(jnp.isfinite(out)))
