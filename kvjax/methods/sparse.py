"""Shared frame of the query-aware sparse methods (Quest, ClusterKV, FreeKV).

The first `dense_layers` layers stay dense (`Full`): their attention is too spread out to
select from (ALGORITHMS.md section 0). Subclasses implement `sparse_init_cache`, `sparse_ingest` and `sparse_attend` for the
other layers, and the `impl` switch picks the Pallas kernels or their XLA references.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvjax.cache import CacheSpec
from kvjax.checks import check_count
from kvjax.methods.base import Method, check_layer_inputs
from kvjax.methods.full import Full

IMPLS = ("xla", "pallas")
_DENSE = Full()


@dataclasses.dataclass(frozen=True)
class SparseMethod(Method):
    budget: int = 1024
    dense_layers: int = 2
    impl: str = "xla"

    def check_hyperparameters(self) -> None:
        check_count("dense_layers", self.dense_layers, 0)
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")

    def init_cache(self, layer: int, spec: CacheSpec) -> Any:
        if layer < self.dense_layers:
            return _DENSE.init_cache(layer, spec)
        return self.sparse_init_cache(layer, spec)

    def ingest(self, layer, cache, k, v, lengths):
        check_layer_inputs(self, cache, k, v, lengths)
        if layer < self.dense_layers:
            return _DENSE.ingest(layer, cache, k, v, lengths)
        return self.sparse_ingest(layer, cache, k, v, lengths)

    def attend(self, layer, cache, q, k, v, lengths):
        check_layer_inputs(self, cache, k, v, lengths, q, decode=True)
        if layer < self.dense_layers:
            return _DENSE.attend(layer, cache, q, k, v, lengths)
        return self.sparse_attend(layer, cache, q, k, v, lengths)

    def sparse_init_cache(self, layer: int, spec: CacheSpec) -> Any:
        raise NotImplementedError

    def sparse_ingest(self, layer, cache, k, v, lengths):
        raise NotImplementedError

    def sparse_attend(self, layer, cache, q, k, v, lengths):
        raise NotImplementedError
