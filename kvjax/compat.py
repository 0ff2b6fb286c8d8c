"""Version- and backend-sensitive settings, kept in one place.

jax 0.10.x (Python 3.11, this CPU machine) and 0.11.x (the GPU machine) are supported.
"""

from __future__ import annotations

from typing import Any

import jax


def compiler_options() -> dict[str, Any]:
    """XLA options for our ahead-of-time compiled prefill/decode executables.

    On the CPU backend, XLA's default copy insertion copies every cache buffer that a step
    both reads and updates in place (the whole KV cache, every decode step: 3-4x slower at
    6k tokens for SmolLM2). Region-based analysis proves the read happens before the update
    and removes the copies (jax-ml/jax#25399). Other backends already do this.
    """
    if jax.default_backend() == "cpu":
        return {"xla_cpu_copy_insertion_use_region_analysis": True}
    return {}
