"""Small helpers shared by the kernels (not version-sensitive)."""

from __future__ import annotations

import jax


def next_power_of_2(x: int) -> int:
    """Smallest power of two >= x (>= 1). Triton needs power-of-two in-kernel shapes."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


IMPLS = ("xla", "pallas")


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")


def refuse_unverified_gpu(kernel: str, interpret: bool, why: str) -> None:
    """Refuse to compile `kernel` for a GPU where it gave wrong results (jax 0.11.2's Triton
    lowering on an H100, bench/results/gpu-tests-2026-11-23.md): a wrong answer must not pass
    silently. Interpret mode and `impl="xla"` are unaffected."""
    if not interpret and jax.default_backend() in ("gpu", "cuda", "rocm"):
        raise NotImplementedError(
            f"the Pallas kernel {kernel} disagrees with its reference when compiled for a GPU "
            f"({why}); use impl='xla' on GPUs")
