"""Small helpers shared by the kernels (not version-sensitive)."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.experimental.pallas as pl
import jax.numpy as jnp

from pallas_kernels.compat import SQUEEZED


def next_power_of_2(x: int) -> int:
    """Smallest power of two >= x (>= 1). Triton needs power-of-two in-kernel shapes."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


IMPLS = ("xla", "pallas")


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")


def tiled_block_spec(array_shape: Sequence[int], block_shape: Sequence[Any], index_map: Callable) -> Any:
    """`pl.BlockSpec(block_shape, index_map)` for an operand of `array_shape` that the blocks
    tile exactly (every dimension a multiple of its block; squeezed dimensions count as 1).

    Triton's lowering does not mask partial blocks: the last block of a dimension that is
    not a multiple reads past the row's end and, for an output, writes into the next row
    (another problem, head or sequence), racing with the program that owns it. Interpret
    mode and Mosaic TPU clip instead, so only a GPU shows it. Wrappers pad their operands
    to whole blocks and slice the results; this refuses any spec that would not tile.
    """
    if len(array_shape) != len(block_shape):
        raise ValueError(f"block {tuple(block_shape)} has another rank than array {tuple(array_shape)}")
    for dim, (size, block) in enumerate(zip(array_shape, block_shape)):
        step = 1 if block is SQUEEZED else block
        if size % step:
            raise ValueError(f"block {tuple(block_shape)} does not tile array {tuple(array_shape)} "
                             f"(dimension {dim}: {size} is not a multiple of {step}); pad to whole blocks")
    return pl.BlockSpec(tuple(block_shape), index_map)


def pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    """`x` padded with `value` at the end of `axis` to `size` entries (unchanged if already there)."""
    extra = size - x.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot pad axis {axis} of {x.shape} down to {size}")
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


# Set to 1 to compile the refused kernels on a GPU anyway: for the GPU test run that checks
# them against their references (tests/pallas_kernels), never for results.
ALLOW_UNVERIFIED_ENV = "KVJAX_ALLOW_UNVERIFIED_GPU_KERNELS"


def refuse_unverified_gpu(kernel: str, interpret: bool, why: str) -> None:
    """Refuse to compile `kernel` for a GPU until it has matched its reference there: a wrong
    answer must not pass silently (bench/results/gpu-tests-2026-11-23.md: jax 0.11.2's
    Triton lowering on an H100). Interpret mode and `impl="xla"` are unaffected;
    `$KVJAX_ALLOW_UNVERIFIED_GPU_KERNELS=1` lets a verification run compile it."""
    if interpret or jax.default_backend() not in ("gpu", "cuda", "rocm"):
        return
    if os.environ.get(ALLOW_UNVERIFIED_ENV) == "1":
        return
    raise NotImplementedError(
        f"the Pallas kernel {kernel} is not verified on GPUs ({why}); use impl='xla' on GPUs, or set "
        f"{ALLOW_UNVERIFIED_ENV}=1 to run it against its reference (tests/pallas_kernels)")


_KINDS = {"float": jnp.floating, "int": jnp.integer, "bool": jnp.bool_}


def check_operands(op: str, known: dict[str, tuple[str, int]] | None = None,
                   **operands: tuple[Any, str, str]) -> dict[str, int]:
    """Check each operand's layout and dtype kind before any kernel or reference sees it.

    `operands`: name -> (array, layout, kind), e.g. `k=(k, "B Hkv S d", "float")`; a
    dimension named twice must agree everywhere, and kind is "float", "int" or "bool".
    `known` fixes dimensions that a scalar argument sets (`{"block": ("block_size", 16)}`).
    Query heads share KV heads in equal groups (GQA): where both are named, Hq must be a
    multiple of Hkv.
    The checks run while tracing (shapes are static), so they cost nothing at run time; they
    turn a mismatch, which the Pallas kernels would otherwise read past silently and the
    references report as a reshape or broadcasting error, into one that names the operand
    and the dimension. Returns the dimension sizes.
    """
    sizes = {dim: size for dim, (_, size) in (known or {}).items()}
    source = {dim: f"{argument}={size}" for dim, (argument, size) in (known or {}).items()}
    for name, (array, layout, kind) in operands.items():
        dims = layout.split()
        shape = tuple(getattr(array, "shape", ()))
        if len(shape) != len(dims):
            raise ValueError(f"{op}: {name} must be [{', '.join(dims)}], got shape {shape}")
        for dim, size in zip(dims, shape):
            if dim in sizes and sizes[dim] != size:
                raise ValueError(f"{op}: {name} has {dim}={size} (shape {shape}, [{', '.join(dims)}]), "
                                 f"but {source[dim]}")
            if dim not in sizes:
                sizes[dim], source[dim] = size, f"{name} has {dim}={size}"
        dtype = getattr(array, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, _KINDS[kind]):
            raise TypeError(f"{op}: {name} must hold {kind} values, got dtype {dtype}")
    if "Hq" in sizes and "Hkv" in sizes and (sizes["Hkv"] < 1 or sizes["Hq"] % sizes["Hkv"]):
        raise ValueError(f"{op}: {source['Hq']} heads, not a multiple of the Hkv={sizes['Hkv']} KV heads")
    return sizes
