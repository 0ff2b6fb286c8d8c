"""Argument checks shared by the public entry points; each error names the argument.

`is_integer` is what "an integer" means for sizes and counts given at run time (`CacheSpec`,
`generate`, `perplexity`, `StreamSession`): Python and numpy integers, not bools. Method
hyperparameters are stricter (`kvjax.methods.base.check_int`: Python `int` only), because
they are written to result JSON by `Method.describe`.
"""

from __future__ import annotations

import numbers
from typing import Any


def is_integer(value: Any) -> bool:
    """True for Python and numpy integers; False for bools (an `int` subclass) and the rest."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(name: str, value: Any, minimum: int = 1) -> None:
    """Raise unless `value` is an integer >= `minimum`, naming it as `name`."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
