"""Small helpers shared by the kernels (not version-sensitive)."""

from __future__ import annotations


def next_power_of_2(x: int) -> int:
    """Smallest power of two >= x (>= 1). Triton needs power-of-two in-kernel shapes."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


IMPLS = ("xla", "pallas")


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
