"""Pallas kernels, each beside its pure-jnp reference.

Each operation has a reference (`*_reference`, pure jnp, the semantics), a Pallas kernel
(`*_pallas`, interpret mode on CPU) and a dispatcher without suffix taking
`impl="xla" | "pallas"`. `check_operands` is the shape and dtype check they all run first
(kvjax's methods use it for their own inputs too).
"""

from pallas_kernels._util import check_operands
from pallas_kernels.kmeans import (
    kmeans_assign,
    kmeans_assign_pallas,
    kmeans_assign_reference,
    kmeans_update,
    kmeans_update_pallas,
    kmeans_update_reference,
)
from pallas_kernels.scores import (
    centroid_scores,
    centroid_scores_pallas,
    centroid_scores_reference,
    page_scores,
    page_scores_matmul,
    page_scores_pallas,
    page_scores_reference,
)
from pallas_kernels.sparse_attention import (
    MASKED,
    sparse_decode_attention,
    sparse_decode_attention_pallas,
    sparse_decode_attention_reference,
)

__all__ = [
    "MASKED",
    "centroid_scores",
    "centroid_scores_pallas",
    "centroid_scores_reference",
    "check_operands",
    "kmeans_assign",
    "kmeans_assign_pallas",
    "kmeans_assign_reference",
    "kmeans_update",
    "kmeans_update_pallas",
    "kmeans_update_reference",
    "page_scores",
    "page_scores_matmul",
    "page_scores_pallas",
    "page_scores_reference",
    "sparse_decode_attention",
    "sparse_decode_attention_pallas",
    "sparse_decode_attention_reference",
]
