"""Version- and backend-sensitive Pallas API, kept in one place.

jax 0.10.x (this CPU machine) and 0.11.x (the GPU machine) are supported. Everything that
has been renamed or moved between Pallas releases (squeezed block dimensions, scalar-prefetch
grid specs, backend compiler-parameter classes) is reached through this module only.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.experimental.pallas as pl

# A block dimension of size 1 that the kernel does not see. `pl.squeezed` appeared in
# jax 0.6; `None` is the older spelling, still accepted in 0.10.
SQUEEZED: Any = getattr(pl, "squeezed", None)


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means interpret mode wherever Pallas has no lowering (the CPU backend)."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def page_bounds_as_matmuls() -> bool:
    """Whether XLA page scores are computed as two matrix products (`page_scores_matmul`):
    on a CPU they are 1.8-3.2x faster than the element-wise reduction
    (`bench/page_scores.py`). Elsewhere the reduction stays: it compiles to 2 operations
    where the products take 5 (counted on the CPU), and at these sizes a decode step on a
    GPU is bound by kernel launches (the GPU side is not measured yet)."""
    return jax.default_backend() == "cpu"


def default_scalar_prefetch(scalar_prefetch: bool | None, interpret: bool) -> bool:
    """Scalar prefetch (indices in SMEM before the grid runs) is a TPU (Mosaic) feature;
    Triton and Mosaic GPU take indices as ordinary blocked inputs."""
    if scalar_prefetch is None:
        return jax.default_backend() == "tpu" and not interpret
    return bool(scalar_prefetch)


def scalar_prefetch_grid_spec(
    num_scalar_prefetch: int,
    grid: tuple[int, ...],
    in_specs: Sequence[Any],
    out_specs: Any,
    scratch_shapes: Sequence[Any] = (),
) -> Any:
    """A grid spec whose first `num_scalar_prefetch` operands are passed whole (in SMEM on
    TPU) to every index map and to the kernel. Lives in `pallas.tpu` in jax 0.10/0.11."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=num_scalar_prefetch,
        grid=grid,
        in_specs=list(in_specs),
        out_specs=out_specs,
        scratch_shapes=list(scratch_shapes),
    )


def compiler_params(dimension_semantics: Sequence[str], interpret: bool) -> Any:
    """Backend compiler parameters for our kernels, or None in interpret mode.

    TPU (Mosaic): grid axes marked "parallel" may be split across cores. The class was
    `TPUCompilerParams` before jax 0.7 and is `CompilerParams` since.

    GPU: our kernels are written for the Triton lowering (one program per grid step, array
    ops on power-of-two blocks). Since jax 0.9/0.10 `pallas_call` lowers to Mosaic GPU unless
    `jax_pallas_use_mosaic_gpu` is off or Triton compiler parameters are passed, so we pass
    them. The Triton backend is deprecated in jax 0.11 but still present; the class was
    `TritonCompilerParams` before jax 0.7.
    """
    if interpret:
        return None
    backend = jax.default_backend()
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
        return cls(dimension_semantics=tuple(dimension_semantics))
    if backend in ("gpu", "cuda", "rocm"):
        from jax.experimental.pallas import triton as pltriton

        cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
        return cls()
    return None
